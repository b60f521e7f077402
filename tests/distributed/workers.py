"""Spawned workers for the distributed tests (gloo, CPU). Results go to files in ``out``."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import aro
from aro.bench.models import GPT, ModelConfig

# d = 16 splits unevenly over 3 ranks (6, 5, 5); 2 experts leave a rank with an empty shard;
# one block, so the expert shapes occur once. top_k = E: with top-1 of renormalised gates the
# router would get no gradient at all, only rounding noise, which RMS matching turns into full steps.
CFG = ModelConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1, n_heads=2, n_experts=2, top_k=2, expert_hidden=8)
LR = 0.02


def build(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    # the MoE's experts are created empty; give them values
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 3:
                p.normal_(0, 0.2)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 32, (6, CFG.seq_len + 1), generator=g)
    return x[:, :-1], x[:, 1:]


# The distributed tests compare against the single-process optimizer to 1e-6, so the gradients
# must be bitwise equal: rank 0 computes the whole batch, the other ranks contribute exact zeros,
# and the data-parallel reduction sums instead of averaging (g + 0 + 0 = g exactly). Splitting the
# batch would add the reduction's rounding (~1e-7), which any optimizer's step can amplify in the
# ill-conditioned directions of such tiny matrices.
def rank_weight(rank: int) -> float:
    return 1.0 if rank == 0 else 0.0


def sum_hook(process_group, bucket):
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def make_optimizer(model, sharing: str, **kw):
    return aro.ARO(aro.param_groups(model, mode="full", sharing=sharing), lr=LR, base=kw.pop("base", "sinkhorn"), **kw)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1))


def train_single(steps: int, sharing: str, start: int = 0, model=None, opt=None, base="sinkhorn"):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same summation order in every kernel
    try:
        model = model or build()
        opt = opt or make_optimizer(model, sharing, base=base)
        for t in range(start, start + steps):
            x, y = batch(t)
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model, opt


def _teardown() -> None:
    """Free what references the process group, then destroy it (see aro.bench.distbench._teardown;
    every worker passes a barrier at the end of its work, outside the ``finally``)."""
    gc.collect()
    dist.destroy_process_group()


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def ddp_worker(rank: int, world: int, port: int, out: str, steps: int, sharing: str, base: str, resume: str | None):
    _init(rank, world, port)
    try:
        model = build()
        start = 0
        opt = make_optimizer(model, sharing, base=base, process_group=dist.group.WORLD)
        if resume:
            ckpt = torch.load(resume, weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            start = ckpt["step"]
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, sum_hook)
        for t in range(start, start + steps):
            x, y = batch(t)
            opt.zero_grad()
            (_loss(ddp, x, y) * rank_weight(rank)).backward()
            opt.step()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": start + steps,
                    "stats": opt.stats()}, Path(out) / f"ddp_rank{rank}.pt")
        # Tear DDP down while the process group still lives: a Reducer freed after
        # destroy_process_group() joins gloo's worker thread while holding the GIL, and that thread
        # may need the GIL to free a finished work's tensors (a deadlock seen under load).
        dist.barrier()
        del ddp
        gc.collect()
    finally:
        _teardown()


def _exact_sharded_grads(model, x, y) -> None:
    """Replace FSDP's reduced gradients by the shards of the exact full-batch gradient."""
    from aro.distributed.sharded import shard_like

    replica = build()
    with torch.no_grad():
        for (_, p), q in zip(model.named_parameters(), replica.parameters()):
            q.copy_(p.full_tensor())
    _loss(replica, x, y).backward()
    for (_, p), q in zip(model.named_parameters(), replica.parameters()):
        p.grad = shard_like(q.grad, p.grad)


def _fully_sharded(model, world: int):
    """``fully_shard`` on every block and the root, over a 1-D CPU mesh of ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for module in list(model.blocks) + [model]:
        fully_shard(module, mesh=mesh)
    return model


def fsdp_worker(rank: int, world: int, port: int, out: str, steps: int, sharing: str, base: str, resume: str | None):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp

    _init(rank, world, port)
    try:
        model = _fully_sharded(build(), world)
        opt = make_optimizer(model, sharing, base=base)
        start = 0
        if resume:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "opt": osd}
            dcp.load(state, checkpoint_id=resume)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["opt"])
            start = int(Path(resume, "step.txt").read_text())
        for t in range(start, start + steps):
            x, y = batch(t)
            opt.zero_grad()
            # FSDP averages over ranks (gloo has no pre-multiplied sum): rank 0 carries world x loss,
            # exact when world is a power of two ((2g + 0) / 2 = g)
            (_loss(model, x, y) * rank_weight(rank) * world).backward()
            if world & (world - 1):
                _exact_sharded_grads(model, x, y)  # (3g + 0 + 0) / 3 is not g in floating point
            opt.step()
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        rotations = {}
        for g in opt.param_groups:
            for n, p in zip(g["param_names"], g["params"]):
                r = opt.state[p].get("rotation")
                if r is not None:
                    rotations[n] = r.full_tensor()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "opt": osd}, checkpoint_id=str(Path(out) / "dcp"))
        if rank == 0:
            Path(out, "dcp", "step.txt").write_text(str(start + steps))
        torch.save({"params": full, "rotations": rotations, "stats": opt.stats()}, Path(out) / f"fsdp_rank{rank}.pt")
        dist.barrier()
    finally:
        _teardown()


def fsdp_nonfinite_worker(rank: int, world: int, port: int, out: str) -> None:
    """R08: a NaN in one rank's shard makes every rank skip that parameter (all-reduced decision)."""
    import warnings

    _init(rank, world, port)
    try:
        model = _fully_sharded(build(), world)
        opt = make_optimizer(model, "none")
        names = [n for n, _ in model.named_parameters()]
        target = next(n for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n)
        before = {}
        for t in range(2):
            x, y = batch(t)
            opt.zero_grad()
            _loss(model, x, y).backward()
            if t == 1:
                before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
                if rank == world - 1:  # only the last rank's shard is poisoned
                    dict(model.named_parameters())[target].grad.to_local().view(-1)[0] = float("nan")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
        after = {n: p.full_tensor() for n, p in model.named_parameters()}
        torch.save({"target": target, "names": names, "warned": [str(w.message) for w in caught],
                    "unchanged": [n for n in names if torch.equal(before[n], after[n])],
                    "stats": opt.stats()}, Path(out) / f"nonfinite_rank{rank}.pt")
        dist.barrier()
    finally:
        _teardown()


def bench_worker(rank: int, world: int, port: int, out: str, mode: str, extra: list[str], crash: bool = False) -> None:
    """``aro bench`` as torchrun would start it: the environment describes the process group.
    ``crash``: rank 0 dies right after writing the first checkpoint."""
    from aro.bench import train
    from aro.bench.cli import main

    if crash:
        real = train.atomic_save

        def save_then_die(obj, path):
            real(obj, path)
            raise RuntimeError("simulated crash")

        train.atomic_save = save_then_die
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    code = main(["bench", "--preset", "smoke", "--parallel", mode, "--out", out, "--no-progress", *extra])
    if code:
        raise SystemExit(code)


def load_dcp_single(path: str, sharing: str, base: str):
    """A single process (no process group) resuming from a DCP checkpoint written by FSDP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp

    model = build()
    opt = make_optimizer(model, sharing, base=base)
    # create the state entries so the loader knows their structure
    x, y = batch(0)
    _loss(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "opt": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["opt"])
    return model, opt, int(Path(path, "step.txt").read_text())


if __name__ == "__main__":
    sys.exit(0)
