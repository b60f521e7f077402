"""Moving tensors between ranks for the execution modes: opaque lists of tensors, no algorithm.

Two patterns: an all-gather of fixed-width rows (replicated mode: every rank receives every
result; gloo's all-gather wants equal sizes, so rows are zero-padded to the largest count) and
an exchange of lists of tensors between every pair of ranks, one ``all_to_all_single`` with
per-rank sizes per dtype (sharded mode: pieces to the rank that steps a matrix, and back).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "exchange", "pack_rows", "unpack_rows"]

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


def exchange(outgoing: list[list[Tensor]], incoming: list[list[tuple[Shape, torch.dtype]]],
             dtypes: Sequence[torch.dtype], device: torch.device, group: Any) -> tuple[list[list[Tensor]], int]:
    """Send ``outgoing[r]`` (tensors, in order) to group rank ``r`` and receive from every rank
    ``r`` tensors of the shapes and dtypes ``incoming[r]``, in the order that rank sent them.

    One ``all_to_all_single`` per dtype in ``dtypes`` (every rank passes the same list, so every
    rank makes the same calls, even with nothing to send). Nothing is sent to oneself: the
    entries for this rank must be empty. Returns (received tensors per rank, bytes sent)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if outgoing[rank] or incoming[rank]:
        raise ValueError("exchange: a rank does not send to itself; keep its own tensors local")
    received: list[list[Tensor]] = [[] for _ in range(world)]
    by_dtype = {}
    sent = 0
    for dtype in dtypes:
        send = [[t.reshape(-1) for t in outgoing[r] if t.dtype == dtype] for r in range(world)]
        in_sizes = [sum(t.numel() for t in ts) for ts in send]
        out_sizes = [sum(_numel(s) for s, dt in incoming[r] if dt == dtype) for r in range(world)]
        flat = torch.cat([t for ts in send for t in ts] + [torch.empty(0, dtype=dtype, device=device)])
        recv = torch.empty(sum(out_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(recv, flat, out_sizes, in_sizes, group=group)
        sent += flat.numel() * flat.element_size()
        by_dtype[dtype] = list(recv.split(out_sizes))
    offsets = {(r, dtype): 0 for r in range(world) for dtype in dtypes}
    for r in range(world):
        for shape, dtype in incoming[r]:
            n, at = _numel(shape), offsets[(r, dtype)]
            received[r].append(by_dtype[dtype][r][at : at + n].view(shape))
            offsets[(r, dtype)] = at + n
    return received, sent


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
