"""Spawned workers for the placement tests: ARO on DTensor parameters of every supported
placement, on 1-D and 2-D meshes, mixed with regular tensors, against one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

import aro

from .workers import _init, _teardown

# name -> shape; uneven sizes (7, 5, 9) leave ranks with unequal or empty pieces. "experts" is a
# batched parameter (its own rotation per expert), "bias" takes the AdamW path, "dense" stays a
# regular tensor beside the DTensors.
SHAPES = {"up": (10, 6), "down": (6, 9), "qkv": (7, 5), "experts": (4, 5, 6), "bias": (7,), "dense": (5, 8)}

# layouts: name -> mesh shape and each parameter's placements (None: a regular tensor)
LAYOUTS = {
    "tp": ((2,), {"up": [Shard(0)], "down": [Shard(1)], "qkv": [Replicate()], "experts": [Shard(0)],
                  "bias": [Shard(0)], "dense": None}),
    # FSDP over TP (fully_shard on dp after ColwiseParallel makes the strided placement), HSDP
    # (replicated over dp, sharded over the other dim), experts split over dp and within a matrix
    "fsdp-tp": ((2, 2), {"up": [_StridedShard(0, split_factor=2), Shard(0)], "down": [Shard(0), Shard(1)],
                         "qkv": [Replicate(), Shard(0)], "experts": [Shard(0), Shard(2)],
                         "bias": [Shard(0), Replicate()], "dense": None}),
}


def full_values(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in SHAPES.items()}


def grads(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in SHAPES.items()}


def make_opt(params: list[torch.Tensor], base: str) -> aro.ARO:
    return aro.ARO(params, lr=0.05, weight_decay=0.1, base=base)


def train_single(steps: int, dtype: torch.dtype, base: str) -> tuple[dict, dict]:
    params = {n: torch.nn.Parameter(t) for n, t in full_values(dtype).items()}
    opt = make_opt(list(params.values()), base)
    for step in range(steps):
        for n, g in grads(step, dtype).items():
            params[n].grad = g
        opt.step()
    rotations = {n: opt.state[p]["rotation"] for n, p in params.items() if "rotation" in opt.state[p]}
    return {n: p.detach() for n, p in params.items()}, rotations


def placement_worker(rank: int, world: int, port: int, out: str, layout: str, steps: int, dtype_name: str,
                     base: str) -> None:
    _init(rank, world, port)
    try:
        dtype = getattr(torch, dtype_name)
        mesh_shape, placements = LAYOUTS[layout]
        mesh = init_device_mesh("cpu", mesh_shape)

        def lay(name: str, t: torch.Tensor) -> torch.Tensor:
            pl = placements[name]
            return t.clone() if pl is None else distribute_tensor(t, mesh, pl, src_data_rank=None)

        params = {n: torch.nn.Parameter(lay(n, t)) for n, t in full_values(dtype).items()}
        opt = make_opt(list(params.values()), base)
        for step in range(steps):
            for n, g in grads(step, dtype).items():
                params[n].grad = lay(n, g)
            opt.step()
        full = {n: (p.full_tensor() if placements[n] is not None else p).detach() for n, p in params.items()}
        rotations = {n: opt.state[p]["rotation"] for n, p in params.items() if "rotation" in opt.state[p]}
        rotations = {n: r.full_tensor() if hasattr(r, "full_tensor") else r for n, r in rotations.items()}
        torch.save({"params": full, "rotations": rotations, "stats": opt.stats()}, f"{out}/placement_rank{rank}.pt")
        dist.barrier()
    finally:
        _teardown()
