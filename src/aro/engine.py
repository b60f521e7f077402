r"""How one ARO step over a param group is executed: units, buckets, gather and scatter.

A **unit** is one rotation and the matrices (*members*) it updates. Per-matrix ARO has one
unit per matrix (a 3-D parameter ``[E, m, n]`` gives ``E`` units); a shared rotation (a
sharing plan, :mod:`aro.sharing`) is one unit with several members. Units whose members have
the same shapes, dtype and device form a **bucket** and run as one batched computation
(:func:`aro.functional.shared_rotated_step`); the only Python loops are over parameters, to
gather their momenta into the batch and scatter the updates back.

Where state lives: every member keeps ``momentum_buffer`` and ``orientation`` (and, for the Adam
projection, ``exp_avg_sq`` in its rotated frame); the rotation of a unit is stored in the state
of its *owner*: the parameter itself for per-matrix units (``(m, m)``, or ``(E, m, m)`` for a
3-D parameter) and the first member of a shared rotation (``(d, d)``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import state_keys as K
from .functional.projections import AdamProjection
from .functional.rotation import shared_rotated_step
from .layout import MatrixShape, matrix_shape, oriented, resolve_orientation, unoriented

__all__ = ["BucketResult", "Member", "Sources", "Unit", "apply_bucket", "assemble_updates", "bucketize", "compute_bucket",
           "refreshes",
           "expected_shapes", "local_sources", "plan_units", "run_units", "shared_owner"]


@dataclass(frozen=True)
class Member:
    param: Tensor
    expert: int | None  # which matrix of a batched (3-D) parameter; None: the only one
    shape: MatrixShape


@dataclass
class Unit:
    owner: Tensor  # whose state holds the rotation
    expert: int | None  # index into the owner's batched rotation, None for a (d, d) rotation
    members: list[Member]


def _batched(group: dict[str, Any], p: Tensor) -> bool:
    return p.ndim == 3 and group["matrix_view"] == "auto"


def shared_specs(group: dict[str, Any]) -> list[list[tuple[int, str]]]:
    return [[(int(i), str(side)) for i, side in spec] for spec in (group.get("shared") or [])]


def shared_owner(group: dict[str, Any]) -> dict[int, tuple[int, str]]:
    """param index -> (index of the owner of its shared rotation, orientation), for shared members."""
    out = {}
    for spec in shared_specs(group):
        owner = spec[0][0]
        for i, side in spec:
            out[i] = (owner, side)
    return out


def expected_shapes(group: dict[str, Any], index: int, p: Tensor, orientation: str) -> dict[str, tuple | None]:
    """Shapes of the rotated-frame state of parameter ``index`` of ``group``.

    ``rotation`` is None for a shared member that is not its rotation's owner (and for the
    identity policy); ``exp_avg_sq`` is the Adam projection's second moment.
    """
    ms = matrix_shape(tuple(p.shape), orientation, group["matrix_view"])
    lead = (ms.count,) if _batched(group, p) else ()
    owners = shared_owner(group)
    if group["rotation"] == "identity":
        rotation = None
    elif index in owners:
        rotation = (ms.m, ms.m) if owners[index][0] == index else None
    else:
        rotation = lead + (ms.m, ms.m)
    return {K.ROTATION: rotation, K.EXP_AVG_SQ: lead + (ms.m, ms.n)}


def init_state(group: dict[str, Any], index: int, p: Tensor, state: dict, dtype: torch.dtype,
               wrap: Callable[[Tensor], Tensor] | None = None) -> None:
    """Fresh state for parameter ``index``; ``wrap`` turns full tensors into the parameter's
    sharding (FSDP2), or is None."""
    wrap = wrap or (lambda t: t)
    owners = shared_owner(group)
    orientation = owners[index][1] if index in owners else resolve_orientation(
        tuple(p.shape), group["orientation"], group["matrix_view"]
    )
    shapes = expected_shapes(group, index, p, orientation)
    state[K.STEP] = torch.tensor(0.0)
    state[K.ORIENTATION] = orientation
    if type(p).__name__ == "DTensor":
        state[K.MOMENTUM] = torch.zeros_like(p, dtype=dtype)
    else:
        state[K.MOMENTUM] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
    if shapes[K.ROTATION] is not None:
        d = shapes[K.ROTATION][-1]
        state[K.ROTATION] = wrap(torch.eye(d, dtype=dtype, device=p.device).expand(shapes[K.ROTATION]).clone())
    if group["base"] == "adam":
        state[K.EXP_AVG_SQ] = wrap(torch.zeros(shapes[K.EXP_AVG_SQ], dtype=dtype, device=p.device))


def plan_units(group: dict[str, Any], params: list[Tensor], state: dict) -> list[Unit]:
    """Units for the parameters of ``group`` that step now (``params``), in group order."""
    stepping = {id(p) for p in params}
    index = {id(p): i for i, p in enumerate(group["params"])}
    owners = shared_owner(group)
    units: list[Unit] = []
    for spec in shared_specs(group):
        members = []
        for i, _ in spec:
            p = group["params"][i]
            if id(p) not in stepping:
                continue
            ms = matrix_shape(tuple(p.shape), state[p][K.ORIENTATION], group["matrix_view"])
            experts = range(ms.count) if _batched(group, p) else [None]
            members += [Member(p, e, ms) for e in experts]
        if members:
            units.append(Unit(group["params"][spec[0][0]], None, members))
    for p in params:
        if index[id(p)] in owners:
            continue
        ms = matrix_shape(tuple(p.shape), state[p][K.ORIENTATION], group["matrix_view"])
        experts = range(ms.count) if _batched(group, p) else [None]
        units += [Unit(p, e, [Member(p, e, ms)]) for e in experts]
    return units


def _matrix(t: Tensor, member: Member) -> Tensor:
    X = oriented(t, member.shape)
    return X[0] if member.expert is None else X[member.expert]


def _rotated(t: Tensor, expert: int | None) -> Tensor:
    return t if expert is None else t[expert]


@dataclass
class Sources:
    """The full (unsharded) tensors a step reads and writes, keyed by ``id(param)``.

    Locally these are the optimizer's own state tensors, so writing them updates the state; the
    FSDP layer fills them with matrices assembled from shards and scatters them back afterwards.
    """

    momentum: dict[int, Tensor]  # effective momentum (Nesterov or plain), parameter layout
    rotation: dict[int, Tensor]  # rotation state of unit owners
    second_moment: dict[int, Tensor]  # Adam projection's exp_avg_sq, rotated frame
    step: dict[int, float]


@dataclass
class BucketResult:
    rotation: Tensor | None  # (U, d, d)
    updates: list[Tensor]  # per member position, (U, d, n_j), RMS-matched
    moments: list[Tensor] | None  # per member position, (U, d, n_j)
    fallbacks: Tensor
    degenerate: Tensor


# On CPU a bucket is split so that no stacked (U, m, n) tensor exceeds this many bytes: larger
# temporaries are served by fresh mmap'd pages (glibc's mmap threshold is at most 32 MiB), and
# faulting them in costs more than the arithmetic -- measured 3.4x slower Sinkhorn for 20 stacked
# 384x1536 matrices than for 4 chunks of 5 (benchmarks/step_ablations.py). GPUs keep whole
# buckets (their caching allocator reuses memory; fewer, larger kernels are better there).
CPU_BUCKET_BYTES = 16 * 2**20


def refreshes(group: dict[str, Any], unit: Unit, src: Sources) -> bool:
    """Whether ``unit`` computes a new rotation this step (``rotation_every``: steps 1, k+1, ...)."""
    k = group.get("rotation_every", 1)
    return k == 1 or (int(src.step[id(unit.members[0].param)]) - 1) % k == 0


def bucketize(units: list[Unit], src: Sources, group: dict[str, Any] | None = None) -> list[list[Unit]]:
    """Units with the same rotated size, member shapes, dtype, device (and, with ``group``,
    rotation refresh), in first-seen order (split on CPU so that each stacked tensor stays
    under :data:`CPU_BUCKET_BYTES`)."""
    buckets: dict[tuple, list[Unit]] = defaultdict(list)
    for u in units:
        M = src.momentum[id(u.members[0].param)]
        fresh = refreshes(group, u, src) if group is not None else True
        key = (M.device, M.dtype, u.members[0].shape.m, tuple(m.shape.n for m in u.members), fresh)
        buckets[key].append(u)
    out = []
    for (device, dtype, m, ns, _), bucket in buckets.items():
        per_unit = m * max(ns) * torch.empty((), dtype=dtype).element_size()
        size = len(bucket) if device.type != "cpu" else max(1, CPU_BUCKET_BYTES // per_unit)
        out.extend(bucket[i : i + size] for i in range(0, len(bucket), size))
    return out


def compute_bucket(group: dict[str, Any], bucket: list[Unit], src: Sources, f: Any) -> BucketResult:
    """The math of one bucket; reads ``src``, writes nothing."""
    J = len(bucket[0].members)
    Ms = [torch.stack([_matrix(src.momentum[id(u.members[j].param)], u.members[j]) for u in bucket]) for j in range(J)]
    R = None
    if group["rotation"] != "identity":
        R = torch.stack([_rotated(src.rotation[id(u.owner)], u.expert) for u in bucket])
    Vs, bias_correction = None, None
    if isinstance(f, AdamProjection):
        Vs = [torch.stack([_rotated(src.second_moment[id(u.members[j].param)], u.members[j].expert) for u in bucket])
              for j in range(J)]
        steps = [src.step[id(u.members[0].param)] for u in bucket]
        bias_correction = torch.tensor([1.0 - f.beta2**t for t in steps], dtype=Ms[0].dtype,
                                       device=Ms[0].device).view(-1, 1, 1)
    out = shared_rotated_step(
        Ms, R, policy=group["rotation"], f=f, f_states=Vs, bias_correction=bias_correction,
        estimator=group["estimator"], qr=group["qr"], refresh=refreshes(group, bucket[0], src),
        matmul_dtype=group.get("matmul_dtype"),
    )
    rho = group["rms_target"]
    updates = []
    for U in out.updates:
        if rho is not None:
            # U = rho * U / RMS(U), per matrix (zero updates stay zero); U is ours to scale in place
            rms = torch.linalg.vector_norm(U, dim=(-2, -1), keepdim=True) / (U.shape[-2] * U.shape[-1]) ** 0.5
            U = U.mul_(torch.where(rms > 0, rho / torch.where(rms > 0, rms, 1.0), 0.0))
        updates.append(U)
    return BucketResult(out.rotation, updates, Vs, out.fallbacks, out.degenerate)


def apply_bucket(bucket: list[Unit], result: BucketResult, src: Sources,
                 pieces: dict[int, list[tuple[int | None, Tensor]]]) -> None:
    """Write a bucket's rotations and second moments into ``src``; collect its updates in ``pieces``."""
    if result.rotation is not None:
        views = [_rotated(src.rotation[id(u.owner)], u.expert) for u in bucket]
        torch._foreach_copy_(views, list(result.rotation.unbind(0)))
    if result.moments is not None:
        for j, V in enumerate(result.moments):
            views = [_rotated(src.second_moment[id(u.members[j].param)], u.members[j].expert) for u in bucket]
            torch._foreach_copy_(views, list(V.unbind(0)))
    for j, U in enumerate(result.updates):
        for u, U_u in zip(bucket, U.unbind(0)):
            member = u.members[j]
            pieces[id(member.param)].append((member.expert, U_u))


