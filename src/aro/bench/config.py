"""The benchmark configuration: one dataclass, its presets, and the command line made from it.

Every option is declared once, as a field of :class:`BenchConfig`; the ``aro bench`` flags are
generated from the fields (``lr_grid`` -> ``--lr-grid``), a JSON file given with ``--config``
must use field names, and unknown keys or wrong types are rejected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .budget import budget_unit, steps_for_budget
from .models import PRESETS as MODEL_PRESETS
from .optimizers import OPTIMIZERS
from .options import converter

__all__ = ["BenchConfig", "PRESETS", "add_arguments", "config_from_args", "resolve"]

ALL_OPTIMIZERS = tuple(OPTIMIZERS)


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run (see docs/BENCHMARK.md for the protocol)."""

    preset: str = "quick"
    optimizers: tuple[str, ...] = ("aro-sinkhorn", "adamw", "muon")
    model: str = "small"
    data: str | None = None  # None: the Python standard library's source
    steps: int = 300  # base step budget S
    batch_size: int = 16
    seeds: int = 2  # runs at the chosen lr: seeds 0..seeds-1 (seed 0 is the sweep run)
    lr: float | None = None  # one lr for every optimizer (no sweep)
    lr_grid: tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3)
    # per-optimizer grids (name -> grid), each with as many points as lr_grid
    lr_grid_by_optimizer: dict[str, tuple[float, ...]] = field(default_factory=dict)
    lr_by_optimizer: dict[str, float] = field(default_factory=dict)  # fixed lrs, no sweep
    warmup_frac: float = 0.05  # linear warmup over this fraction of the steps
    min_lr_frac: float = 0.1  # cosine decays to this fraction of the peak lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 8
    precision: str = "fp32"  # "fp32" or "bf16" (autocast, float32 master weights)
    overtrain: tuple[int, ...] = (1,)  # budgets as multiples of `steps`
    # budgets in the paper's unit, multiples of 20 tokens per parameter (aro.bench.budget); when
    # given, `steps` is budget 1's step count, lrs are swept there and reused at the others
    budgets: tuple[float, ...] = ()
    budget_seeds: int = 2  # seeds at every budget but 1 (which runs `seeds`)
    tokens_per_parameter: float = 20.0  # one budget unit (Chinchilla's compute-optimal ratio)
    threads: int = 0  # torch threads per process; 0: torch's default (with jobs > 1: cores / jobs)
    jobs: int = 1  # runs trained at once, each in its own process (aro.bench.jobs)
    out: str | None = None  # run folder; default runs/bench-<preset>

    def __post_init__(self) -> None:
        _check_types(self)
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"--optimizers: unknown {unknown}; choose from {sorted(OPTIMIZERS)}")
        if not self.optimizers:
            raise ValueError("--optimizers: give at least one optimizer")
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"--model {self.model!r}: choose from {sorted(MODEL_PRESETS)}")
        for flag, mapping in (("lr-by-optimizer", self.lr_by_optimizer), ("lr-grid-by-optimizer", self.lr_grid_by_optimizer)):
            for name in mapping:
                if name not in OPTIMIZERS:
                    raise ValueError(f"--{flag}: unknown optimizer {name!r}")
        for name, grid in self.lr_grid_by_optimizer.items():
            if not isinstance(grid, tuple):
                raise TypeError(f"--lr-grid-by-optimizer: {name} needs a grid like {name}=1e-3/2e-3/4e-3, got {grid!r}")
            if len(grid) != len(self.lr_grid):
                raise ValueError(
                    f"--lr-grid-by-optimizer: {name} has {len(grid)} points, --lr-grid has {len(self.lr_grid)}; "
                    "every optimizer gets the same number of lr points"
                )
        positive = {"steps": self.steps, "batch_size": self.batch_size, "seeds": self.seeds, "eval_every": self.eval_every,
                    "eval_batches": self.eval_batches, "jobs": self.jobs}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        lrs = ([self.lr] if self.lr is not None else []) + list(self.lr_grid) + list(self.lr_by_optimizer.values())
        lrs += [v for grid in self.lr_grid_by_optimizer.values() for v in grid]
        if any(v <= 0 for v in lrs) or not self.lr_grid:
            raise ValueError("learning rates must be positive and --lr-grid non-empty")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision {self.precision!r}: choose fp32 or bf16")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError("--warmup-frac must be in [0, 1) and --min-lr-frac in [0, 1]")
        if any(k < 1 for k in self.overtrain) or 1 not in self.overtrain:
            raise ValueError("--overtrain multiples must be >= 1 and include 1")
        if self.budgets:
            if 1 not in self.budgets or any(not k > 0 for k in self.budgets):
                raise ValueError(f"--budgets {','.join(map(str, self.budgets))}: budgets must be > 0 and include 1 "
                                 "(learning rates are swept at budget 1)")
            if self.overtrain != (1,):
                raise ValueError("--budgets and --overtrain both set budgets; give one of them")
            if self.tokens_per_parameter <= 0:
                raise ValueError(f"--tokens-per-parameter must be > 0, got {self.tokens_per_parameter}")
            if self.steps != self.budget_steps(1):
                raise ValueError(f"--steps {self.steps} does not match --budgets: budget 1 of {self.model} at batch "
                                 f"{self.batch_size} is {self.budget_steps(1)} steps; leave --steps out")
            if self.budget_seeds < 1:
                raise ValueError(f"--budget-seeds must be >= 1, got {self.budget_seeds}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/bench-{self.preset}")

    def budget_steps(self, budget: float) -> int:
        """Steps of ``budget`` x ``tokens_per_parameter`` tokens per parameter for this model and batch."""
        return steps_for_budget(budget, budget_unit(self.model, self.batch_size, self.tokens_per_parameter))

    def lr_candidates(self, optimizer: str) -> tuple[float, ...]:
        if self.lr is not None:
            return (self.lr,)
        if optimizer in self.lr_by_optimizer:
            return (self.lr_by_optimizer[optimizer],)
        return self.lr_grid_by_optimizer.get(optimizer, self.lr_grid)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Learning rates of the quick preset: the ones the standard preset's sweep chose (seed 0, best
