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
