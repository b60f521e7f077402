"""``aro stepbench``: what one optimizer step costs, side by side, on this machine.

Three sections, every one timed *interleaved* (one step of each optimizer in turn, repeated),
after warm-up steps, reported as medians and ratios (:mod:`aro.bench.timing`):

* ``presets``: the optimizer step alone on the parameters of each ``aro bench`` model preset
  (gradients are fixed random tensors), with the optimizer-state bytes per parameter byte;
* ``matrices``: one ``d x d`` and one ``d x 4d`` matrix for each ``d``, with the achieved
  GFLOP/s of the matrix methods against a plain float32 matmul of the same operands on the same
  machine (the roofline fraction);
* ``train_step``: the whole training step (forward, backward, clipping, optimizer) of the
  standard model.

Two Muons: ``muon`` is ``torch.optim.Muon``, whose Newton-Schulz runs in bfloat16; ``muon-fp32``
is the same update in float32, batched by shape (:mod:`aro.bench.optimizers`). On a CPU without
bfloat16 instructions the first is emulated (about 16x slower on the standard model), so the
comparison that matters there is with ``muon-fp32``; both are reported. A case predicted to take
longer than ``max_step_s`` per step (``torch.optim.Muon``'s FLOPs at the measured bfloat16
matmul speed) is not run, and its prediction is recorded instead.

FLOPs are each registry entry's own model (``OptimizerSpec.matrix_flops``, documented in
:mod:`aro.bench.optimizers`), summed over the parameters the entry's method steps. Elementwise work
(Sinkhorn, momentum, Adam) is not counted, so the GFLOP/s figure is the matrix-multiply throughput
the step achieves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .models import PRESETS, build_model
from .optimizers import OPTIMIZERS, aro_flops, build_optimizers, muon_flops
from .environment import environment_info
from .options import check_options, option
from .timing import time_interleaved, warm_allocator
from .. import tuning
from .files import atomic_write_text

__all__ = ["StepbenchOptions", "aro_flops", "muon_flops", "run_stepbench"]

# the optimizers whose whole training step is timed too (when given with --optimizers)
TRAIN_OPTIMIZERS = ("adamw", "muon", "muon-fp32", "aro-sinkhorn", "aro-sinkhorn-auto", "aro-sinkhorn-bf16",
                    "aro-sinkhorn-every4", "eigen-adam", "soap",
                    "normuon", "adamuon", "dion", "dion-rms")
STANDARD_PRESET = "small"  # the model of `aro bench --preset standard`
LR, WD = 1e-3, 0.1


@dataclass(frozen=True)
class StepbenchOptions:
    """The options of ``aro stepbench``, declared once: the flags are generated from the fields
    (:mod:`aro.bench.options`)."""

    optimizers: tuple[str, ...] = option(
        ("adamw", "muon", "muon-fp32", "aro-sinkhorn", "aro-sinkhorn-every4", "aro-sinkhorn-scqr", "aro-sign",
         "aro-adam", "eigen-sinkhorn"),
        "comma-separated registry names (aro bench --help lists them)", choices=OPTIMIZERS)
    models: tuple[str, ...] = option(
        ("tiny", "small", "medium", "large", "moe-small"),
        f"comma-separated model presets whose parameters are stepped, of {sorted(PRESETS)}, '' for none "
        "(--presets is the former spelling)", aliases=("--presets",), choices=sorted(PRESETS))
    dims: tuple[int, ...] = option((128, 256, 512, 1024, 2048), "d for the d x d and d x 4d matrices, '' for none",
                                   minimum=1)
    train_model: str = option(STANDARD_PRESET, "model preset of the training-step timing, '' to skip",
                              aliases=("--train-preset",))
    train_batch: int = option(16, "sequences per training step (the bench protocol's batch)", minimum=1)
    warmup: int = option(3, "untimed rounds first", minimum=0)
    repeats: int = option(15, "at most this many timed rounds", minimum=1)
    budget: float = option(20.0, "stop timing a case after this many seconds (>= 3 rounds)", minimum=0)
    slow: float = option(3.0, "a case whose first step takes longer than this (s) is timed once and leaves the rounds",
                         minimum=0)
    max_step: float = option(60.0, "do not run torch.optim.Muon where it is predicted to take longer than this (s) "
                             "per step", minimum=0)
    cold_allocator: bool = option(False, "time without first freeing a large block (fresh pages: not what a "
                                  "training loop sees)")
    threads: int = option(0, "torch threads (0: leave the default)", minimum=0)
    out: Path = option(Path("benchmarks/results/stepbench-cpu.json"), "JSON path; the plot goes beside it")

    def __post_init__(self) -> None:
        check_options(self)
        if not self.optimizers:
            raise ValueError("--optimizers: give at least one registry name (aro bench --help lists them)")
        if self.train_model and self.train_model not in PRESETS:
            raise ValueError(f"--train-model {self.train_model}: unknown; choose from {', '.join(sorted(PRESETS))}, "
                             "or '' to skip the training step")


def state_bytes(opts: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor in the optimizers' state, including tensors held in lists or dicts
    (SOAP keeps its Kronecker factors and eigenbases in per-dimension lists)."""

    def size(v) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        return 0

    return sum(size(st) for opt in opts for st in opt.state.values())


