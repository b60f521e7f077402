"""Execution modes behind one interface: ``run(spec, units, sources, count) -> Report``.

* :class:`SingleProcess` -- every unit on this process (also every rank of a run without a
  process group);
* :class:`aro.distributed.replicated.Replicated` -- replicated parameters (DDP): the units are
  split across ranks by cost and the results all-gathered;
* :class:`aro.distributed.sharded.Sharded` -- DTensor parameters of any supported placement
  (FSDP2, tensor parallel, 2-D meshes), possibly mixed with regular ones: whole matrices are
  assembled on the rank that steps them and the pieces sent back.

:func:`make_executor` picks the mode from the parameters and the ``process_group`` argument;
:mod:`torch.distributed.tensor` is imported only when a parameter is a DTensor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..engine import Count, Sources, Unit, run_units
from ..spec import GroupSpec

__all__ = ["Report", "SingleProcess", "is_dtensor", "local", "make_executor"]


class Report(NamedTuple):
    updates: dict[int, Tensor]  # id(param) -> update, in the layout of the parameter's local tensor
    rotations: int  # rotations computed on this rank
    loads: list[float]  # cost of the work each rank did (empty on one process)
    sent_bytes: int = 0  # payload this rank sent to other ranks
    floor_bytes: int = 0  # the least any plan must move, all ranks together (sharded mode)

    def merged(self, other: Report) -> Report:
        """The totals of this report and ``other`` (two groups of one step); updates are not kept."""
        loads = [a + b for a, b in zip(self.loads, other.loads)] if self.loads else other.loads
        return Report({}, self.rotations + other.rotations, loads, self.sent_bytes + other.sent_bytes,
                      self.floor_bytes + other.floor_bytes)


def is_dtensor(t: Any) -> bool:
    """Without importing torch.distributed.tensor (slow to import; only FSDP2 users need it)."""
    return type(t).__name__ == "DTensor" or (hasattr(t, "device_mesh") and hasattr(t, "placements"))


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard, any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


class SingleProcess:
    """Every unit on this process."""

    process_group: Any = None

    def run(self, spec: GroupSpec, units: list[Unit], src: Sources, count: Count) -> Report:
        updates, rotations = run_units(spec, units, src, count)
        return Report(updates, rotations, [])

    def place_rows(self, rows: Tensor, p: Tensor) -> Tensor:
        """``p``'s local rows of a tensor shaped like ``p``, as the step's sources hold it."""
        return rows

    def place_whole(self, whole: Tensor, p: Tensor) -> Tensor:
        """A whole new state tensor of ``p``, laid out as ``p`` is (a shard of it for a DTensor ``p``)."""
        return whole


def make_executor(named: list[tuple[str, Tensor]], process_group: Any) -> SingleProcess:
    """The execution mode for these ``(label, parameter)`` pairs (see the module docstring).

    With DTensor parameters the work is shared by ``process_group`` or, by default, by the ranks
    of the parameters' device meshes (all of a 2-D mesh, so FSDP x TP balances over every rank).
    """
    pg = _normalize_process_group(process_group)
    sharded = [(label, p) for label, p in named if is_dtensor(p)]
    if sharded:
        from .placement import check_placements

        for label, p in sharded:
            check_placements(p, label)
        group = pg if pg is not None else _group_of_ranks(sorted({r for _, p in sharded for r in _mesh_ranks(p)}))
        members = set(torch.distributed.get_process_group_ranks(group))
        for label, p in sharded:
            if not set(_mesh_ranks(p)) <= members:
                raise ValueError(f"{label} lives on ranks {_mesh_ranks(p)}, outside the optimizer's process_group "
                                 f"(ranks {sorted(members)}); pass a process_group that covers its device mesh")
        from .sharded import Sharded  # imports torch.distributed.tensor

        return Sharded(group, [p for _, p in sharded])
    if pg is not None:
        from .replicated import Replicated

        return Replicated(pg)
    return SingleProcess()


def _mesh_ranks(p: Any) -> list[int]:
    return p.device_mesh.mesh.flatten().tolist()


def _group_of_ranks(ranks: list[int]) -> Any:
    """The default group if ``ranks`` are all ranks, else a group of them (made by them alone)."""
    dist = torch.distributed
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD
    return dist.new_group(ranks, use_local_synchronization=True)


def _normalize_process_group(pg: Any) -> Any:
    """ProcessGroup, DeviceMesh (its ranks) or None; anything else is a TypeError."""
    if pg is None:
        return None
    if not torch.distributed.is_available():
        raise TypeError("process_group needs torch.distributed, which this torch build lacks")
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(pg, DeviceMesh):
        return pg.get_group() if pg.ndim == 1 else _group_of_ranks(sorted(pg.mesh.flatten().tolist()))
    if isinstance(pg, ProcessGroup):
        return pg
    raise TypeError(
        f"Invalid process_group: {type(pg).__name__}; expected None, a torch.distributed.ProcessGroup or a DeviceMesh"
    )

