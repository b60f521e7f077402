"""ARO on DTensor parameters of any placement equals ARO in one process (gloo, 2 and 4 ranks)."""

import pytest
import torch
import torch.distributed as dist

from . import placement_workers as PW
from .test_distributed import rel, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize("layout,world", [("tp", 2), ("fsdp-tp", 4)])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
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
