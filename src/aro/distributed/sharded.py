"""ARO on FSDP2 parameters (DTensor, ``Shard(0)``): assemble, step on one rank, send the rows back.

Each rank holds dim-0 shards (``torch.chunk`` layout, possibly uneven or empty) of every
parameter, its gradient and its optimizer state; rotations and Adam second moments are DTensors
sharded the same way along their own dim 0, so checkpoints (``state_dict()`` or DCP) hold the
true rotation of every matrix and reshard to any world size.

A step: (1) momentum on the local shards; (2) one ``all_to_all`` sends every shard of a *work
item* -- a matrix with its own rotation(s), or all members of a shared rotation -- to the rank
that steps it (cost-balanced); (3) that rank runs the single-process step on the whole matrices;
(4) a second ``all_to_all`` returns each rank its rows of the updates and of the new state. The
tensors an item moves are the :func:`aro.state_schema.step_inputs` and ``step_outputs`` fields.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from .. import state_schema as S
from ..engine import Count, Sources, Unit, run_units
from ..spec import GroupSpec
from .executor import Report, SingleProcess
from .planning import plan_work
from .transport import assemble_on_ranks, chunk_sizes, return_chunks

__all__ = ["Sharded", "shard_like"]


def shard_like(full: Tensor, like: DTensor) -> DTensor:
    """``full`` as a DTensor sharded on dim 0 over ``like``'s mesh (chunk layout, no communication)."""
    mesh = like.device_mesh
    sizes = chunk_sizes(full.shape[0], mesh.size())
    start = sum(sizes[: mesh.get_local_rank()])
    piece = full[start : start + sizes[mesh.get_local_rank()]].contiguous()
    return DTensor.from_local(piece, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())


def _items(units: list[Unit]) -> list[list[Unit]]:
    """Work items: units grouped by the parameter that holds their rotation(s)."""
    items: dict[int, list[Unit]] = defaultdict(list)
    for u in units:
        items[id(u.holder)].append(u)
    return list(items.values())


def _named(spec: GroupSpec, item: list[Unit]) -> list[tuple[str, Tensor]]:
    """(state key, parameter) of each tensor an item needs whole, in a fixed order."""
    params = list({id(m.param): m.param for u in item for m in u.members}.values())
    named = []
    for field in S.step_inputs(spec):
        named += [(field.key, item[0].holder)] if field.held_by == "holder" else [(field.key, p) for p in params]
    return named


class Sharded(SingleProcess):
    """Work items stepped whole on one rank each of ``process_group``."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group

    def place_rows(self, rows: Tensor, p: Tensor) -> Tensor:
        """Local ``rows`` of ``p``'s shape as a DTensor laid out like ``p`` (no communication)."""
        return DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def place_whole(self, whole: Tensor, p: Tensor) -> Tensor:
        return shard_like(whole, p)

    def run(self, spec: GroupSpec, units: list[Unit], src: Sources, count: Count) -> Report:
        """Updates are this rank's rows; the new state rows are written into ``src``'s DTensors."""
        world = dist.get_world_size(self.process_group)
        items = _items(units)
        rank_of, loads = plan_work(items, world)
        named = [_named(spec, item) for item in items]
        shapes = [[tuple(src.tensors[n].shape) for n in _keys(item)] for item in named]
        chunks = [[src.tensors[n].to_local() for n in _keys(item)] for item in named]
        whole = assemble_on_ranks(chunks, shapes, rank_of, self.process_group)
        mine = [u for k in sorted(whole) for u in items[k]]
        steps = {id(m.param): src.step[id(m.param)] for u in mine for m in u.members}
        full = Sources({n: t for k in sorted(whole) for n, t in zip(_keys(named[k]), whole[k])}, steps)
        updates, rotations = run_units(spec, mine, full, count) if mine else ({}, 0)
        results = {k: [updates[pid] if key == S.MOMENTUM else full.tensors[(key, pid)]
                       for key, pid in _keys(named[k])] for k in whole}
        rows = return_chunks(results, shapes, rank_of, chunks[0][0], self.process_group)
        local_updates: dict[int, Tensor] = {}
        for k, item in enumerate(named):
            for (key, pid), t in zip(_keys(item), rows[k]):
                if key == S.MOMENTUM:
                    local_updates[pid] = t
                else:
                    src.tensors[(key, pid)].to_local().copy_(t)
        return Report(local_updates, rotations, loads)


def _keys(named: list[tuple[str, Tensor]]) -> list[tuple[str, int]]:
    return [(key, id(p)) for key, p in named]
