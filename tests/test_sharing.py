"""Sharing plans (aro.sharing) and shared rotations in aro.ARO."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import aro
from aro_oracle import ReferenceARO
from aro.bench.models import build_model

transformers = pytest.importorskip("transformers")


def hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    yield "gpt2", GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    for tied in (True, False):
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied, max_position_embeddings=32)
        yield f"llama-{'tied' if tied else 'untied'}", LlamaForCausalLM(cfg)


def all_models():
    for name in ("small", "moe-small", "small-tied"):
        yield name, build_model(name, 0)
    yield from hf_models()


def plan(model, mode, sharing, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recognised architectures leave nothing unshared
        return aro.param_groups(model, mode=mode, sharing=sharing, **kw)


@pytest.mark.parametrize("mode", ["hybrid", "full"])
@pytest.mark.parametrize("sharing", ["none", "global", "chain"])
def test_plan_covers_every_matrix_exactly_once(mode, sharing):
    for name, model in all_models():
        groups = plan(model, mode, sharing)
        params = [p for g in groups for _, p in g["params"]]
        assert len(params) == len({id(p) for p in params}) == len(list(model.parameters())), name
        aro_group = groups[0]
        indices = [i for spec in aro_group.get("shared") or [] for i, _ in spec]
        assert len(indices) == len(set(indices))
        if sharing != "none":
            n_matrices = sum(1 for _, p in aro_group["params"] if p.ndim >= 2)
            assert len(indices) == n_matrices, name  # recognised models: every ARO matrix is placed
        L = {"small": 4, "moe-small": 4, "small-tied": 4}.get(name, 2)
        expected = {"global": 1, "chain": L + 1, "none": 0}[sharing]
        assert len(aro_group.get("shared") or []) == expected, name


def test_chain_streams_of_the_bench_model():
    model = build_model("small", 0)
    group = plan(model, "full", "chain")[0]
    names = [n for n, _ in group["params"]]
    streams = [{names[i] for i, _ in spec} for spec in group["shared"]]
    assert streams[0] == {"tok_emb.weight", "pos_emb.weight"} | {f"blocks.0.{m}.weight" for m in
                                                                ("attn.q", "attn.k", "attn.v", "mlp.up")}
    assert streams[2] == {"blocks.1.attn.o.weight", "blocks.1.mlp.down.weight"} | {
        f"blocks.2.{m}.weight" for m in ("attn.q", "attn.k", "attn.v", "mlp.up")}
    assert streams[4] == {"blocks.3.attn.o.weight", "blocks.3.mlp.down.weight", "lm_head.weight"}
    sides = {names[i]: side for spec in group["shared"] for i, side in spec}
    assert sides["blocks.0.attn.q.weight"] == "cols" and sides["blocks.0.attn.o.weight"] == "rows"
    assert sides["tok_emb.weight"] == "cols" and sides["lm_head.weight"] == "cols"


def test_hf_gpt2_conv1d_sides():
    name, model = next(hf_models())
    group = plan(model, "full", "global")[0]
    names = [n for n, _ in group["params"]]
    sides = {names[i]: side for spec in group["shared"] for i, side in spec}
    assert sides["transformer.h.0.attn.c_attn.weight"] == "rows"  # Conv1D [in=d, out=3d] consumer
    assert sides["transformer.h.0.attn.c_proj.weight"] == "cols"  # Conv1D [in, out=d] producer
    assert sides["transformer.wte.weight"] == "cols"


@pytest.mark.parametrize("mode", ["hybrid", "full"])
@pytest.mark.parametrize("sharing", ["none", "global", "chain"])
def test_hf_models_train_20_steps_in_every_mode(mode, sharing):
    for name, model in hf_models():
        opt = aro.ARO(plan(model, mode, sharing), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 64, (4, 16), generator=g)  # one batch, memorised
        losses = []
        for _ in range(20):
            out = model(input_ids=ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        assert all(math.isfinite(v) for v in losses), (name, losses)
        assert losses[-1] < losses[0], name
        qr = opt.stats()["qr_per_step"]
        if sharing == "global":
            assert qr == 1
        elif sharing == "chain":
            assert qr == 3  # L + 1 with L = 2


def test_qr_count_none_global_chain():
    counts = {}
    for sharing in ("none", "global", "chain"):
        model = build_model("small", 0)
        opt = aro.ARO(plan(model, "hybrid", sharing))
        x = torch.randint(0, 256, (2, 17))
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        counts[sharing] = opt.stats()["qr_per_step"]
    assert counts == {"none": 24, "global": 1, "chain": 5}


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 8), "mixer": nn.Linear(8, 8)}) for _ in range(2))
        self.extra = nn.Linear(8, 8)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = h + b["mixer"](b["q"](h))
        return self.extra(h)


def test_fallback_warning_names_the_unshared_parameters():
    # `extra`, the last module with parameters, is the output layer: a head, on AdamW in hybrid mode
    with pytest.warns(UserWarning, match=r"2 matrices.*blocks\.0\.mixer\.weight, blocks\.1\.mixer\.weight$"):
        groups = aro.param_groups(Unknown(), mode="hybrid", sharing="chain")
    names = [n for n, _ in groups[0]["params"]]
    shared = {names[i] for spec in groups[0]["shared"] for i, _ in spec}
    assert shared == {"blocks.0.q.weight", "blocks.1.q.weight"}

    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"1 matrices.*: 0\.weight$"):
        groups = aro.param_groups(mlp, sharing="global")
    assert groups[0].get("shared") == []


# ------------------------------------------------------------ an exactly invariant model
class InvariantLM(nn.Module):
    """Pre-norm transformer with gain-free RMSNorm: exactly invariant under R on the residual stream."""

    def __init__(self, d=12, kv=6, layers=2, vocab=20, T=8):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(d, kv, bias=False), "k": nn.Linear(d, kv, bias=False),
                           "v": nn.Linear(d, kv, bias=False), "o": nn.Linear(kv, d, bias=False),
                           "up": nn.Linear(d, 2 * d, bias=False), "down": nn.Linear(2 * d, d, bias=False)})
            for _ in range(layers)
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        norm = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[-1]))
        for b in self.blocks:
            h = norm(x)
            att = torch.nn.functional.scaled_dot_product_attention(b["q"](h)[None], b["k"](h)[None], b["v"](h)[None],
                                                                   is_causal=True)[0]
            x = x + b["o"](att)
            x = x + b["down"](torch.nn.functional.gelu(b["up"](norm(x))))
        return self.lm_head(norm(x))


def test_invariant_model_is_invariant():
    torch.manual_seed(0)
    model = InvariantLM().double()
    idx = torch.randint(0, 20, (8,))
    before = model(idx)
    R = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o.weight", "down.weight")):
                p.copy_(R @ p)
            elif "emb" in name:
                p.copy_(p @ R.T)
            else:
                p.copy_(p @ R.T)
    torch.testing.assert_close(model(idx), before)


@pytest.mark.parametrize("sharing", ["global", "chain"])
@pytest.mark.parametrize("estimator", ["sum", "stack"])
@pytest.mark.parametrize("base", ["sinkhorn", "sign", "adam"])
def test_shared_step_equals_float64_reference(sharing, estimator, base):
    if estimator == "stack" and base == "adam":
        pytest.skip("the stack estimator needs a stateless f")
    torch.manual_seed(0)
    model = InvariantLM().double()
    groups = aro.param_groups(model, mode="full", sharing=sharing, estimator=estimator, base=base)
    opt = aro.ARO(groups, lr=0.02, weight_decay=0.1)
    group = opt.param_groups[0]
    ref = ReferenceARO(lr=0.02, weight_decay=0.1, base=base, shared=group["shared"], estimator=estimator)
    ref_params = [p.detach().numpy().copy() for p in group["params"]]
    for step in range(3):
        idx = torch.randint(0, 20, (8,))
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits[:-1], idx[1:])
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.numpy().copy() for p in group["params"]]
        opt.step()
        ref.step(ref_params, grads)
        for p, w in zip(group["params"], ref_params):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-10, atol=1e-12)
        with torch.no_grad():  # keep both on the same trajectory regardless of tiny drift
            for p, w in zip(group["params"], ref_params):
                p.copy_(torch.from_numpy(w))
    owner = group["params"][group["shared"][0][0][0]]
    np.testing.assert_allclose(opt.state[owner]["rotation"].numpy(), ref.rotations[("shared", 0)], atol=1e-10)


def test_tall_members_update_stays_in_span_of_momentum():
    # q/k/v map d=12 -> kv=6: oriented d x kv they are tall; a shared d x d rotation must not
    # leak their update into the 6 directions their momentum does not span
    torch.manual_seed(0)
    model = InvariantLM().double()
    opt = aro.ARO(aro.param_groups(model, mode="full", sharing="chain"), lr=0.02, weight_decay=0.0)
    k = model.blocks[0]["k"].weight
    for _ in range(2):
        idx = torch.randint(0, 20, (8,))
        before = k.detach().clone()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(idx)[:-1], idx[1:]).backward()
        opt.step()
    U = (k.detach() - before).T  # oriented d x kv
    M = (0.95 * opt.state[k]["momentum_buffer"] + 0.05 * k.grad).T  # the Nesterov momentum the step used
    Q = torch.linalg.qr(M)[0]
    leak = (U - Q @ (Q.T @ U)).norm() / U.norm()
    assert leak < 1e-10
    assert opt.state[k]["orientation"] == "cols"


def test_sharing_plan_validation():
    model = build_model("tiny", 0)
    groups = aro.param_groups(model, sharing="chain")
    bad = dict(groups[0])
    bad["shared"] = [[[0, "rows"]], [[0, "cols"]]]
    with pytest.raises(ValueError, match="parameter 0 is in shared"):
        aro.ARO([bad] + groups[1:])
    bad["shared"] = [[[0, "diagonal"]]]
    with pytest.raises(ValueError, match="side"):
        aro.ARO([bad] + groups[1:])
    names = [n for n, _ in groups[0]["params"]]
    up = names.index("blocks.0.mlp.up.weight")  # (256, 64)
    bad["shared"] = [[[0, "cols"], [up, "cols"]]]  # q (64x64) with up's 64 columns: same d
    aro.ARO([bad] + groups[1:])
    bad["shared"] = [[[0, "cols"], [up, "rows"]]]  # d = 64 vs 256
    with pytest.raises(ValueError, match="different sizes"):
        aro.ARO([bad] + groups[1:])


def test_shared_resume_is_bit_identical():
    import copy
    import io

    model = build_model("moe-small", 0)
    twin = copy.deepcopy(model)
    x = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(s)) for s in range(4)]

    def steps(m, opt, batches):
        for b in batches:
            opt.zero_grad()
            m.loss(b[:, :-1], b[:, 1:]).backward()
            opt.step()

    opt = aro.ARO(plan(model, "full", "chain"), lr=0.01, base="adam")
    steps(model, opt, x)
    opt_a = aro.ARO(plan(twin, "full", "chain"), lr=0.01, base="adam")
    steps(twin, opt_a, x[:2])
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b = aro.ARO(plan(twin, "full", "chain"), lr=0.01, base="adam")
    opt_b.load_state_dict(torch.load(buf, weights_only=False))
    steps(twin, opt_b, x[2:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


class _TorchBlocksLM(nn.Module):
    """A pre-norm LM built from torch modules: nn.MultiheadAttention and an nn.Sequential MLP."""

    def __init__(self, d=8, L=2, vocab=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.RMSNorm(d), "attn": nn.MultiheadAttention(d, 2, bias=False, batch_first=True),
            "norm2": nn.RMSNorm(d), "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))})
            for _ in range(L))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def test_multihead_attention_and_sequential_mlps_join_the_plan():
    import warnings

    model = _TorchBlocksLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unshared
        groups = aro.param_groups(model, mode="full", sharing="chain")
    names = [n for n, _ in groups[0]["params"]]
    spec_of = {names[i]: k for k, spec in enumerate(groups[0]["shared"]) for i, _ in spec}
    side_of = {names[i]: side for spec in groups[0]["shared"] for i, side in spec}
    # block b reads stream b and writes stream b + 1; the embedding writes stream 0, the head reads stream L
    assert spec_of["blocks.0.attn.in_proj_weight"] == spec_of["blocks.0.mlp.0.weight"] == spec_of["emb.weight"]
    assert spec_of["blocks.0.attn.out_proj.weight"] == spec_of["blocks.0.mlp.2.weight"] == spec_of[
        "blocks.1.attn.in_proj_weight"]
    assert spec_of["blocks.1.mlp.2.weight"] == spec_of["lm_head.weight"]
    assert side_of["blocks.0.attn.in_proj_weight"] == "cols" and side_of["blocks.0.attn.out_proj.weight"] == "rows"
    assert side_of["blocks.0.mlp.0.weight"] == "cols" and side_of["blocks.0.mlp.2.weight"] == "rows"
    assert len(groups[0]["shared"]) == 3
    opt = aro.ARO(groups, lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.stats()["qr_per_step"] == 3