def _random_grads(params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2


def _stepper(opts: list[torch.optim.Optimizer]) -> Callable[[], None]:
    def step() -> None:
        for o in opts:
            o.step()

    return step


def _repeated(fn: Callable[[], None], k: int) -> Callable[[], None]:
    if k == 1:
        return fn

    def run() -> None:
        for _ in range(k):
            fn()

    return run


def _ratios(ms: dict[str, float], key: str) -> dict[str, float] | None:
    if key not in ms:
        return None
    return {k: v / ms[key] for k, v in ms.items()}


def matmul_gflops(s: int, t: int, *, dtype: torch.dtype = torch.float32, warmup: int = 2, repeats: int = 5) -> float:
    """GFLOP/s of a plain ``(s x s) @ (s x t)`` matmul in ``dtype`` on this machine."""
    a, b = torch.randn(s, s, dtype=dtype), torch.randn(s, t, dtype=dtype)
    ms = time_interleaved({"mm": lambda: torch.mm(a, b)}, warmup=warmup, repeats=repeats, budget_s=5.0)["mm"]["ms"]
    return 2.0 * s * s * t / ms / 1e6


class _Cases:
    """Times a set of named steps interleaved, skipping an optimizer whose products run in
    bfloat16 (``torch.optim.Muon``'s Newton-Schulz, say) where they are predicted to take longer
    than ``max_step_s`` per step at the measured bfloat16 matmul speed (emulated on CPUs without
    bfloat16 instructions)."""

    def __init__(self, *, warmup: int, repeats: int, budget_s: float, slow_s: float, max_step_s: float,
                 bf16_gflops: float | None):
        self.warmup, self.repeats, self.budget_s = warmup, repeats, budget_s
        self.slow_s, self.max_step_s, self.bf16_gflops = slow_s, max_step_s, bf16_gflops

    def run(self, steps: dict[str, Callable[[], None]], flops: dict[str, float], warmup: int | None = None) -> dict:
        skipped = {}
        specs = {k: OPTIMIZERS.get(k) for k in steps}  # None: a plain timed function (tests)
        for k in steps:
            if specs[k] is not None and specs[k].products_dtype == torch.bfloat16 and self.bf16_gflops:
                predicted = flops.get(k, 0.0) / (self.bf16_gflops * 1e9)
                if predicted > self.max_step_s:
                    skipped[k] = (f"not run: predicted {predicted:.0f} s per step ({flops[k] / 1e9:.0f} GFLOP of "
                                  f"bfloat16 products at the measured {self.bf16_gflops:.1f} GFLOP/s)")
        per_call = {k: specs[k].steps_per_call if specs[k] is not None else 1 for k in steps}
        timings = time_interleaved({k: _repeated(v, per_call[k]) for k, v in steps.items() if k not in skipped},
                                   warmup=self.warmup if warmup is None else warmup, repeats=self.repeats,
                                   budget_s=self.budget_s, slow_s=self.slow_s)
        ms = {k: t["ms"] / per_call[k] for k, t in timings.items()}
        return {"step_ms": ms, "rounds": {k: t["rounds"] for k, t in timings.items()},
                "steps_per_call": {k: per_call[k] for k in timings if per_call[k] > 1},
                "faults_per_step": {k: t["faults"] / per_call[k] for k, t in timings.items()}, "skipped": skipped,
                "ratio_vs_adamw": _ratios(ms, "adamw"), "ratio_vs_muon": _ratios(ms, "muon"),
                "ratio_vs_muon_fp32": _ratios(ms, "muon-fp32")}


def bench_presets(presets: list[str], names: list[str], cases: _Cases) -> list[dict]:
    out = []
    for preset in presets:
        steppers, opts_by_name = {}, {}
        for name in names:
            model = build_model(preset, seed=0)
            _random_grads(list(model.parameters()), seed=1)
            opts = build_optimizers(name, model, LR, WD)
            steppers[name], opts_by_name[name] = _stepper(opts), opts
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        flops = {k: OPTIMIZERS[k].step_flops(model) for k in names}
        row = {"preset": preset, "parameters": sum(p.numel() for p in model.parameters())}
        row.update(cases.run(steppers, flops))
        row["state_bytes_per_param_byte"] = {k: state_bytes(opts_by_name[k]) / param_bytes for k in row["step_ms"]}
        row["hidden_matrix_gflops"] = {k: flops[k] / row["step_ms"][k] / 1e6 for k in row["step_ms"] if flops[k]}
        out.append(row)
    return out


def _matrix_optimizer(name: str, p: nn.Parameter) -> torch.optim.Optimizer:
    build = OPTIMIZERS[name].build_matrix
    if build is None:
        raise ValueError(f"stepbench --optimizers: {name!r} shares rotations across matrices; "
                         "it has no single-matrix form (use it in the preset section)")
    return build(p, LR, WD)


def bench_matrices(dims: list[int], names: list[str], cases: _Cases) -> list[dict]:
    out = []
    for d in dims:
        for m, n in ((d, d), (d, 4 * d)):
            steppers = {}
            for name in names:
                p = nn.Parameter(torch.randn(m, n) / n**0.5)
                _random_grads([p], seed=2)
                steppers[name] = _stepper([_matrix_optimizer(name, p)])
            flops = {k: OPTIMIZERS[k].matrix_flops(m, n) for k in names}
            row = {"m": m, "n": n, "d": d}
            row.update(cases.run(steppers, flops, warmup=max(1, cases.warmup - 1)))
            peak = matmul_gflops(min(m, n), max(m, n))
            achieved = {k: flops[k] / v / 1e6 for k, v in row["step_ms"].items() if flops[k]}
            row.update({"matmul_gflops": peak, "gflops": achieved,
                        "roofline_fraction": {k: v / peak for k, v in achieved.items()}})
            out.append(row)
    return out


def bench_train_step(preset: str, names: list[str], cases: _Cases, *, batch_size: int) -> dict:
    cfg = PRESETS[preset]
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    inputs, targets = x[:, :-1], x[:, 1:]
    steppers, flops = {}, {}
    for name in names:
        model = build_model(preset, seed=0)
        opts = build_optimizers(name, model, LR, WD)
        flops[name] = OPTIMIZERS[name].step_flops(model)

        def step(model=model, opts=opts) -> None:
            for o in opts:
                o.zero_grad(set_to_none=True)
            model.train_loss(inputs, targets).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for o in opts:
                o.step()

        steppers[name] = step
    row = {"preset": preset, "batch_size": batch_size,
           "forward_backward_gflop": forward_backward_flops(model, cfg, batch_size) / 1e9,
           "optimizer_matmul_gflop": {k: v / 1e9 for k, v in flops.items()}}
    row.update(cases.run(steppers, flops))
    return row


def forward_backward_flops(model: nn.Module, cfg, batch_size: int) -> float:
    """Matrix-multiply FLOPs of one forward + backward pass: 6 per token and weight of every
    matrix the tokens are multiplied by (embedding lookups are not products), plus attention's
    scores and weighted sums, :math:`4 T^2 d` per layer and sequence forward, three times that
    with the backward pass. The lower bound of what the optimizer's FLOPs are compared with."""
    tokens = batch_size * cfg.seq_len
    weights = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "emb" not in name)
    attention = 12 * cfg.n_layers * batch_size * cfg.seq_len**2 * cfg.d_model
    return 6.0 * tokens * weights + attention


