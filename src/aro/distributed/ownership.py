"""Which rank computes which unit: cost-balanced, deterministic, the same on every rank."""

from __future__ import annotations

from typing import Sequence

__all__ = ["assign", "unit_cost"]


def unit_cost(d: int, widths: Sequence[int]) -> float:
    r"""Rotation FLOPs of a unit, up to a constant: :math:`\sum_j d^2 n_j` (the products with
    :math:`R`, the cross-Gram and the update) plus :math:`d^3` (the QR)."""
    return float(sum(d * d * n for n in widths) + d**3)


def assign(costs: Sequence[float], world_size: int) -> list[int]:
    """Longest-processing-time greedy: the most expensive items first, each to the least-loaded
    rank (ties: the lower rank). Deterministic, so every rank computes the same assignment."""
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner
