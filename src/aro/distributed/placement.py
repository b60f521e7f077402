"""Where the pieces of a DTensor lie: for each rank of the optimizer's process group, the global
indices (one index set per tensor dimension) of its local tensor.

Every placement torch uses for parameters is covered: ``Shard(d)`` (FSDP2, column- and
row-parallel TP, expert parallel), ``_StridedShard(d, sf)`` (FSDP2 over TP: the tensor dimension
is split right-to-left), and ``Replicate`` (HSDP, replicated TP layers). Sharding a dimension
never moves data across the others, so a rank's piece is the Cartesian product of one index set
per dimension; ranks that differ only along a ``Replicate`` mesh dimension hold the same piece.
The sets are computed from the placements alone (no communication), with ``torch.chunk``'s
layout, as :func:`torch.distributed.tensor.distribute_tensor` lays tensors out; a test checks
them against ``distribute_tensor`` on every rank of 1-D and 2-D meshes.

``Partial`` (pending reductions) cannot be stepped: a gradient or parameter in that state is
not a value yet, and the error says so.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Piece", "check_placements", "indexer", "local_position", "mesh_ranks", "piece_sets", "pieces",
           "state_placements"]

Sets = tuple[tuple[int, ...], ...]  # one ascending index tuple per tensor dimension


class Piece(NamedTuple):
    """A block of a tensor (or of one expert's slice of it) and the group ranks holding it."""

    sets: Sets
    holders: tuple[int, ...]  # group ranks, ascending

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.sets)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sets:
            n *= len(s)
        return n


def _kind(placement: Any) -> str:
    name = type(placement).__name__
    if name == "_StridedShard":
        return "strided"
    if name == "Shard":
        return "shard"
    if name == "Replicate":
        return "replicate"
    return name


def check_placements(t: Any, label: str) -> None:
    """ValueError naming ``label`` and the placement if ARO cannot step a DTensor laid out so."""
    for i, pl in enumerate(t.placements):
        kind = _kind(pl)
        if kind not in ("shard", "strided", "replicate"):
            raise ValueError(
                f"ARO cannot step {label}: its placement {pl} on mesh dimension {i} is not supported "
                "(Shard, _StridedShard and Replicate are; a Partial tensor holds unreduced values: "
                "redistribute it to Replicate or Shard before the optimizer step)")


def _chunk(idx: list[int], k: int) -> list[list[int]]:
    parts = [c.tolist() for c in torch.tensor(idx, dtype=torch.long).chunk(k)] if idx else []
    return parts + [[] for _ in range(k - len(parts))]


def _dim_sets(size: int, dim: int, mesh_shape: tuple[int, ...], specs: tuple[tuple[str, int, int], ...],
              coord: tuple[int, ...]) -> tuple[int, ...]:
    """Indices of tensor dimension ``dim`` (of ``size``) held at mesh coordinate ``coord``."""
    idx = list(range(size))
    for i, (kind, d, split) in enumerate(specs):
        if d != dim:
            continue
        if kind == "shard":
            idx = _chunk(idx, mesh_shape[i])[coord[i]]
        elif kind == "strided":  # split into `split` parts first, then each part across the mesh dim
            idx = [j for part in _chunk(idx, split) for j in _chunk(part, mesh_shape[i])[coord[i]]]
    return tuple(idx)


def _specs(placements: Sequence[Any], ndim: int) -> tuple[tuple[str, int, int], ...]:
    out = []
    for pl in placements:
        kind = _kind(pl)
        if kind in ("shard", "strided"):
            out.append((kind, pl.dim % ndim, int(getattr(pl, "split_factor", 1))))
        else:
            out.append((kind, -1, 1))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], slices: tuple[tuple[int, ...], ...], mesh_shape: tuple[int, ...],
            specs: tuple[tuple[str, int, int], ...]) -> tuple[tuple[int, Sets], ...]:
    """(global rank, index sets) of every rank of each of the parallel meshes ``slices`` (their
    ranks, flattened); one slice unless the mesh is a submesh that other ranks see in parallel."""
    out = []
    for ranks in slices:
        for flat, coord in enumerate(itertools.product(*(range(s) for s in mesh_shape))):
            sets = tuple(_dim_sets(n, d, mesh_shape, specs, coord) for d, n in enumerate(shape))
            out.append((ranks[flat], sets))
    return tuple(out)


def piece_sets(t: Any) -> tuple[tuple[int, Sets], ...]:
    """(global rank, index sets of its local tensor) for every rank of a DTensor's mesh."""
    return _layout(tuple(t.shape), *_mesh_key(t, None))


@functools.lru_cache(maxsize=16384)
def _grouped(shape: tuple[int, ...], mesh: tuple[tuple[int, ...], tuple[int, ...], tuple] | None,
             expert: int | None, group_ranks: tuple[int, ...]) -> tuple[Piece, ...]:
    rank_in_group = {g: i for i, g in enumerate(group_ranks)}
    if mesh is None:  # a regular tensor: every rank of the group holds all of it
        layout: tuple[tuple[int, Sets], ...] = tuple((g, tuple(tuple(range(n)) for n in shape)) for g in group_ranks)
    else:
        layout = _layout(shape, *mesh)
    holders: dict[Sets, list[int]] = {}
    for g, sets in layout:
        if expert is not None:
            if expert not in sets[0]:
                continue
            sets = sets[1:]
        if all(sets) and g in rank_in_group:
            holders.setdefault(sets, []).append(rank_in_group[g])
    return tuple(Piece(sets, tuple(sorted(h))) for sets, h in holders.items())


def mesh_ranks(t: Any) -> tuple[int, ...]:
    """The global ranks of a DTensor's mesh, flattened in mesh order."""
    return tuple(t.device_mesh.mesh.flatten().tolist())


def _mesh_key(t: Any, slices: tuple[tuple[int, ...], ...] | None) -> tuple | None:
    if not (hasattr(t, "device_mesh") and hasattr(t, "placements")):
        return None
    return slices or (mesh_ranks(t),), tuple(t.device_mesh.mesh.shape), _specs(t.placements, t.ndim)


def pieces(t: Tensor, expert: int | None, group_ranks: tuple[int, ...],
           slices: tuple[tuple[int, ...], ...] | None = None) -> tuple[Piece, ...]:
    """The distinct non-empty pieces of ``t`` (or of ``t[expert]``) and which group ranks hold
    each; a regular tensor is one piece held by every rank. ``slices``: the ranks of every
    parallel copy of ``t``'s mesh, when it is a submesh (FSDP's data-parallel mesh of an FSDP x
    TP model: ranks 0 and 2 hold one copy of a norm weight, ranks 1 and 3 another)."""
    return _grouped(tuple(t.shape), _mesh_key(t, slices), expert, group_ranks)


def local_position(t: Any, expert: int, rank: int) -> int:
    """Where ``t[expert]`` lies in global rank ``rank``'s local tensor (it must hold it)."""
    if _mesh_key(t, None) is None:
        return expert
    for g, sets in piece_sets(t):
        if g == rank:
            return sets[0].index(expert)
    raise ValueError(f"rank {rank} holds no part of this tensor")


def indexer(sets: Sets) -> tuple:
    """An index into a whole tensor selecting the block ``sets`` (slices where contiguous)."""
    parts: list[Any] = []
    for s in sets:
        if s[-1] - s[0] + 1 == len(s):
            parts.append(slice(s[0], s[-1] + 1))
        else:
            parts.append(torch.tensor(s, dtype=torch.long))
    if sum(isinstance(p, Tensor) for p in parts) <= 1:
        return tuple(parts)
    n = len(parts)  # several scattered dimensions: broadcast index tensors (numpy's ix_)
    full = [p if isinstance(p, Tensor) else torch.arange(p.start, p.stop) for p in parts]
    return tuple(f.view(*[-1 if j == i else 1 for j in range(n)]) for i, f in enumerate(full))


def state_placements(p: Any, ndim: int) -> list[Any]:
    """Placements of a rotated-frame state tensor (rotation, Adam second moment) of DTensor ``p``.

    Per-expert state ``(E, d, *)`` of a batched parameter keeps the parameter's split of the expert
    dimension (so an expert's rotation lies where its weights lie and is stepped there) and is
    replicated across mesh dimensions that split the matrices themselves. Any other state is split
    by rows over every mesh dimension: each rank holds a distinct block, and DCP reshards it."""
    from torch.distributed.tensor import Replicate, Shard

    if ndim == 3 and p.ndim == 3:
        return [pl if _kind(pl) in ("shard", "strided") and pl.dim % 3 == 0 else Replicate() for pl in p.placements]
    return [Shard(0)] * p.device_mesh.ndim
