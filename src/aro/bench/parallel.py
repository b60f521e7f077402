"""Data parallelism for ``aro bench`` under ``torchrun``: DDP or FSDP2, selected by ``--parallel``.

    torchrun --nproc-per-node 2 -m aro.bench.cli bench --preset quick --parallel ddp
    torchrun --nproc-per-node 2 -m aro.bench.cli bench --preset quick --parallel fsdp2

Every rank builds the same model (same seed) and takes its slice ``rank::world`` of each
global batch, so the global batch, and the protocol, are the ones of a single process; the
gradient is the mean over the global batch (DDP all-reduce / FSDP2 reduce-scatter), except an
MoE model's balancing loss, which each rank computes on its own slice. ``ddp``
wraps the model in ``DistributedDataParallel`` and gives ``aro.ARO`` the process group, which
splits the rotation work across ranks; ``fsdp2`` applies ``fully_shard`` to every block and to
the model, and ``aro.ARO`` assembles whole matrices by all-to-all. Evaluation runs on every rank
(FSDP2's forward is collective) and gives the same loss everywhere; only rank 0 writes files.
Checkpoints hold full (unsharded) model and optimizer state, so a run may resume with another
number of ranks. The bench runs on CPU, so the process group uses gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PARALLEL_MODES", "Parallel", "fully_shard_blocks", "setup_parallel", "tensor_parallel"]

PARALLEL_MODES = ("none", "ddp", "fsdp2")


@dataclass(frozen=True)
class Parallel:
    mode: str = "none"
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- model and optimizer
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train through (DDP wrapper, or ``model`` itself, sharded in place)."""
        if self.mode == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        if self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            fully_shard_blocks(model, init_device_mesh("cpu", (self.world,)))
        return model

    @property
    def process_group(self):
        """What ``aro.ARO`` needs to split work across replicas (DDP); FSDP2 is detected."""
        return dist.group.WORLD if self.mode == "ddp" else None

    # ---------------------------------------------------------------- data and values
    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "none":
            return x, y
        return x[self.rank :: self.world], y[self.rank :: self.world]

    def mean(self, value: torch.Tensor) -> float:
        """Mean over ranks of a scalar (every rank gets the same number)."""
        if self.mode == "none":
            return value.item()
        t = value.detach().float().reshape(1).clone()
        dist.all_reduce(t)
        return (t / self.world).item()

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier()

    # ---------------------------------------------------------------- checkpoints
    def state(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
        """Full model and optimizer state (collective under FSDP2; call on every rank)."""
        if self.mode != "fsdp2":
            return {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers]}
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"model": get_model_state_dict(model, options=options),
                "optimizers": [get_optimizer_state_dict(model, o, options=options) for o in optimizers]}

    def load(self, path: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
        """Load a checkpoint written by :meth:`state` (any world size); returns its step."""
        ckpt = torch.load(path, weights_only=False)
        if self.mode != "fsdp2":
            model.load_state_dict(ckpt["model"])
            for opt, state in zip(optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
            return ckpt["step"]
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, ckpt["model"], options=options)
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            set_optimizer_state_dict(model, opt, state, options=options)
        return ckpt["step"]


def fully_shard_blocks(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2 over a 1-D ``mesh``: every block, then the model (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tensor_parallel(model: nn.Module, mesh: Any) -> nn.Module:
    """Megatron-style tensor parallelism of the dense blocks over a 1-D ``mesh``, in place: q, k,
    v and the MLP's up projection column-parallel (each rank computes its heads and hidden
    units), o and down row-parallel (partial sums all-reduced). Embeddings, norms, the LM head
    and MoE layers stay regular tensors, replicated, so the optimizer sees both kinds. Every
    rank must feed the same batch."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel()}
    for block in model.blocks:
        dense = {"mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()} if hasattr(block.mlp, "up") else {}
        parallelize_module(block, mesh, {**plan, **dense})
    return model


def setup_parallel(mode: str) -> Parallel:
    """Join the process group ``torchrun`` describes (environment variables) for ``mode``."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"--parallel {mode!r}: choose from {PARALLEL_MODES}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} (torchrun) but --parallel none: pass --parallel ddp or fsdp2")
        return Parallel()
    if "RANK" not in os.environ:
        raise ValueError(f"--parallel {mode} runs under torchrun: "
                         f"torchrun --nproc-per-node N -m aro.bench.cli bench ... --parallel {mode}")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Parallel(mode, dist.get_rank(), dist.get_world_size())
