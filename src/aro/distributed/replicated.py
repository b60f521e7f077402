"""ARO on replicated parameters (DDP): split the rotation work, all-gather the results.

Every rank holds every parameter and, after DDP's all-reduce, the same gradient. The cheap
elementwise work (momentum) runs everywhere; the expensive per-unit work (cross-Gram, QR, f,
rotated update) is assigned to one owner per unit, balanced by cost (:mod:`.ownership`). Each
bucket's results (new rotation, RMS-matched update, Adam second moment) are all-gathered
asynchronously while the next bucket is computed, and every rank then writes all of them: the
parameters, and the optimizer state of *every* matrix, stay identical on all ranks, so a
``state_dict()`` from any rank holds the true rotations and resumes on any world size.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine import (BucketResult, Sources, Unit, apply_bucket, assemble_updates, bucketize, compute_bucket,
                      refreshes)
from .ownership import assign, unit_cost

__all__ = ["replicated_run_units"]


def _layout(group: dict[str, Any], unit: Unit, adam: bool) -> list[tuple[str, int, tuple[int, ...]]]:
    d = unit.members[0].shape.m
    parts: list[tuple[str, int, tuple[int, ...]]] = []
    if group["rotation"] != "identity":
        parts.append(("rotation", -1, (d, d)))
    parts += [("update", j, (d, m.shape.n)) for j, m in enumerate(unit.members)]
    if adam:
        parts += [("moment", j, (d, m.shape.n)) for j, m in enumerate(unit.members)]
    return parts


def _pack(result: BucketResult, layout) -> Tensor:
    cols = []
    for kind, j, _ in layout:
        t = result.rotation if kind == "rotation" else (result.updates[j] if kind == "update" else result.moments[j])
        cols.append(t.flatten(1))
    return torch.cat(cols, dim=1)


def _unpack(rows: Tensor, layout, adam: bool) -> BucketResult:
    sizes = [s[0] * s[1] for _, _, s in layout]
    chunks = rows.split(sizes, dim=1)
    rotation, updates, moments = None, [], []
    for (kind, _, shape), c in zip(layout, chunks):
        t = c.reshape(rows.shape[0], *shape)
        if kind == "rotation":
            rotation = t
        elif kind == "update":
            updates.append(t)
        else:
            moments.append(t)
    zero = torch.zeros((), dtype=torch.int64)
    return BucketResult(rotation, updates, moments if adam else None, zero, zero)


def replicated_run_units(
    group: dict[str, Any],
    units: list[Unit],
    src: Sources,
    f: Any,
    count: Callable[[str, Tensor], None],
    process_group: Any,
    adam: bool,
) -> tuple[dict[int, Tensor], int, list[float]]:
    """Run ``units`` split across ranks; returns updates, rotations computed here, and the
    cost of the work each rank did (for the distributed benchmark)."""
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    buckets = bucketize(units, src, group)
    costs = [unit_cost(u.members[0].shape.m, [m.shape.n for m in u.members]) for b in buckets for u in b]
    owners = assign(costs, world)
    loads = [0.0] * world
    for c, o in zip(costs, owners):
        loads[o] += c
    pending = []
    offset = 0
    n_rotations = 0
    for bucket in buckets:
        owner_of = owners[offset : offset + len(bucket)]
        offset += len(bucket)
        layout = _layout(group, bucket[0], adam)
        width = sum(s[0] * s[1] for _, _, s in layout)
        counts = [owner_of.count(r) for r in range(world)]
        mine = [u for u, o in zip(bucket, owner_of) if o == rank]
        M0 = src.momentum[id(bucket[0].members[0].param)]
        send = torch.zeros(max(counts), width, dtype=M0.dtype, device=M0.device)
        if mine:
            result = compute_bucket(group, mine, src, f)
            if result.rotation is not None and refreshes(group, mine[0], src):
                n_rotations += len(mine)
                count("qr_fallbacks", result.fallbacks)
                count("degenerate_rotations", result.degenerate)
            send[: len(mine)] = _pack(result, layout)
        recv = [torch.empty_like(send) for _ in range(world)]
        work = dist.all_gather(recv, send, group=process_group, async_op=True)  # overlaps the next bucket
        pending.append((bucket, owner_of, recv, work, layout))
    pieces: dict[int, list] = defaultdict(list)
    for bucket, owner_of, recv, work, layout in pending:
        work.wait()
        seen = [0] * world
        rows = []
        for o in owner_of:
            rows.append(recv[o][seen[o]])
            seen[o] += 1
        apply_bucket(bucket, _unpack(torch.stack(rows), layout, adam), src, pieces)
    return assemble_updates(units, pieces), n_rotations, loads
