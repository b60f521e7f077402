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
    from pathlib import Path

    from .report import combined_budget_figure, format_markdown, format_table, write_report

    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "config.json").exists():
            raise ValueError(f"{run_dir}: not a run folder (no config.json); give the --out folder of an aro bench run")
    for run_dir in args.run_dirs:
        summary = write_report(Path(run_dir))
        if args.markdown is not None:
            names = _names(args.markdown) or None
            print(format_markdown(summary, names, args.versus))
        else:
            print(f"{run_dir}\n{format_table(summary)}")
    if args.budget_figure:
        combined_budget_figure([Path(d) for d in args.run_dirs], Path(args.budget_figure))
        print(f"\nbudget figure: {args.budget_figure}")
    return 0


def _stepbench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .stepbench import format_stepbench, run_stepbench

    result = run_stepbench(
        optimizers=_names(args.optimizers), presets=_names(args.models),
        dims=[int(d) for d in _names(args.dims)], train_preset=args.train_model or None, out=Path(args.out),
        warmup=args.warmup, repeats=args.repeats, budget_s=args.budget, slow_s=args.slow, max_step_s=args.max_step,
        threads=args.threads, warm=not args.cold_allocator, train_batch=args.train_batch,
    )
    print(format_stepbench(result))
    print(f"\nresults: {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_stepbench(sub) -> None:
    from .models import PRESETS as MODEL_PRESETS
    from .stepbench import DEFAULT_DIMS, DEFAULT_OPTIMIZERS, DEFAULT_PRESETS

    sb = sub.add_parser("stepbench", help="time the optimizer step (and training step) side by side",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sb.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                    help="comma-separated registry names (aro bench --help lists them)")
    sb.add_argument("--models", "--presets", dest="models", default=",".join(DEFAULT_PRESETS),
                    help=f"comma-separated model presets whose parameters are stepped, of {sorted(MODEL_PRESETS)} "
                         "(--presets is the former spelling)")
    sb.add_argument("--dims", default=",".join(map(str, DEFAULT_DIMS)), help="d for the d x d and d x 4d matrices")
    sb.add_argument("--train-model", "--train-preset", dest="train_model", default="small",
                    help="model preset of the training-step timing, '' to skip")
    sb.add_argument("--train-batch", type=int, default=16,
                    help="sequences per training step (16: the bench protocol's batch)")
    sb.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    sb.add_argument("--repeats", type=int, default=15, help="at most this many timed rounds")
    sb.add_argument("--budget", type=float, default=20.0, help="stop timing a case after this many seconds (>= 3 rounds)")
    sb.add_argument("--slow", type=float, default=3.0,
                    help="a case whose first step takes longer than this (s) is timed once and leaves the rounds")
    sb.add_argument("--max-step", type=float, default=60.0,
                    help="do not run torch.optim.Muon where it is predicted to take longer than this (s) per step")
    sb.add_argument("--cold-allocator", action="store_true",
                    help="time without first freeing a large block (fresh pages: not what a training loop sees)")
    sb.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    sb.add_argument("--out", default="benchmarks/results/stepbench-cpu.json", help="JSON path; the plot goes beside it")
    sb.set_defaults(func=_stepbench)


def _distbench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .distbench import format_distbench, run_distbench

    result = run_distbench(preset=args.preset, worlds=[int(w) for w in _names(args.worlds)], modes=_names(args.modes),
                           sharing=args.sharing, warmup=args.warmup, repeats=args.repeats, out=Path(args.out))
    print(format_distbench(result))
    print(f"\nresults: {args.out}")
    return 0


def _add_distbench(sub) -> None:
    db = sub.add_parser("distbench", help="distributed optimizer step per rank (gloo processes on this machine)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    db.add_argument("--preset", default="small", help="model preset")
    db.add_argument("--worlds", default="1,2,3", help="comma-separated world sizes")
    db.add_argument("--modes", default="ddp,fsdp2", help="ddp and/or fsdp2")
    db.add_argument("--sharing", default="none", choices=["none", "global", "chain"], help="rotation sharing plan")
    db.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    db.add_argument("--repeats", type=int, default=10, help="timed steps")
    db.add_argument("--out", default="benchmarks/results/distbench-cpu.json", help="JSON path")
    db.set_defaults(func=_distbench)


def _diagnose(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .diagnose import run_diagnose

    r = run_diagnose(Path(args.out), model=args.model, steps=args.steps, lr=args.lr)
    g, al = r["gain"], r["alignment"]
    print(f"(b) mean J(ARO)/J(eigen) - 1 over steps: {100 * sum(g['mean_gain']) / max(1, len(g['mean_gain'])):+.2f}%, "
          f"matrices where ARO is higher: {100 * sum(g['fraction_aro_higher']) / max(1, len(g['fraction_aro_higher'])):.0f}%")
    for p in ("identity", "eigen", "aro", "polar"):
        cells = "  ".join(f"s={s:g}: {m:.3f}+-{d:.3f}" for s, m, d in zip(al["sigmas"], al[p]["mean"], al[p]["std"]))
        print(f"(c) {p:<8} cos(G, U) {cells}")
    print(f"\nresults: {args.out}/diagnose.json and diagnose_*.png")
    return 0


def _add_diagnose(sub) -> None:
    dg = sub.add_parser("diagnose", help="rotation analyses: update spectra, objective gain, noisy alignment",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dg.add_argument("--out", default="docs/figures", help="folder for diagnose.json and the PNGs")
    dg.add_argument("--model", default="small", help="bench model preset of the training-run analysis")
    dg.add_argument("--steps", type=int, default=200, help="training steps of that run")
    dg.add_argument("--lr", type=float, default=1.6e-2, help="its lr (ARO-Sinkhorn's standard-sweep choice)")
    dg.set_defaults(func=_diagnose)


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
                        "against this optimizer")
    report.add_argument("--budget-figure", metavar="PNG",
                        help="also draw speedup against budget for all RUN_DIRs in one figure (one row each)")
    report.set_defaults(func=_report)
    _add_stepbench(sub)
    _add_distbench(sub)
    _add_diagnose(sub)
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
