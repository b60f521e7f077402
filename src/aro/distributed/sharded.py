"""ARO on FSDP2 parameters (DTensor, ``Shard(0)``): assemble, compute on an owner, scatter back.

Each rank holds dim-0 shards (``torch.chunk`` layout, possibly uneven or empty) of every
parameter, its gradient and its optimizer state; rotations and Adam second moments are DTensors
sharded the same way along their own dim 0, so checkpoints (``state_dict()`` or DCP) hold the
true rotation of every matrix and reshard to any world size.

A step: (1) momentum on the local shards; (2) one ``all_to_all`` sends every shard of a *work
item* -- a matrix with its own rotation(s), or all members of a shared rotation -- to the item's
owner (cost-balanced); (3) the owner runs the ordinary single-process step on the whole matrices;
(4) a second ``all_to_all`` returns each rank its rows of the updates, rotations and moments.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from .. import state_keys as K
from ..engine import Sources, Unit, run_units
from .ownership import assign, unit_cost

__all__ = ["chunk_sizes", "local", "shard_like", "sharded_run_units"]


def chunk_sizes(n: int, world: int) -> list[int]:
    """Dim-0 sizes of ``torch.chunk(x, world)`` per rank (trailing ranks may get 0)."""
    sizes = [len(c) for c in torch.arange(n).chunk(world)]
    return sizes + [0] * (world - len(sizes))


def local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(full: Tensor, like: DTensor) -> DTensor:
    """``full`` as a DTensor sharded on dim 0 over ``like``'s mesh (chunk layout, no communication)."""
    mesh = like.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    sizes = chunk_sizes(full.shape[0], world)
    start = sum(sizes[:rank])
    piece = full[start : start + sizes[rank]].contiguous()
    return DTensor.from_local(piece, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())


def _items(units: list[Unit]) -> dict[int, list[Unit]]:
    """Work items: units grouped by the parameter that owns their rotation(s)."""
    items: dict[int, list[Unit]] = defaultdict(list)
    for u in units:
        items[id(u.owner)].append(u)
    return items


def _item_tensors(item: list[Unit], adam: bool, policy: str) -> list[tuple[str, Tensor]]:
    """(kind, parameter) pairs that an item needs whole, in a fixed order."""
    params, seen = [], set()
    for u in item:
        for m in u.members:
            if id(m.param) not in seen:
                seen.add(id(m.param))
                params.append(m.param)
    out = [("M", p) for p in params]
    if policy != "identity":
        out.append(("R", item[0].owner))
    if adam:
        out += [("V", p) for p in params]
    return out


