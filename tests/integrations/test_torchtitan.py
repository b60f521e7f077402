"""ARO through torchtitan's optimizer-container interface, on torchtitan's llama3 debug model.

torchtitan's stock trainer does not start on a CPU-only machine (it picks the CUDA device and
NCCL when no accelerator is found), so these tests drive what the trainer drives: the model
built from its registry, ``config.optimizer.build(model_parts=...)``, ``step``/``zero_grad``,
and the flat FQN-keyed ``state_dict`` its checkpointer saves with DCP.
"""

import pytest
import torch

pytest.importorskip("torchtitan")

import aro  # noqa: E402
from aro.integrations.torchtitan import AROOptimizersContainer, aro_optimizer_config  # noqa: E402


def llama3_debug(layers: int = 2, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """torchtitan's llama3 ``debugmodel`` (2 of its layers), attention by SDPA: FlexAttention
    has no backward on CPU."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    cfg = model_registry("debugmodel", attn_backend="flex").model
    cfg.layers = cfg.layers[:layers]
    for _, _, parent, attr in list(cfg.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model.to(dtype)


def train(model, opt, steps: int, start: int = 0, weight: float = 1.0) -> list[float]:
    """Steps ``start .. start + steps`` on fixed random tokens; the losses (the gradient is that
    of ``weight`` x the loss, for the data-parallel workers)."""
    losses = []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 2048, (2, 33), generator=g)
        x = tokens[:, :-1]
        positions = torch.arange(x.shape[1]).expand_as(x).contiguous()
        logits = model(x, positions=positions, attention_masks=None)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        (loss * weight).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_container_builds_aro_with_the_hybrid_split_and_steps_as_aro_does():
    from torchtitan.components.optimizer import OptimizersContainer

    model = llama3_debug()
    opt = aro_optimizer_config(lr=2e-3, weight_decay=0.1).build(model_parts=[model])
    assert isinstance(opt, AROOptimizersContainer) and isinstance(opt, OptimizersContainer)
    assert len(opt) == 1 and isinstance(opt.optimizers[0], aro.ARO)
    spec_of = {n: opt.optimizers[0].spec(g) for g in opt.optimizers[0].param_groups for n in g["param_names"]}
    params = dict(model.named_parameters())
    # the hybrid split: embeddings and output head on AdamW, hidden matrices on ARO
    assert not spec_of["tok_embeddings.weight"].uses_aro(params["tok_embeddings.weight"])
    assert not spec_of["lm_head.weight"].uses_aro(params["lm_head.weight"])
    assert spec_of["layers.0.attention.wo.weight"].uses_aro(params["layers.0.attention.wo.weight"])
    assert set(spec_of) == set(params)

    reference = llama3_debug()
    ref_opt = aro.ARO(aro.param_groups(reference), lr=2e-3, weight_decay=0.1)
    assert train(model, opt, 3) == train(reference, ref_opt, 3)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n


def test_flat_state_dict_round_trip_resumes_identically():
    model = llama3_debug()
    opt = aro_optimizer_config(lr=2e-3).build(model_parts=[model])
    train(model, opt, 2)
    flat = opt.state_dict()
    assert "state.layers.0.attention.wo.weight.rotation" in flat  # FQN-keyed, as DCP saves it
    resumed = llama3_debug()
    resumed.load_state_dict(model.state_dict())
    opt2 = aro_optimizer_config(lr=2e-3).build(model_parts=[resumed])
    opt2.load_state_dict(flat)
    assert train(model, opt, 2, start=2) == train(resumed, opt2, 2, start=2)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_bad_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="mode='ful'"):
        aro_optimizer_config(mode="ful").build(model_parts=[llama3_debug(1)])


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """FSDP2 over 2 gloo ranks: the container steps DTensor parameters; its flat state dict is
    saved and loaded with DCP, as torchtitan's checkpointer does."""
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        def build():
            model = llama3_debug(dtype=torch.float64)
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.layers.values() if hasattr(model.layers, "values") else model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model

        model = build()
        opt = aro_optimizer_config(lr=2e-3).build(model_parts=[model])
        weight = 2.0 if rank == 0 else 0.0  # FSDP averages: rank 0 carries 2x the loss, rank 1 exact zeros
        train(model, opt, 2, 0, weight)
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=f"{out}/dcp")
        resumed = build()
        opt2 = aro_optimizer_config(lr=2e-3).build(model_parts=[resumed])
        state = {"model": resumed.state_dict(), "optimizer": opt2.state_dict()}
        dcp.load(state, checkpoint_id=f"{out}/dcp")
        resumed.load_state_dict(state["model"])
        opt2.load_state_dict(state["optimizer"])
        train(resumed, opt2, 1, 2, weight)
        full = {n: p.full_tensor() for n, p in resumed.named_parameters()}
        if rank == 0:
            torch.save(full, f"{out}/fsdp.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_two_ranks_with_a_dcp_checkpoint_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from tests.distributed.test_distributed import free_port, rel

    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    # float64 and one thread, as in the workers: one step's gradient of 64 tokens is rank-deficient,
    # and ARO's rotation of the null directions follows the rounding of the products (another
    # thread count gave 1e-5 differences in float64 after one step)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = llama3_debug(dtype=torch.float64)
        opt = aro_optimizer_config(lr=2e-3).build(model_parts=[model])
        train(model, opt, 3)
    finally:
        torch.set_num_threads(threads)
    for n, p in model.named_parameters():
        assert rel(got[n], p.detach()) < 1e-10, n
