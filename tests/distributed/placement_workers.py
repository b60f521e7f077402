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
    # HSDP: fully_shard over a 2-D mesh replicates across the first dimension, shards over the second
    "hsdp": ((2, 2), {"up": [Replicate(), Shard(0)], "down": [Replicate(), Shard(0)], "qkv": [Replicate(), Shard(0)],
                      "experts": [Replicate(), Shard(0)], "bias": [Replicate(), Shard(0)], "dense": None}),
    # expert parallel alone: each rank holds whole experts
    "ep": ((2,), {"experts": [Shard(0)], "bias": [Shard(0)]}),
    "rows": ((4,), {"up": [Shard(0)], "down": [Shard(0)], "qkv": [Shard(0)], "experts": [Shard(0)],
                    "bias": [Shard(0)], "dense": None}),
}


def full_values(dtype: torch.dtype, names=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    values = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in SHAPES.items()}
    return {n: t for n, t in values.items() if names is None or n in names}


def grads(step: int, dtype: torch.dtype, names=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    values = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in SHAPES.items()}
    return {n: t for n, t in values.items() if names is None or n in names}


def make_opt(params: list[torch.Tensor], base: str) -> aro.ARO:
    return aro.ARO(params, lr=0.05, weight_decay=0.1, base=base)


def train_single(steps: int, dtype: torch.dtype, base: str, layout: str | None = None) -> tuple[dict, dict]:
    """One process, the parameters of ``layout`` (all if None)."""
    full, rotations, _ = train_laid_out(None, steps, dtype, base, names=LAYOUTS[layout][1] if layout else None)
    return full, rotations


def _module(params: dict[str, torch.nn.Parameter]) -> torch.nn.Module:
    holder = torch.nn.Module()
    for n, p in params.items():
        holder.register_parameter(n, p)
    return holder


