import ast
import io
import math
from pathlib import Path

import pytest
import torch

import aro
import aro.bench
from aro.bench.models import build_model
from aro.bench.optimizers import OPTIMIZERS, build_optimizers, check_mode

COMPETITORS = ("soap", "normuon", "adamuon", "dion", "dion-full", "dion-rms")


def _batch(g: torch.Generator, T: int = 32):
    x = torch.randint(0, 256, (4, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _train(model, opts, g, steps):
    losses = []
    for _ in range(steps):
        loss = model.loss(*_batch(g))
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", ["tiny", "moe-small"])
def test_every_optimizer_trains_a_few_steps(name, model_name):
    model = build_model(model_name, 0)
    if model_name == "moe-small" and not OPTIMIZERS[name].expert_tensors:
        with pytest.raises(ValueError, match="expert tensors"):
            build_optimizers(name, model, 4e-3, 0.1)
        return
    opts = build_optimizers(name, model, 4e-3, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = _train(model, opts, torch.Generator().manual_seed(0), 4)
    assert all(math.isfinite(v) for v in losses)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed), [n for (n, _), c in zip(model.named_parameters(), changed) if not c]


@pytest.mark.parametrize("name", COMPETITORS + ("adamw", "muon", "aro-sinkhorn"))
def test_state_dict_round_trip_resumes_identically(name):
    g = torch.Generator().manual_seed(1)
    model = build_model("tiny", 0)
    opts = build_optimizers(name, model, 4e-3, 0.1)
    _train(model, opts, g, 12)  # past SOAP's first eigenbasis refresh (every 10 steps)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opts": [o.state_dict() for o in opts], "rng": g.get_state()}, buf)
    reference = _train(model, opts, g, 12)
    expected = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    fresh = build_model("tiny", 5)  # other initial weights: everything must come from the checkpoint
    fresh.load_state_dict(saved["model"])
    fresh_opts = build_optimizers(name, fresh, 1e-3, 0.0)  # other hyperparameters too
    for o, sd in zip(fresh_opts, saved["opts"]):
        o.load_state_dict(sd)
    g2 = torch.Generator()
    g2.set_state(saved["rng"])
    assert _train(fresh, fresh_opts, g2, 12) == reference
    for a, b in zip(expected, fresh.parameters()):
        assert torch.equal(a, b)


def test_every_entry_declares_its_capabilities():
    model = build_model("tiny", 0)
    for name, spec in OPTIMIZERS.items():
        assert spec.name == name
        assert spec.scope in ("none", "hidden", "matrices", "all"), name
        assert isinstance(spec.fsdp2, bool) and isinstance(spec.expert_tensors, bool), name
        assert isinstance(spec.steps_per_call, int) and spec.steps_per_call >= 1, name
        assert spec.products_dtype in (torch.float32, torch.bfloat16), name
        assert spec.hyperparameters and all(":" in v for v in spec.hyperparameters.values()), name
        flops = spec.matrix_flops(64, 256)
        assert flops >= 0 and math.isfinite(flops), name
        assert (flops == 0) == (spec.scope == "none" or spec.aro_options.get("rotation") == "identity"
                                and spec.aro_options.get("base") != "newton_schulz"), name
        assert spec.step_flops(model) >= 0
        if spec.build_matrix is not None:
            p = torch.nn.Parameter(torch.randn(16, 24) / 24**0.5)
            opt = spec.build_matrix(p, 1e-3, 0.1)
            before = p.detach().clone()
            for _ in range(2):  # SOAP's first step only gathers its preconditioner statistics
                p.grad = torch.randn_like(p)
                opt.step()
            assert not torch.equal(before, p.detach()), name
        else:
            assert spec.aro_options.get("sharing", "none") != "none", name


def test_flop_models_count_what_they_say():
    from aro.bench.optimizers import aro_flops, dion_flops, muon_flops, soap_flops

    m, n = 64, 256
    approx = lambda v: pytest.approx(v, rel=1e-12)
    assert aro_flops(m, n) == approx(4 * 2 * 64 * 64 * 256 + 8 / 3 * 64**3)
    assert aro_flops(m, n, every=4) == approx(2 * 2 * 64 * 64 * 256 + (2 * 2 * 64 * 64 * 256 + 8 / 3 * 64**3) / 4)
    assert muon_flops(m, n) == approx(5 * (4 * 64 * 64 * 256 + 2 * 64**3))
    assert dion_flops(m, n, 0.25) == approx(8 * 64 * 256 * 16 + 4 * 64 * 16**2 - 4 / 3 * 16**3)
    assert dion_flops(m, n, 1.0) > dion_flops(m, n, 0.25)
    assert soap_flops(m, n) == approx(8 * m * n * (m + n) + (2 + 8 / 3) * (m**3 + n**3) / 10)
    # SOAP steps every parameter (embeddings and head too), the hybrid entries only hidden matrices
    model = build_model("tiny", 0)
    assert OPTIMIZERS["soap"].step_flops(model) > sum(
        soap_flops(*p.shape) for p, role in aro.classify_parameters(model).values() if role == "matrix")


def test_modes_are_checked_before_training():
    for name, spec in OPTIMIZERS.items():
        check_mode(name, "none")
        check_mode(name, "ddp")
        if spec.fsdp2:
            check_mode(name, "fsdp2")
        else:
            with pytest.raises(ValueError, match=f"--optimizers {name}: it cannot step FSDP2"):
                check_mode(name, "fsdp2")
    assert not OPTIMIZERS["muon"].fsdp2 and OPTIMIZERS["aro-sinkhorn"].fsdp2


def test_no_bench_module_branches_on_an_optimizer_name():
    """Behaviour comes from the registry's fields: outside the registry, no comparison or
    membership test in aro.bench has a registry name as an operand."""
    names = set(OPTIMIZERS)
    offenders = []
    for path in Path(aro.bench.__file__).parent.glob("*.py"):
        if path.name == "optimizers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Constant) and o.value in names for o in operands):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizers("lion", build_model("tiny", 0), 1e-3, 0.0)


def test_muon_baseline_uses_torch_muon_on_hidden_matrices():
    model = build_model("tiny", 0)
    opts = build_optimizers("muon", model, 1e-3, 0.1)
    muon = next(o for o in opts if isinstance(o, torch.optim.Muon))
    names = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.blocks[0].attn.q.weight) in names
    assert id(model.tok_emb.weight) not in names and id(model.lm_head.weight) not in names
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


@pytest.mark.parametrize("name", ["normuon", "adamuon", "dion"])
def test_hybrid_competitors_step_only_hidden_matrices(name):
    model = build_model("tiny", 0)
    opts = build_optimizers(name, model, 1e-3, 0.1)
    adamw = [o for o in opts if isinstance(o, torch.optim.AdamW)]
    assert len(adamw) == 1 and len(opts) == 2
    on_adamw = {id(p) for g in adamw[0].param_groups for p in g["params"]}
    roles = aro.classify_parameters(model)
    for p, role in roles.values():
        assert (id(p) in on_adamw) == (role != "matrix")


@pytest.mark.parametrize("name,scale", [("normuon", 0.2), ("adamuon", 0.2)])
def test_muon_variants_rms_match_to_adamw(name, scale):
    """Their first matrix update has RMS 0.2 x lr, the scale every RMS-matched method shares."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 48))
    opt = OPTIMIZERS[name].build_matrix(p, 0.01, 0.0)
    p.grad = torch.randn(32, 48)
    before = p.detach().clone()
    opt.step()
    rms = (p.detach() - before).pow(2).mean().sqrt().item()
    assert rms == pytest.approx(scale * 0.01, rel=0.02)

