"""aro stepbench / distbench / diagnose: structure, exact quantities, and the FLOP model."""

import json

import pytest
import torch

from aro.bench.cli import main
from aro.bench.stepbench import aro_flops, muon_flops, state_bytes


def test_flop_model():
    # ARO on 4x8 (rotates the 4 side): Z0 = R^T M, cross-Gram, Z1 = R^T M, R f -> 4 * 2*16*8, QR 8/3 * 64
    assert aro_flops(4, 8) == pytest.approx(4 * 2 * 16 * 8 + 8 / 3 * 64)
    assert aro_flops(8, 4) == aro_flops(4, 8)  # the smaller side is rotated
    assert aro_flops(4, 8, "identity") == 0.0
    assert aro_flops(4, 8, "eigen") == aro_flops(4, 8)  # M (R^T M)^T costs what the cross-Gram costs
    assert aro_flops(4, 8, every=4) == pytest.approx(2 * 2 * 16 * 8 + (2 * 2 * 16 * 8 + 8 / 3 * 64) / 4)
    assert muon_flops(4, 8) == pytest.approx(5 * (4 * 16 * 8 + 2 * 64))


def test_flop_model_counts_the_products_aro_runs():
    """The four products of the model are the matrix products one ARO step makes: the profiler's
    bmm/mm calls on a 6 x 10 matrix, matrix-vector products (Sinkhorn's) left out."""
    from torch.profiler import profile

    import aro

    p = torch.nn.Parameter(torch.randn(6, 10))
    opt = aro.ARO([p], lr=1e-3)
    p.grad = torch.randn(6, 10)
    opt.step()
    with profile(record_shapes=True) as prof:
        opt.step()
    flops = 0
    for e in prof.events():
        if e.name in ("aten::bmm", "aten::mm"):
            (*_, rows, inner), (*_, _, cols) = e.input_shapes[:2]
            if min(rows, inner, cols) > 1:
                flops += 2 * rows * inner * cols
    assert flops == aro_flops(6, 10) - 8 / 3 * 6**3


def test_stepbench_writes_json_and_plot(tmp_path):
    out = tmp_path / "sb.json"
    code = main(["stepbench", "--optimizers", "adamw,muon,muon-fp32,aro-sinkhorn", "--models", "tiny", "--dims", "16",
                 "--train-model", "tiny", "--warmup", "1", "--repeats", "3", "--out", str(out)])
    assert code == 0 and out.with_suffix(".png").exists()
    r = json.loads(out.read_text())
    preset = r["presets"][0]
    assert preset["ratio_vs_adamw"]["adamw"] == 1.0 and preset["ratio_vs_muon"]["muon"] == 1.0
    assert preset["ratio_vs_muon_fp32"]["muon-fp32"] == 1.0
    assert all(preset["rounds"][k] >= 3 for k in preset["step_ms"])  # none of these is a slow case
    # AdamW keeps exp_avg and exp_avg_sq: exactly 2 bytes of state per parameter byte (+ step scalars)
    assert preset["state_bytes_per_param_byte"]["adamw"] == pytest.approx(2.0, abs=0.01)
    assert preset["state_bytes_per_param_byte"]["aro-sinkhorn"] < 2.0
    mats = {(m["m"], m["n"]) for m in r["matrices"]}
    assert mats == {(16, 16), (16, 64)}
    for m in r["matrices"]:
        assert set(m["roofline_fraction"]) == {"muon", "muon-fp32", "aro-sinkhorn"} and m["matmul_gflops"] > 0
    assert set(r["train_step"]["step_ms"]) == {"adamw", "muon", "muon-fp32", "aro-sinkhorn"}  # every4 not asked for
    names = [t["target"] for t in r["targets"]]
    assert any("training step" in n for n in names) and r["targets"][2]["value"] == r["train_step"]["ratio_vs_adamw"][
        "aro-sinkhorn"]


def test_forward_backward_flops_of_the_tiny_model():
    from aro.bench.models import PRESETS, build_model
    from aro.bench.stepbench import forward_backward_flops

    cfg = PRESETS["tiny"]  # d 64, 3 layers, seq 64, MLP 4d, untied head 64 x 256
    d, L, T = cfg.d_model, cfg.n_layers, cfg.seq_len
    weights = L * (4 * d * d + 2 * 4 * d * d) + 256 * d
    expected = 6 * 2 * T * weights + 12 * L * 2 * T * T * d
    assert forward_backward_flops(build_model("tiny", seed=0), cfg, 2) == expected


