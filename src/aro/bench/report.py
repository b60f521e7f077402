"""Figures and tables, made only from the logs of a run folder (``aro report RUN_DIR``).

* ``figures/val_loss.png`` -- validation loss of every optimizer at its chosen lr (mean over
  seeds, band = min..max), base budget;
* ``figures/speedup.png`` -- speedup vs AdamW and vs Muon, mean with std error bars;
* ``figures/lr_sweep.png`` -- final validation loss against lr (seed 0), chosen lr marked;
* ``figures/overtrain.png`` -- speedup against budget, when overtraining budgets ran;
* ``figures/budgets.png`` -- speedup against the budget in the paper's unit (``--budgets``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .optimizers import BASELINES
from .stats import paired_difference
from .summary import load_runs, summarize

__all__ = ["budget_figure", "combined_budget_figure", "combined_budget_summary", "format_budget_table",
           "format_markdown", "format_table", "write_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(stat: dict | None, digits: int = 3) -> str:
    """``mean±std``; the mean alone when the statistic has one seed (a std of 0 would read as
    agreement between seeds)."""
    if not stat or stat.get("mean") is None:
        return "-"
    if len(stat.get("per_seed") or ()) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"


def format_table(summary: dict) -> str:
    """The end-of-run table: one row per optimizer at the base budget."""
    head = ["optimizer", "lr", "seeds", "final val loss", *(f"speedup vs {b}" for b in BASELINES), "step ms",
            "opt ms", "step/adamw"]
    rows = []
    for name, e in summary["optimizers"].items():
        if "final_val_loss" not in e:
            continue
        ratio = e["step_time_ratio"].get("adamw")
        rows.append([
            name + (" *" if e.get("lr_at_grid_edge") else ""),
            f"{e['lr']:g}",
            str(len(e["seeds"])),
            _fmt(e["final_val_loss"], 4),
            # against itself the crossing metric only measures the jitter of its own curve's tail
            *(_fmt(e["speedup"].get(base)) if base != name else "-" for base in BASELINES),
            f"{1e3 * e['step_time_s']:.1f}" if e.get("step_time_s") else "-",
            f"{1e3 * e['optimizer_step_time_s']:.2f}" if e.get("optimizer_step_time_s") else "-",
            f"{ratio:.3f}" if ratio else "-",
        ])
    text = _aligned(head, rows)
    n = summary.get("seeds")
    text.append(f"mean±std over the finished seeds (of {n} planned); speedup = steps of the baseline / steps to reach"
                " its final val loss; * = chosen lr at the edge of the grid")
    starved = {name: e["starved_experts"] for name, e in summary["optimizers"].items() if "starved_experts" in e}
    if starved:
        text.append("starved experts at the end, per seed (under a tenth of an even share of the tokens, all layers): "
                    + "; ".join(f"{name} " + "/".join("-" if v is None else str(v) for v in vals)
                                for name, vals in starved.items()))
    if any(len(e.get("budgets", {})) > 1 for e in summary["optimizers"].values()):
        text += ["", format_budget_table(summary)]
    return "\n".join(text)


def _interval(p: dict | None, spec: str = ".3f") -> str:
    """A paired statistic as ``mean [low, high]``, ``*`` when the interval excludes its null."""
    if not p or p.get("mean") is None:
        return "-"
    if p.get("low") is None:
        return f"{p['mean']:{spec}}"
    return f"{p['mean']:{spec}} [{p['low']:{spec}}, {p['high']:{spec}}]{'*' if p['significant'] else ''}"


def _aligned(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_budget_table(summary: dict) -> str:
    """One row per optimizer and budget: final loss, paired speedups with 95% intervals, the
    schedule-fair speedups."""
    head = ["optimizer", "budget", "seeds", "final val loss"] + [f"speedup vs {b} [95%]" for b in BASELINES] + [
        f"fair vs {b}" for b in BASELINES]
    rows = []
    for name, e in summary["optimizers"].items():
        for key, b in sorted((e.get("budgets") or {}).items(), key=lambda kv: kv[1]["budget"]):
            fair = b.get("schedule_fair_speedup", {})
            bounds = b.get("schedule_fair_bound", {})
            cells = ["-" if base == name else _interval(b.get("paired", {}).get(base, {}).get("speedup"))
                     for base in BASELINES]
            cells += [f"{fair[base]:.3f}" if fair.get(base) is not None else
                      (f">={bounds[base]['at_least']:.2f}" if "at_least" in (bounds.get(base) or {}) else
                       f"<={bounds[base]['at_most']:.2f}" if "at_most" in (bounds.get(base) or {}) else "-")
                      for base in BASELINES]
            rows.append([name, key, str(len(b["seeds"])), _fmt(b["final_val_loss"], 4)] + cells)
    return "\n".join(_aligned(head, rows) + [
        "budget in units of the compute-optimal data (20 tokens per parameter); speedup: crossing metric, geometric "
        "mean over seeds with its paired 95% t-interval (* = excludes 1); fair: schedule-fair speedup"])


def format_markdown(summary: dict, names: list[str] | None = None, versus: str | None = None,
                    pool: dict[str, dict] | None = None) -> str:
    """The README's results table: final loss (mean ± std over seeds), speedups vs the baselines
    (geometric mean and paired 95% interval) and the final-loss difference vs Muon (paired 95%
    interval); * marks an interval that excludes 1 (speedups) or 0 (differences). ``versus``
    adds the paired final-loss difference against that optimizer (seed by seed), looked up in
    ``summary`` or else in ``pool`` (entries of other run folders, see :func:`pairing_pool`);
    Muon's column is there already, so ``versus="muon"`` adds nothing."""
    if versus == BASELINES[-1]:
        versus = None
    head = ["optimizer", "lr", "final val loss", "speedup vs AdamW [95%]", "speedup vs Muon [95%]",
            f"Δ loss vs {BASELINES[-1].capitalize()} [95%]"] + ([f"Δ loss vs {versus} [95%]"] if versus else [])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    entries = {n: e for n in names or list(summary["optimizers"])
               if (e := summary["optimizers"].get(n)) and "final_val_loss" in e}
    most = max((len(e["seeds"]) for e in entries.values()), default=0)
    for name, e in entries.items():
        paired = e.get("paired", {})
        n = len(e["seeds"])  # a row with fewer seeds than the others says so: its mean is less settled
        cells = [name + (" (lr at grid edge)" if e.get("lr_at_grid_edge") else ""), f"{e['lr']:g}",
                 _fmt(e["final_val_loss"], 3) + (f" ({n} seed{'s' if n > 1 else ''})" if n < most else "")]
        for base in BASELINES:
            cells.append("1" if base == name else _interval(paired.get(base, {}).get("speedup")).replace(", ", "–"))
        strongest = BASELINES[-1]  # the loss difference is taken against the stronger baseline
        diff = paired.get(strongest, {}).get("final_loss_diff") if name != strongest else None
        cells.append("0" if name == strongest else _interval(diff, "+.3f"))
        if versus:
            cells.append("0" if name == versus else _interval(_paired_vs(summary, name, versus, pool), "+.3f"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)



def _paired_vs(summary: dict, name: str, other: str, pool: dict[str, dict] | None = None) -> dict | None:
    """Paired final-loss difference ``name − other`` over their common seeds (base budget)."""
    a, b = summary["optimizers"].get(name), summary["optimizers"].get(other) or (pool or {}).get(other)
    if not a or not b or "final_val_loss" not in a or "final_val_loss" not in b:
        return None
    theirs = dict(zip(b["seeds"], b["final_val_loss"]["per_seed"]))
    mine = dict(zip(a["seeds"], a["final_val_loss"]["per_seed"]))
    common = [s for s in a["seeds"] if s in theirs]
    return paired_difference([mine[s] for s in common], [theirs[s] for s in common])


# config values that may differ between run folders whose seeds still pair: which optimizers ran,
# at which lrs, budgets and seed counts, and how the processes ran; everything else (model, data,
# steps, batch, schedule, evaluation) fixes the initial weights and the data order of a seed
PAIRING_FREE = frozenset({"optimizers", "lr", "lr_grid", "lr_grid_by_optimizer", "lr_by_optimizer", "budgets",
                          "budget_seeds", "overtrain", "seeds", "out", "threads", "jobs", "parallel"})


def pairing_pool(configs: dict[str, dict], summaries: dict[str, dict]) -> dict[str, dict]:
    """The optimizer entries of several run folders (``{folder: config}``, ``{folder: summary}``),
    merged for seed-by-seed pairing across folders; a ValueError names the folder and the
    config value that makes their seeds incomparable."""
    first, *rest = configs
    for other in rest:
        for key in sorted((set(configs[first]) | set(configs[other])) - PAIRING_FREE):
            if configs[first].get(key) != configs[other].get(key):
                raise ValueError(f"{other} and {first} differ in {key!r} ({configs[other].get(key)!r} vs "
                                 f"{configs[first].get(key)!r}): their seeds are not paired; compare folders "
                                 "made with the same model, data, steps and schedule")
    pool: dict[str, dict] = {}
    for folder in configs:
        pool.update(summaries[folder]["optimizers"])
    return pool


def write_report(out: Path, summary: dict | None = None) -> dict:
    """(Re)build summary.json, summary.csv and figures/ from the logs in ``out``."""
    out = Path(out)
    summary = summary or summarize(out)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    runs = load_runs(out)
    plt = _plt()
    _val_loss_figure(plt, summary, runs, figs / "val_loss.png")
    _speedup_figure(plt, summary, figs / "speedup.png")
    _sweep_figure(plt, summary, figs / "lr_sweep.png")
    if any(len(e.get("budgets", {})) > 1 for e in summary["optimizers"].values()):
        budget_figure(plt, {out.name: summary}, figs / "budgets.png")
    elif len(summary["budgets"]) > 1:
        _overtrain_figure(plt, summary, figs / "overtrain.png")
    (out / "report.txt").write_text(format_table(summary) + "\n")
    return summary


def _colors(names):
    """Distinct colors: tab10 while it suffices (tab20 pairs similar shades side by side)."""
    size = 10 if len(names) <= 10 else 20
    cmap = _plt().get_cmap(f"tab{size}")
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# a panel whose speedups span more than this factor gets a log axis; a narrower one stays linear,
# where matplotlib's log axis would label no tick between 1 and the next power of ten
WIDE_RANGE = 4.0


def _minor_label(value: float, _position) -> str:
    """Label the minor ticks of a log axis sparsely (1-2-5 steps), so a narrow range still shows values."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa, 6) in (1.5, 2, 3, 5) else ""


def _speedup_axis(ax) -> None:
    """A log y axis with plain labels if the panel's speedups span more than ``WIDE_RANGE``:
    speedups are ratios, so on a log axis a crossing speedup of 1.1 stays readable beside a
    schedule-fair one of 9, and 2x and 0.5x lie equally far from 1."""
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    low, high = ax.get_ylim()
    if low > 0 and high / low > WIDE_RANGE:
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
            for name in (n for n in names if n in summary["optimizers"]):  # one legend order in every panel
                blocks = sorted((summary["optimizers"][name].get("budgets") or {}).values(), key=lambda b: b["budget"])
                pts = [(b["budget"], b["speedup"][base]) for b in blocks
                       if b.get("speedup", {}).get(base, {}).get("mean") is not None]
                if pts and name != base:
                    ax.errorbar([k for k, _ in pts], [v["mean"] for _, v in pts], yerr=[v["std"] for _, v in pts],
                                marker="o", capsize=3, label=name, color=colors[name])
                fair = [(b["budget"], b["schedule_fair_speedup"].get(base)) for b in blocks
                        if b.get("schedule_fair_speedup", {}).get(base) is not None]
                if fair:
                    ax.plot([k for k, _ in fair], [v for _, v in fair], "--", marker="o", mfc="white",
                            color=colors[name])
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            _speedup_axis(ax)
            tpp = summary.get("budget_unit", {}).get("tokens_per_parameter", 20.0)
            ax.set_xlabel(f"training budget (x {tpp:g} tokens per parameter)")
            ax.set_title(f"{label}: speedup vs {base} (solid: crossing, dashed: schedule-fair)", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _labelled(summaries: dict[str | Path, dict]) -> dict[str, tuple[Path, dict]]:
    """``{folder name: (folder, summary)}``; two folders of one name would overwrite each other."""
    names = [Path(d).name for d in summaries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"RUN_DIR: folders named {repeated} appear twice; every folder labels its own row, "
                         "so give folders with distinct names")
    return {Path(d).name: (Path(d), summary) for d, summary in summaries.items()}


def combined_budget_figure(summaries: dict[str | Path, dict], path: Path) -> None:
    """:func:`budget_figure` over several run folders ({folder: its summary}, each row labelled by
    the folder's name)."""
    labelled = {name: summary for name, (_, summary) in _labelled(summaries).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    budget_figure(_plt(), labelled, Path(path))


def combined_budget_summary(summaries: dict[str | Path, dict]) -> dict:
    """The budget ladders of several run folders ({folder: its summary}; e.g. the tiny ladder, the
    small and the MoE model at 1x) in one record, so one file answers "what does X gain over Y at
    budget K on model M".

    The first folder is the main ladder: its summary is the top level, whole (the schema of every
    summary, with ``budget_unit`` and per-optimizer ``budgets``). ``ladders`` adds every folder,
    the first included: {folder name: {"model", "source", "budget_unit", "optimizers": {name:
    {"lr", "budgets"}}}}, each ``budgets`` the folder summary's own block ({"K": {lr,
    final_val_loss, speedup, paired, ...}}), unchanged. Folders must count budgets in one unit
    (tokens per parameter and which parameters), else their budgets would not be comparable.
    """
    ladders, units = {}, {}
    for name, (folder, summary) in _labelled(summaries).items():
        unit = summary.get("budget_unit")
        if unit is None:
            raise ValueError(f"{name}: no budget_unit in its summary.json; give folders made with "
                             "aro bench --budgets")
        units[name] = (unit["tokens_per_parameter"], unit["which_parameters"])
        ladders[name] = {
            "model": json.loads((folder / "config.json").read_text())["config"]["model"],
            "source": str(folder),
            "budget_unit": unit,
            "optimizers": {o: {"lr": e["lr"], "budgets": e.get("budgets", {})}
                           for o, e in summary["optimizers"].items() if "lr" in e},
        }
    if len(set(units.values())) > 1:
        raise ValueError(f"RUN_DIR: the folders count budgets in different units {units}; "
                         "combine folders made with the same --tokens-per-parameter")
    return {**next(iter(summaries.values())), "ladders": ladders}
