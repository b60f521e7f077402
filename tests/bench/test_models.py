import pytest
import torch

import aro
from aro.bench.models import PRESETS, build_model


def test_presets_span_the_promised_sizes():
    sizes = {name: sum(p.numel() for p in build_model(name, 0).parameters()) for name in PRESETS}
    assert min(sizes.values()) < 250_000 and 0.15e6 < sizes["tiny"]
    assert 15e6 < max(sizes.values()) < 25e6


def test_same_seed_same_weights_and_tied_embeddings():
    a, b = build_model("tiny", 3), build_model("tiny", 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    tied = build_model("small-tied", 0)
    assert tied.lm_head.weight is tied.tok_emb.weight


def test_moe_model_has_3d_experts_and_trains():
    model = build_model("moe-small", 0)
    assert model.blocks[0].mlp.w_up.shape == (8, 128, 128)
    x = torch.randint(0, 256, (2, 32))
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    assert model.blocks[0].mlp.w_up.grad is not None and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["tiny", "moe-small", "small-tied"])
def test_hidden_matrices_are_classified_as_matrices(name):
    # regression: the tiny preset's d equals its seq_len; q/k/v must not look like an LM head
    roles = {n: r for n, (_, r) in aro.classify_parameters(build_model(name, 0)).items()}
    assert roles["blocks.0.attn.q.weight"] == "matrix"
    assert roles["tok_emb.weight"] == "embedding"
    if name != "small-tied":
        assert roles["lm_head.weight"] == "head"
    if name == "moe-small":
        assert roles["blocks.0.mlp.router.weight"] == "router" and roles["blocks.0.mlp.w_up"] == "matrix"


def test_causal():
    model = build_model("tiny", 0).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-6)


def test_balance_loss_is_one_when_balanced_and_grows_with_collapse():
    from aro.bench.models import balance_loss

    E = 4
    uniform = torch.full((6, E), 1 / E, dtype=torch.float64)
    assert balance_loss(uniform, torch.full((E,), 3)).item() == pytest.approx(1.0, abs=1e-15)
    # two tokens, two experts, top-1, both routed to expert 0: f = (1, 0), P = (0.75, 0.25)
    gates = torch.tensor([[0.9, 0.1], [0.6, 0.4]], dtype=torch.float64, requires_grad=True)
    loss = balance_loss(gates, torch.tensor([2, 0]))
    assert loss.item() == pytest.approx(2 * 0.75, abs=1e-15)
    loss.backward()  # f is a constant: d/d gates[n, i] = E * f_i / N
    assert torch.allclose(gates.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5, dtype=torch.float64)
    assert balance_loss(collapsed, torch.tensor([5, 0, 0, 0])).item() == pytest.approx(E)


def test_balanced_moe_adds_its_term_only_in_training_and_only_through_the_routers():
    balanced, plain = build_model("moe-small-balanced", 0), build_model("moe-small", 0)
    assert all(torch.equal(p, q) for p, q in zip(balanced.parameters(), plain.parameters()))
    x = torch.randint(0, 256, (2, 33))
    assert torch.equal(balanced.loss(x[:, :-1], x[:, 1:]), plain.loss(x[:, :-1], x[:, 1:]))
    assert plain.aux_loss() is None and build_model("tiny", 0).aux_loss() is None
    aux = balanced.aux_loss()
    coef = balanced.cfg.balance_coef
    # at init the router is near uniform: each layer's term is about coef (1 when balanced)
    assert coef * 4 <= aux.item() < coef * 4 * 1.5
    aux.backward()
    # the term reads the routers' probabilities: it reaches every router and whatever feeds a
    # router (earlier layers), never the last layer's experts nor the head
    last = balanced.blocks[-1].mlp
    assert all(b.mlp.router.weight.grad.abs().sum() > 0 for b in balanced.blocks)
    assert last.w_up.grad is None and last.w_down.grad is None and balanced.lm_head.weight.grad is None
    loads = balanced.expert_load()
    assert len(loads) == 4 and all(int(load.sum()) == 2 * 32 * 2 for load in loads)  # tokens x top-2
    balanced.eval()
    balanced.loss(x[:, :-1], x[:, 1:])
    assert balanced.aux_loss() is None
