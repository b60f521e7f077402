"""Distributed ARO on ``torch.distributed``: replicated (DDP) and sharded (FSDP2) parameters.

The single-process engine (:mod:`aro.engine`) is the reference; both layers call it, only on
the work each rank owns (:mod:`.ownership`). :class:`aro.ARO` picks the layer by itself.
"""

from .ownership import assign, unit_cost

__all__ = ["assign", "unit_cost"]
