"""Execution modes behind one interface: ``run(spec, units, sources, count) -> Report``.

* :class:`SingleProcess` -- every unit on this process (also every rank of a run without a
  process group);
* :class:`aro.distributed.replicated.Replicated` -- replicated parameters (DDP): the units are
  split across ranks by cost and the results all-gathered;
* :class:`aro.distributed.sharded.Sharded` -- DTensor parameters (FSDP2): whole matrices are
  assembled on the rank that steps them and the rows sent back.

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


def make_executor(params: list[Tensor], process_group: Any) -> SingleProcess:
    """The execution mode for these parameters (see the module docstring)."""
    pg = _normalize_process_group(process_group)
    sharded = [p for p in params if is_dtensor(p)]
    if sharded:
        if len(sharded) != len(params):
            raise ValueError("ARO got a mix of DTensor and regular parameters; shard all of them (fully_shard) or none")
        for i, p in enumerate(sharded):
            if p.device_mesh.ndim != 1 or any(type(pl).__name__ != "Shard" or pl.dim != 0 for pl in p.placements):
                raise ValueError(
                    f"ARO supports DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2 fully_shard); "
                    f"parameter {i} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
                )
        from .sharded import Sharded  # imports torch.distributed.tensor

        return Sharded(pg if pg is not None else sharded[0].device_mesh.get_group())
    if pg is not None:
        from .replicated import Replicated

        return Replicated(pg)
    return SingleProcess()


def _normalize_process_group(pg: Any) -> Any:
    """ProcessGroup, 1-D DeviceMesh or None; anything else is a TypeError."""
    if pg is None:
        return None
    if not torch.distributed.is_available():
        raise TypeError("process_group needs torch.distributed, which this torch build lacks")
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(pg, DeviceMesh):
        if pg.ndim != 1:
            raise ValueError(f"Invalid process_group: a {pg.ndim}-D DeviceMesh; pass a 1-D mesh or one of its groups")
        return pg.get_group()
    if isinstance(pg, ProcessGroup):
        return pg
    raise TypeError(
        f"Invalid process_group: {type(pg).__name__}; expected None, a torch.distributed.ProcessGroup or a DeviceMesh"
    )

