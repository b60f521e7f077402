"""Distributed ARO on ``torch.distributed``: replicated (DDP) and sharded (FSDP2) parameters.

The single-process engine (:mod:`aro.engine`) is the reference; both layers call it, only on
the work planned for each rank (:mod:`.planning`). :class:`aro.ARO` picks the layer by itself.
"""

from .planning import assign, plan_work, unit_cost

__all__ = ["assign", "plan_work", "unit_cost"]
