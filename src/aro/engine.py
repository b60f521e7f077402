r"""How one ARO step over a param group is executed on one process: units, buckets, fields.

A **unit** is one rotation and the matrices (*members*) it updates. Per-matrix ARO has one
unit per matrix (a 3-D parameter ``[E, m, n]`` gives ``E`` units); a shared rotation (a
sharing plan, :mod:`aro.sharing`) is one unit with several members. The rotation lives in the
state of the unit's *holder* (:mod:`aro.state_schema`). Units whose members have the same
shapes, dtype and device form a **bucket** and run as one batched computation
(:func:`aro.functional.shared_rotated_step`); the only Python loops are over parameters, to
gather their tensors into the batch and scatter the results back.

A step reads and writes named tensors (:class:`Sources`: ``(state key, id(param)) -> tensor``)
and returns, per bucket, the :func:`aro.state_schema.step_outputs` fields. The execution modes
of :mod:`aro.distributed` move these fields between ranks without knowing what they are.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from . import state_schema as S
from . import tuning
from .functional.numerics import rms_match_
from .functional.rotation import shared_rotated_step
from .layout import MatrixShape, oriented_matrix, unoriented, unoriented_matrix
from .spec import GroupSpec

__all__ = ["BucketResult", "Count", "Member", "Sources", "Unit", "apply_bucket", "assemble_updates", "bucketize",
           "compute_bucket", "count_rotations", "output_shapes", "plan_units", "run_units"]

Count = Callable[[str, Tensor], None]


@dataclass(frozen=True)
class Member:
    param: Tensor
    expert: int | None  # which matrix of a batched (3-D) parameter; None: the only one
    shape: MatrixShape


@dataclass
class Unit:
    holder: Tensor  # whose state holds the rotation
    expert: int | None  # index into the holder's batched rotation, None for a (d, d) rotation
    members: list[Member]


@dataclass
class Sources:
    """The whole tensors a step reads and writes, ``(state key, id(param)) -> tensor``, and each
    parameter's step count. Locally these are the optimizer's own state tensors (momentum: the
    effective, Nesterov or plain, momentum), so writing them updates the state; the sharded mode
    fills them with matrices assembled from shards and scatters them back afterwards."""

    tensors: dict[tuple[str, int], Tensor]
    step: dict[int, float]


@dataclass
class BucketResult:
    """One stacked ``(U, ...)`` tensor per :func:`output_shapes` entry, in its order."""

    values: list[Tensor]
    fallbacks: Tensor
    degenerate: Tensor


def plan_units(spec: GroupSpec, group_params: list[Tensor], params: list[Tensor], state: dict) -> list[Unit]:
    """Units for the parameters that step now (``params``), in group order."""
    stepping = {id(p) for p in params}

    def members(p: Tensor) -> list[Member]:
        ms = spec.matrix_shape(p, state[p][S.ORIENTATION])
        return [Member(p, e, ms) for e in (range(ms.count) if spec.batched(p) else [None])]

    units: list[Unit] = []
    for rotation in spec.sharing.rotations:
        shared = [m for i, _ in rotation if id(group_params[i]) in stepping for m in members(group_params[i])]
        if shared:
            units.append(Unit(group_params[rotation[0][0]], None, shared))
    index = {id(p): i for i, p in enumerate(group_params)}
    for p in params:
        if index[id(p)] not in spec.sharing.holder_of:
            units += [Unit(p, m.expert, [m]) for m in members(p)]
    return units


def output_shapes(spec: GroupSpec, unit: Unit) -> list[tuple[int, ...]]:
    """Per-unit shapes of a bucket's results, in :attr:`BucketResult.values` order: the
    :func:`aro.state_schema.step_outputs` fields, one per member (a holder's field: one)."""
    d = unit.members[0].shape.m
    return [(d, d) if field.square else (d, unit.members[j].shape.n) for field, j in _slots(spec, unit)]


def _slots(spec: GroupSpec, unit: Unit) -> list[tuple[S.Field, int]]:
    """(field, member position) of each result, in order."""
    out: list[tuple[S.Field, int]] = []
    for field in S.step_outputs(spec):
        out += [(field, 0)] if field.held_by == "holder" else [(field, j) for j in range(len(unit.members))]
    return out


def _view(src: Sources, field: S.Field, unit: Unit, member: Member) -> Tensor:
    """The matrix of ``field`` for one member (or one unit) inside the tensors of ``src``."""
    if field.frame == "parameter":
        return oriented_matrix(src.tensors[(field.key, id(member.param))], member.shape, member.expert)
    if field.held_by == "holder":
        t, expert = src.tensors[(field.key, id(unit.holder))], unit.expert
    else:
        t, expert = src.tensors[(field.key, id(member.param))], member.expert
    return t if expert is None else t[expert]


# On CPU a bucket is split so that no stacked (U, m, n) tensor exceeds this many bytes: larger
# temporaries are served by fresh mmap'd pages (glibc's mmap threshold is at most 32 MiB), and
# faulting them in costs more than the arithmetic (benchmarks/step_ablations.py measures it).
# GPUs keep whole buckets (their caching allocator reuses memory; fewer, larger kernels are better).
CPU_BUCKET_BYTES = 16 * 2**20


def bucketize(spec: GroupSpec, units: list[Unit], src: Sources) -> list[list[Unit]]:
    """Units with the same rotated size, member shapes, dtype, device and rotation refresh, in
    first-seen order (split on CPU so that each stacked tensor stays under :data:`CPU_BUCKET_BYTES`)."""
    buckets: dict[tuple, list[Unit]] = defaultdict(list)
    for u in units:
        M = src.tensors[(S.MOMENTUM, id(u.members[0].param))]
        fresh = spec.refreshes(src.step[id(u.members[0].param)])
        buckets[(M.device, M.dtype, u.members[0].shape.m, tuple(m.shape.n for m in u.members), fresh)].append(u)
    out = []
    for (device, dtype, m, ns, _), bucket in buckets.items():
        per_unit = m * max(ns) * torch.empty((), dtype=dtype).element_size()
        size = len(bucket) if device.type != "cpu" else max(1, CPU_BUCKET_BYTES // per_unit)
        out.extend(bucket[i : i + size] for i in range(0, len(bucket), size))
    return out


def compute_bucket(spec: GroupSpec, bucket: list[Unit], src: Sources) -> BucketResult:
    """The math of one bucket; reads ``src``, writes nothing but the Adam projection's stacked
    (copied) second moments."""
    first = bucket[0]
    stack = lambda field, j: torch.stack([_view(src, field, u, u.members[j]) for u in bucket])  # noqa: E731
    J = len(first.members)
    Ms = [stack(S.MOMENTUM_FIELD, j) for j in range(J)]
    R = stack(S.ROTATION_FIELD, 0) if spec.has_rotation else None
    Vs, bias_correction = None, None
    if spec.stateful_f:
        Vs = [stack(S.SECOND_MOMENT_FIELD, j) for j in range(J)]
        steps = [src.step[id(u.members[0].param)] for u in bucket]
        bias_correction = torch.tensor([1.0 - spec.f.beta2**t for t in steps], dtype=Ms[0].dtype,
                                       device=Ms[0].device).view(-1, 1, 1)
    refresh = spec.refreshes(src.step[id(first.members[0].param)])
    step = partial(shared_rotated_step, Ms, R, policy=spec.policy, f=spec.f, bias_correction=bias_correction,
                   estimator=spec.estimator, refresh=refresh)
    qr, matmul_dtype = spec.qr, spec.matmul_dtype
    if qr == "auto" or matmul_dtype == "auto":
        device = Ms[0].device
        key = (device.type, str(Ms[0].dtype).removeprefix("torch."), tuple(Ms[0].shape[:2]),
               tuple(M.shape[-1] for M in Ms), spec.policy, "refresh" if refresh else "reuse",
               f"qr={qr}", f"matmul_dtype={matmul_dtype}")
        qr, matmul_dtype = tuning.choose(
            key, tuning.options(qr, matmul_dtype, device, Ms[0].dtype),
            lambda q, d: step(f_states=[V.clone() for V in Vs] if Vs else None, qr=q, matmul_dtype=d), device)
    out = step(f_states=Vs, qr=qr, matmul_dtype=matmul_dtype)
    updates = [U if spec.rms_target is None else rms_match_(U, spec.rms_target) for U in out.updates]
    produced = {S.UPDATE: updates, S.ROTATION: [out.rotation], S.EXP_AVG_SQ: Vs}
    values = [t for field in S.step_outputs(spec) for t in produced[field.key]]
    return BucketResult(values, out.fallbacks, out.degenerate)


def apply_bucket(spec: GroupSpec, bucket: list[Unit], result: BucketResult, src: Sources,
                 pieces: dict[int, list[tuple[int | None, Tensor]]]) -> None:
    """Write a bucket's state into ``src``; collect its updates in ``pieces``."""
    for (field, j), value in zip(_slots(spec, bucket[0]), result.values):
        if field.key == S.UPDATE:
            for u, U_u in zip(bucket, value.unbind(0)):
                pieces[id(u.members[j].param)].append((u.members[j].expert, U_u))
        else:
            torch._foreach_copy_([_view(src, field, u, u.members[j]) for u in bucket], list(value.unbind(0)))


def assemble_updates(units: list[Unit], pieces: dict[int, list[tuple[int | None, Tensor]]]) -> dict[int, Tensor]:
    """``{id(param): update}`` in each parameter's own layout."""
    updates = {}
    for u in units:
        for member in u.members:
            pid = id(member.param)
            if pid in updates:
                continue
            parts, shape = pieces[pid], tuple(member.param.shape)
            if parts[0][0] is None:
                updates[pid] = unoriented_matrix(parts[0][1], member.shape, shape)
            else:
                X = torch.stack([t for _, t in sorted(parts, key=lambda et: et[0])])
                updates[pid] = unoriented(X, member.shape, shape)
    return updates


def count_rotations(spec: GroupSpec, bucket: list[Unit], result: BucketResult, src: Sources, count: Count) -> int:
    """Record a computed bucket's QR fallbacks and degenerate rotations; the rotations it computed."""
    if not spec.has_rotation or not spec.refreshes(src.step[id(bucket[0].members[0].param)]):
        return 0
    count("qr_fallbacks", result.fallbacks)
    count("degenerate_rotations", result.degenerate)
    return len(bucket)


def run_units(spec: GroupSpec, units: list[Unit], src: Sources, count: Count) -> tuple[dict[int, Tensor], int]:
    """Run every unit on this process; ``{id(param): update}`` and the number of rotations computed."""
    pieces: dict[int, list[tuple[int | None, Tensor]]] = defaultdict(list)
    n_rotations = 0
    for bucket in bucketize(spec, units, src):
        result = compute_bucket(spec, bucket, src)
        n_rotations += count_rotations(spec, bucket, result, src, count)
        apply_bucket(spec, bucket, result, src, pieces)
    return assemble_updates(units, pieces), n_rotations
