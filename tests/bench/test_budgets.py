"""Budgets in the paper's unit, the ladder protocol and the paired statistics."""

import json
import math

import pytest

from aro.bench import protocol
from aro.bench.cli import main
from aro.bench.budget import budget_of_steps, budget_unit, count_parameters, steps_for_budget
from aro.bench.config import resolve
from aro.bench.ladder import ladder_runs, schedule_fair_bound, schedule_fair_speedup
from aro.bench.models import build_model
from aro.bench.stats import paired_difference, paired_ratio, t_quantile
from aro.bench.summary import summarize
from run_logs import write_run


# ---------------------------------------------------------------- budget arithmetic
def test_parameters_are_counted_once_with_embeddings():
    model = build_model("tiny", 0)
    counts = count_parameters(model)
    assert counts["all"] == sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    embeddings = cfg.vocab_size * cfg.d_model + cfg.seq_len * cfg.d_model + cfg.d_model * cfg.vocab_size
    assert counts["non_embedding"] == counts["all"] - embeddings
    tied = count_parameters(build_model("small-tied", 0))
    assert tied["all"] == sum(p.numel() for p in build_model("small-tied", 0).parameters())  # the tied tensor once


def test_budget_to_steps():
    unit = budget_unit("tiny", 16)
    n = count_parameters(build_model("tiny", 0))["all"]
    assert unit["parameters"] == n and unit["tokens_per_step"] == 16 * 64
    assert steps_for_budget(1, unit) == round(20 * n / (16 * 64))
    assert steps_for_budget(8, unit) == round(8 * 20 * n / (16 * 64))
    assert steps_for_budget(1e-9, unit) == 1
    assert budget_of_steps(steps_for_budget(4, unit), unit) == pytest.approx(4, rel=1e-3)
    half = budget_unit("tiny", 16, tokens_per_parameter=10)
    assert steps_for_budget(2, half) == steps_for_budget(1, unit)
    with pytest.raises(ValueError, match="budget must be > 0"):
        steps_for_budget(0, unit)
    with pytest.raises(ValueError, match="tokens-per-parameter"):
        budget_unit("tiny", 16, tokens_per_parameter=0)


def test_config_derives_steps_from_budget_one():
    cfg = resolve("budgets", {})
    assert cfg.steps == cfg.budget_steps(1) == steps_for_budget(1, budget_unit("tiny", 16))
    assert resolve("budgets", {"model": "small", "budgets": (1.0,)}).steps == steps_for_budget(1, budget_unit("small", 16))
    with pytest.raises(ValueError, match="--steps and --budgets"):
        resolve("budgets", {"steps": 100})
    with pytest.raises(ValueError, match="include 1"):
        resolve("budgets", {"budgets": (2.0, 4.0)})
    with pytest.raises(ValueError, match="give one of them"):
        resolve("budgets", {"overtrain": (1, 2)})


def test_ladder_order_and_lr_check():
    cfg = resolve("budgets", {"optimizers": ("adamw", "muon"), "budgets": (0.5, 1.0, 2.0)})
    specs = ladder_runs(cfg, {"adamw": 1e-3, "muon": 1.6e-2})
    steps = [s.steps for s in specs]
    assert steps[:4] == [cfg.budget_steps(0.5)] * 4 and steps[4:8] == [cfg.budget_steps(2)] * 4
    assert [(s.optimizer, s.seed) for s in specs[:4]] == [("adamw", 0), ("muon", 0), ("adamw", 1), ("muon", 1)]
    checks = specs[8:]
    assert {(s.optimizer, s.lr) for s in checks} == {("adamw", 5e-4), ("adamw", 2e-3), ("muon", 8e-3),
                                                      ("muon", 3.2e-2)}
    assert all(s.seed == 0 and s.steps == cfg.budget_steps(2) for s in checks)


