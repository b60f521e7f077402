"""``aro stepbench``: what one optimizer step costs, side by side, on this machine.

Three sections, every one timed *interleaved* (one step of each optimizer in turn, repeated),
after warm-up steps, reported as medians and ratios:

* ``presets``: the optimizer step alone on the parameters of each ``aro bench`` model preset
  (gradients are fixed random tensors), with the optimizer-state bytes per parameter byte;
* ``matrices``: one ``d x d`` and one ``d x 4d`` matrix for each ``d``, with the achieved
  GFLOP/s of the matrix methods against a plain matmul of the same operands on the same
  machine (the roofline fraction);
* ``train_step``: the whole training step (forward, backward, clipping, optimizer) of the
  standard model for AdamW, Muon and ARO-Sinkhorn.

FLOP model for an ``m x n`` matrix whose rotated side is ``s = min(m, n)`` and other side
``t = max(m, n)``: the ARO step forms :math:`R^\\top M` (:math:`2s^2t`), the cross-Gram
:math:`M f(R^\\top M)^\\top` (:math:`2s^2t`), the update :math:`R f(\\cdot)` (:math:`2s^2t`) and a
QR with its Q (:math:`\\tfrac83 s^3`); the eigen policy forms :math:`MM^\\top R` instead of the
cross-Gram (:math:`2s^2t + 2s^3`). Muon's five quintic Newton-Schulz iterations cost
:math:`5(4s^2t + 2s^3)`. Elementwise work (Sinkhorn, momentum, Adam) is not counted, so the
GFLOP/s figure is the matrix-multiply throughput the step achieves.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import aro

from .models import PRESETS, build_model
from .optimizers import ADAMW_BETAS, ADAMW_EPS, OPTIMIZERS, build_optimizers
from .protocol import environment_info
from .train import atomic_write_text

__all__ = ["DEFAULT_DIMS", "DEFAULT_OPTIMIZERS", "DEFAULT_PRESETS", "aro_flops", "muon_flops", "run_stepbench"]

DEFAULT_OPTIMIZERS = ("adamw", "muon", "aro-sinkhorn", "aro-sinkhorn-every4", "aro-sinkhorn-scqr", "aro-sign", "aro-adam",
                      "eigen-sinkhorn")
DEFAULT_PRESETS = ("tiny", "small", "medium", "large", "moe-small")
DEFAULT_DIMS = (128, 256, 512, 1024, 2048)
TRAIN_OPTIMIZERS = ("adamw", "muon", "aro-sinkhorn", "aro-sinkhorn-every4")
LR, WD = 1e-3, 0.1


def aro_flops(m: int, n: int, rotation: str = "aro", every: int = 1) -> float:
    """Matrix-multiply FLOPs of one ARO step on an ``m x n`` matrix (module docstring), with a
    new rotation every ``every`` steps (the update's two products every step, the rest amortized)."""
    s, t = min(m, n), max(m, n)
    if rotation == "identity":
        return 0.0
    new_rotation = 2.0 * s * s * t + 8.0 / 3.0 * s**3
    if rotation.startswith("eigen"):
        new_rotation += 2.0 * s**3
    return 2 * 2.0 * s * s * t + new_rotation / every


def muon_flops(m: int, n: int, steps: int = 5) -> float:
    s, t = min(m, n), max(m, n)
    return steps * (4.0 * s * s * t + 2.0 * s**3)


def _flops(name: str, shapes: list[tuple[int, ...]]) -> float:
    options = OPTIMIZERS[name].aro_options if name in OPTIMIZERS else {}
    rotation, every = options.get("rotation", "aro"), options.get("rotation_every", 1)
    total = 0.0
    for shape in shapes:
        batch = 1
        for b in shape[:-2]:
            batch *= b
        if name == "muon":
            total += batch * muon_flops(shape[-2], shape[-1])
        elif name != "adamw":
            total += batch * aro_flops(shape[-2], shape[-1], rotation, every)
    return total


def interleaved_medians(steps: dict[str, Callable[[], None]], *, warmup: int, repeats: int,
                        budget_s: float) -> dict[str, float]:
    """Median seconds per call of each callable, called in turn (round robin) after ``warmup``
    rounds; at least 3 and at most ``repeats`` timed rounds, fewer when a round takes long."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    start = time.perf_counter()
    for r in range(repeats):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def state_bytes(opts: list[torch.optim.Optimizer]) -> int:
    total = 0
    for opt in opts:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total


def _random_grads(params: list[nn.Parameter], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2


def _stepper(opts: list[torch.optim.Optimizer]) -> Callable[[], None]:
    def step() -> None:
        for o in opts:
            o.step()

    return step


def _ratios(medians: dict[str, float], key: str) -> dict[str, float] | None:
    if key not in medians:
        return None
    return {k: v / medians[key] for k, v in medians.items()}


def bench_presets(presets: list[str], names: list[str], *, warmup: int, repeats: int, budget_s: float) -> list[dict]:
    out = []
    for preset in presets:
        steppers, opts_by_name, models = {}, {}, {}
        for name in names:
            model = build_model(preset, seed=0)
            params = list(model.parameters())
            _random_grads(params, seed=1)
            opts = build_optimizers(name, model, LR, WD)
            steppers[name], opts_by_name[name], models[name] = _stepper(opts), opts, model
        medians = interleaved_medians(steppers, warmup=warmup, repeats=repeats, budget_s=budget_s)
        model = next(iter(models.values()))
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        hidden = [p.shape for _, (p, role) in aro.classify_parameters(model).items() if role == "matrix"]
        out.append({
            "preset": preset,
            "parameters": sum(p.numel() for p in model.parameters()),
            "optimizer_step_ms": {k: 1e3 * v for k, v in medians.items()},
            "ratio_vs_adamw": _ratios(medians, "adamw"),
            "ratio_vs_muon": _ratios(medians, "muon"),
            "state_bytes_per_param_byte": {k: state_bytes(o) / param_bytes for k, o in opts_by_name.items()},
            "hidden_matrix_gflops": {k: _flops(k, hidden) / medians[k] / 1e9 for k in names if k != "adamw"},
        })
    return out


def _matrix_optimizer(name: str, p: nn.Parameter) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW([p], lr=LR, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=WD)
    if name == "muon":
        return torch.optim.Muon([p], lr=LR, weight_decay=WD, adjust_lr_fn="match_rms_adamw")
    options = {k: v for k, v in OPTIMIZERS[name].aro_options.items() if k not in ("mode", "sharing")}
    if OPTIMIZERS[name].aro_options.get("sharing", "none") != "none":
        raise ValueError(f"stepbench --optimizers: {name!r} shares rotations across matrices; "
                         "it has no single-matrix form (use it in the preset section)")
    return aro.ARO([p], lr=LR, weight_decay=WD, **options)


def matmul_gflops(s: int, t: int, *, warmup: int = 2, repeats: int = 5) -> float:
    """GFLOP/s of a plain float32 ``(s x s) @ (s x t)`` matmul on this machine."""
    a, b = torch.randn(s, s), torch.randn(s, t)
    med = interleaved_medians({"mm": lambda: torch.mm(a, b)}, warmup=warmup, repeats=repeats, budget_s=5.0)["mm"]
    return 2.0 * s * s * t / med / 1e9


def bench_matrices(dims: list[int], names: list[str], *, warmup: int, repeats: int, budget_s: float) -> list[dict]:
    out = []
    for d in dims:
        for m, n in ((d, d), (d, 4 * d)):
            steppers = {}
            for name in names:
                p = nn.Parameter(torch.randn(m, n) / n**0.5)
                _random_grads([p], seed=2)
                steppers[name] = _stepper([_matrix_optimizer(name, p)])
            medians = interleaved_medians(steppers, warmup=warmup, repeats=repeats, budget_s=budget_s)
            peak = matmul_gflops(min(m, n), max(m, n))
            achieved = {k: _flops(k, [(m, n)]) / medians[k] / 1e9 for k in names if k != "adamw"}
            out.append({
                "m": m, "n": n, "d": d,
                "optimizer_step_ms": {k: 1e3 * v for k, v in medians.items()},
                "ratio_vs_adamw": _ratios(medians, "adamw"),
                "ratio_vs_muon": _ratios(medians, "muon"),
                "matmul_gflops": peak,
                "gflops": achieved,
                "roofline_fraction": {k: v / peak for k, v in achieved.items()},
            })
    return out


def bench_train_step(preset: str, names: list[str], *, batch_size: int, warmup: int, repeats: int,
                     budget_s: float) -> dict:
    cfg = PRESETS[preset]
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)
    inputs, targets = x[:, :-1], x[:, 1:]
    steppers = {}
    for name in names:
        model = build_model(preset, seed=0)
        opts = build_optimizers(name, model, LR, WD)

        def step(model=model, opts=opts) -> None:
            for o in opts:
                o.zero_grad(set_to_none=True)
            model.loss(inputs, targets).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for o in opts:
                o.step()

        steppers[name] = step
    medians = interleaved_medians(steppers, warmup=warmup, repeats=repeats, budget_s=budget_s)
    return {"preset": preset, "batch_size": batch_size, "step_ms": {k: 1e3 * v for k, v in medians.items()},
            "ratio_vs_adamw": _ratios(medians, "adamw"), "ratio_vs_muon": _ratios(medians, "muon")}


def run_stepbench(*, optimizers: list[str], presets: list[str], dims: list[int], train_preset: str | None,
                  out: Path, warmup: int = 3, repeats: int = 15, budget_s: float = 20.0, threads: int = 0,
                  progress: Callable[[str], None] = print) -> dict:
    unknown = [n for n in optimizers if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"stepbench --optimizers: unknown {unknown}; choose from {sorted(OPTIMIZERS)}")
    bad = [p for p in presets + ([train_preset] if train_preset else []) if p not in PRESETS]
    if bad:
        raise ValueError(f"stepbench --presets: unknown {bad}; choose from {sorted(PRESETS)}")
    if threads:
        torch.set_num_threads(threads)
    result: dict = {"environment": environment_info(), "optimizers": optimizers,
                    "settings": {"warmup": warmup, "repeats": repeats, "budget_s": budget_s}}
    progress(f"presets: {presets}")
    result["presets"] = bench_presets(presets, optimizers, warmup=warmup, repeats=repeats, budget_s=budget_s)
    single = [n for n in optimizers if OPTIMIZERS[n].aro_options.get("sharing", "none") == "none"]
    progress(f"matrices: d in {dims}")
    result["matrices"] = bench_matrices(dims, single, warmup=max(1, warmup - 1), repeats=repeats, budget_s=budget_s)
    if train_preset:
        names = [n for n in TRAIN_OPTIMIZERS if n in optimizers]
        progress(f"training step: {train_preset}, {names}")
        result["train_step"] = bench_train_step(train_preset, names, batch_size=16, warmup=warmup,
                                                repeats=repeats, budget_s=budget_s)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    plot_stepbench(result, out.with_suffix(".png"))
    return result


def plot_stepbench(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = result["matrices"]
    for i, name in enumerate(result["optimizers"]):
        color = f"C{i}"
        for wide, style in ((False, "-"), (True, "--")):
            pts = [(r["d"], r["optimizer_step_ms"][name]) for r in rows
                   if (r["n"] == 4 * r["m"]) == wide and name in r["optimizer_step_ms"]]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{name} ({'d x 4d' if wide else 'd x d'})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("d")
    ax.set_ylabel("optimizer step (ms, median)")
    ax.set_title("one optimizer step on one matrix")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_stepbench(result: dict) -> str:
    lines = []
    names = result["optimizers"]
    lines.append("optimizer step on preset parameters (ms, median; x Muon; state bytes / param bytes)")
    for r in result["presets"]:
        cells = [f"{n} {r['optimizer_step_ms'][n]:.2f}" + (f" ({r['ratio_vs_muon'][n]:.2f}x)" if r["ratio_vs_muon"] else "")
                 + f" [{r['state_bytes_per_param_byte'][n]:.2f}]" for n in names]
        lines.append(f"  {r['preset']:<10} " + "  ".join(cells))
    lines.append("single matrices (ms, median; roofline fraction vs plain matmul)")
    for r in result["matrices"]:
        cells = [f"{n} {v:.2f}" + (f" ({r['roofline_fraction'][n]:.0%})" if n in r["roofline_fraction"] else "")
                 for n, v in r["optimizer_step_ms"].items()]
        lines.append(f"  {r['m']}x{r['n']:<6} mm {r['matmul_gflops']:.0f} GF/s  " + "  ".join(cells))
    if "train_step" in result:
        t = result["train_step"]
        lines.append(f"training step, {t['preset']} (ms, median; x AdamW)")
        lines.append("  " + "  ".join(f"{n} {v:.1f} ({t['ratio_vs_adamw'][n]:.3f}x)" for n, v in t["step_ms"].items()))
    return "\n".join(lines)