# The targets (this 2-core CPU, float32, medians, ratios from one run): see README "Step cost".
def targets(result: dict) -> list[dict]:
    """Each target with its measured value and whether it is met (None: not measured)."""
    out = []

    def add(what: str, value: float | None, limit: float, above: bool = False) -> None:
        met = None if value is None else (value >= limit if above else value <= limit)
        out.append({"target": what, "value": value, "limit": limit, "met": met})

    std = next((r for r in result.get("presets", []) if r["preset"] == STANDARD_PRESET), None)
    aro_ms = std["step_ms"].get("aro-sinkhorn") if std else None
    for base in ("muon", "muon-fp32"):
        ref = std["step_ms"].get(base) if std else None
        add(f"ARO-Sinkhorn optimizer step / {base} ({STANDARD_PRESET} preset)",
            aro_ms / ref if aro_ms and ref else None, 1.0)
    train = result.get("train_step")
    ratio = train["ratio_vs_adamw"] if train and train["ratio_vs_adamw"] else {}
    add(f"ARO-Sinkhorn training step / AdamW ({train['preset'] if train else STANDARD_PRESET} preset)",
        ratio.get("aro-sinkhorn"), 1.05)
    add(f"ARO-Sinkhorn optimizer state / parameter bytes, hybrid ({STANDARD_PRESET})",
        std["state_bytes_per_param_byte"].get("aro-sinkhorn") if std else None, 2.0)
    for r in result.get("matrices", []):
        if r["d"] == 1024:
            add(f"ARO-Sinkhorn share of plain-matmul GFLOP/s, {r['m']}x{r['n']}",
                r["roofline_fraction"].get("aro-sinkhorn"), 0.5, above=True)
    return out