def test_slow_cases_are_timed_once_and_predicted_ones_skipped():
    from aro.bench.stepbench import _Cases

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        import time

        time.sleep(0.05)

    cases = _Cases(warmup=2, repeats=5, budget_s=10.0, slow_s=0.02, max_step_s=1.0, bf16_gflops=1.0)
    r = cases.run({"fast": fast, "slow": slow, "muon": fast}, {"muon": 5e9})
    assert r["rounds"] == {"fast": 5, "slow": 1}
    assert calls["slow"] == 2 and calls["fast"] == 2 + 5  # slow: one warm-up call, one timed call
    assert "muon" in r["skipped"] and "predicted 5 s" in r["skipped"]["muon"]


def test_a_slow_first_call_alone_keeps_a_case_in_the_rounds():
    """One-time work in the first call (qr="auto" timing its options) does not make a case slow."""
    import time

    from aro.bench.timing import time_interleaved

    calls = {"n": 0}

    def tuned_once():
        calls["n"] += 1
        time.sleep(0.05 if calls["n"] == 1 else 0.0)

    r = time_interleaved({"tuned": tuned_once}, warmup=2, repeats=4, budget_s=10.0, slow_s=0.02)
    assert r["tuned"]["rounds"] == 4 and r["tuned"]["ms"] < 20


def test_periodic_optimizers_are_timed_over_a_whole_period():
    from aro.bench.optimizers import OPTIMIZERS
    from aro.bench.stepbench import _Cases

    assert OPTIMIZERS["aro-sinkhorn-every4"].steps_per_call == 4 and OPTIMIZERS["aro-sinkhorn"].steps_per_call == 1
    calls = []
    cases = _Cases(warmup=1, repeats=3, budget_s=10.0, slow_s=10.0, max_step_s=1.0, bf16_gflops=None)
    r = cases.run({"aro-sinkhorn-every4": lambda: calls.append(1)}, {})
    assert len(calls) == 4 * (1 + 3) and r["steps_per_call"] == {"aro-sinkhorn-every4": 4}


def test_stepbench_rejects_unknown_names(tmp_path, capsys):
    assert main(["stepbench", "--optimizers", "lion", "--out", str(tmp_path / "x.json")]) == 2
    assert "lion" in capsys.readouterr().err


def test_state_bytes_counts_tensors_only():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn(3, 4)
    opt.step()
    assert state_bytes([opt]) == 2 * 12 * 4 + 4  # exp_avg, exp_avg_sq, step (float32 scalar)


def test_diagnose_pieces_on_small_cases():
    from aro.bench.diagnose import alignment, update_spectra

    spectra = update_spectra(shapes=((8, 8),), iters=20)["8x8"]
    assert set(spectra) == {"ARO-Sinkhorn", "ARO-Sign", "Eigen-Sinkhorn", "Eigen-Sign"}
    assert all(max(s) == pytest.approx(1.0) and len(s) == 8 for s in spectra.values())
    al = alignment(sigmas=(0.0, 1.0), m=6, n=10, burn_in=5, steps=20)
    for p in ("identity", "eigen", "aro", "polar"):
        assert al[p]["std"][0] < 1e-3  # no noise: (nearly) the same update every step, once settled
        assert al[p]["mean"][0] > al[p]["mean"][1]  # noise lowers the alignment


def test_state_bytes_counts_tensors_in_lists():
    """SOAP keeps its Kronecker factors and eigenbases in lists: they count."""
    from aro.bench.optimizers import OPTIMIZERS

    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = OPTIMIZERS["soap"].build_matrix(p, 1e-3, 0.0)
    for _ in range(2):
        p.grad = torch.randn(4, 6)
        opt.step()
    moments = 2 * 24 * 4
    factors = 2 * (4 * 4 + 6 * 6) * 4  # GG and Q, one 4x4 and one 6x6 each
    assert state_bytes([opt]) == moments + factors
