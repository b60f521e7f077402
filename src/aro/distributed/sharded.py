"""ARO on DTensor parameters of any placement: FSDP2, tensor parallel, FSDP x TP, HSDP, experts.

Each rank holds pieces (:mod:`.placement`) of parameters, gradients and optimizer state; the
rotated-frame state (rotations, Adam second moments) is a DTensor too, so checkpoints
(``state_dict()`` or DCP) hold the true rotation of every matrix and reshard to any mesh.
Regular tensors in the same optimizer count as replicated on every rank of the group.

A step, per group: (1) momentum on the local pieces (in the optimizer); (2) every *work item* --
one matrix with its rotation, one expert of a batched parameter, or all members of a shared
rotation -- is given to one rank, cost-balanced, and to a rank that already holds all of it when
one does (expert-parallel weights are stepped where they lie); (3) one exchange sends each piece
the owner lacks to it, once (a replicated piece from one of its holders); (4) the owner assembles
the whole tensors and runs the single-process step on them; (5) a second exchange returns to
every holder its piece of the update and of the new state. The tensors an item moves are the
:func:`aro.state_schema.step_inputs` fields; the transport moves them without knowing what they are.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import state_schema as S
from ..engine import Count, Member, Sources, Unit, run_units
from ..spec import GroupSpec
from .executor import Report, SingleProcess, is_dtensor, local
from .placement import Piece, indexer, local_position, mesh_ranks, pieces, state_placements
from .planning import plan_work
from .transport import exchange

__all__ = ["Sharded", "shard_like"]


def shard_like(full: Tensor, like: DTensor) -> DTensor:
    """``full`` laid out as ``like`` is (each rank keeps its own piece; no communication)."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


class _View(NamedTuple):
    """A tensor an item needs whole: ``tensor`` (the state ``key`` of ``param``), or its slice
    ``[expert]`` for one expert of a batched parameter."""

    key: str
    param: Tensor
    expert: int | None
    tensor: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape) if self.expert is None else tuple(self.tensor.shape[1:])


def _items(units: list[Unit]) -> list[list[Unit]]:
    """Work items: units grouped by the parameter that holds their rotation(s) and the expert."""
    items: dict[tuple[int, int | None], list[Unit]] = defaultdict(list)
    for u in units:
        items[(id(u.holder), u.expert)].append(u)
    return list(items.values())


def _views(spec: GroupSpec, item: list[Unit], src: Sources) -> list[_View]:
    expert = item[0].expert
    params = list({id(m.param): m.param for u in item for m in u.members}.values())
    views = []
    for field in S.step_inputs(spec):
        for p in [item[0].holder] if field.held_by == "holder" else params:
            views.append(_View(field.key, p, expert, src.tensors[(field.key, id(p))]))
    return views


