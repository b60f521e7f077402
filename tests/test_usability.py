"""What a new user trips over: typos, grouping, weight decay on vectors, checkpoints, compile."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import aro
from aro.bench.models import build_model


def _batch(seed=0):
    x = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def test_import_is_warning_free():
    subprocess.run([sys.executable, "-W", "error", "-c", "import aro, aro.bench.cli"], check=True)


def test_import_leaves_heavy_torch_modules_alone():
    """``import aro`` loads neither DTensor (FSDP2 users load it) nor TorchDynamo (compile users)."""
    code = ("import sys, aro; bad = [m for m in ('torch.distributed.tensor', 'torch._dynamo') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_misspelled_group_key_names_the_closest():
    model = build_model("tiny", 0)
    with pytest.raises(ValueError, match="'weight_decy'; did you mean 'weight_decay'"):
        aro.ARO([{"params": list(model.parameters()), "weight_decy": 0.0}])
    with pytest.raises(ValueError, match="did you mean 'rotation'"):
        aro.param_groups(model, rotaton="eigen")
    with pytest.raises(ValueError, match="'modee'; did you mean 'mode'"):  # its own arguments too
        aro.param_groups(model, modee="full")
    with pytest.raises(ValueError, match="did you mean 'no_decay'"):
        aro.param_groups(model, nodecay=())
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        aro.param_groups(model, bogus=1)
    with pytest.raises(ValueError, match="no_decay"):
        aro.param_groups(model, no_decay=("norms",))


def test_param_groups_wants_the_module():
    model = build_model("tiny", 0)
    with pytest.raises(TypeError, match="not model.parameters"):
        aro.param_groups(model.parameters())


def test_scheduler_keys_are_accepted():
    model = build_model("tiny", 0)
    opt = aro.ARO(model.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "initial_lr": 1e-3, "max_lr": 1e-2, "min_lr": 0.0,
                         "base_momentum": 0.85, "max_momentum": 0.95})


def test_norm_gains_and_biases_get_no_weight_decay_by_default():
    model = build_model("tiny", 0)
    groups = aro.param_groups(model)
    spared = {n for g in groups if g.get("weight_decay") == 0.0 for n, _ in g["params"]}
    roles = aro.classify_parameters(model)
    assert spared == {n for n, (_, role) in roles.items() if role == "vector"}
    opt = aro.ARO(groups, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only decay moves a parameter
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) == (n in spared), n
    everything = aro.param_groups(model, no_decay=())
    assert not any("weight_decay" in g for g in everything)
    with_emb = aro.param_groups(model, no_decay=("vector", "embedding"))
    assert "tok_emb.weight" in {n for g in with_emb if g.get("weight_decay") == 0.0 for n, _ in g["params"]}


def _stepped_state(preset: str):
    """A model and the state dict of a hybrid ARO after one step on it."""
    model = build_model(preset, 0)
    opt = aro.ARO(aro.param_groups(model), lr=1e-3)
    model.loss(*_batch()).backward()
    opt.step()
    return model, opt.state_dict()


def test_loading_state_of_another_grouping_says_so():
    model, state = _stepped_state("small")
    chained = aro.ARO(aro.param_groups(model, sharing="chain"), lr=1e-3)
    with pytest.raises(ValueError, match="sharing plan differs.*rebuild the optimizer"):
        chained.load_state_dict(state)
    full = aro.ARO(aro.param_groups(model, mode="full"), lr=1e-3)
    with pytest.raises(ValueError, match="grouping.*differs"):
        full.load_state_dict(state)
    plain = aro.ARO(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="parameter groups.*grouping"):
        plain.load_state_dict(state)


def test_add_param_group_after_param_groups():
    model = build_model("tiny", 0)
    opt = aro.ARO(aro.param_groups(model), lr=1e-3)
    extra = nn.Parameter(torch.randn(8, 8))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["param_names"] == [f"added.{len(opt.param_groups) - 1}.0"]
    extra.grad = torch.randn(8, 8)
    before = extra.detach().clone()
    opt.step()
    assert not torch.equal(before, extra.detach())
    assert "rotation" in opt.state[extra]


def test_compiled_step_runs_eagerly_and_equals_eager():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    models = [build_model("tiny", 0) for _ in range(2)]
    opts = [aro.ARO(aro.param_groups(m), lr=1e-2) for m in models]
    compiled = torch.compile(opts[1].step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(3):
            for m, step in zip(models, (opts[0].step, compiled)):
                m.loss(*_batch(t)).backward()
                step()
                m.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    breaks = sum(counters["graph_break"].values())
    assert breaks <= 1  # the one documented skip of the disabled step, not a storm


def test_nonfinite_warning_names_every_skipped_parameter():
    model = build_model("tiny", 0)
    opt = aro.ARO(aro.param_groups(model), lr=1e-3)
    model.loss(*_batch()).backward()
    model.blocks[0].attn.q.weight.grad[0, 0] = float("nan")  # ARO group
    model.norm.weight.grad[0] = float("inf")  # the no-decay AdamW group
    with pytest.warns(RuntimeWarning, match=r"2 parameter\(s\).*blocks\.0\.attn\.q\.weight.*'norm\.weight'"):
        opt.step()


# ---------------------------------------------------------------- the command line
def test_cli_version_and_help(capsys):
    from aro.bench.cli import build_parser, main
    from aro.bench.config import FIELD_HELP, BenchConfig
    from aro.bench.optimizers import OPTIMIZERS

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"aro {aro.__version__}"
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "(field" not in help_text
    for name in OPTIMIZERS:
        assert name in help_text
    assert "{large,medium,moe-small,moe-small-balanced,small,small-tied,tiny}" in help_text and "(quick: 300)" in help_text
    import dataclasses

    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(BenchConfig)}
    step_help = build_parser()._subparsers._group_actions[0].choices["stepbench"].format_help()
    assert "--models" in step_help and "(default: small)" in step_help


def test_cli_missing_run_folder_is_one_line(capsys, tmp_path):
    from aro.bench.cli import main

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a run folder" in err


# ---------------------------------------------------------------- classification of many models
class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16, 10)


class _ViT(nn.Module):
    def __init__(self, d=16, patches=4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, d))
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)


class _LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.decoder = nn.Linear(12, 3)


def _roles(model):
    return {n: r for n, (_, r) in aro.classify_parameters(model).items()}


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                                                    n_positions=32, bos_token_id=0, eos_token_id=0))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, bos_token_id=0, eos_token_id=0))


CLASSIFICATION = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
            {"0.weight": "matrix", "0.bias": "vector", "2.weight": "matrix", "4.weight": "head", "4.bias": "vector"}),
    "cnn": (_CNN, {"conv1.weight": "conv", "conv1.bias": "vector", "conv2.weight": "conv", "fc.weight": "head"}),
    "vit": (_ViT, {"patch.weight": "conv", "cls_token": "embedding", "pos_embed": "embedding", "norm1.weight": "vector",
                   "attn.in_proj_weight": "matrix", "attn.in_proj_bias": "vector", "attn.out_proj.weight": "matrix",
                   "mlp.0.weight": "matrix", "mlp.2.weight": "matrix", "head.weight": "head"}),
    "lstm": (_LSTM, {"emb.weight": "embedding", "lstm.weight_ih_l0": "matrix", "lstm.weight_hh_l0": "matrix",
                     "lstm.bias_ih_l0": "vector", "decoder.weight": "head"}),
    "gpt2": (lambda: _hf("gpt2"), {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
                                   "transformer.h.0.attn.c_attn.weight": "matrix",
                                   "transformer.h.0.mlp.c_proj.weight": "matrix", "transformer.ln_f.weight": "vector"}),
    "llama": (lambda: _hf("llama"), {"model.embed_tokens.weight": "embedding", "lm_head.weight": "head",
                                     "model.layers.0.self_attn.k_proj.weight": "matrix",
                                     "model.layers.0.mlp.gate_proj.weight": "matrix", "model.norm.weight": "vector"}),
}


@pytest.mark.parametrize("kind", list(CLASSIFICATION))
def test_classification_table(kind):
    build, expected = CLASSIFICATION[kind]
    model = build()
    roles = _roles(model)
    for name, role in expected.items():
        assert roles[name] == role, (name, roles[name], role)
    # hybrid mode: a 3-D conv weight is flattened, never batched; heads and tokens go to AdamW
    groups = aro.param_groups(model)
    where = {n: g for g in groups for n, _ in g["params"]}
    for name, role in roles.items():
        g = where[name]
        if role == "conv":
            assert g["algorithm"] == "aro" and g["matrix_view"] == "flatten"
        elif role in ("head", "embedding", "router", "vector"):
            assert g["algorithm"] == "adamw", name
        else:
            assert g["algorithm"] == "aro", name
    opt = aro.ARO(groups, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if roles.get(name) == "conv":
            assert opt.state[p]["rotation"].ndim == 2  # one rotation for the flattened (out, in*k) matrix


def test_trainer_helper_keeps_the_hybrid_split(tmp_path):
    transformers = pytest.importorskip("transformers")
    from aro.integrations.huggingface import trainer_optimizer

    model = _hf("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a frozen matrix is left out
    opt = trainer_optimizer(model, lr=1e-3, weight_decay=0.1)
    where = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert where["lm_head.weight"]["algorithm"] == "adamw" and where["model.embed_tokens.weight"]["algorithm"] == "adamw"
    assert where["model.layers.0.self_attn.q_proj.weight"]["algorithm"] == "aro"
    assert where["model.norm.weight"]["weight_decay"] == 0.0
    assert "model.layers.0.mlp.up_proj.weight" not in where

    data = [{"input_ids": torch.randint(0, 50, (16,)), "labels": torch.randint(0, 50, (16,))} for _ in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert trainer.optimizer.optimizer is opt or trainer.optimizer is opt
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    assert "rotation" in opt.state[model.model.layers[0].self_attn.q_proj.weight]


def test_foreign_group_keys_are_kept_with_a_warning():
    model = build_model("tiny", 0)
    with pytest.warns(UserWarning, match="'name' is not an ARO option") as record:
        opt = aro.ARO([{"params": list(model.parameters()), "name": "all", "lr_mult": 1.0}])
    assert record[0].filename == __file__  # points at the caller
    assert opt.param_groups[0]["name"] == "all"
    with pytest.raises(ValueError, match="'momentum'; did you mean 'beta'"):
        aro.ARO([{"params": list(model.parameters()), "momentum": 0.9}])


def test_state_saved_through_a_compiled_or_ddp_wrapper_loads():
    model, state = _stepped_state("tiny")
    for group in state["param_groups"]:  # as saved from torch.compile(model) under DDP
        group["param_names"] = ["module._orig_mod." + n for n in group["param_names"]]
    fresh = aro.ARO(aro.param_groups(model), lr=1e-3)
    fresh.load_state_dict(state)
    for group in state["param_groups"]:
        group["param_names"] = list(reversed(group["param_names"]))
    with pytest.raises(ValueError, match=r"at index 0: '.*' here, '.*' saved"):
        aro.ARO(aro.param_groups(model), lr=1e-3).load_state_dict(state)
