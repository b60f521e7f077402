"""DDP and FSDP2 ARO against the single-process optimizer (gloo, 2 and 3 CPU processes)."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import aro

from . import workers as W

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world, *args):
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rotations_of(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: st["rotation"] for p, st in opt.state.items() if "rotation" in st}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sharing,base", [("none", "sinkhorn"), ("chain", "adam")])
def test_ddp_equals_single_process(tmp_path, world, sharing, base):
    spawn(W.ddp_worker, world, str(tmp_path), 5, sharing, base, None)
    model, opt = W.train_single(5, sharing, base=base)
    expected_rot = rotations_of(opt, model)
    for rank in range(world):
        got = torch.load(tmp_path / f"ddp_rank{rank}.pt", weights_only=False)
        for name, p in model.state_dict().items():
            assert rel(got["model"][name], p) < 1e-6, (rank, name)
        # every rank's optimizer state holds the true rotation of every matrix
        saved = got["opt"]["state"]
        ours = opt.state_dict()["state"]
        assert saved.keys() == ours.keys()
        for k in ours:
            if "rotation" in ours[k]:
                assert rel(saved[k]["rotation"], ours[k]["rotation"]) < 1e-5, (rank, k)
        loads = got["stats"]["rotation_cost_by_rank"]
        assert len(loads) == world and sum(loads) > 0
        if sharing == "none":  # many units: every rank gets work (chain has only L + 1 = 2 rotations)
            assert all(x > 0 for x in loads)
    assert expected_rot  # the model has rotations to compare


def test_ddp_checkpoint_across_world_sizes(tmp_path):
    # 2 ranks -> 1 process
    spawn(W.ddp_worker, 2, str(tmp_path), 3, "none", "sinkhorn", None)
    ckpt = torch.load(tmp_path / "ddp_rank0.pt", weights_only=False)
    model = W.build()
    model.load_state_dict(ckpt["model"])
    opt = W.make_optimizer(model, "none")
    opt.load_state_dict(ckpt["opt"])
    W.train_single(2, "none", start=3, model=model, opt=opt)
    ref, _ = W.train_single(5, "none")
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel(p.detach(), q.detach()) < 1e-6, n
    # 1 process -> 3 ranks
    single, opt1 = W.train_single(3, "none")
    path = tmp_path / "single.pt"
    torch.save({"model": single.state_dict(), "opt": opt1.state_dict(), "step": 3}, path)
    spawn(W.ddp_worker, 3, str(tmp_path), 2, "none", "sinkhorn", str(path))
    got = torch.load(tmp_path / "ddp_rank2.pt", weights_only=False)
    for n, p in ref.state_dict().items():
        assert rel(got["model"][n], p) < 1e-6, n


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sharing,base", [("none", "sinkhorn"), ("chain", "adam")])
def test_fsdp2_equals_single_process(tmp_path, world, sharing, base):
    spawn(W.fsdp_worker, world, str(tmp_path), 5, sharing, base, None)
    model, opt = W.train_single(5, sharing, base=base)
    expected_rot = rotations_of(opt, model)
    for rank in range(world):
        got = torch.load(tmp_path / f"fsdp_rank{rank}.pt", weights_only=False)
        for name, p in model.named_parameters():
            assert rel(got["params"][name], p.detach()) < 1e-6, (rank, name)
        assert got["rotations"].keys() == expected_rot.keys()
        for name, R in expected_rot.items():
            assert rel(got["rotations"][name], R) < 1e-5, (rank, name)


def test_fsdp2_checkpoint_2_ranks_resumes_on_1_and_1_on_2(tmp_path):
    spawn(W.fsdp_worker, 2, str(tmp_path), 3, "chain", "sinkhorn", None)
    model, opt, start = W.load_dcp_single(str(tmp_path / "dcp"), "chain", "sinkhorn")
    assert start == 3
    W.train_single(2, "chain", start=3, model=model, opt=opt)
    ref, ref_opt = W.train_single(5, "chain")
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel(p.detach(), q.detach()) < 1e-6, n
    # and the other way: the 1-process FSDP (mesh of 1) checkpoint resumed on 2 ranks
    one = tmp_path / "one"
    one.mkdir()
    spawn(W.fsdp_worker, 1, str(one), 3, "chain", "sinkhorn", None)
    two = tmp_path / "two"
    two.mkdir()
    spawn(W.fsdp_worker, 2, str(two), 2, "chain", "sinkhorn", str(one / "dcp"))
    got = torch.load(two / "fsdp_rank1.pt", weights_only=False)
    for n, p in ref.named_parameters():
        assert rel(got["params"][n], p.detach()) < 1e-6, n


def test_process_group_type_is_checked():
    with pytest.raises(TypeError, match="process_group"):
        aro.ARO([torch.nn.Parameter(torch.randn(3, 3))], process_group="world")


def test_R08_fsdp2_nonfinite_shard_on_one_rank_is_skipped_on_every_rank(tmp_path):
    spawn(W.fsdp_nonfinite_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"nonfinite_rank{r}.pt", weights_only=False) for r in range(2)]
    for got in results:
        assert got["unchanged"] == [got["target"]]  # the poisoned matrix, and only it, kept its values
        assert got["stats"]["nonfinite_skips"] == 1
        assert any(got["target"] in w for w in got["warned"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_bench_under_torchrun_matches_one_process_and_resumes_across_world_sizes(tmp_path, mode):
    import json

    from aro.bench.cli import main

    extra = ["--optimizers", "aro-sinkhorn,adamw", "--batch-size", "4"]
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    assert main(["bench", "--preset", "smoke", "--out", str(single), "--no-progress", *extra]) == 0
    spawn(W.bench_worker, 2, str(parallel), mode, extra)

    def curves(out):
        return {d.name: [json.loads(x)["val_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
                for d in sorted((out / "runs").iterdir())}

    ref, got = curves(single), curves(parallel)
    assert ref.keys() == got.keys()
    # the same protocol: only the rounding of the gradient reduction may differ
    # (FSDP2 without a reshard after evaluation was off by 6e-4 here: a skipped root reduction)
    for name in ref:
        assert got[name] == pytest.approx(ref[name], rel=1e-4), name
    env = json.loads((parallel / "config.json").read_text())["environment"]
    assert env["parallel"] == mode and env["world_size"] == 2
    # killed with 2 ranks after the first checkpoint, resumed in one process: the same curves
    crashed = tmp_path / "crashed"
    with pytest.raises(Exception):
        spawn(W.bench_worker, 2, str(crashed), mode, extra, True)
    assert list(crashed.glob("runs/*/checkpoint.pt"))
    assert main(["bench", "--preset", "smoke", "--out", str(crashed), "--no-progress", *extra]) == 0
    for name, curve in curves(crashed).items():
        assert curve == pytest.approx(ref[name], rel=1e-4), name


def test_distbench_reports_the_work_split(tmp_path):
    import json

    from aro.bench.cli import main

    out = tmp_path / "db.json"
    assert main(["distbench", "--preset", "tiny", "--worlds", "1,2", "--warmup", "1", "--repeats", "2",
                 "--out", str(out)]) == 0
    runs = {(r["mode"], r["world"]): r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {("ddp", 1), ("ddp", 2), ("fsdp2", 1), ("fsdp2", 2)}
    for (mode, world), r in runs.items():
        assert len(r["step_ms_by_rank"]) == world and all(t > 0 for t in r["step_ms_by_rank"])
        assert sum(r["rotation_flop_share_by_rank"]) == pytest.approx(1.0)
        assert sum(r["qr_per_step_by_rank"]) == 18  # the tiny model's 3 blocks x 6 matrices, each once
        if world == 2:
            assert all(0.3 < s < 0.7 for s in r["rotation_flop_share_by_rank"])  # balanced by cost


def test_trainer_ddp_resume_continues_identically(tmp_path):
    """The Hugging Face Trainer on 2 gloo processes (torchrun) with trainer_optimizer (hybrid, DDP
    work split): train 6 steps saving at step 3, resume from step 3 in a new launch: the final
    parameters are bitwise equal and so are the logged losses."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import subprocess
    import sys

    script = Path(__file__).with_name("trainer_script.py")
    for mode in ("full", "resume"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(script), str(tmp_path), mode]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=False)
    assert sorted(full["losses"]) == list(range(1, 7)) and full["losses"] == resumed["losses"]
    for name, p in full["params"].items():
        assert torch.equal(p, resumed["params"][name]), name


def test_distbench_tensor_parallel_modes_report_bytes_against_the_floor(tmp_path):
    import json

    from aro.bench.cli import main
    from aro.bench.distbench import DistbenchOptions

    out = tmp_path / "db.json"
    assert main(["distbench", "--preset", "tiny", "--worlds", "2", "--modes", "tp,fsdp2-tp", "--warmup", "1",
                 "--repeats", "1", "--out", str(out)]) == 0
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"tp", "fsdp2-tp"}
    for r in runs.values():
        assert sum(r["qr_per_step_by_rank"]) == 18  # every matrix stepped once, somewhere
        assert r["bytes_floor"] > 0 and sum(r["bytes_sent_by_rank"]) >= r["bytes_floor"]
        assert all(b > 0 for b in r["bytes_sent_by_rank"])
    assert main(["distbench", "--preset", "tiny", "--worlds", "3", "--modes", "fsdp2-tp", "--out", str(out)]) == 2
    with pytest.raises(ValueError, match="even --worlds"):
        DistbenchOptions(worlds=(3,), modes=("fsdp2-tp",))
