"""Loading a state dict into :class:`aro.ARO`: is it this optimizer's, and does each state fit its parameter?

Torch's loader copies whatever matches by position; a checkpoint of another grouping, model or
orientation would load silently and corrupt the step. These checks run first and name the group
or parameter that does not fit, and how to fix it.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor

from . import state_schema as S
from .spec import GroupSpec, resolve
from .validation import param_label

__all__ = ["check_grouping", "check_saved_state", "checked_pairs", "copy_state_value"]

_REGROUP = ("rebuild the optimizer with the grouping it was saved with (the same aro.param_groups(model, mode=..., "
            "sharing=..., no_decay=...); checkpoints from before no_decay existed need no_decay=()), or load only "
            "the model and start a fresh optimizer")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")


def _unwrapped(name: str) -> str:
    """A parameter name without the prefixes torch.compile, DDP and FSDP1 wrappers add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
        name = name.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
    return name


def _sharing_plan(group: dict[str, Any]) -> list | None:
    plan = group.get("shared")
    return None if plan is None else [[list(entry) for entry in spec] for spec in plan]


def check_grouping(saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """The saved optimizer must group the parameters as this one does; say so before any
    per-parameter check would report a confusing shape error about an unrelated parameter."""
    if len(saved_groups) != len(groups):
        raise ValueError(f"the saved optimizer state has {len(saved_groups)} parameter groups, this optimizer has "
                         f"{len(groups)}: the grouping (mode, sharing) differs; {_REGROUP}")
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        mine, theirs = _sharing_plan(group), _sharing_plan(saved)
        if mine != theirs:
            describe = lambda plan: "no shared rotations" if plan is None else f"{len(plan)} shared rotation(s)"
            raise ValueError(f"param_groups[{g}]: saved with {describe(theirs)}, this optimizer has {describe(mine)}: "
                             f"the sharing plan differs; {_REGROUP}")
        names, saved_names = group.get("param_names"), saved.get("param_names")
        if names is not None and saved_names is not None:
            mine_n, theirs_n = [_unwrapped(n) for n in names], [_unwrapped(n) for n in saved_names]
            if mine_n != theirs_n:
                i = next(i for i, (a, b) in enumerate(zip(mine_n + [None], theirs_n + [None])) if a != b)
                here = mine_n[i] if i < len(mine_n) else "nothing"
                there = theirs_n[i] if i < len(theirs_n) else "nothing"
                raise ValueError(f"param_groups[{g}] holds other parameters than the saved one (at index {i}: "
                                 f"{here!r} here, {there!r} saved); the grouping differs; {_REGROUP}")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param_groups[{g}] has {len(group['params'])} parameters, the saved one "
                             f"{len(saved['params'])}: the grouping differs; {_REGROUP}")


def copy_state_value(key: str, value: Any, p: Tensor) -> Any:
    if isinstance(value, Tensor):
        if key == S.STEP:
            return value.detach().clone()
        return value.detach().to(device=p.device, copy=True)
    return copy.deepcopy(value)


def check_saved_state(spec: GroupSpec, index: int, p: Tensor, st: dict[str, Any], label: str) -> None:
    """Raise ValueError if the saved state ``st`` cannot belong to parameter ``index`` of the group
    whose (saved) values ``spec`` was resolved from."""
    for key in (S.MOMENTUM, S.EXP_AVG):
        if key in st and tuple(st[key].shape) != tuple(p.shape):
            raise ValueError(f"saved state {key!r} has shape {tuple(st[key].shape)}, which does not fit {label}")
    if S.ORIENTATION not in st:
        if S.EXP_AVG_SQ in st and tuple(st[S.EXP_AVG_SQ].shape) != tuple(p.shape):
            raise ValueError(f"saved state 'exp_avg_sq' has shape {tuple(st[S.EXP_AVG_SQ].shape)}, which does not fit {label}")
        return
    orientation = st[S.ORIENTATION]
    if orientation not in ("rows", "cols"):
        raise ValueError(f"saved state 'orientation' is {orientation!r} for {label}; expected 'rows' or 'cols'")
    if p.ndim < 2:
        raise ValueError(f"saved state holds a rotation, but {label} is not a matrix")
    shared = spec.sharing.holder_of.get(index)
    if shared is not None and shared[1] != orientation:
        raise ValueError(f"saved orientation {orientation!r} of {label} differs from the sharing plan's {shared[1]!r}")
    for key, shape in S.state_shapes(spec, index, p, orientation).items():
        if shape is not None and key in st and tuple(st[key].shape) != shape:
            raise ValueError(f"saved state {key!r} has shape {tuple(st[key].shape)}, expected {shape} for {label}")


def checked_pairs(groups: list[dict[str, Any]], state_dict: dict[str, Any],
                  defaults: dict[str, Any]) -> list[tuple[Tensor, dict[str, Any]]]:
    """Each parameter with its saved state, checked against it (``ValueError`` naming the
    parameter); a group's spec is resolved from its saved values, as torch's loader restores them."""
    saved_state = state_dict["state"]
    pairs = []
    for group, saved in zip(groups, state_dict["param_groups"]):
        spec = resolve({**defaults, **saved})
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            if pid in saved_state:
                check_saved_state(spec, i, p, saved_state[pid], param_label(group, i, p))
                pairs.append((p, saved_state[pid]))
    return pairs
