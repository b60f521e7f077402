"""R46: the bench harness killed by a signal mid-run resumes and ends where it would have."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["-m", "aro.bench.cli", "bench", "--preset", "smoke", "--steps", "40", "--eval-every", "4", "--no-progress"]


def run(out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *ARGS, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kw)


def without_timing(obj):
    """The summary minus wall-clock fields, which no two runs share."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if "time" not in k}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def summary(out: Path) -> dict:
    return without_timing(json.loads((out / "summary.json").read_text()))


def curves(out: Path) -> dict:
    return {d.name: [json.loads(x)["val_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in sorted((out / "runs").iterdir())}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_R46_killed_bench_resumes_losing_at_most_one_interval(tmp_path, sig):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert run(clean).wait(timeout=600) == 0
    proc = run(killed)
    deadline = time.time() + 300
    while not list(killed.glob("runs/*/checkpoint.pt")):  # a run is mid-way, with a checkpoint behind it
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    partial = list(killed.glob("runs/*/metrics.jsonl"))
    assert partial and not all((p.parent / "result.json").exists() for p in partial)
    assert run(killed).wait(timeout=600) == 0
    assert curves(killed) == curves(clean)
    assert summary(killed) == summary(clean)
    assert not list(killed.glob("runs/*/checkpoint.pt")) and not list(killed.glob("runs/*/.*tmp*"))
