"""The ``aro`` command.

    aro bench --preset quick                 # the main job: ARO-Sinkhorn vs AdamW vs Muon, < 10 min
    aro bench --preset standard              # the whole protocol, about 2 hours on 2 cores
    aro bench --optimizers adamw,aro-sign --steps 200 --lr-grid 2e-3,4e-3 --out runs/mine
    aro report runs/bench-quick              # rebuild summary and figures from the logs
"""

from __future__ import annotations

import argparse
import sys

from .config import add_arguments, config_from_args

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    from .protocol import run_benchmark
    from .report import format_table

    cfg = config_from_args(args)
    print(f"aro bench: preset {cfg.preset}, model {cfg.model}, {len(cfg.optimizers)} optimizer(s), "
          f"{cfg.steps} steps, {cfg.seeds} seed(s) -> {cfg.out_dir}", flush=True)
    summary = run_benchmark(cfg, progress=not args.no_progress)
    print(format_table(summary))
    print(f"\nresults: {cfg.out_dir}/summary.json, summary.csv, figures/")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import format_table, write_report

    summary = write_report(args.run_dir)
    print(format_table(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aro", description="Adaptively Rotated Optimization: benchmark and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="train small LMs with each optimizer under the controlled protocol")
    add_arguments(bench)
    bench.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    bench.set_defaults(func=_bench)
    report = sub.add_parser("report", help="rebuild summary.json/csv and figures from a run folder's logs")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)
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
