"""Argument checks of :class:`aro.ARO`: every error names the argument, its value and the fix."""

from __future__ import annotations

import difflib
import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .functional.projections import SINKHORN_VARIANTS, STATELESS_PROJECTIONS
from .functional.qr import QR_METHODS
from .functional.rotation import ESTIMATORS, ROTATION_POLICIES
from .layout import MATRIX_VIEWS, ORIENTATIONS, matrix_shape

__all__ = ["ALGORITHMS", "base_names", "NONFINITE_POLICIES", "OTHER_GROUP_KEYS", "index_of", "is_named", "name_group",
           "param_label", "stepping_params", "validate_group_keys", "validate_hyperparameters", "validate_param",
           "validate_sharing"]

ALGORITHMS = ("auto", "aro", "adamw")
NONFINITE_POLICIES = ("skip", "raise")


# Keys a group may carry besides ARO's hyperparameters: torch's own and those that
# learning-rate schedulers and SWA add to the groups they manage.
OTHER_GROUP_KEYS = frozenset({"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum",
                              "max_momentum", "swa_lr", "lr_scale"})


# Keys from other optimizers' vocabularies, with ARO's name for the same thing.
KEY_HINTS = {"momentum": "beta", "dampening": "beta", "lr_decay": "weight_decay", "decay": "weight_decay"}


def base_names() -> tuple[str, ...]:
    """The base projections ``base=`` accepts by name (read at each check: a projection added to
    ``STATELESS_PROJECTIONS`` is accepted at once)."""
    return tuple(sorted(STATELESS_PROJECTIONS)) + ("adam",)


def validate_group_keys(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A key close to a valid one is a typo: ValueError naming it and the closest valid key (torch
    would keep it and silently use the default). Any other unknown key (a framework's ``name``,
    ``lr_mult``, ``layer_id`` ...) is kept, as torch keeps it, with a warning that ARO ignores it."""
    valid = set(defaults) | OTHER_GROUP_KEYS
    for key in group:
        if key in valid:
            continue
        close = [KEY_HINTS[key]] if key in KEY_HINTS else difflib.get_close_matches(str(key), sorted(valid), n=1,
                                                                                     cutoff=0.75)
        if close:
            raise ValueError(f"Invalid param group key {key!r}; did you mean {close[0]!r}?")
        warnings.warn(f"param group key {key!r} is not an ARO option; it is kept in the group and ignored",
                      UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stack level of the first frame outside aro and torch.optim (the user's call)."""
    import inspect
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    optim = os.path.dirname(os.path.abspath(torch.optim.__file__))
    for level, frame in enumerate(inspect.stack()[1:], start=1):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(here) or path.startswith(optim)):
            return level
    return 1


def validate_param(group: dict[str, Any], p: Any, label: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"ARO params must be tensors, got {type(p).__name__} for {label}")
    if p.is_complex():
        raise ValueError(f"ARO does not support complex parameters: {label}; view it as real with torch.view_as_real")
    if not p.is_floating_point():
        raise ValueError(f"ARO needs floating-point parameters: {label}")
    if group["algorithm"] == "aro" and p.ndim < 2:
        raise ValueError(
            f"algorithm='aro' needs matrices, but {label} has {p.ndim} dimension(s); "
            "put it in a group with algorithm='adamw' (or 'auto')"
        )


def validate_sharing(group: dict[str, Any]) -> None:
    """``shared``: a list of rotation specs, each a list of ``[param_index, "rows"|"cols"]``.

    Every member must be a matrix on the ARO path, appear in at most one spec, and rotate a
    side of the same size ``d`` as the other members of its spec.
    """
    specs = group.get("shared")
    if specs is None:
        return
    if not isinstance(specs, (list, tuple)):
        raise TypeError(f"Invalid shared: {specs!r}; expected a list of [[param_index, 'rows'|'cols'], ...] lists")
    params = group["params"]
    seen: dict[int, int] = {}
    for k, spec in enumerate(specs):
        if not isinstance(spec, (list, tuple)) or not spec:
            raise ValueError(f"Invalid shared[{k}]: {spec!r}; expected a non-empty list of [param_index, side] pairs")
        sides = set()
        for entry in spec:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"Invalid shared[{k}] entry {entry!r}; expected [param_index, 'rows'|'cols']")
            i, side = entry
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(f"Invalid shared[{k}] index {i!r}; the group has {len(params)} parameters")
            if side not in ("rows", "cols"):
                raise ValueError(f"Invalid shared[{k}] side {side!r} for parameter {i}; expected 'rows' or 'cols'")
            if i in seen:
                raise ValueError(f"parameter {i} is in shared[{seen[i]}] and shared[{k}]; a matrix has one rotation")
            seen[i] = k
            p = params[i]
            if p.ndim < 2 or group["algorithm"] == "adamw":
                raise ValueError(f"shared[{k}] lists parameter {i} (shape {tuple(p.shape)}), which is not on the ARO path")
            sides.add(matrix_shape(tuple(p.shape), side, group["matrix_view"]).m)
        if len(sides) != 1:
            raise ValueError(f"shared[{k}] rotates sides of different sizes {sorted(sides)}; a shared rotation needs one size")


