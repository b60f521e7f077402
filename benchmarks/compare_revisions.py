"""The optimizer step (and training step) of two git revisions, timed in alternation.

    .venv/bin/python benchmarks/compare_revisions.py --base f993d4c \
        --out benchmarks/results/step-before-after.json

Checks ``--base`` out into a temporary git worktree, then runs the same timing snippet under
each revision's ``src/`` (a fresh process each time, same virtual environment), alternating
base, head, base, head, ... for ``--rounds`` rounds, so that a drift of the machine's speed
hits both alike. Each process warms up, then reports the median of ``--steps`` timed steps of
``opt.step()`` on fixed random gradients of a bench preset (and, with ``--train``, of a whole
training step). The result is the median over rounds per revision and their ratio.
``--head`` defaults to the working tree. Each process starts with a cold allocator (fresh
pages for the step's temporaries; see :mod:`aro.bench.timing`), the same for both revisions;
whether a process's first large frees raise glibc's thresholds varies between processes, which
makes the optimizer step bimodal (about 16 or 20 ms on `small`, 2026-12 Zen 5). ``--warm``
frees one 24 MiB block before timing in every process (as ``aro stepbench`` does), which
removes that mode: use it to resolve changes of a few percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SNIPPET = r"""
import json, statistics, sys, time
import torch
from aro.bench.models import PRESETS, build_model
from aro.bench.optimizers import build_optimizers
name, preset, steps, train, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
if warm:  # as aro.bench.timing.warm_allocator (kept inline: old revisions may lack it)
    block = torch.empty(6 * 2**20, dtype=torch.float32); block.fill_(0.0); del block
model = build_model(preset, seed=0)
opts = build_optimizers(name, model, 1e-3, 0.1)
g = torch.Generator().manual_seed(1)
grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in model.parameters()]
cfg = PRESETS[preset]
x = torch.randint(0, cfg.vocab_size, (16, cfg.seq_len + 1), generator=g)
def opt_step():
    for p, gr in zip(model.parameters(), grads):
        p.grad = gr
    for o in opts:
        o.step()
def train_step():
    for o in opts:
        o.zero_grad(set_to_none=True)
    model.loss(x[:, :-1], x[:, 1:]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for o in opts:
        o.step()
import aro
out = {"aro_file": aro.__file__}
for label, fn in [("optimizer_step", opt_step)] + ([("train_step", train_step)] if train else []):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    out[label] = 1e3 * statistics.median(ts)
print(json.dumps(out))
"""


def _run(src: Path, name: str, preset: str, steps: int, train: bool, warm: bool) -> dict:
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "", "MPLBACKEND": "Agg"}
    env = {k: v for k, v in env.items() if v}
    out = subprocess.run([sys.executable, "-c", SNIPPET, name, preset, str(steps), "1" if train else "0",
                          "1" if warm else "0"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--head", default=None, help="git revision (default: the working tree)")
    ap.add_argument("--optimizers", default="aro-sinkhorn,adamw", help="registry names both revisions know")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--train", action="store_true", help="also time the whole training step")
    ap.add_argument("--warm", action="store_true", help="free a 24 MiB block before timing (see the docstring)")
    ap.add_argument("--out", default="benchmarks/results/step-before-after.json")
    args = ap.parse_args()

    repo = Path(__file__).resolve().parents[1]
    sha = lambda rev: subprocess.run(["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True,  # noqa: E731
                                     check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label, rev in (("base", args.base), ("head", args.head)):
            if rev is None:
                trees[label] = (repo / "src", "working tree")
                continue
            path = Path(tmp) / label
            subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=repo, check=True,
                           capture_output=True)
            trees[label] = (path / "src", sha(rev))
        try:
            result = {"base": trees["base"][1], "head": trees["head"][1], "preset": args.preset,
                      "rounds": args.rounds, "steps": args.steps, "warm": args.warm, "optimizers": {}}
            for name in [n.strip() for n in args.optimizers.split(",") if n.strip()]:
                per = {"base": [], "head": []}
                for _ in range(args.rounds):
                    for label in ("base", "head"):
                        per[label].append(_run(trees[label][0], name, args.preset, args.steps, args.train, args.warm))
                row: dict = {}
                files = {label: per[label][0].pop("aro_file") for label in per}
                for r in per["base"] + per["head"]:
                    r.pop("aro_file", None)
                row["aro_file"] = files
                for key in per["base"][0]:
                    b = statistics.median(r[key] for r in per["base"])
                    h = statistics.median(r[key] for r in per["head"])
                    row[key] = {"base_ms": b, "head_ms": h, "head_over_base": h / b,
                                "rounds_base_ms": [r[key] for r in per["base"]],
                                "rounds_head_ms": [r[key] for r in per["head"]]}
                    print(f"{name:<14} {key:<15} base {b:8.2f} ms  head {h:8.2f} ms  head/base {h / b:.3f}")
                result["optimizers"][name] = row
        finally:
            for label, rev in (("base", args.base), ("head", args.head)):
                if rev is not None:
                    subprocess.run(["git", "worktree", "remove", "--force", str(Path(tmp) / label)], cwd=repo,
                                   capture_output=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