class Sharded(SingleProcess):
    """Work items stepped whole on one rank each of ``process_group``."""

    def __init__(self, process_group: Any, params: list[Tensor]) -> None:
        """``params``: the DTensor parameters. Their meshes may be submeshes (FSDP's data-parallel
        mesh inside an FSDP x TP mesh) that other ranks see as other slices; one all-gather of
        every rank's mesh ranks, here, tells each rank all the slices (collective: every rank
        of the group constructs the optimizer)."""
        self.process_group = process_group
        world = dist.get_world_size(process_group)
        self.ranks = tuple(dist.get_global_rank(process_group, r) for r in range(world))
        self.rank = dist.get_rank(process_group)
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, [mesh_ranks(p) for p in params], group=process_group)
        self._slices = {id(p): tuple(sorted({ranks[i] for ranks in seen})) for i, p in enumerate(params)}

    def place_rows(self, rows: Tensor, p: Tensor) -> Tensor:
        """Local ``rows`` of ``p``'s shape as a DTensor laid out like ``p`` (no communication)."""
        if not is_dtensor(p):
            return rows
        return DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def place_whole(self, whole: Tensor, p: Tensor) -> Tensor:
        if not is_dtensor(p):
            return whole
        return distribute_tensor(whole, p.device_mesh, state_placements(p, whole.ndim), src_data_rank=None)

    def _local_piece(self, v: _View) -> Tensor:
        t = local(v.tensor)
        return t if v.expert is None else t[local_position(v.tensor, v.expert, self.ranks[self.rank])]

    def run(self, spec: GroupSpec, units: list[Unit], src: Sources, count: Count) -> Report:
        """Updates are this rank's pieces; the new state pieces are written into ``src``'s tensors."""
        items = _items(units)
        if not items:  # every rank has the same parameters, so none makes a collective call
            return Report({}, 0, [0.0] * len(self.ranks))
        views = [_views(spec, item, src) for item in items]
        layouts = [[pieces(v.tensor, v.expert, self.ranks, self._slices.get(id(v.param))) for v in vs] for vs in views]
        rank_of, loads = plan_work(items, len(self.ranks), [_holding_all(vs, ls) for vs, ls in zip(views, layouts)])
        dtypes = sorted({v.tensor.dtype for vs in views for v in vs}, key=str)
        device = local(views[0][0].tensor).device
        wholes, sent_in = self._gather(views, layouts, rank_of, dtypes, device)
        mine = [k for k, o in enumerate(rank_of) if o == self.rank]
        results, rotations = self._compute(spec, [items[k] for k in mine], [views[k] for k in mine],
                                           [wholes[k] for k in mine], src, count)
        results_of = dict(zip(mine, results))
        sent_out, received = self._return(views, layouts, rank_of, results_of, dtypes, device)
        updates = {}
        for vs in views:
            for v in vs:
                if v.key == S.MOMENTUM and id(v.param) not in updates:
                    updates[id(v.param)] = torch.empty_like(local(v.tensor))
        self._write_back(views, layouts, rank_of, results_of, received, updates)
        return Report(updates, rotations, loads, sent_in + sent_out, _floor_bytes(views, layouts, len(self.ranks)))

    def _gather(self, views: list[list[_View]], layouts: list[list[tuple[Piece, ...]]], rank_of: list[int],
                dtypes: list[torch.dtype], device: torch.device) -> tuple[dict[int, list[Tensor]], int]:
        """Each item's tensors, whole, on its owner: ``{item: [tensor per view]}`` and bytes sent."""
        world, me = len(self.ranks), self.rank
        outgoing: list[list[Tensor]] = [[] for _ in range(world)]
        incoming: list[list[tuple]] = [[] for _ in range(world)]
        for k, (vs, ls) in enumerate(zip(views, layouts)):
            owner = rank_of[k]
            for v, ps in zip(vs, ls):
                for p in ps:
                    if owner in p.holders:
                        continue
                    sender = p.holders[k % len(p.holders)]
                    if sender == me:
                        outgoing[owner].append(self._local_piece(v))
                    if owner == me:
                        incoming[sender].append((p.shape, v.tensor.dtype))
        received, sent = exchange(outgoing, incoming, dtypes, device, self.process_group)
        stream = [iter(r) for r in received]
        wholes: dict[int, list[Tensor]] = {}
        for k, (vs, ls) in enumerate(zip(views, layouts)):
            if rank_of[k] != me:
                continue
            wholes[k] = []
            for v, ps in zip(vs, ls):
                whole = torch.empty(v.shape, dtype=v.tensor.dtype, device=device)
                for p in ps:
                    data = self._local_piece(v) if me in p.holders else next(stream[p.holders[k % len(p.holders)]])
                    whole[indexer(p.sets)] = data.reshape(p.shape)
                wholes[k].append(whole)
        return wholes, sent

    def _compute(self, spec: GroupSpec, items: list[list[Unit]], views: list[list[_View]],
                 wholes: list[list[Tensor]], src: Sources, count: Count) -> tuple[list[list[Tensor]], int]:
        """The single-process step on this rank's items; per item, the tensors to send back (the
        update in place of the momentum, the new state otherwise)."""
        proxies: dict[tuple[int, int | None], Tensor] = {}

        def proxy(p: Tensor, expert: int | None) -> Tensor:
            # stands for `p` (or its slice [expert]) in the step: its id keys the whole tensors
            key = (id(p), expert)
            if key not in proxies:
                proxies[key] = torch.empty(p.shape if expert is None else p.shape[1:], device="meta")
            return proxies[key]

        tensors: dict[tuple[str, int], Tensor] = {}
        steps: dict[int, float] = {}
        units: list[Unit] = []
        for item, vs, ws in zip(items, views, wholes):
            for v, w in zip(vs, ws):
                tensors[(v.key, id(proxy(v.param, v.expert)))] = w
                if id(v.param) in src.step:
                    steps[id(proxy(v.param, v.expert))] = src.step[id(v.param)]
            for u in item:
                e = u.expert
                members = [Member(proxy(m.param, e), m.expert if e is None else None,
                                  m.shape if e is None else m.shape._replace(count=1)) for m in u.members]
                units.append(Unit(proxy(u.holder, e), None, members))
        updates, rotations = run_units(spec, units, Sources(tensors, steps), count) if units else ({}, 0)
        results = [[updates[id(proxy(v.param, v.expert))] if v.key == S.MOMENTUM else w for v, w in zip(vs, ws)]
                   for vs, ws in zip(views, wholes)]
        return results, rotations

    def _return(self, views: list[list[_View]], layouts: list[list[tuple[Piece, ...]]], rank_of: list[int],
                results: dict[int, list[Tensor]], dtypes: list[torch.dtype],
                device: torch.device) -> tuple[int, list[list[Tensor]]]:
        """Send every holder its pieces of the results; (bytes sent, received tensors per rank)."""
        world, me = len(self.ranks), self.rank
        outgoing: list[list[Tensor]] = [[] for _ in range(world)]
        incoming: list[list[tuple]] = [[] for _ in range(world)]
        for k, (vs, ls) in enumerate(zip(views, layouts)):
            owner = rank_of[k]
            for vi, (v, ps) in enumerate(zip(vs, ls)):
                for p in ps:
                    for h in p.holders:
                        if h != owner and owner == me:
                            outgoing[h].append(results[k][vi][indexer(p.sets)].contiguous())
                        elif h != owner and h == me:
                            incoming[owner].append((p.shape, v.tensor.dtype))
        received, sent = exchange(outgoing, incoming, dtypes, device, self.process_group)
        return sent, received

    def _write_back(self, views: list[list[_View]], layouts: list[list[tuple[Piece, ...]]], rank_of: list[int],
                    results: dict[int, list[Tensor]], received: list[list[Tensor]],
                    updates: dict[int, Tensor]) -> None:
        """Put this rank's pieces of the results in place: updates into ``updates``, state into
        the local tensors of the state DTensors."""
        me = self.rank
        stream = [iter(r) for r in received]
        for k, (vs, ls) in enumerate(zip(views, layouts)):
            owner = rank_of[k]
            for vi, (v, ps) in enumerate(zip(vs, ls)):
                for p in ps:
                    if me not in p.holders:
                        continue
                    data = results[k][vi][indexer(p.sets)] if owner == me else next(stream[owner])
                    if v.key == S.MOMENTUM:
                        target = updates[id(v.param)]
                        if v.expert is not None:
                            target = target[local_position(v.tensor, v.expert, self.ranks[me])]
                    else:
                        target = self._local_piece(v)
                    target.copy_(data.reshape(target.shape))


def _holding_all(views: list[_View], layouts: list[tuple[Piece, ...]]) -> list[int] | None:
    """The ranks that hold every tensor of an item whole (None if no rank does)."""
    common: set[int] | None = None
    for v, ps in zip(views, layouts):
        whole = {h for p in ps if p.shape == v.shape for h in p.holders}
        common = whole if common is None else common & whole
    return sorted(common) if common else None


def _floor_bytes(views: list[list[_View]], layouts: list[list[tuple[Piece, ...]]], world: int) -> int:
    """The fewest bytes any plan must move (all ranks together) for these items: each piece not
    on the item's owner goes there once, and each holder other than the owner gets its piece of
    the result, with the owner of each item chosen to move the least."""
    total = 0
    for vs, ls in zip(views, layouts):
        sizes = [(p.numel * v.tensor.element_size(), p.holders) for v, ps in zip(vs, ls) for p in ps]
        total += sum(b * (len(h) - 1) for b, h in sizes)
        total += 2 * min(sum(b for b, h in sizes if r not in h) for r in range(world))
    return total