def validate_hyperparameters(g: dict[str, Any]) -> None:
    """ValueError/TypeError naming the argument and its value."""

    def number(name: str, lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = True) -> None:
        v = g[name]
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"Invalid {name}: tensor with {v.numel()} elements; expected one")
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"Invalid {name}: {g[name]!r}; expected a number")
        bad = (v <= lo if lo_open else v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)) or math.isnan(v)
        if bad:
            lo_b, hi_b = ("(" if lo_open else "["), (")" if hi_open else "]")
            raise ValueError(f"Invalid {name}: {v}; expected a value in {lo_b}{lo}, {hi if hi is not None else 'inf'}{hi_b}")

    def choice(name: str, options: tuple) -> None:
        if g[name] not in options:
            raise ValueError(f"Invalid {name}: {g[name]!r}; expected one of {options}")

    def flag(name: str) -> None:
        if not isinstance(g[name], bool):
            raise TypeError(f"Invalid {name}: {g[name]!r}; expected True or False")

    number("lr", 0.0)
    number("beta", 0.0, 1.0)
    number("weight_decay", 0.0)
    if not callable(g["base"]):
        choice("base", base_names())
    choice("rotation", ROTATION_POLICIES)
    choice("qr", QR_METHODS + ("auto",))
    it = g["sinkhorn_iters"]
    if isinstance(it, bool) or not isinstance(it, int) or it < 1:
        raise ValueError(f"Invalid sinkhorn_iters: {it!r}; expected an integer >= 1")
    choice("sinkhorn_variant", SINKHORN_VARIANTS)
    flag("nesterov")
    if g["rms_target"] is not None:
        number("rms_target", 0.0, lo_open=True, hi=None)
    choice("orientation", ORIENTATIONS)
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for j, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid betas[{j}]: {b!r}; expected a value in [0, 1)")
    number("eps", 0.0)
    flag("maximize")
    choice("nonfinite", NONFINITE_POLICIES)
    choice("algorithm", ALGORITHMS)
    choice("matrix_view", MATRIX_VIEWS)
    choice("estimator", ESTIMATORS)
    md = g.get("matmul_dtype")
    if md is not None and md != "auto" and md not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"Invalid matmul_dtype: {md!r}; expected None, torch.bfloat16, torch.float16, torch.float32 "
                         "or 'auto'")
    k = g.get("rotation_every", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid rotation_every: {k!r}; expected an integer >= 1 (1 = a new rotation every step)")
    if g["estimator"] == "stack" and g["base"] == "adam" and g.get("shared"):
        raise ValueError("Invalid estimator: 'stack' needs a stateless base projection; use estimator='sum' with base='adam'")


def stepping_params(group: dict[str, Any]) -> list[Tensor]:
    """The parameters of ``group`` with a (dense) gradient and at least one element."""
    params = []
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"ARO does not support sparse gradients ({param_label(group, i, p)}); "
                               "use a dense embedding (sparse=False) or torch.optim.SparseAdam for it")
        if p.numel():  # nothing to update otherwise (global size: every rank decides alike)
            params.append(p)
    return params


def is_named(group: dict[str, Any]) -> bool:
    params = group["params"]
    if isinstance(params, Tensor):
        return False
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs; use a list")
    params = list(params)
    group["params"] = params  # a generator is read once
    return "param_names" in group or (bool(params) and isinstance(params[0], tuple))


def name_group(group: dict[str, Any], g: int) -> dict[str, Any]:
    params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
    return {**group, "params": [(f"added.{g}.{i}", p) for i, p in enumerate(params)]}


def param_label(group: dict[str, Any], index: int, p: Tensor) -> str:
    names = group.get("param_names")
    name = f"{names[index]!r} " if names and index < len(names) else ""
    return f"parameter {name}(index {index}, shape {tuple(p.shape)}, dtype {p.dtype})"


def index_of(group: dict[str, Any], p: Tensor) -> int:
    return next(i for i, q in enumerate(group["params"]) if q is p)
