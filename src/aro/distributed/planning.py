"""Which rank computes which piece of work: cost-balanced, deterministic, the same on every rank."""

from __future__ import annotations

from typing import Sequence

__all__ = ["assign", "plan_work", "unit_cost"]


def unit_cost(d: int, widths: Sequence[int]) -> float:
    r"""Rotation FLOPs of a unit, up to a constant: :math:`\sum_j d^2 n_j` (the products with
    :math:`R`, the cross-Gram and the update) plus :math:`d^3` (the QR)."""
    return float(sum(d * d * n for n in widths) + d**3)


def assign(costs: Sequence[float], world_size: int,
           candidates: Sequence[Sequence[int] | None] | None = None) -> list[int]:
    """Longest-processing-time greedy: the most expensive items first, each to the least-loaded
    rank (ties: the lower rank) among its ``candidates`` (None: any rank). Deterministic, so
    every rank computes the same assignment."""
    load = [0.0] * world_size
    rank_of = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        allowed = candidates[i] if candidates is not None and candidates[i] else range(world_size)
        r = min(allowed, key=lambda k: (load[k], k))
        rank_of[i] = r
        load[r] += costs[i]
    return rank_of


def plan_work(units_per_item: Sequence[Sequence], world_size: int,
              candidates: Sequence[Sequence[int] | None] | None = None) -> tuple[list[int], list[float]]:
    """The rank of each work item (a list of :class:`aro.engine.Unit`) and each rank's total cost.
    ``candidates[k]``, if given and not empty, restricts item ``k`` to those ranks (the sharded
    mode passes the ranks that already hold all of an item, so it is stepped without moving it)."""
    costs = [sum(unit_cost(u.members[0].shape.m, [m.shape.n for m in u.members]) for u in item)
             for item in units_per_item]
    rank_of = assign(costs, world_size, candidates)
    loads = [0.0] * world_size
    for c, r in zip(costs, rank_of):
        loads[r] += c
    return rank_of, loads