def assemble_updates(units: list[Unit], pieces: dict[int, list[tuple[int | None, Tensor]]]) -> dict[int, Tensor]:
    """``{id(param): update}`` in each parameter's own layout."""
    updates = {}
    for u in units:
        for member in u.members:
            pid = id(member.param)
            if pid in updates:
                continue
            parts = pieces[pid]
            if parts[0][0] is None:
                X = parts[0][1].unsqueeze(0)
            else:
                X = torch.stack([t for _, t in sorted(parts, key=lambda et: et[0])])
            updates[pid] = unoriented(X, member.shape, tuple(member.param.shape))
    return updates


def local_sources(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], state: dict) -> Sources:
    """Sources backed by the optimizer state (momentum already updated for this step)."""
    bufs = [state[p][K.MOMENTUM] for p in params]
    if group["nesterov"]:
        bufs = torch._foreach_lerp(grads, bufs, group["beta"])  # beta*M + (1-beta)*G
    momentum = {id(p): M for p, M in zip(params, bufs)}
    rotation, moments = {}, {}
    for p in group["params"]:
        st = state.get(p)
        if not st:
            continue
        if K.ROTATION in st:
            rotation[id(p)] = st[K.ROTATION]
        if K.EXP_AVG_SQ in st and K.ORIENTATION in st:
            moments[id(p)] = st[K.EXP_AVG_SQ]
    return Sources(momentum, rotation, moments, {id(p): float(state[p][K.STEP]) for p in params})


def run_units(
    group: dict[str, Any], units: list[Unit], src: Sources, f: Any, count: Callable[[str, Tensor], None]
) -> tuple[dict[int, Tensor], int]:
    """Run every unit on one process; return ``{id(param): update}`` and the number of rotations."""
    pieces: dict[int, list[tuple[int | None, Tensor]]] = defaultdict(list)
    n_rotations = 0
    for bucket in bucketize(units, src, group):
        result = compute_bucket(group, bucket, src, f)
        if result.rotation is not None and refreshes(group, bucket[0], src):
            n_rotations += len(bucket)
            count("qr_fallbacks", result.fallbacks)
            count("degenerate_rotations", result.degenerate)
        apply_bucket(bucket, result, src, pieces)
    return assemble_updates(units, pieces), n_rotations