def _dcp_load(module: torch.nn.Module, opt: aro.ARO, path: str) -> None:
    """Resume from a DCP checkpoint with torch's own state-dict API (it creates the state first)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(module, opt)
    state = {"model": msd, "opt": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["opt"])


def _dcp_save(module: torch.nn.Module, opt: aro.ARO, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, opt)
    dcp.save({"model": msd, "opt": osd}, checkpoint_id=path)


def train_laid_out(layout: str | None, steps: int, dtype: torch.dtype, base: str, start: int = 0,
                   resume: str | None = None, save: str | None = None, names=None) -> tuple[dict, dict, dict]:
    """Steps ``start .. start + steps`` with the parameters laid out as ``LAYOUTS[layout]`` (None:
    one process, the parameters ``names``, default all), optionally resumed from and saved to
    DCP; full parameters, rotations, stats."""
    mesh_shape, placements = LAYOUTS[layout] if layout else ((), {n: None for n in (names or SHAPES)})
    mesh = init_device_mesh("cpu", mesh_shape) if layout else None

    def lay(name: str, t: torch.Tensor) -> torch.Tensor:
        pl = placements[name]
        return t.clone() if pl is None else distribute_tensor(t, mesh, pl, src_data_rank=None)

    params = {n: torch.nn.Parameter(lay(n, t)) for n, t in full_values(dtype, placements).items()}
    module = _module(params)
    opt = make_opt(list(params.values()), base)
    if resume:
        _dcp_load(module, opt, resume)
    for step in range(start, start + steps):
        for n, g in grads(step, dtype, placements).items():
            params[n].grad = lay(n, g)
        opt.step()
    if save:
        _dcp_save(module, opt, save)
    full = {n: (p.full_tensor() if placements[n] is not None else p).detach() for n, p in params.items()}
    rotations = {n: opt.state[p]["rotation"] for n, p in params.items() if "rotation" in opt.state[p]}
    rotations = {n: r.full_tensor() if hasattr(r, "full_tensor") else r for n, r in rotations.items()}
    return full, rotations, opt.stats()


def placement_worker(rank: int, world: int, port: int, out: str, layout: str, steps: int, dtype_name: str,
                     base: str, start: int = 0, resume: str | None = None, save: str | None = None) -> None:
    _init(rank, world, port)
    try:
        full, rotations, stats = train_laid_out(layout, steps, getattr(torch, dtype_name), base, start, resume, save)
        torch.save({"params": full, "rotations": rotations, "stats": stats}, f"{out}/placement_rank{rank}.pt")
        dist.barrier()
    finally:
        _teardown()


# (shape, mesh shape, placements): uneven and empty pieces, strided rows, several split dims
PIECE_CASES = [
    ((7, 5), (4,), [Shard(0)]), ((3, 5), (4,), [Shard(0)]), ((5, 9), (4,), [Shard(1)]), ((5, 9), (4,), [Replicate()]),
    ((10, 6), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]), ((7, 6), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((9, 7), (2, 2), [Shard(0), Shard(1)]), ((9, 7), (2, 2), [Shard(1), Shard(0)]), ((9, 7), (2, 2), [Shard(0), Shard(0)]),
    ((9, 7), (2, 2), [Replicate(), Shard(1)]), ((3, 5, 6), (2, 2), [Shard(0), Shard(2)]),
    ((11, 6), (2, 2), [_StridedShard(0, split_factor=2), Shard(1)]),
]


def pieces_worker(rank: int, world: int, port: int, out: str) -> None:
    """For every case: is this rank's local tensor the block the placement module computes?"""
    from torch.distributed.tensor import DTensor, Partial

    from aro.distributed.placement import indexer, piece_sets

    _init(rank, world, port)
    try:
        checks = []
        for shape, mesh_shape, pl in PIECE_CASES:
            mesh = init_device_mesh("cpu", mesh_shape)
            full = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
            local = distribute_tensor(full, mesh, pl, src_data_rank=None).to_local()
            sets = dict(piece_sets(distribute_tensor(full, mesh, pl, src_data_rank=None)))[rank]
            block = full[indexer(sets)] if all(sets) else full.new_empty(0)
            checks.append(bool(local.numel() == block.numel() and torch.equal(local.reshape(-1), block.reshape(-1))))
        mesh = init_device_mesh("cpu", (world,))
        partial = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()]))
        try:
            aro.ARO([torch.nn.Parameter(torch.ones(3, 3)), partial], lr=0.01)
            error = ""
        except ValueError as e:
            error = str(e)
        torch.save({"checks": checks, "partial_error": error}, f"{out}/pieces_rank{rank}.pt")
        dist.barrier()
    finally:
        _teardown()


DENSE = None  # the model of the TP tests, built lazily (imports the bench)


def dense_model():
    from aro.bench.models import GPT, ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2)).double()


def model_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randint(0, 32, (4, 9), generator=g)
    return x[:, :-1], x[:, 1:]


def train_model(model, opt, steps: int, weight: float = 1.0) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = model_batch(step)
        opt.zero_grad()
        loss = model.loss(x, y)
        (loss * weight).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tp_model_worker(rank: int, world: int, port: int, out: str, fsdp: bool) -> None:
    """The bench's GPT, tensor parallel (q/k/v/up column-wise, o/down row-wise, the rest regular
    tensors) over 2 ranks, or FSDP x TP on a 2 x 2 mesh, trained with ``aro.ARO(model.parameters())``."""
    from torch.distributed.fsdp import fully_shard

    from aro.bench.parallel import tensor_parallel

    _init(rank, world, port)
    try:
        model = dense_model()
        weight = 1.0
        if fsdp:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            tensor_parallel(model, mesh["tp"])
            for block in model.blocks:
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
            # FSDP averages over dp: the first dp replica carries 2x the loss, the other exact zeros
            weight = 2.0 if mesh.get_coordinate()[0] == 0 else 0.0
        else:
            tensor_parallel(model, init_device_mesh("cpu", (world,)))
        opt = aro.ARO(model.parameters(), lr=0.02, weight_decay=0.1)
        losses = train_model(model, opt, 3, weight)
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
        torch.save({"params": full, "losses": losses, "stats": opt.stats()}, f"{out}/tp_model_rank{rank}.pt")
        dist.barrier()
    finally:
        _teardown()