def run_stepbench(options: StepbenchOptions, *, progress: Callable[[str], None] = print) -> dict:
    o = options
    if o.threads:
        torch.set_num_threads(o.threads)
    if not o.cold_allocator:
        warm_allocator()
    bf16 = (matmul_gflops(256, 1024, dtype=torch.bfloat16, warmup=1, repeats=3)
            if any(OPTIMIZERS[n].products_dtype == torch.bfloat16 for n in o.optimizers) else None)
    cases = _Cases(warmup=o.warmup, repeats=o.repeats, budget_s=o.budget, slow_s=o.slow, max_step_s=o.max_step,
                   bf16_gflops=bf16)
    optimizers = list(o.optimizers)
    result: dict = {"environment": environment_info(), "optimizers": optimizers,
                    "settings": {"warmup": o.warmup, "repeats": o.repeats, "budget_s": o.budget, "slow_s": o.slow,
                                 "max_step_s": o.max_step, "allocator_warmed": not o.cold_allocator},
                    "matmul_gflops_256x1024": {"float32": matmul_gflops(256, 1024), "bfloat16": bf16}}
    presets, dims = list(o.models), list(o.dims)
    progress(f"presets: {presets}")
    result["presets"] = bench_presets(presets, optimizers, cases)
    single = [n for n in optimizers if OPTIMIZERS[n].build_matrix is not None]
    progress(f"matrices: d in {dims}")
    result["matrices"] = bench_matrices(dims, single, cases)
    if o.train_model:
        names = [n for n in TRAIN_OPTIMIZERS if n in optimizers]
        progress(f"training step: {o.train_model}, {names}")
        result["train_step"] = bench_train_step(o.train_model, names, cases, batch_size=o.train_batch)
    result["targets"] = targets(result)
    # what qr="auto" / matmul_dtype="auto" chose per bucket shape, and whether bfloat16 was a candidate
    result["auto_choices"] = tuning.choices()
    result["bf16_native"] = tuning.native_bf16(torch.device("cpu"))
    o.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(o.out, json.dumps(result, indent=1))
    plot_stepbench(result, o.out.with_suffix(".png"))
    return result


