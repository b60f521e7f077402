"""The optimizer state of :class:`aro.ARO`, declared once: keys, who holds each tensor, shape, frame.

Checkpoints depend on the keys. Per parameter on the ARO path (matrices):

* ``step`` -- 0-d float32 CPU tensor, steps taken by this parameter.
* ``orientation`` -- ``"rows"`` (R acts on dim -2) or ``"cols"`` (R acts on dim -1), fixed at
  the first step so that a checkpoint resumes with the same frame.
* ``momentum_buffer`` -- :math:`M`, shaped like the parameter, in the parameter's frame.
* ``rotation`` -- :math:`R`, ``(m, m)`` with ``m`` the rotated side; ``(E, m, m)`` for a 3-D
  parameter of ``E`` matrices. Held once per *unit* (a rotation and the matrices it updates) by
  its *holder*: the matrix itself, or the first member of a shared rotation (``(d, d)``).
  Absent for the ``identity`` policy.
* ``exp_avg_sq`` -- the Adam projection's second moment, in the rotated frame, shaped like the
  oriented matrix ``(m, n)`` or ``(E, m, n)``; only for ``base="adam"``.

On the AdamW path (everything else): ``step``, ``exp_avg``, ``exp_avg_sq``, as in
:class:`torch.optim.AdamW`. State is float32 for float32/bf16/fp16 parameters and float64 for
float64 ones.

The tensors a rotated step reads and writes are the :class:`Field` records below; the step's
initialization, checkpoint validation and the distributed transports all iterate them, so a new
stateful projection or a policy without a rotation is a change here (and in :mod:`aro.spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["EXP_AVG", "EXP_AVG_SQ", "MOMENTUM", "ORIENTATION", "ROTATION", "STEP", "UPDATE", "Field", "MOMENTUM_FIELD",
           "ROTATION_FIELD", "SECOND_MOMENT_FIELD", "UPDATE_FIELD", "init_adamw_state", "init_state", "rotated_state", "state_dtype", "state_shapes",
           "step_inputs", "step_outputs"]

STEP = "step"
MOMENTUM = "momentum_buffer"
ROTATION = "rotation"
ORIENTATION = "orientation"
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
UPDATE = "update"  # not state: the step's result per matrix, carried like the rotated state


@dataclass(frozen=True)
class Field:
    """One tensor of a unit's step.

    ``held_by``: ``"holder"`` (one per unit, in the state of the rotation's holder) or
    ``"member"`` (one per matrix). ``frame``: ``"parameter"`` (the parameter's own layout) or
    ``"rotated"`` (the oriented matrix, rotated side first). ``square``: ``(m, m)`` instead of
    ``(m, n)``. ``initial``: ``"eye"`` or ``"zeros"`` for state; None for a step output.
    """

    key: str
    held_by: str
    frame: str
    square: bool = False
    initial: str | None = "zeros"


MOMENTUM_FIELD = Field(MOMENTUM, "member", "parameter")
ROTATION_FIELD = Field(ROTATION, "holder", "rotated", square=True, initial="eye")
SECOND_MOMENT_FIELD = Field(EXP_AVG_SQ, "member", "rotated")
UPDATE_FIELD = Field(UPDATE, "member", "rotated", initial=None)


def rotated_state(spec: Any) -> tuple[Field, ...]:
    """The rotated-frame state of a unit under ``spec`` (an :class:`aro.spec.GroupSpec`)."""
    return (ROTATION_FIELD,) * spec.has_rotation + (SECOND_MOMENT_FIELD,) * spec.stateful_f


def step_inputs(spec: Any) -> tuple[Field, ...]:
    return (MOMENTUM_FIELD,) + rotated_state(spec)


def step_outputs(spec: Any) -> tuple[Field, ...]:
    return (UPDATE_FIELD,) + rotated_state(spec)


def state_shapes(spec: Any, index: int, p: Tensor, orientation: str) -> dict[str, tuple[int, ...] | None]:
    """Shape of each rotated-frame state tensor of parameter ``index``; None where it holds none
    (a shared member that is not its rotation's holder)."""
    ms = spec.matrix_shape(p, orientation)
    shared = spec.sharing.holder_of.get(index)
    lead = (ms.count,) if spec.batched(p) else ()
    shapes: dict[str, tuple[int, ...] | None] = {}
    for field in rotated_state(spec):
        tail = (ms.m, ms.m) if field.square else (ms.m, ms.n)
        if field.held_by == "holder" and shared is not None:
            shapes[field.key] = tail if shared[0] == index else None
        else:
            shapes[field.key] = lead + tail
    return shapes


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 parameters keep float64 state; every other floating dtype keeps (and computes in) float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def init_state(spec: Any, index: int, p: Tensor, state: dict, dtype: torch.dtype,
               place: Callable[[Tensor], Tensor] | None = None) -> None:
    """Fresh state for parameter ``index``; ``place`` lays a whole rotated-frame tensor out as the
    parameter is (a shard of it for FSDP2), or is None."""
    place = place or (lambda t: t)
    orientation = spec.orientation_of(index, p)
    state[STEP] = torch.tensor(0.0)
    state[ORIENTATION] = orientation
    state[MOMENTUM] = _zeros_like(p, dtype)
    fields = {f.key: f for f in rotated_state(spec)}
    for key, shape in state_shapes(spec, index, p, orientation).items():
        if shape is None:
            continue
        if fields[key].initial == "eye":
            t = torch.eye(shape[-1], dtype=dtype, device=p.device).expand(shape).clone()
        else:
            t = torch.zeros(shape, dtype=dtype, device=p.device)
        state[key] = place(t)


def init_adamw_state(p: Tensor, state: dict, dtype: torch.dtype) -> None:
    """Fresh AdamW-path state, as :class:`torch.optim.AdamW` keeps it."""
    state[STEP] = torch.tensor(0.0)
    state[EXP_AVG] = _zeros_like(p, dtype)
    state[EXP_AVG_SQ] = _zeros_like(p, dtype)


def _zeros_like(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Zeros shaped (and, for a DTensor, sharded) like ``p``; contiguous even if ``p`` is not."""
    if type(p).__name__ == "DTensor":
        return torch.zeros_like(p, dtype=dtype)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