def test_a_budget_1_ladder_checks_only_the_lrs_it_did_not_sweep():
    cfg = resolve("budgets", {"optimizers": ("adamw", "muon"), "budgets": (1.0,), "lr_by_optimizer": {"muon": 4e-3}})
    specs = ladder_runs(cfg, {"adamw": 8e-3, "muon": 4e-3})
    assert [(s.optimizer, s.lr, s.seed, s.steps) for s in specs] == [("muon", 2e-3, 0, cfg.steps),
                                                                      ("muon", 8e-3, 0, cfg.steps)]


# ---------------------------------------------------------------- paired statistics
def test_t_quantile_known_values():
    assert t_quantile(2) == pytest.approx(4.302653, rel=1e-6)
    assert t_quantile(10) == pytest.approx(2.228139, rel=1e-6)
    assert t_quantile(10**6) == pytest.approx(1.959964, rel=1e-5)


def test_paired_difference_on_synthetic_seeds():
    # the seed effect (1, 5, 9) is shared and cancels: the differences are exactly 0.5
    x = [1.5, 5.5, 9.5]
    b = [1.0, 5.0, 9.0]
    p = paired_difference(x, b)
    assert p["mean"] == pytest.approx(0.5) and p["low"] == pytest.approx(0.5) and p["significant"]
    # differences 1, 2, 3: mean 2, half-width t(2) * 1 / sqrt(3)
    p = paired_difference([1, 2, 3], [0, 0, 0])
    half = 4.302653 / math.sqrt(3)
    assert (p["low"], p["high"]) == (pytest.approx(2 - half, rel=1e-6), pytest.approx(2 + half, rel=1e-6))
    assert p["significant"] is False
    # missing seeds are dropped pairwise; one pair gives no interval
    p = paired_difference([1.0, None], [0.5, 0.2])
    assert p["n"] == 1 and p["significant"] is None and p["mean"] == pytest.approx(0.5)


def test_paired_ratio_is_geometric():
    p = paired_ratio([2.0, 0.5])
    assert p["mean"] == pytest.approx(1.0) and p["significant"] is False
    p = paired_ratio([1.2, 1.2, 1.2])
    assert p["mean"] == pytest.approx(1.2) and p["low"] == pytest.approx(1.2) and p["significant"]
    p = paired_ratio([1.1, 1.3, 1.2])
    logs = [math.log(v) for v in (1.1, 1.3, 1.2)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 2)
    assert p["high"] == pytest.approx(math.exp(mean + 4.302653 * sd / math.sqrt(3)), rel=1e-6)


# ---------------------------------------------------------------- schedule-fair speedup
def test_schedule_fair_speedup_interpolates_in_log_budget():
    ladder = [(1.0, 3.0), (2.0, 2.8), (4.0, 2.7)]
    assert schedule_fair_speedup(4.0, 2.8, ladder) == pytest.approx(2.0)  # X reaches it at K* = 2
    assert schedule_fair_speedup(2.0, 2.9, ladder) == pytest.approx(2.0 / math.sqrt(2))  # K* = sqrt(2)
    assert schedule_fair_speedup(2.0, 3.5, ladder) is None
    assert schedule_fair_bound(2.0, 3.5, ladder) == {"at_least": 2.0}
    assert schedule_fair_bound(8.0, 2.0, ladder) == {"at_most": 2.0}
    assert schedule_fair_bound(2.0, 2.9, ladder) is None


# ---------------------------------------------------------------- the ladder end to end
TINY_LADDER = dict(optimizers=("adamw", "muon", "aro-sinkhorn"), budgets=(0.5, 1.0, 2.0), tokens_per_parameter=0.01,
                   batch_size=2, seeds=2, budget_seeds=2, eval_every=5, eval_batches=1, lr_grid=(2e-3, 8e-3),
                   lr_grid_by_optimizer={})


