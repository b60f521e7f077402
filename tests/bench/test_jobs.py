"""``aro bench --jobs N``: runs in worker processes give the runs of one process; the run lock."""

import json
import math
import os
import signal

import pytest
import torch

from aro.bench.cli import main
from aro.bench.config import BenchConfig, resolve
from aro.bench.data import load_corpus
from aro.bench.files import RunFolderBusy, run_lock
from aro.bench.jobs import threads_per_job
from aro.bench.train import RunSpec, run_training

# two optimizers, two seeds: 4 runs (the sweep's rounds are tested on _sweep in test_protocol.py)
ARGS = ["bench", "--preset", "smoke", "--optimizers", "adamw,aro-sinkhorn", "--lr-grid", "0.004", "--seeds", "2",
        "--threads", "1", "--no-progress"]


def _results(out):
    return {d.name: json.loads((d / "result.json").read_text()) for d in (out / "runs").iterdir()}


def test_jobs_train_the_runs_one_process_trains(tmp_path, capsys):
    assert main(ARGS + ["--out", str(tmp_path / "one")]) == 0
    assert main(ARGS + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 4
    for name in one:  # bit for bit: weights and batches depend on the seed, not on the process
        assert two[name]["final_val_loss"] == one[name]["final_val_loss"], name
        assert two[name]["threads"] == 1
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert {n: e["lr"] for n, e in s1["optimizers"].items()} == {n: e["lr"] for n, e in s2["optimizers"].items()}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and all("final val loss" in line for line in lines)  # one line per run a worker trained
    # resuming reads every finished run back without a worker; a changed --jobs is no new protocol
    stamps = {d.name: (d / "result.json").stat().st_mtime_ns for d in (tmp_path / "two" / "runs").iterdir()}
    assert main(ARGS + ["--out", str(tmp_path / "two"), "--jobs", "3"]) == 0
    assert stamps == {d.name: (d / "result.json").stat().st_mtime_ns for d in (tmp_path / "two" / "runs").iterdir()}
    assert "[1/" not in capsys.readouterr().out


def test_an_error_in_a_worker_stops_the_bench_and_names_the_run(tmp_path, capsys):
    out = tmp_path / "busy"
    held = out / "runs" / "aro-sinkhorn__lr0.004__seed0__steps12"
    with run_lock(held):  # as if another invocation were training this run
        assert main(ARGS + ["--out", str(out), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert str(held) in err and "another process" in err and "--jobs" in err
    assert not (held / "result.json").exists()


def test_a_worker_that_dies_raises_instead_of_hanging(tmp_path):
    import threading
    import time

    from aro.bench.jobs import RunPool

    cfg = resolve("smoke", {"out": str(tmp_path), "jobs": 2, "threads": 1})
    specs = [RunSpec("adamw", 2e-3, seed, 12) for seed in (0, 1)]
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("train_all waited for a dead worker"))
    signal.alarm(120)
    with RunPool(cfg, lambda spec: tmp_path / spec.name, say=lambda line: None) as pool:
        def kill_first_worker():  # as the OOM killer would, while it is still starting
            while True:
                try:
                    started = list(pool._running)
                except RuntimeError:  # the main thread added a worker meanwhile
                    continue
                if started:
                    return started[0].kill()
                time.sleep(0.001)

        killer = threading.Thread(target=kill_first_worker)
        killer.start()
        with pytest.raises(RuntimeError, match=r"exit code -9 and no result"):
            pool.train_all(specs)
        killer.join()
    signal.alarm(0)
    assert not pool._running  # the other worker was stopped


def test_one_worker_per_run_folder_even_when_a_run_is_listed_twice(tmp_path):
    from aro.bench.jobs import RunPool

    cfg = resolve("smoke", {"out": str(tmp_path), "jobs": 2, "threads": 1})
    spec = RunSpec("adamw", 2e-3, 0, 4)
    lines = []
    with RunPool(cfg, lambda s: tmp_path / s.name, say=lines.append) as pool:
        first, again = pool.train_all([spec, spec])
    assert first == again and first["spec"]["steps"] == 4
    assert len(lines) == 1 and lines[0].startswith("[1/1] adamw__lr0.002__seed0__steps4")


def test_a_second_process_on_a_run_folder_is_refused(tmp_path):
    cfg = resolve("smoke", {"out": str(tmp_path), "steps": 2})
    spec = RunSpec("adamw", 2e-3, 0, 2)
    with run_lock(tmp_path / spec.name):
        with pytest.raises(RunFolderBusy, match="being trained by another process"):
            run_training(cfg, spec, load_corpus(None), tmp_path / spec.name, progress=False)
    # released: the run trains, and once finished it is read back even while its lock is held
    result = run_training(cfg, spec, load_corpus(None), tmp_path / spec.name, progress=False)
    with run_lock(tmp_path / spec.name):
        assert run_training(cfg, spec, load_corpus(None), tmp_path / spec.name, progress=False) == result


def test_jobs_need_one_process_per_run_and_share_the_cores(tmp_path):
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        resolve("smoke", {"jobs": 0})
    assert threads_per_job(BenchConfig(jobs=2, threads=3)) == 3
    assert threads_per_job(BenchConfig(jobs=10**6)) == 1
    from aro.bench.parallel import Parallel
    from aro.bench.protocol import run_benchmark

    with pytest.raises(ValueError, match="--jobs 2 with --parallel ddp"):
        run_benchmark(resolve("smoke", {"jobs": 2, "out": str(tmp_path)}), par=Parallel(mode="ddp"))
    # config.json records the threads each run trains with, not those of the process handing them out
    from aro.bench.protocol import _write_config

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent's threads (--threads 0: torch's default)
    try:
        _write_config(resolve("smoke", {"jobs": 10**6, "out": str(tmp_path / "env")}), {}, Parallel())
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "env" / "config.json").read_text())["environment"]["threads"] == 1
    _write_config(resolve("smoke", {"jobs": 2, "threads": 3, "out": str(tmp_path / "given")}), {}, Parallel())
    assert json.loads((tmp_path / "given" / "config.json").read_text())["environment"]["threads"] == 3  # --threads


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/status").read().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # an exited child nobody has reaped yet is not running


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux")
def test_workers_die_with_a_killed_bench(tmp_path):
    """A killed `aro bench --jobs` leaves no orphaned run training on (and holding its lock)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    argv = [sys.executable, "-m", "aro.bench.cli", "bench", "--preset", "smoke", "--optimizers", "adamw",
            "--lr-grid", "0.002,0.004", "--steps", "100000", "--eval-every", "1000", "--jobs", "2", "--threads", "1",
            "--no-progress", "--out", str(tmp_path)]
    parent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.monotonic() + 60
    while len(children) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        children = [int(p) for t in Path(f"/proc/{parent.pid}/task").iterdir()
                    for p in (t / "children").read_text().split()
                    if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]  # not the resource tracker
    assert len(children) == 2, "the bench did not start its two workers"
    locks = [tmp_path / "runs" / f"adamw__lr{lr}__seed0__steps100000" / ".lock" for lr in ("0.002", "0.004")]
    while not all(lock.exists() for lock in locks) and time.monotonic() < deadline:
        time.sleep(0.2)  # both workers are training (the lock is taken after the exit signal is set)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in children if _alive(pid)]
    for pid in survivors:  # a failing test leaves no orphan burning the machine's cores
        os.kill(pid, signal.SIGKILL)
    assert not survivors


def test_given_lrs_send_seed_0_to_the_workers_with_the_other_seeds(tmp_path, monkeypatch):
    """With every lr given there is no sweep to wait for: one batch, so no worker idles while
    seed 0 trains alone. A sweep still comes first (its seeds wait for the chosen lr)."""
    from aro.bench import protocol
    from run_logs import write_run

    batches = []

    class RecordingPool:  # trains nothing: writes each run's logs, as a finished worker would
        def __init__(self, cfg, run_dir_of):
            self.out = cfg.out_dir

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def train_all(self, specs):
            batches.append([(s.optimizer, s.lr, s.seed) for s in specs])
            losses = [2.0 + math.log(s.lr / 2e-3) ** 2 for s in specs]  # best at 2e-3
            for s, loss in zip(specs, losses):
                write_run(self.out, s.optimizer, s.lr, s.seed, s.steps, [3.0, loss])
            return [{"final_val_loss": loss} for loss in losses]

    monkeypatch.setattr(protocol, "RunPool", RecordingPool)
    given = resolve("smoke", {"optimizers": ("adamw", "muon"), "lr_by_optimizer": {"adamw": 2e-3, "muon": 4e-3},
                              "seeds": 2, "jobs": 2, "out": str(tmp_path / "given")})
    protocol.run_benchmark(given, progress=False)
    assert batches == [[("adamw", 2e-3, 0), ("muon", 4e-3, 0), ("adamw", 2e-3, 1), ("muon", 4e-3, 1)]]

    batches.clear()
    swept = resolve("smoke", {"optimizers": ("adamw", "muon"), "lr_by_optimizer": {"adamw": 2e-3},
                              "lr_grid": (1e-3, 2e-3, 4e-3), "seeds": 2, "jobs": 2, "out": str(tmp_path / "swept")})
    protocol.run_benchmark(swept, progress=False)
    assert batches[0] == [("adamw", 2e-3, 0), ("muon", 1e-3, 0), ("muon", 2e-3, 0), ("muon", 4e-3, 0)]
    assert batches[1:] == [[("adamw", 2e-3, 1), ("muon", 2e-3, 1)]]  # the chosen lr, after the sweep
