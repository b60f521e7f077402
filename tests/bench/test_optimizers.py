import math

import pytest
import torch

from aro.bench.models import build_model
from aro.bench.optimizers import OPTIMIZERS, build_optimizers


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", ["tiny", "moe-small"])
def test_every_optimizer_trains_a_few_steps(name, model_name):
    model = build_model(model_name, 0)
    opts = build_optimizers(name, model, 4e-3, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    T = 32
    losses = []
    for _ in range(4):
        x = torch.randint(0, 256, (4, T + 1), generator=g)
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed), [n for (n, _), c in zip(model.named_parameters(), changed) if not c]


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
