"""The ``aro`` command.

    aro bench --preset quick                 # the main job: ARO-Sinkhorn vs AdamW vs Muon, < 10 min
    aro bench --preset standard              # the whole protocol, about 2 hours on 2 cores
    aro bench --optimizers adamw,aro-sign --steps 200 --lr-grid 2e-3,4e-3 --out runs/mine
    aro report runs/bench-quick              # rebuild summary and figures from the logs
    aro bench --preset budgets --out benchmarks/results/budgets/tiny   # speedup against training budget
    aro stepbench --out benchmarks/results/stepbench-cpu.json   # optimizer-step cost, side by side
    aro distbench --worlds 1,2,3 --modes ddp,fsdp2               # per-rank step time and work split
    aro diagnose --out docs/figures                              # the paper's rotation analyses
"""

from __future__ import annotations

import argparse
import sys

from .config import add_arguments, bench_epilog, config_from_args
from .options import add_options, options_from_args

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    from .protocol import run_benchmark
    from .report import format_table

    from .parallel import setup_parallel

    cfg = config_from_args(args)
    par = setup_parallel(args.parallel)
    say = print if par.is_main else (lambda *a, **k: None)
    say(f"aro bench: preset {cfg.preset}, model {cfg.model}, {len(cfg.optimizers)} optimizer(s), "
          f"{cfg.steps} steps, {cfg.seeds} seed(s) -> {cfg.out_dir}", flush=True)
    try:
        summary = run_benchmark(cfg, progress=not args.no_progress, par=par)
    finally:
        if par.mode != "none":
            import torch.distributed as dist

            dist.destroy_process_group()
    say(format_table(summary))
    say(f"\nresults: {cfg.out_dir}/summary.json, summary.csv, figures/")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .files import atomic_write_text
    from .report import (combined_budget_figure, combined_budget_summary, format_markdown, format_table, pairing_pool,
                         write_report)

    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "config.json").exists():
            raise ValueError(f"{run_dir}: not a run folder (no config.json); give the --out folder of an aro bench run")
    summaries = {run_dir: write_report(Path(run_dir)) for run_dir in args.run_dirs}
    pool = None
    if args.versus and len(args.run_dirs) > 1:  # --versus may name an optimizer of another folder
        configs = {d: json.loads((Path(d) / "config.json").read_text())["config"] for d in args.run_dirs}
        pool = pairing_pool(configs, summaries)
    for run_dir, summary in summaries.items():
        if args.markdown is not None:
            names = _names(args.markdown) or None
            print(format_markdown(summary, names, args.versus, pool))
        else:
            print(f"{run_dir}\n{format_table(summary)}")
    if args.budget_figure:
        combined_budget_figure(summaries, Path(args.budget_figure))
        print(f"\nbudget figure: {args.budget_figure}")
    if args.budget_summary:
        combined = combined_budget_summary(summaries)
        Path(args.budget_summary).parent.mkdir(parents=True, exist_ok=True)  # as --budget-figure does
        atomic_write_text(Path(args.budget_summary), json.dumps(combined, indent=1))
        print(f"budget summary: {args.budget_summary}")
    return 0


def _stepbench(args: argparse.Namespace) -> int:
    from .stepbench import StepbenchOptions, format_stepbench, run_stepbench

    options = options_from_args(StepbenchOptions, args)
    result = run_stepbench(options)
    print(format_stepbench(result))
    print(f"\nresults: {options.out} and {options.out.with_suffix('.png')}")
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _distbench(args: argparse.Namespace) -> int:
    from .distbench import DistbenchOptions, format_distbench, run_distbench

    options = options_from_args(DistbenchOptions, args)
    result = run_distbench(options)
    print(format_distbench(result))
    print(f"\nresults: {options.out}")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from .diagnose import DiagnoseOptions, run_diagnose

    options = options_from_args(DiagnoseOptions, args)
    r = run_diagnose(options)
    g, al = r["gain"], r["alignment"]
    print(f"(b) mean J(ARO)/J(eigen) - 1 over steps: {100 * sum(g['mean_gain']) / max(1, len(g['mean_gain'])):+.2f}%, "
          f"matrices where ARO is higher: {100 * sum(g['fraction_aro_higher']) / max(1, len(g['fraction_aro_higher'])):.0f}%")
    for p in ("identity", "eigen", "aro", "polar"):
        cells = "  ".join(f"s={s:g}: {m:.3f}+-{d:.3f}" for s, m, d in zip(al["sigmas"], al[p]["mean"], al[p]["std"]))
        print(f"(c) {p:<8} cos(G, U) {cells}")
    print(f"\nresults: {options.out}/diagnose.json and diagnose_*.png")
    return 0


def _add_subcommands(sub) -> None:
    """``aro stepbench``, ``aro distbench`` and ``aro diagnose``: each one's flags generated from
    its options dataclass (:mod:`aro.bench.options`)."""
    from .diagnose import DiagnoseOptions
    from .distbench import DistbenchOptions
    from .stepbench import StepbenchOptions

    for name, cls, func, help_text in (
        ("stepbench", StepbenchOptions, _stepbench,
         "time the optimizer step (and training step) side by side"),
        ("distbench", DistbenchOptions, _distbench,
         "distributed optimizer step per rank (gloo processes on this machine)"),
        ("diagnose", DiagnoseOptions, _diagnose,
         "rotation analyses: update spectra, objective gain, noisy alignment"),
    ):
        parser = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_options(parser, cls)
        parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="aro", description="Adaptively Rotated Optimization: benchmark and tools")
    parser.add_argument("--version", action="version", version=f"aro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="train small LMs with each optimizer under the controlled protocol",
                           epilog=bench_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(bench)
    bench.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    bench.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp2"],
                       help="data parallelism under torchrun (see aro.bench.parallel)")
    bench.set_defaults(func=_bench)
    report = sub.add_parser("report", help="rebuild summary.json/csv and figures from a run folder's logs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (aro bench --out)")
    report.add_argument("--markdown", nargs="?", const="", metavar="NAMES",
                        help="print the README's results table (optionally only these comma-separated optimizers)")
    report.add_argument("--versus", metavar="NAME", help="with --markdown: add the paired final-loss difference "
                        "against this optimizer, which may be in another of the RUN_DIRs if they differ only in "
                        "optimizers, lrs, budgets and seed counts")
    report.add_argument("--budget-figure", metavar="PNG",
                        help="also draw speedup against budget for all RUN_DIRs in one figure (one row each)")
    report.add_argument("--budget-summary", metavar="JSON",
                        help="also write the budget ladders of all RUN_DIRs into one JSON (one entry per folder, "
                        "each in its summary.json's budgets schema)")
    report.set_defaults(func=_report)
    _add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"aro {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