def plot_stepbench(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    rows = result["matrices"]
    for i, name in enumerate(result["optimizers"]):
        color = f"C{i % 10}"
        for wide, style in ((False, "-"), (True, "--")):
            pts = [(r["d"], r["step_ms"][name], r["rounds"][name]) for r in rows
                   if (r["n"] == 4 * r["m"]) == wide and name in r["step_ms"]]
            if not pts:
                continue
            ax.plot([d for d, _, _ in pts], [t for _, t, _ in pts], style, marker="o", color=color,
                    label=f"{name} ({'d x 4d' if wide else 'd x d'})")
            single = [(d, t) for d, t, n in pts if n == 1]
            if single:  # timed once (slower than the slow threshold)
                ax.plot(*zip(*single), "o", color="white", markeredgecolor=color, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("d")
    ax.set_ylabel("optimizer step (ms, median)")
    ax.set_title("one optimizer step on one d x d (solid) or d x 4d (dashed) matrix\n"
                 "hollow: timed once (slow case); missing: not run (predicted too slow)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(r: dict, n: str) -> str:
    if n in r["skipped"]:
        return f"{n} skipped"
    text = f"{n} {r['step_ms'][n]:.1f}"
    ratios = [(r[k][n], lbl) for k, lbl in (("ratio_vs_muon_fp32", "xMfp32"), ("ratio_vs_adamw", "xAdamW"))
              if r.get(k) and n in r[k]]
    if ratios:
        text += " (" + ", ".join(f"{v:.2f}{lbl}" for v, lbl in ratios[:1]) + ")"
    return text + ("*" if r["rounds"].get(n) == 1 else "")


def format_stepbench(result: dict) -> str:
    lines = ["optimizer step on preset parameters (ms, median; x muon-fp32; [state bytes / param bytes]; "
             "* timed once)"]
    for r in result["presets"]:
        cells = [_cell(r, n) + (f" [{r['state_bytes_per_param_byte'][n]:.2f}]" if n in r["step_ms"] else "")
                 for n in result["optimizers"]]
        lines.append(f"  {r['preset']:<10} " + "  ".join(cells))
    lines.append("single matrices (ms, median; share of plain-matmul GFLOP/s)")
    for r in result["matrices"]:
        cells = [_cell(r, n) + (f" {{{r['roofline_fraction'][n]:.0%}}}" if n in r["roofline_fraction"] else "")
                 for n in list(r["step_ms"]) + list(r["skipped"])]
        lines.append(f"  {r['m']}x{r['n']:<6} mm {r['matmul_gflops']:.0f} GF/s  " + "  ".join(cells))
    if "train_step" in result:
        t = result["train_step"]
        lines.append(f"training step, {t['preset']} (ms, median; x AdamW)")
        lines.append("  " + "  ".join(f"{n} {v:.1f} ({t['ratio_vs_adamw'][n]:.3f}x)" for n, v in t["step_ms"].items()))
        if "forward_backward_gflop" in t:
            fb = t["forward_backward_gflop"]
            lines.append(f"  forward+backward {fb:.2f} GFLOP; optimizer matmul FLOPs as a share of it: " + "  ".join(
                f"{n} {v / fb:.1%}" for n, v in t["optimizer_matmul_gflop"].items() if v))
    lines.append("targets")
    for tg in result.get("targets", []):
        value = "not measured" if tg["value"] is None else f"{tg['value']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "-"}[tg["met"]]
        lines.append(f"  {tg['target']}: {value} (limit {tg['limit']}) {verdict}")
    return "\n".join(lines)
