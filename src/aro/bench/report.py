"""Tables and summaries, made only from the logs of run folders (``aro report RUN_DIR``).

``write_report`` rebuilds a folder's summary.json, summary.csv, report.txt and its figures
(:mod:`aro.bench.figures`); ``format_table``, ``format_budget_table``, ``format_lr_checks`` and
``format_markdown`` print the end-of-run, budget, lr-check and README tables; ``combined_budget_summary`` and
``combined_budget_figure`` put several folders' budget ladders side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .figures import budget_figure, has_ladder, load_pyplot, write_figures
from .optimizers import BASELINES
from .stats import paired_difference
from .summary import load_runs, summarize

__all__ = ["combined_budget_figure", "combined_budget_summary", "format_budget_table", "format_lr_checks",
           "format_markdown", "format_table", "write_report"]


def _finite_seeds(stat: dict) -> int:
    """How many seeds a statistic's mean is over (a diverged seed's value is None or not finite)."""
    return sum(1 for v in stat.get("per_seed") or () if v is not None and math.isfinite(v))


def _fmt(stat: dict | None, digits: int = 3) -> str:
    """``mean±std``; the mean alone when the statistic has one seed (a std of 0 would read as
    agreement between seeds)."""
    if not stat or stat.get("mean") is None:
        return "-"
    if _finite_seeds(stat) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"


def _better_lr(block: dict) -> str | None:
    """The lr that did better than the reused one in this budget's lr check (seed 0), or None:
    no check here, or the reused lr was the best of it."""
    if "lr_check" not in block or block["lr_transfers"]:
        return None
    finite = {lr: v for lr, v in block["lr_check"].items() if v is not None}
    return min(finite, key=finite.get) if finite else None


def _base_better_lr(summary: dict, entry: dict) -> str | None:
    """:func:`_better_lr` of the check run at the base budget (an lr given without a sweep)."""
    return next((_better_lr(b) for b in (entry.get("budgets") or {}).values()
                 if b["steps"] == summary.get("base_steps")), None)


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
            name + (" *" if e.get("lr_at_grid_edge") else "") + (" +" if _base_better_lr(summary, e) else ""),
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
    planned = summary.get("seeds")
    text.append(f"mean±std over the finished seeds (of {planned} planned); speedup = steps of the baseline / steps to reach"
                " its final val loss; * = chosen lr at the edge of the grid; + = a given lr its lr check beat")
    starved = {name: e["starved_experts"] for name, e in summary["optimizers"].items() if "starved_experts" in e}
    if starved:
        text.append("starved experts at the end, per seed (under a tenth of an even share of the tokens, all layers): "
                    + "; ".join(f"{name} " + "/".join("-" if v is None else str(v) for v in vals)
                                for name, vals in starved.items()))
    if has_ladder(summary):
        text += ["", format_budget_table(summary)]
    checks = format_lr_checks(summary)
    if checks:
        text += ["", checks]
    return "\n".join(text)


def format_lr_checks(summary: dict) -> str:
    """The ladder's lr checks, one line per optimizer: at its longest budget, seed 0's final loss at
    each lr tried so far (the chosen one marked) and the best of them; "" if none ran."""
    lines = []
    for name, e in summary["optimizers"].items():
        for key, b in (e.get("budgets") or {}).items():
            if "lr_check" not in b:
                continue
            chosen = f"{b['lr']:g}"  # lr_check's keys are the lrs written with %g
            tried = ", ".join(f"{lr} -> " + ("-" if v is None else f"{v:.4f}") + (" (chosen)" if lr == chosen else "")
                              for lr, v in b["lr_check"].items())
            best = chosen if b["lr_transfers"] else _better_lr(b)
            verdict = "no finite loss" if best is None else f"best {best}" + (" (chosen)" if b["lr_transfers"] else "")
            lines.append(f"{name} at budget {key}: {tried}; {verdict}")
    if not lines:
        return ""
    return "\n".join(["lr check (seed 0, final val loss at each lr):"] + ["  " + line for line in lines])


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
            rows.append([name + (" +" if _better_lr(b) else ""), key, str(len(b["seeds"])),
                         _fmt(b["final_val_loss"], 4)] + cells)
    return "\n".join(_aligned(head, rows) + [
        "budget in units of the compute-optimal data (20 tokens per parameter); speedup: crossing metric, geometric "
        "mean over seeds with its paired 95% t-interval (* = excludes 1); fair: schedule-fair speedup; + = the "
        "lr check at this budget found a better lr than the reused one"])


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
    most = max((_finite_seeds(e["final_val_loss"]) for e in entries.values()), default=0)
    for name, e in entries.items():
        paired = e.get("paired", {})
        finished = _finite_seeds(e["final_val_loss"])  # fewer than the other rows: its mean is less settled
        better = _base_better_lr(summary, e)
        cells = [name + (" (lr at grid edge)" if e.get("lr_at_grid_edge") else "")
                 + (f" (lr check: {better} better)" if better else ""), f"{e['lr']:g}",
                 _fmt(e["final_val_loss"], 3) + (f" ({finished} seed{'s' if finished != 1 else ''})"
                                                 if finished < most else "")]
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
    write_figures(out.name, summary, load_runs(out), figs)
    (out / "report.txt").write_text(format_table(summary) + "\n")
    return summary


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
    budget_figure(load_pyplot(), labelled, Path(path))


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