def test_half_finished_ladder_resumes_without_redoing_runs(tmp_path, monkeypatch):
    cfg = resolve("budgets", {**TINY_LADDER, "out": str(tmp_path)})
    real = protocol.run_training
    trained = []

    def run(cfg, spec, *args, **kwargs):
        if not (args[1] / "result.json").exists():
            trained.append(spec.name)
            if stop_after is not None and len(trained) > stop_after:
                raise KeyboardInterrupt("killed")
        return real(cfg, spec, *args, **kwargs)

    monkeypatch.setattr(protocol, "run_training", run)
    stop_after = 15
    with pytest.raises(KeyboardInterrupt):
        protocol.run_benchmark(cfg, progress=False)
    first = trained[:15]
    trained.clear()
    stop_after = None
    summary = protocol.run_benchmark(cfg, progress=False)
    assert not set(first) & set(trained[1:])  # nothing finished is redone (the killed run restarts)
    finished = {p.parent.name for p in tmp_path.glob("runs/*/result.json")}
    assert set(first) | set(trained) == finished

    # the summary schema
    unit = summary["budget_unit"]
    assert unit["tokens_per_parameter"] == 0.01 and unit["parameters"] == count_parameters(build_model("tiny", 0))["all"]
    assert unit["which_parameters"].startswith("all")
    for name in TINY_LADDER["optimizers"]:
        entry = summary["optimizers"][name]
        assert "final_val_loss" in entry and "speedup" in entry and "paired" in entry  # today's schema kept
        assert set(entry["budgets"]) == {"0.5", "1", "2"}
        one = entry["budgets"]["1"]
        assert one["lr"] == entry["lr"] and len(one["final_val_loss"]["per_seed"]) == 2
        assert set(one["final_val_loss"]) >= {"mean", "std", "per_seed"}
        assert set(one["speedup"]) == {"adamw", "muon"} and set(one["speedup"]["muon"]) >= {"mean", "std"}
        assert set(one["paired"]["adamw"]) == {"final_loss_diff", "speedup"}
        assert set(one["schedule_fair_speedup"]) == {"adamw", "muon"} - {name}
        two = entry["budgets"]["2"]
        assert two["steps"] == cfg.budget_steps(2) and len(two["lr_check"]) == 3
        assert isinstance(two["lr_transfers"], bool)
    assert (tmp_path / "figures" / "budgets.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text()) == summarize(tmp_path)


# ---------------------------------------------------------------- several ladders in one record
# the tiny model's budget 1 in 40 steps of batch 2
TPP = 40 * budget_unit("tiny", 2)["tokens_per_step"] / budget_unit("tiny", 2)["parameters"]


def _ladder_folder(root, model, curves, tpp=TPP):
    """A finished budget-1 run folder of ``model`` (2 seeds), written from known losses."""
    out = root / model
    cfg = resolve("budgets", dict(model=model, budgets=(1.0,), tokens_per_parameter=tpp, batch_size=2, seeds=2,
                                  optimizers=("adamw", "muon", "aro-sinkhorn"), out=str(out),
                                  lr_by_optimizer={"adamw": 2e-3, "muon": 2e-3, "aro-sinkhorn": 2e-3}))
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    for name, curve in curves.items():
        for seed in (0, 1):
            write_run(out, name, 2e-3, seed, cfg.budget_steps(1), [v + 0.01 * seed for v in curve])
    return out


CURVES = {"adamw": [5.0, 4.0, 3.0, 2.5, 2.0], "muon": [5.0, 3.5, 2.6, 2.2, 1.9],
          "aro-sinkhorn": [5.0, 3.0, 2.0, 1.9, 1.8]}


def test_a_budget_1_ladder_with_given_lrs_reports_their_check(tmp_path):
    out = _ladder_folder(tmp_path, "tiny", CURVES)
    steps = json.loads((out / "config.json").read_text())["config"]["steps"]
    from aro.bench.report import format_budget_table, format_lr_checks, format_markdown, format_table

    write_run(out, "muon", 1e-3, 0, steps, [v + 0.05 for v in CURVES["muon"]])
    half_done = summarize(out)
    # a given lr is not "at the edge of a grid" when only half of its check has run, nor marked
    # while it is the best of its check
    assert half_done["optimizers"]["muon"]["lr_at_grid_edge"] is False
    assert "muon +" not in format_table(half_done) and "better)" not in format_markdown(half_done)
    write_run(out, "muon", 4e-3, 0, steps, [v - 0.02 for v in CURVES["muon"]])
    muon = summarize(out)["optimizers"]["muon"]
    one = muon["budgets"]["1"]
    # the given lr stays the chosen one although 4e-3 did better at seed 0: the check reports it
    assert muon["lr"] == 2e-3 and one["lr"] == 2e-3 and one["seeds"] == [0, 1]
    assert one["lr_check"] == {"0.001": pytest.approx(1.95), "0.002": pytest.approx(1.9), "0.004": pytest.approx(1.88)}
    assert one["lr_transfers"] is False  # twice the given lr did better
    assert "lr_check" not in summarize(out)["optimizers"]["adamw"]["budgets"]["1"]
    # every table marks the row whose given lr its check beat; the others stay unmarked
    summary = summarize(out)
    assert muon["lr_at_grid_edge"] is False
    rows = {line.split()[0]: line for line in format_table(summary).splitlines()[2:5]}
    assert rows["muon"].startswith("muon +  ") and not rows["adamw"].startswith("adamw +")
    assert [line.split("|")[1].strip() for line in format_markdown(summary).splitlines()[2:]] == [
        "adamw", "muon (lr check: 0.004 better)", "aro-sinkhorn"]
    budget_rows = format_budget_table(summary).splitlines()[2:5]
    assert [row.split()[:2] for row in budget_rows] == [["adamw", "1"], ["muon", "+"], ["aro-sinkhorn", "1"]]
    # the end-of-run table prints the check (the README quotes it), the chosen lr marked
    checks = format_table(summary).split("lr check (seed 0, final val loss at each lr):\n")[1].splitlines()
    assert checks == ["  muon at budget 1: 0.001 -> 1.9500, 0.002 -> 1.9000 (chosen), 0.004 -> 1.8800; best 0.004"]
    write_run(out, "aro-sinkhorn", 4e-3, 0, steps, [5.0, float("nan")], diverged=True)  # a check run that diverged
    line = next(x for x in format_lr_checks(summarize(out)).splitlines() if x.startswith("  aro-sinkhorn"))
    assert line == "  aro-sinkhorn at budget 1: 0.002 -> 1.8000 (chosen), 0.004 -> -; best 0.002 (chosen)"


def test_budget_summary_gathers_each_folders_ladder(tmp_path):
    dense = _ladder_folder(tmp_path, "tiny", curves=CURVES)
    moe = _ladder_folder(tmp_path, "moe-small", curves={k: [v - 0.1 for v in c] for k, c in CURVES.items()})
    path, png = tmp_path / "all" / "summary.json", tmp_path / "all" / "budgets.png"
    assert main(["report", str(dense), str(moe), "--budget-summary", str(path), "--budget-figure", str(png)]) == 0
    combined = json.loads(path.read_text())
    # the first folder's summary is the top level, whole; every folder's ladder is under "ladders"
    assert {k: v for k, v in combined.items() if k != "ladders"} == json.loads((dense / "summary.json").read_text())
    assert list(combined["ladders"]) == ["tiny", "moe-small"]
    for folder, shift in ((dense, 0.0), (moe, -0.1)):
        ladder = combined["ladders"][folder.name]
        assert ladder["model"] == folder.name and ladder["source"] == str(folder)
        own = json.loads((folder / "summary.json").read_text())
        assert ladder["budget_unit"] == own["budget_unit"]
        for name, curve in CURVES.items():
            block = ladder["optimizers"][name]["budgets"]["1"]
            assert block == own["optimizers"][name]["budgets"]["1"]  # the folder's block, unchanged
            assert block["final_val_loss"]["per_seed"] == pytest.approx([curve[-1] + shift, curve[-1] + shift + 0.01])
    # ARO reaches AdamW's final loss (2.0) at step 20 of 40
    assert combined["ladders"]["tiny"]["optimizers"]["aro-sinkhorn"]["budgets"]["1"]["speedup"]["adamw"]["mean"] == 2.0
    assert png.stat().st_size > 1000


def test_budget_summary_refuses_folders_in_different_units_or_of_one_name(tmp_path, capsys):
    dense = _ladder_folder(tmp_path, "tiny", curves=CURVES)
    other = _ladder_folder(tmp_path, "moe-small", CURVES, tpp=2 * TPP)
    assert main(["report", str(dense), str(other), "--budget-summary", str(tmp_path / "s.json")]) != 0
    assert "count budgets in different units" in capsys.readouterr().err
    (tmp_path / "copy").mkdir()
    twin = _ladder_folder(tmp_path / "copy", "tiny", curves=CURVES)
    assert main(["report", str(dense), str(twin), "--budget-summary", str(tmp_path / "s.json")]) != 0
    assert "appear twice" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()  # nothing half-written


def _block(budget, adamw, muon, fair_adamw=None):
    return {"budget": budget, "speedup": {"adamw": {"mean": adamw, "std": 0.01}, "muon": {"mean": muon, "std": 0.01}},
            "schedule_fair_speedup": {} if fair_adamw is None else {"adamw": fair_adamw}}


def test_budget_figure_scales_each_panel_to_its_range_and_keeps_one_legend_order(tmp_path):
    from aro.bench.figures import budget_figure, load_pyplot

    plt = load_pyplot()

    class Kept:  # pyplot, except that the figure stays open to be inspected
        def __init__(self):
            self.figures = []

        def subplots(self, *args, **kwargs):
            fig, axes = plt.subplots(*args, **kwargs)
            self.figures.append((fig, axes))
            return fig, axes

        def close(self, fig):
            pass

    # the dense row: a schedule-fair speedup of 9 beside crossing speedups near 1.5 (vs adamw),
    # speedups vs muon within 0.9-1.2; the MoE row lists the optimizers in another order
    dense = {"optimizers": {"muon": {"budgets": {"1": _block(1.0, 1.5, 1.0, 3.0), "8": _block(8.0, 1.6, 1.0, 9.0)}},
                            "aro": {"budgets": {"1": _block(1.0, 1.7, 1.1, 3.5), "8": _block(8.0, 1.7, 1.2, 9.5)}}}}
    moe = {"optimizers": {"aro": {"budgets": {"1": _block(1.0, 1.4, 0.95)}},
                          "muon": {"budgets": {"1": _block(1.0, 1.5, 1.0)}}}}
    # 0.4 with a wide error bar beside 9: the axis margin reaches below 0, the values span 22x
    wide = {"optimizers": {"aro": {"budgets": {"1": {**_block(1.0, 0.4, 1.0, 9.0), "speedup": {
        "adamw": {"mean": 0.4, "std": 0.39}, "muon": {"mean": 1.0, "std": 0.0}}}}}}}
    kept = Kept()
    budget_figure(kept, {"tiny": dense, "moe-small": moe, "wide": wide}, tmp_path / "b.png")
    fig, axes = kept.figures[0]
    try:
        assert (tmp_path / "b.png").stat().st_size > 1000
        # 1 to 9.5 and 0.4 to 9: ratios on a log axis; within 0.9-1.7: linear, labelled
        assert axes[0][0].get_yscale() == "log" and axes[2][0].get_yscale() == "log"
        assert [ax.get_yscale() for ax in (axes[0][1], axes[1][0], axes[1][1], axes[2][1])] == ["linear"] * 4
        # one order in every panel (the first folder's), whatever order a folder lists them in
        assert axes[1][0].get_legend_handles_labels()[1] == ["muon", "aro"]
        assert axes[0][1].get_legend_handles_labels()[1] == ["aro"]  # no line of muon against itself
    finally:
        plt.close(fig)