def sharded_run_units(
    group: dict[str, Any],
    units: list[Unit],
    momentum: dict[int, Tensor],
    state: dict,
    f: Any,
    count: Callable[[str, Tensor], None],
    process_group: Any,
    adam: bool,
) -> tuple[dict[int, Tensor], int, list[float]]:
    """Updates ``{id(param): local update rows}``; writes rotation and moment shards in ``state``.

    ``momentum`` maps ``id(param)`` to the local rows of the effective momentum.
    """
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    items = _items(units)
    keys = list(items)
    costs = [sum(unit_cost(u.members[0].shape.m, [m.shape.n for m in u.members]) for u in items[k]) for k in keys]
    owner_of = dict(zip(keys, assign(costs, world)))
    loads = [0.0] * world
    for k, c in zip(keys, costs):
        loads[owner_of[k]] += c
    policy = group["rotation"]

    def full_shape(kind: str, p: Tensor) -> tuple[int, ...]:
        return tuple(p.shape) if kind == "M" else tuple(state[p][K.ROTATION if kind == "R" else K.EXP_AVG_SQ].shape)

    def local_rows(kind: str, p: Tensor) -> Tensor:
        if kind == "M":
            return momentum[id(p)]
        return local(state[p][K.ROTATION if kind == "R" else K.EXP_AVG_SQ])

    def rows_of(shape: tuple[int, ...], r: int) -> int:
        return chunk_sizes(shape[0], world)[r]

    def numel(shape: tuple[int, ...], r: int) -> int:
        n = rows_of(shape, r)
        for s in shape[1:]:
            n *= s
        return n

    needs = {k: _item_tensors(items[k], adam, policy) for k in keys}
    shapes = {k: [full_shape(kind, p) for kind, p in needs[k]] for k in keys}
    dtype, device = next(iter(momentum.values())).dtype, next(iter(momentum.values())).device

    # sizes[a][b]: elements rank a sends to rank b when gathering (its rows of b's items).
    # Gloo's all_to_all wants one size for every pair, so every message is padded to the largest.
    sizes = [[sum(numel(s, a) for k in keys if owner_of[k] == b for s in shapes[k]) for b in range(world)]
             for a in range(world)]
    width = max(max(row) for row in sizes)

    def exchange(chunks_to: list[list[Tensor]]) -> list[Tensor]:
        send = []
        for chunks in chunks_to:
            flat = torch.cat(chunks + [torch.empty(0, dtype=dtype, device=device)])
            send.append(torch.cat([flat, flat.new_zeros(width - flat.numel())]))
        recv = [torch.empty(width, dtype=dtype, device=device) for _ in range(world)]
        dist.all_to_all(recv, send, group=process_group)
        return recv

    # (2) gather whole tensors on owners
    recv = exchange([[local_rows(kind, p).reshape(-1) for k in keys if owner_of[k] == r for kind, p in needs[k]]
                     for r in range(world)])
    full: dict[tuple[str, int], Tensor] = {}
    cursor = [0] * world
    for k in keys:
        if owner_of[k] != rank:
            continue
        for (kind, p), shape in zip(needs[k], shapes[k]):
            parts = []
            for r in range(world):
                n = numel(shape, r)
                parts.append(recv[r][cursor[r] : cursor[r] + n].reshape(rows_of(shape, r), *shape[1:]))
                cursor[r] += n
            full[(kind, id(p))] = torch.cat(parts)

    # (3) the ordinary step on whole matrices
    mine = [u for k in keys if owner_of[k] == rank for u in items[k]]
    src = Sources(
        momentum={pid: t for (kind, pid), t in full.items() if kind == "M"},
        rotation={pid: t for (kind, pid), t in full.items() if kind == "R"},
        second_moment={pid: t for (kind, pid), t in full.items() if kind == "V"},
        step={id(m.param): float(state[m.param][K.STEP]) for u in mine for m in u.members},
    )
    updates, n_rotations = run_units(group, mine, src, f, count) if mine else ({}, 0)

    # (4) every rank gets its rows back
    def out_tensors(k):
        out = []
        for kind, p in needs[k]:
            if kind == "M":
                out.append(("U", p, updates.get(id(p)) if owner_of[k] == rank else None))
            else:
                out.append((kind, p, full.get((kind, id(p)))))
        return out

    chunks_to = []
    for r in range(world):
        chunks = []
        for k in keys:
            if owner_of[k] != rank:
                continue
            for (kind, p, t), shape in zip(out_tensors(k), shapes[k]):
                start = sum(chunk_sizes(shape[0], world)[:r])
                chunks.append(t[start : start + rows_of(shape, r)].reshape(-1))
        chunks_to.append(chunks)
    recv = exchange(chunks_to)  # the reverse exchange has the transposed sizes: same maximum
    local_updates: dict[int, Tensor] = {}
    for r in range(world):
        cursor_r = 0
        for k in keys:
            if owner_of[k] != r:
                continue
            for (kind, p), shape in zip(needs[k], shapes[k]):
                n = numel(shape, rank)
                rows = recv[r][cursor_r : cursor_r + n].reshape(rows_of(shape, rank), *shape[1:])
                cursor_r += n
                if kind == "M":
                    local_updates[id(p)] = rows
                else:
                    local(state[p][K.ROTATION if kind == "R" else K.EXP_AVG_SQ]).copy_(rows)
    return local_updates, n_rotations, loads
