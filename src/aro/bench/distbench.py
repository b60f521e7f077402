"""``aro distbench``: the distributed optimizer step, per rank, for several world sizes.

For each world size ``N`` it spawns ``N`` gloo processes on this machine (one torch thread
each), builds the same model on every rank, lays it out by mode -- ``ddp``: full replicas and
``aro.ARO(..., process_group=WORLD)``, which splits the rotation work by cost and all-gathers
the updates; ``fsdp2``: ``fully_shard`` per block; ``tp``: the dense blocks tensor-parallel;
``fsdp2-tp``: both, on a (N/2) x 2 mesh; the optimizer assembles whole matrices from the DTensor
pieces -- gives every rank the same fixed gradients and times ``opt.step()`` after warm-up (a
barrier before each step, so the ranks start together). It reports each rank's median step time,
its share of the rotation FLOPs (``ARO.stats()``'s ``rotation_cost_by_rank``: the cost model
:math:`m^2 n + m^3` per matrix that the split balances), and the bytes it sent, beside the
floor: the least any plan moves (``bytes_floor_per_step``).

On a machine with fewer cores than ranks the processes share cores; the FLOP shares are
exact regardless, the times then show the oversubscription.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .models import PRESETS, build_model
from .optimizers import ADAMW_BETAS, ADAMW_EPS
from .options import check_options, option
from .parallel import Parallel
from .environment import environment_info
from .files import atomic_write_text

__all__ = ["DIST_MODES", "DistbenchOptions", "run_distbench"]

DIST_MODES = ("ddp", "fsdp2", "tp", "fsdp2-tp")


@dataclass(frozen=True)
class DistbenchOptions:
    """The options of ``aro distbench``, declared once: the flags are generated from the fields
    (:mod:`aro.bench.options`)."""

    preset: str = option("small", "model preset", choices=sorted(PRESETS))
    worlds: tuple[int, ...] = option((1, 2, 3), "comma-separated world sizes", minimum=1)
    modes: tuple[str, ...] = option(DIST_MODES[:2], f"comma-separated, of {', '.join(DIST_MODES)}", choices=DIST_MODES)
    sharing: str = option("none", "rotation sharing plan", choices=("none", "global", "chain"))
    warmup: int = option(3, "untimed steps first", minimum=0)
    repeats: int = option(10, "timed steps", minimum=1)
    out: Path = option(Path("benchmarks/results/distbench-cpu.json"), "JSON path")

    def __post_init__(self) -> None:
        check_options(self)
        if not self.worlds:
            raise ValueError("--worlds: give at least one world size, e.g. --worlds 1,2")
        if not self.modes:
            raise ValueError(f"--modes: give at least one of {', '.join(DIST_MODES)}")
        if "fsdp2-tp" in self.modes and any(w % 2 for w in self.worlds):
            raise ValueError(f"--modes fsdp2-tp runs on a (world/2) x 2 mesh: give even --worlds, got "
                             f"{','.join(map(str, self.worlds))}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teardown() -> None:
    """Free what still references the process group, then destroy it. Every worker first passes a
    barrier at the end of its work: a rank that closes its gloo sockets while a peer's transport
    thread still reads them aborts that peer ("terminate called without an active exception"). The
    barrier is not in a ``finally``: a rank that failed must exit, not wait for its peers."""
    gc.collect()
    dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, preset: str, mode: str, sharing: str, warmup: int, repeats: int,
            out: str) -> None:
    import aro

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(preset, seed=0)
        par = Parallel(mode if mode in ("ddp", "fsdp2") else "none", rank, world)
        _lay_out(model, mode, world)  # in place; the optimizer detects the DTensor parameters
        # only the optimizer step is timed, so DDP needs no wrapper: just the group that splits the work
        pg = par.process_group if world > 1 and mode == "ddp" else None
        groups = aro.param_groups(model, sharing=sharing)
        opt = aro.ARO(groups, lr=1e-3, weight_decay=0.1, betas=ADAMW_BETAS, eps=ADAMW_EPS, process_group=pg)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            full = torch.randn(p.shape, generator=g) * 1e-2  # the same full gradient on every rank
            if hasattr(p, "to_local"):
                from aro.distributed.sharded import shard_like

                p.grad = shard_like(full, p)
            else:
                p.grad = full
        times = []
        for i in range(warmup + repeats):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        stats = opt.stats()
        row = {"rank": rank, "step_ms": 1e3 * statistics.median(times), "qr_per_step": stats["qr_per_step"],
               "rotation_cost_by_rank": stats["rotation_cost_by_rank"], "bytes_sent": stats["bytes_sent_per_step"],
               "bytes_floor": stats["bytes_floor_per_step"]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
        dist.barrier()
    finally:
        _teardown()


def _lay_out(model: torch.nn.Module, mode: str, world: int) -> None:
    """``fsdp2``: every block and the model sharded over all ranks; ``tp``: the dense blocks
    tensor-parallel over all ranks; ``fsdp2-tp``: tensor parallel within pairs of ranks and FSDP2
    across the pairs, on a (world/2) x 2 mesh (torchtitan's 2-D layout)."""
    from torch.distributed.device_mesh import init_device_mesh

    from .parallel import fully_shard_blocks, tensor_parallel

    if mode == "fsdp2":
        fully_shard_blocks(model, init_device_mesh("cpu", (world,)))
    elif mode == "tp":
        tensor_parallel(model, init_device_mesh("cpu", (world,)))
    elif mode == "fsdp2-tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        tensor_parallel(model, mesh["tp"])
        fully_shard_blocks(model, mesh["dp"])


def run_distbench(options: DistbenchOptions, *, progress=print) -> dict:
    o = options
    result = {"environment": environment_info(), "preset": o.preset, "sharing": o.sharing,
              "settings": {"warmup": o.warmup, "repeats": o.repeats}, "runs": []}
    for mode in o.modes:
        for world in o.worlds:
            progress(f"{mode}, world {world}")
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_worker, args=(world, _free_port(), o.preset, mode, o.sharing, o.warmup, o.repeats, tmp),
                         nprocs=world, join=True)
                ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
            costs = ranks[0]["rotation_cost_by_rank"] or [1.0]
            total = sum(costs) or 1.0
            result["runs"].append({
                "mode": mode, "world": world,
                "step_ms_by_rank": [r["step_ms"] for r in ranks],
                "qr_per_step_by_rank": [r["qr_per_step"] for r in ranks],
                "rotation_flop_share_by_rank": [c / total for c in costs],
                "bytes_sent_by_rank": [r["bytes_sent"] for r in ranks],
                # the least any plan moves, all ranks together: each piece to the rank that steps
                # its matrix and back, from and to the rank that holds most of it (sharded modes)
                "bytes_floor": ranks[0]["bytes_floor"],
            })
    o.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(o.out, json.dumps(result, indent=1))
    return result


def format_distbench(result: dict) -> str:
    lines = [f"optimizer step per rank, preset {result['preset']}, sharing {result['sharing']} "
             "(ms, median | rotation FLOP share | rotations computed | KiB sent)"]
    for r in result["runs"]:
        cells = [f"rank{i} {ms:.1f} ms | {share:.0%} | {q} | {b / 1024:.0f}" for i, (ms, share, q, b) in
                 enumerate(zip(r["step_ms_by_rank"], r["rotation_flop_share_by_rank"], r["qr_per_step_by_rank"],
                               r.get("bytes_sent_by_rank", [0] * r["world"])))]
        sent = sum(r.get("bytes_sent_by_rank", []))
        floor = f", {sent / r['bytes_floor']:.2f}x the floor" if r.get("bytes_floor") else ""
        lines.append(f"  {r['mode']:<8} world {r['world']}: " + "   ".join(cells) + floor)
    return "\n".join(lines)
