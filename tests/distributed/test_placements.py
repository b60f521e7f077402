"""ARO on DTensor parameters of any placement equals ARO in one process (gloo, 2 and 4 ranks)."""

import pytest
import torch
import torch.distributed as dist

from . import placement_workers as PW
from .test_distributed import rel, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize("layout,world,dtype,tol", [("tp", 2, "float64", 1e-10), ("tp", 2, "float32", 1e-5),
                                                     ("fsdp-tp", 4, "float64", 1e-10), ("fsdp-tp", 4, "float32", 1e-5),
                                                     ("hsdp", 4, "float64", 1e-10)])
def test_any_placement_equals_one_process(tmp_path, layout, world, dtype, tol):
    steps = 4
    spawn(PW.placement_worker, world, str(tmp_path), layout, steps, dtype, "sinkhorn")
    ref, ref_rot = PW.train_single(steps, getattr(torch, dtype), "sinkhorn")
    assert set(ref_rot) == {"up", "down", "qkv", "experts", "dense"}
    sent = []
    for rank in range(world):
        got = torch.load(tmp_path / f"placement_rank{rank}.pt", weights_only=False)
        for n, p in ref.items():
            assert rel(got["params"][n], p) < tol, (rank, n)
        assert got["rotations"].keys() == ref_rot.keys()
        for n, r in ref_rot.items():  # every rank's state holds the true rotation of every matrix
            assert rel(got["rotations"][n], r) < tol, (rank, n)
        loads = got["stats"]["rotation_cost_by_rank"]
        assert len(loads) == world and all(x > 0 for x in loads), loads  # every rank steps something
        sent.append(got["stats"]["bytes_sent_per_step"])
    assert sum(sent) > 0


def test_piece_layouts_match_distribute_tensor_on_every_rank(tmp_path):
    spawn(PW.pieces_worker, 4, str(tmp_path))
    for rank in range(4):
        got = torch.load(tmp_path / f"pieces_rank{rank}.pt", weights_only=False)
        assert got["checks"] == [True] * len(PW.PIECE_CASES), (rank, got["checks"])
        # a Partial parameter is refused by name and placement, with the way out
        assert "(index 1, shape (4, 4)" in got["partial_error"], got["partial_error"]
        assert "Partial" in got["partial_error"] and "redistribute" in got["partial_error"]


def test_dcp_checkpoint_of_a_2x2_mesh_resumes_on_4x1_on_2_ranks_and_in_one_process(tmp_path):
    """Saved by FSDP x TP on a 2 x 2 mesh after 3 steps; resumed for 2 more steps as rows over a
    1-D mesh of 4, as TP on 2 ranks, and in one process: each equals 5 steps in one process."""
    ckpt = str(tmp_path / "dcp")
    (tmp_path / "saved").mkdir()
    spawn(PW.placement_worker, 4, str(tmp_path / "saved"), "fsdp-tp", 3, "float64", "sinkhorn", 0, None, ckpt)
    ref, ref_rot = PW.train_single(5, torch.float64, "sinkhorn")
    for layout, world in [("rows", 4), ("tp", 2)]:
        out = tmp_path / layout
        out.mkdir()
        spawn(PW.placement_worker, world, str(out), layout, 2, "float64", "sinkhorn", 3, ckpt)
        for rank in range(world):
            got = torch.load(out / f"placement_rank{rank}.pt", weights_only=False)
            for n, p in ref.items():
                assert rel(got["params"][n], p) < 1e-10, (layout, rank, n)
            for n, r in ref_rot.items():
                assert rel(got["rotations"][n], r) < 1e-10, (layout, rank, n)
    full, rotations, _ = PW.train_laid_out(None, 2, torch.float64, "sinkhorn", start=3, resume=ckpt)
    for n, p in ref.items():
        assert rel(full[n], p) < 1e-10, n
    for n, r in ref_rot.items():
        assert rel(rotations[n], r) < 1e-10, n


@pytest.mark.parametrize("fsdp,world", [(False, 2), (True, 4)])
def test_tensor_parallel_model_trains_as_one_process(tmp_path, fsdp, world):
    """The repro of a user: parallelize_module(...) then aro.ARO(model.parameters()), some
    parameters DTensors and some not; with FSDP on top, on a 2 x 2 mesh."""
    import aro

    spawn(PW.tp_model_worker, world, str(tmp_path), fsdp)
    model = PW.dense_model()
    opt = aro.ARO(model.parameters(), lr=0.02, weight_decay=0.1)
    losses = PW.train_model(model, opt, 3)
    for rank in range(world):
        got = torch.load(tmp_path / f"tp_model_rank{rank}.pt", weights_only=False)
        if not fsdp or rank in (0, 1):  # the dp replica that carried the loss
            assert got["losses"] == pytest.approx(losses, rel=1e-12)
        for n, p in model.named_parameters():
            assert rel(got["params"][n], p.detach()) < 1e-9, (rank, n)


def test_expert_parallel_weights_are_stepped_where_they_lie(tmp_path):
    """Experts split along the expert dimension: each rank steps its own experts, nothing moves."""
    spawn(PW.placement_worker, 2, str(tmp_path), "ep", 3, "float64", "sinkhorn")
    ref, ref_rot = PW.train_single(3, torch.float64, "sinkhorn", "ep")
    for rank in range(2):
        got = torch.load(tmp_path / f"placement_rank{rank}.pt", weights_only=False)
        assert rel(got["params"]["experts"], ref["experts"]) < 1e-10
        assert rel(got["rotations"]["experts"], ref_rot["experts"]) < 1e-10
        assert got["stats"]["bytes_sent_per_step"] == 0 and got["stats"]["bytes_floor_per_step"] == 0
        assert got["stats"]["qr_per_step"] == 2  # its two experts
