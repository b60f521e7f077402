"""The figures of a run folder (``aro report RUN_DIR``), drawn only from its summary and logs.

* ``figures/val_loss.png`` -- validation loss of every optimizer at its chosen lr (mean over
  seeds, band = min..max), base budget;
* ``figures/speedup.png`` -- speedup vs AdamW and vs Muon, mean with std error bars;
* ``figures/lr_sweep.png`` -- final validation loss against lr (seed 0), chosen lr marked;
* ``figures/overtrain.png`` -- speedup against budget, when overtraining budgets ran;
* ``figures/budgets.png`` -- speedup against the budget in the paper's unit (``--budgets``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .optimizers import BASELINES

__all__ = ["budget_figure", "has_ladder", "load_pyplot", "write_figures"]


def load_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    """Every figure's ending: laid out, written at one resolution, closed (pyplot keeps figures open)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _colors(names):
    """Distinct colors: tab10 while it suffices (tab20 pairs similar shades side by side)."""
    size = 10 if len(names) <= 10 else 20
    cmap = load_pyplot().get_cmap(f"tab{size}")
    return {n: cmap(i % size) for i, n in enumerate(names)}


def _val_loss_figure(plt, summary, runs, path):
    base = summary["base_steps"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = _colors(list(summary["optimizers"]))
    lows = []
    for name, e in summary["optimizers"].items():
        curves = [r["curve"] for r in runs if r["spec"]["optimizer"] == name and r["spec"]["lr"] == e["lr"]
                  and r["spec"]["steps"] == base]
        curves = [c for c in curves if all(v is not None for v in c["val_loss"])]
        if not curves:
            continue
        n = min(len(c["step"]) for c in curves)
        steps = np.array(curves[0]["step"][:n])
        ys = np.array([c["val_loss"][:n] for c in curves])
        mean = ys.mean(axis=0)
        ax.plot(steps, mean, label=f"{name} (lr {e['lr']:g})", color=colors[name], lw=1.6)
        if len(curves) > 1:
            ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=colors[name], alpha=0.15)
        lows.append((mean.min(), mean[len(mean) // 5] if len(mean) > 5 else mean[0]))
    if lows:
        lo = min(a for a, _ in lows)
        hi = max(b for _, b in lows)
        ax.set_ylim(lo - 0.02 * (hi - lo), hi)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Validation loss at each optimizer's chosen lr ({summary['seeds']} seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def _speedup_figure(plt, summary, path):
    names = [n for n, e in summary["optimizers"].items() if e.get("speedup")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=False)
    for ax, base in zip(axes, BASELINES):
        shown = [n for n in names if summary["optimizers"][n]["speedup"].get(base, {}).get("mean") is not None]
        means = [summary["optimizers"][n]["speedup"][base]["mean"] for n in shown]
        stds = [summary["optimizers"][n]["speedup"][base]["std"] for n in shown]
        ax.bar(range(len(shown)), means, yerr=stds, capsize=4, color=[_colors(names)[n] for n in shown])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(shown)), shown, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"speedup vs {base} (steps to reach {base}'s final loss)")
        ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)