# final validation loss, every optimum bracketed). Source: benchmarks/results/standard/summary.json,
# made by `aro bench --preset standard --out benchmarks/results/standard`.
QUICK_LRS = {"aro-sinkhorn": 1.6e-2, "adamw": 4e-3, "muon": 1.6e-2}

PRESETS: dict[str, dict[str, Any]] = {
    # The main job: at most 10 minutes on 2 cores.
    "quick": dict(optimizers=("aro-sinkhorn", "adamw", "muon"), steps=300, seeds=2, lr_by_optimizer=QUICK_LRS),
    # The whole protocol: every optimizer, lr sweep, 3 seeds; about 2 hours on 2 cores.
    "standard": dict(
        optimizers=(
            "adamw", "muon", "sinkgd", "eigen-sinkhorn", "eigen-adam",
            "aro-sinkhorn", "aro-sign", "aro-adam", "aro-rownorm", "aro-sinkhorn-full",
            "soap", "normuon", "adamuon", "dion", "dion-rms",
        ),
        steps=600,
        seeds=3,
        # Four points for every optimizer. Every matrix method (RMS-matched to 0.2) shares one
        # grid; AdamW's is centred on its own optimum, which exploratory 400-step runs put near
        # 2e-3 while Muon and ARO-Sinkhorn did best near 1.6e-2 (the "lr transfer" of the paper's §5.1
        # does not hold at this scale; see the README).
        lr_grid=(4e-3, 8e-3, 1.6e-2, 3.2e-2),
        # SOAP was first swept on AdamW's grid (its update has Adam's scale); its optimum ran off
        # the top even after the two extensions (best at 1.6e-2), so it shares the matrix grid.
        lr_grid_by_optimizer={"adamw": (5e-4, 1e-3, 2e-3, 4e-3)},
    ),
    # Speedup against the training budget, in the paper's unit (README "Speedup against training
    # budget" gives the ladder's machine-hours and the commands for the small and MoE models:
    # the same preset with --model small --budgets 1 and --model moe-small --budgets 1).
    "budgets": dict(
        optimizers=("adamw", "muon", "aro-sinkhorn", "soap", "eigen-adam", "aro-sinkhorn-full"),
        model="tiny",
        budgets=(0.5, 1.0, 2.0, 4.0, 8.0),
        seeds=3,
        budget_seeds=2,
        eval_every=100,
        lr_grid=(4e-3, 8e-3, 1.6e-2, 3.2e-2),
        lr_grid_by_optimizer={"adamw": (5e-4, 1e-3, 2e-3, 4e-3)},
    ),
    # CI smoke test: seconds.
    "smoke": dict(optimizers=("aro-sinkhorn", "adamw"), model="tiny", steps=12, seeds=1, batch_size=4, eval_every=4,
                  eval_batches=2, lr_grid=(2e-3,)),
}


def resolve(preset: str, overrides: dict[str, Any]) -> BenchConfig:
    """Preset values, then ``overrides`` (only keys that are fields)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose from {sorted(PRESETS)}")
    names = {f.name for f in fields(BenchConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    if ("lr" in overrides or "lr_grid" in overrides) and "lr_by_optimizer" not in overrides:
        values["lr_by_optimizer"] = {}  # an explicit lr or grid replaces the preset's fixed lrs
    if values.get("budgets"):
        if "steps" in overrides:
            raise ValueError("--steps and --budgets: give one (the steps follow from the budget and the batch)")
        model = values.get("model", BenchConfig.model)
        unit = (values.get("batch_size", BenchConfig.batch_size), values.get("tokens_per_parameter", 20.0))
        values["steps"] = steps_for_budget(1, budget_unit(model, *unit)) if model in MODEL_PRESETS else 1
    if "lr_grid" in overrides and "lr_grid_by_optimizer" not in overrides:
        values["lr_grid_by_optimizer"] = {}  # ... and the preset's per-optimizer grids
    return BenchConfig(**values)


# ---------------------------------------------------------------- command line from the fields
def _parse_mapping(text: str) -> dict[str, Any]:
    """``name=lr,name2=lr2`` or, for grids, ``name=lr1/lr2/lr3,...``."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected name=value pairs, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = tuple(float(x) for x in v.split("/")) if "/" in v else float(v)
    return out


