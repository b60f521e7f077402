"""ARO in torchtitan (0.3): an optimizer container a torchtitan config selects.

torchtitan builds ``config.optimizer`` after it has parallelized the model (FSDP2, TP, FSDP x
TP, pipeline stages as model parts) with ``config.optimizer.build(model_parts=...)``. Its own
container matches parameter names against regexes and knows only Adam, AdamW and DistMuon; this
one classifies each model part with :func:`aro.param_groups` (the paper's hybrid split by
default: embeddings, LM head and MoE routers on AdamW, every other matrix on ARO, norms
without weight decay) and builds one :class:`aro.ARO` per part, which steps DTensor parameters
of any placement by itself. Everything else -- ``step``, ``zero_grad``, the flat FQN-keyed
``state_dict`` that torchtitan's checkpointer saves with DCP, learning-rate schedulers around
each inner optimizer -- is torchtitan's container's::

    from aro.integrations.torchtitan import aro_optimizer_config
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    def llama3_aro():  # torchrun ... -m torchtitan.train --module mypkg.configs --config llama3_aro
        cfg = llama3_debugmodel()
        cfg.optimizer = aro_optimizer_config(lr=2e-3, weight_decay=0.1)
        return cfg

torchtitan's ``optimizer.implementation`` (fused / foreach) does not apply: ARO batches its own
work. Importing this module imports torchtitan (``pip install aro[torchtitan]``; README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer

from ..groups import MODES, param_groups
from ..optimizer import ARO

__all__ = ["AROOptimizersContainer", "aro_optimizer_config"]


class AROOptimizersContainer(OptimizersContainer):
    """torchtitan's optimizer container with one :class:`aro.ARO` per model part."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        lr: float = 8e-4
        """Peak learning rate of every group (torchtitan's schedulers scale it)."""
        weight_decay: float = 0.1
        mode: str = "hybrid"
        """``hybrid`` (embeddings, LM head and routers on AdamW) or ``full`` (ARO on every matrix)."""
        sharing: str = "none"
        """Rotation sharing plan (:mod:`aro.sharing`): ``none``, ``global`` or ``chain``."""
        aro_kwargs: dict[str, Any] = field(default_factory=dict)
        """Further :class:`aro.ARO` arguments, e.g. ``{"base": "sinkhorn", "betas": (0.9, 0.95)}``."""

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if config.mode not in MODES:
            raise ValueError(f"aro_optimizer_config(mode={config.mode!r}): choose one of {MODES}")
        self.optimizers = []
        self.model_parts = model_parts
        all_params = []
        for part in model_parts:
            opt = ARO(_trainable_groups(part, config), lr=config.lr, weight_decay=config.weight_decay,
                      **config.aro_kwargs)
            self.optimizers.append(opt)
            all_params += [p for group in opt.param_groups for p in group["params"]]
        self._validate_params(all_params)
        self._post_init(all_params)


def _trainable_groups(part: nn.Module, config: AROOptimizersContainer.Config) -> list[dict[str, Any]]:
    """:func:`aro.param_groups` of one model part, trainable parameters only, named by their
    canonical FQN (without activation-checkpoint or compile wrappers), as torchtitan's
    checkpoints key optimizer state."""
    groups = []
    for group in param_groups(part, mode=config.mode, sharing=config.sharing):
        named = [(canonical_fqn(n), p) for n, p in group["params"] if p.requires_grad]
        if named:
            groups.append({**group, "params": named})
    if not groups:
        raise ValueError("aro_optimizer_config: a model part has no parameter that requires a gradient")
    return groups


def aro_optimizer_config(lr: float = 8e-4, weight_decay: float = 0.1, mode: str = "hybrid", sharing: str = "none",
                         **aro_kwargs: Any) -> AROOptimizersContainer.Config:
    """The value for a torchtitan ``Trainer.Config``'s ``optimizer`` field."""
    return AROOptimizersContainer.Config(lr=lr, weight_decay=weight_decay, mode=mode, sharing=sharing,
                                         aro_kwargs=aro_kwargs)