def _sweep_figure(plt, summary, path):
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = _colors(list(summary["optimizers"]))
    for name, e in summary["optimizers"].items():
        pts = sorted((float(lr), v) for lr, v in e["lr_sweep"].items() if v is not None and math.isfinite(v))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, color=colors[name], ms=4)
        ax.plot([e["lr"]], [e["lr_sweep"][str(e["lr"])]], "*", color=colors[name], ms=12)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (AdamW scale)")
    ax.set_ylabel("final validation loss (seed 0)")
    ax.set_title("learning-rate sweep (star = chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def _overtrain_figure(plt, summary, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = _colors(list(summary["optimizers"]))
    for ax, base in zip(axes, BASELINES):
        for name, e in summary["optimizers"].items():
            blocks = [(1, e)] + [(int(k), b) for k, b in (e.get("overtrain") or {}).items()]
            pts = [(k, b["speedup"][base]) for k, b in sorted(blocks, key=lambda kb: kb[0])
                   if b.get("speedup", {}).get(base, {}).get("mean") is not None]
            if len(pts) < 2:
                continue
            ax.errorbar([k for k, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                        marker="o", capsize=3, label=name, color=colors[name])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (x base steps)")
        ax.set_title(f"speedup vs {base}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(plt, fig, path)


# a panel whose speedups span more than this factor gets a log axis; a narrower one stays linear,
# where matplotlib's log axis would label no tick between 1 and the next power of ten
WIDE_RANGE = 4.0


def _minor_label(value: float, _position) -> str:
    """Label the minor ticks of a log axis at 2, 3 and 5 times a power of ten, so a panel spanning
    less than a decade still shows values."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa, 6) in (2, 3, 5) else ""


def _speedup_axis(ax, values: list[float]) -> None:
    """A log y axis with plain labels if the speedups plotted (``values``, 1 included) span more
    than ``WIDE_RANGE``: speedups are ratios, so on a log axis a crossing speedup of 1.1 stays
    readable beside a schedule-fair one of 9, and 2x and 0.5x lie equally far from 1. Decided on
    the values, not on the axis limits, whose margins may reach below 0 (error-bar ends at or
    below 0 are clipped on the log axis)."""
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > WIDE_RANGE:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))


def budget_figure(plt, summaries: dict[str, dict], path: Path) -> None:
    """The paper's Figure 1, ours: speedup against the training budget (20 tokens per parameter =
    1), one row per run folder (e.g. the dense and the MoE model), one column per baseline. Solid:
    the crossing speedup, mean ± std over seeds; dashed, open markers: the schedule-fair speedup
    (:mod:`aro.bench.ladder`)."""
    rows = list(summaries.items())
    # one budget axis for every row, so a model measured at 1x only sits under the ladder's 1x
    fig, axes = plt.subplots(len(rows), len(BASELINES), figsize=(11, 4.3 * len(rows)), squeeze=False, sharex=True)
    names = list(dict.fromkeys(n for _, s in rows for n in s["optimizers"]))
    colors = _colors(names)
    for (label, summary), row in zip(rows, axes):
        for ax, base in zip(row, BASELINES):
            plotted = [1.0]
            for name in (n for n in names if n in summary["optimizers"]):  # one legend order in every panel
                blocks = sorted((summary["optimizers"][name].get("budgets") or {}).values(), key=lambda b: b["budget"])
                pts = [(b["budget"], b["speedup"][base]) for b in blocks
                       if b.get("speedup", {}).get(base, {}).get("mean") is not None]
                if pts and name != base:
                    plotted += [v["mean"] for _, v in pts]
                    ax.errorbar([k for k, _ in pts], [v["mean"] for _, v in pts], yerr=[v["std"] for _, v in pts],
                                marker="o", capsize=3, label=name, color=colors[name])
                fair = [(b["budget"], b["schedule_fair_speedup"].get(base)) for b in blocks
                        if b.get("schedule_fair_speedup", {}).get(base) is not None]
                if fair:
                    plotted += [v for _, v in fair]
                    ax.plot([k for k, _ in fair], [v for _, v in fair], "--", marker="o", mfc="white",
                            color=colors[name])
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            _speedup_axis(ax, plotted)
            tpp = summary.get("budget_unit", {}).get("tokens_per_parameter", 20.0)
            ax.set_xlabel(f"training budget (x {tpp:g} tokens per parameter)")
            ax.set_title(f"{label}: speedup vs {base} (solid: crossing, dashed: schedule-fair)", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    _save(plt, fig, path)


def has_ladder(summary: dict) -> bool:
    """Whether a summary holds a budget ladder (some optimizer at more than one ``--budgets`` value)."""
    return any(len(e.get("budgets", {})) > 1 for e in summary["optimizers"].values())


def write_figures(label: str, summary: dict, runs, figs: Path) -> None:
    """Every figure of one run folder into ``figs``; ``label`` names its row in budgets.png."""
    plt = load_pyplot()
    _val_loss_figure(plt, summary, runs, figs / "val_loss.png")
    _speedup_figure(plt, summary, figs / "speedup.png")
    _sweep_figure(plt, summary, figs / "lr_sweep.png")
    if has_ladder(summary):
        budget_figure(plt, {label: summary}, figs / "budgets.png")
    elif len(summary["budgets"]) > 1:
        _overtrain_figure(plt, summary, figs / "overtrain.png")
