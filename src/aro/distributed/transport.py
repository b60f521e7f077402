"""Moving tensors between ranks for the execution modes: opaque lists of tensors, no algorithm.

Two patterns: an all-gather of fixed-width rows (replicated mode: every rank receives every
result) and a pair of all-to-alls that assemble whole tensors from dim-0 chunks on one rank and
return each rank its chunk (sharded mode). Gloo's collectives want equal sizes from every rank,
so messages are zero-padded to the largest.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "assemble_on_ranks", "chunk_sizes", "pack_rows", "return_chunks", "unpack_rows"]

Shape = tuple[int, ...]


def pack_rows(tensors: Sequence[Tensor]) -> Tensor:
    """``(U, ...)`` tensors side by side as ``(U, width)`` rows."""
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


def unpack_rows(rows: Tensor, shapes: Sequence[Shape]) -> list[Tensor]:
    """Inverse of :func:`pack_rows` for per-row ``shapes``."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [c.reshape(rows.shape[0], *s) for c, s in zip(rows.split(sizes, dim=1), shapes)]


def all_gather_rows(rows: Tensor, max_rows: int, group: Any) -> tuple[Any, list[Tensor]]:
    """Start an all-gather of every rank's ``rows`` (padded to ``max_rows``); (work, per-rank rows)."""
    send = rows.new_zeros(max_rows, rows.shape[1])
    send[: rows.shape[0]] = rows
    recv = [torch.empty_like(send) for _ in range(dist.get_world_size(group))]
    return dist.all_gather(recv, send, group=group, async_op=True), recv


def chunk_sizes(n: int, world: int) -> list[int]:
    """Dim-0 sizes of ``torch.chunk(x, world)`` per rank (trailing ranks may get 0)."""
    sizes = [len(c) for c in torch.arange(n).chunk(world)]
    return sizes + [0] * (world - len(sizes))


def _numel(shape: Shape, rank: int, world: int) -> int:
    n = chunk_sizes(shape[0], world)[rank]
    for s in shape[1:]:
        n *= s
    return n


def _all_to_all(chunks_to: list[list[Tensor]], width: int, like: Tensor, group: Any) -> list[Tensor]:
    send = []
    for chunks in chunks_to:
        flat = torch.cat([c.reshape(-1) for c in chunks] + [like.new_empty(0)])
        send.append(torch.cat([flat, flat.new_zeros(width - flat.numel())]))
    recv = [like.new_empty(width) for _ in range(len(chunks_to))]
    dist.all_to_all(recv, send, group=group)
    return recv


def _width(shapes: list[list[Shape]], rank_of: list[int], world: int) -> int:
    """The largest message: elements any rank sends any rank (the reverse exchange has the transposed sizes)."""
    return max(sum(_numel(s, a, world) for k, item in enumerate(shapes) if rank_of[k] == b for s in item)
               for a in range(world) for b in range(world))


def assemble_on_ranks(chunks: list[list[Tensor]], shapes: list[list[Shape]], rank_of: list[int],
                      group: Any) -> dict[int, list[Tensor]]:
    """Item ``k`` is a list of tensors of global ``shapes[k]``, of which this rank holds the
    dim-0 ``chunks[k]`` (``torch.chunk`` layout). Returns ``{k: whole tensors}`` for the items
    whose ``rank_of[k]`` is this rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    like = next(c for item in chunks for c in item)
    recv = _all_to_all([[c for k, item in enumerate(chunks) if rank_of[k] == r for c in item] for r in range(world)],
                       _width(shapes, rank_of, world), like, group)
    whole: dict[int, list[Tensor]] = {}
    cursor = [0] * world
    for k, item in enumerate(shapes):
        if rank_of[k] != rank:
            continue
        whole[k] = []
        for shape in item:
            parts = []
            for r in range(world):
                n = _numel(shape, r, world)
                parts.append(recv[r][cursor[r] : cursor[r] + n].reshape(chunk_sizes(shape[0], world)[r], *shape[1:]))
                cursor[r] += n
            whole[k].append(torch.cat(parts))
    return whole


def return_chunks(whole: dict[int, list[Tensor]], shapes: list[list[Shape]], rank_of: list[int], like: Tensor,
                  group: Any) -> dict[int, list[Tensor]]:
    """Inverse of :func:`assemble_on_ranks`: every rank gets its dim-0 chunk of every item's tensors."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks_to = []
    for r in range(world):
        chunks = []
        for k in sorted(whole):
            for t, shape in zip(whole[k], shapes[k]):
                start = sum(chunk_sizes(shape[0], world)[:r])
                chunks.append(t[start : start + chunk_sizes(shape[0], world)[r]])
        chunks_to.append(chunks)
    recv = _all_to_all(chunks_to, _width(shapes, rank_of, world), like, group)
    mine: dict[int, list[Tensor]] = {}
    cursor = [0] * world
    for k, item in enumerate(shapes):
        r = rank_of[k]
        mine[k] = []
        for shape in item:
            n = _numel(shape, rank, world)
            mine[k].append(recv[r][cursor[r] : cursor[r] + n].reshape(chunk_sizes(shape[0], world)[rank], *shape[1:]))
            cursor[r] += n
    return mine