def _converter(tp: Any):
    """The subcommands' converter (:func:`aro.bench.options.converter`), plus name=value mappings."""
    return _parse_mapping if typing.get_origin(tp) is dict else converter(tp)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(BenchConfig)


# One line of help per field; the help shows the quick preset's value (the default preset; any
# other preset sets its own values, listed in PRESETS below).
FIELD_HELP = {
    "preset": "preset to start from; every other flag overrides one of its values",
    "optimizers": "comma-separated registry names (listed below)",
    "model": "model preset",
    "data": "text file or folder to train on; default: the Python standard library's source",
    "steps": "base step budget (with --budgets it follows from budget 1)",
    "batch_size": "sequences per step",
    "seeds": "seeds at the chosen lr (seed 0 is the sweep run)",
    "lr": "one lr for every optimizer (no sweep)",
    "lr_grid": "comma-separated lr sweep, the same number of points for every optimizer",
    "lr_grid_by_optimizer": "per-optimizer grids, name=lr1/lr2/...,name2=...",
    "lr_by_optimizer": "fixed lrs (no sweep), name=lr,name2=lr",
    "warmup_frac": "linear warmup over this fraction of the steps",
    "min_lr_frac": "cosine decays to this fraction of the peak lr",
    "weight_decay": "decoupled weight decay on every parameter",
    "grad_clip": "global gradient-norm clip (0: off)",
    "eval_every": "steps between validation evaluations",
    "eval_batches": "validation batches per evaluation",
    "precision": "fp32 or bf16 (autocast, float32 master weights)",
    "overtrain": "comma-separated budgets as multiples of --steps (must include 1)",
    "budgets": "comma-separated budgets in units of --tokens-per-parameter tokens per parameter (must include 1)",
    "budget_seeds": "seeds at every budget but 1",
    "tokens_per_parameter": "one budget unit: tokens per parameter (Chinchilla's 20)",
    "threads": "torch threads per process (0: torch's default; with --jobs N, the cores divided by N)",
    "jobs": "runs trained at once, each in its own process (e.g. 2 on 2 cores, one thread each)",
    "out": "run folder (default runs/bench-<preset>); a rerun resumes it",
}


def bench_epilog() -> str:
    """The registry's names and one-line descriptions, for ``aro bench --help``."""
    width = max(map(len, OPTIMIZERS))
    return "optimizers:\n" + "\n".join(f"  {n:<{width}}  {s.description}" for n, s in OPTIMIZERS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field; the help shows the quick preset's value as the default (the
    parsed default stays None, so a preset's own value applies unless the flag is given)."""
    parser.add_argument("--config", help="JSON file with config fields (applied before flags)")
    types = _field_types()
    quick = resolve("quick", {})
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "preset":
            parser.add_argument(flag, default="quick", choices=sorted(PRESETS),
                                help=f"{FIELD_HELP[f.name]} (default: %(default)s)")
            continue
        value = getattr(quick, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        help_text = f"{FIELD_HELP[f.name]} (quick: {shown})" if value not in (None, {}, ()) else FIELD_HELP[f.name]
        choices = sorted(MODEL_PRESETS) if f.name == "model" else (["fp32", "bf16"] if f.name == "precision" else None)
        parser.add_argument(flag, dest=f.name, type=_converter(types[f.name]), default=None, choices=choices,
                            help=help_text.replace("%", "%%"))


def _check_types(cfg: BenchConfig) -> None:
    types = _field_types()
    for f in fields(cfg):
        value, tp = getattr(cfg, f.name), types[f.name]
        origin = typing.get_origin(tp)
        ok = True
        if origin is tuple:
            ok = isinstance(value, tuple) and all(isinstance(v, typing.get_args(tp)[0]) or
                                                   (typing.get_args(tp)[0] is float and isinstance(v, int)) for v in value)
        elif origin is dict:
            ok = isinstance(value, dict)
        elif origin is not None:  # Optional[x]
            inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
            ok = value is None or isinstance(value, inner) or (inner is float and isinstance(value, int))
        elif tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if not ok:
            raise TypeError(f"config field {f.name!r}: {value!r} is not of type {tp}")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    overrides: dict[str, Any] = {}
    if args.config:
        data = json.loads(Path(args.config).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object")
        for key in ("optimizers", "lr_grid", "overtrain", "budgets"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if isinstance(data.get("lr_grid_by_optimizer"), dict):
            data["lr_grid_by_optimizer"] = {k: tuple(v) if isinstance(v, list) else v
                                            for k, v in data["lr_grid_by_optimizer"].items()}
        overrides.update({k: v for k, v in data.items() if k != "preset"})
    for f in fields(BenchConfig):
        if f.name != "preset" and getattr(args, f.name, None) is not None:
            overrides[f.name] = getattr(args, f.name)
    return resolve(args.preset, overrides)
