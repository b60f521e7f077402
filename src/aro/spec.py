"""One param group, resolved once: what every layer below :class:`aro.ARO` reads instead of the group dict.

:func:`resolve` turns a validated group into a frozen :class:`GroupSpec`: the base projection
object, the rotation policy and its flags, the sharing plan with its index maps. The optimizer
keeps one spec per group and resolves again only when a value it was made from changed (a user
or a checkpoint load may change any group value; schedulers change ``lr`` and
``weight_decay``, which are read from the group at each step and are not part of the spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .functional.projections import AdamProjection, Projection, make_projection
from .layout import MatrixShape, matrix_shape, resolve_orientation
from .validation import validate_hyperparameters

__all__ = ["SPEC_KEYS", "GroupSpec", "Sharing", "SpecCache", "resolve", "resolve_checked", "snapshot"]

# The group values a spec is made from (everything but params, names, lr and weight_decay).
SPEC_KEYS = ("algorithm", "base", "sinkhorn_iters", "sinkhorn_variant", "betas", "eps", "rotation", "qr",
             "estimator", "nesterov", "beta", "rms_target", "orientation", "matrix_view", "rotation_every",
             "matmul_dtype", "maximize", "nonfinite", "shared")


@dataclass(frozen=True)
class Sharing:
    """A group's sharing plan: each shared rotation is a tuple of ``(param index, side)``; its
    first member is the rotation's *holder* (the parameter whose state stores it)."""

    rotations: tuple[tuple[tuple[int, str], ...], ...] = ()
    holder_of: dict[int, tuple[int, str]] = field(default_factory=dict)  # member index -> (holder index, side)

    @staticmethod
    def of(plan: Any) -> "Sharing":
        rotations = tuple(tuple((int(i), str(side)) for i, side in spec) for spec in (plan or ()))
        holder_of = {i: (spec[0][0], side) for spec in rotations for i, side in spec}
        return Sharing(rotations, holder_of)


@dataclass(frozen=True)
class GroupSpec:
    """Everything a step needs to know about a group besides its ``lr`` and ``weight_decay``."""

    algorithm: str  # "auto" (ndim >= 2 -> ARO), "aro" or "adamw"
    f: Projection  # the base projection, built once
    stateful_f: bool  # f carries a second moment (the Adam projection)
    policy: str  # rotation policy
    has_rotation: bool  # the policy keeps a rotation state (all but "identity")
    qr: str
    estimator: str
    nesterov: bool
    beta: float
    rms_target: float | None
    orientation: str
    matrix_view: str
    rotation_every: int
    matmul_dtype: torch.dtype | str | None  # None: the state dtype; "auto": chosen by aro.tuning
    maximize: bool
    nonfinite: str
    betas: tuple[float, float]  # AdamW path
    eps: float
    sharing: Sharing
    source: tuple  # the group values (SPEC_KEYS) it was resolved from

    def uses_aro(self, p: Tensor) -> bool:
        return self.algorithm == "aro" or (self.algorithm == "auto" and p.ndim >= 2)

    def batched(self, p: Tensor) -> bool:
        """A 3-D parameter is a batch of matrices, each with its own rotation (see :mod:`aro.layout`)."""
        return p.ndim == 3 and self.matrix_view == "auto"

    def orientation_of(self, index: int, p: Tensor) -> str:
        """The side a fresh state rotates: the sharing plan's, else the group's (``auto``: the smaller)."""
        if index in self.sharing.holder_of:
            return self.sharing.holder_of[index][1]
        return resolve_orientation(tuple(p.shape), self.orientation, self.matrix_view)

    def matrix_shape(self, p: Tensor, orientation: str) -> MatrixShape:
        return matrix_shape(tuple(p.shape), orientation, self.matrix_view)

    def refreshes(self, step: float) -> bool:
        """Whether a matrix at its ``step``-th step computes a new rotation (steps 1, k+1, 2k+1, ...)."""
        return self.rotation_every == 1 or (int(step) - 1) % self.rotation_every == 0


def snapshot(group: dict[str, Any]) -> tuple:
    return tuple(group.get(k) for k in SPEC_KEYS)


def resolve(group: dict[str, Any]) -> GroupSpec:
    """The spec of a validated group."""
    beta2 = group["betas"][1]
    f = make_projection(group["base"], sinkhorn_iters=group["sinkhorn_iters"],
                        sinkhorn_variant=group["sinkhorn_variant"], beta2=beta2, eps=group["eps"])
    matmul_dtype = group.get("matmul_dtype")
    return GroupSpec(
        algorithm=group["algorithm"], f=f, stateful_f=isinstance(f, AdamProjection), policy=group["rotation"],
        has_rotation=group["rotation"] != "identity", qr=group["qr"], estimator=group["estimator"],
        nesterov=group["nesterov"], beta=float(group["beta"]), rms_target=group["rms_target"],
        orientation=group["orientation"], matrix_view=group["matrix_view"],
        rotation_every=group.get("rotation_every", 1),
        matmul_dtype=None if matmul_dtype == torch.float32 else matmul_dtype, maximize=group["maximize"],
        nonfinite=group["nonfinite"], betas=(float(group["betas"][0]), float(beta2)), eps=float(group["eps"]),
        sharing=Sharing.of(group.get("shared")), source=snapshot(group),
    )


def resolve_checked(group: dict[str, Any]) -> GroupSpec:
    """:func:`resolve` after checking the values again (a user may have changed them since)."""
    validate_hyperparameters(group)
    return resolve(group)


class SpecCache:
    """One spec per group object, made again only when the group's spec values change."""

    def __init__(self, make: Callable[[dict[str, Any]], GroupSpec] = resolve) -> None:
        self._make = make
        self._specs: dict[int, GroupSpec] = {}

    def __call__(self, group: dict[str, Any]) -> GroupSpec:
        spec = self._specs.get(id(group))
        if spec is None or spec.source != snapshot(group):
            spec = self._specs[id(group)] = self._make(group)
        return spec
