import json
from pathlib import Path

import pytest

from aro.bench.cli import main
from aro.bench.config import BenchConfig, resolve
from aro.bench.summary import summarize
from aro.bench.report import format_table, write_report
from aro.bench.train import lr_factor
from run_logs import write_run


def test_report_rebuilt_from_fixture_logs(tmp_path):
    cfg = BenchConfig(optimizers=("aro-sinkhorn", "adamw", "muon"), steps=40, seeds=2, lr_grid=(1e-3, 2e-3),
                      lr_by_optimizer={}, out=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    curves = {
        "adamw": [5.0, 4.0, 3.0, 2.5, 2.0],
        "muon": [5.0, 3.5, 2.6, 2.2, 1.9],
        "aro-sinkhorn": [5.0, 3.0, 2.0, 1.9, 1.8],
    }
    for name, curve in curves.items():
        write_run(tmp_path, name, 1e-3, 0, 40, [v + 0.3 for v in curve])  # worse lr
        for seed in (0, 1):
            write_run(tmp_path, name, 2e-3, seed, 40, [v + 0.01 * seed for v in curve])
    summary = write_report(tmp_path)
    aro_entry = summary["optimizers"]["aro-sinkhorn"]
    assert aro_entry["lr"] == 2e-3 and aro_entry["lr_at_grid_edge"]
    assert aro_entry["speedup"]["adamw"]["mean"] == pytest.approx(2.0)  # reaches 2.0 at step 20 of 40
    assert aro_entry["final_val_loss"]["per_seed"] == [1.8, 1.81]
    assert aro_entry["step_time_ratio"]["adamw"] == pytest.approx(1.1)
    assert summary["optimizers"]["adamw"]["speedup"]["adamw"]["mean"] == pytest.approx(1.0)
    for fig in ("val_loss.png", "speedup.png", "lr_sweep.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 1000
    assert (tmp_path / "summary.csv").read_text().startswith("optimizer,budget,lr")
    table = format_table(summary)
    assert "aro-sinkhorn" in table and "2.000" in table
    adamw_row = next(line for line in table.splitlines() if line.startswith("adamw "))
    assert adamw_row.split()[-5] == "-"  # no speedup of AdamW over itself (the column after the loss)
    assert summarize(tmp_path) == json.loads((tmp_path / "summary.json").read_text())
    assert main(["report", str(tmp_path)]) == 0
    # paired statistics: seed s of every optimizer is a pair; the two seeds' differences are equal
    paired = aro_entry["paired"]["muon"]["final_loss_diff"]
    assert paired["mean"] == pytest.approx(1.8 - 1.9) and paired["low"] == pytest.approx(paired["high"])
    assert paired["significant"] is True
    from aro.bench.report import format_markdown

    md = format_markdown(summary, ["muon", "aro-sinkhorn"]).splitlines()
    assert md[0].startswith("| optimizer | lr |") and len(md) == 4
    assert md[2].startswith("| muon (lr at grid edge) | 0.002 |") and md[2].endswith("| 1 | 0 |")
    assert "-0.100 [-0.100, -0.100]*" in md[3]
    md = format_markdown(summary, ["aro-sinkhorn", "adamw"], versus="aro-sinkhorn").splitlines()
    assert md[2].endswith("| 0 |") and md[3].endswith("| +0.200 [+0.200, +0.200]* |")
    # against Muon the table has its column already: no second one
    assert format_markdown(summary, versus="muon") == format_markdown(summary)


def test_table_counts_finished_seeds_and_gives_no_spread_for_one(tmp_path):
    # a ladder half way through: muon has finished one of its two seeds
    cfg = BenchConfig(optimizers=("adamw", "muon"), steps=40, seeds=2, lr=2e-3, lr_by_optimizer={}, out=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    for seed in (0, 1):
        write_run(tmp_path, "adamw", 2e-3, seed, 40, [5.0, 4.0, 3.0, 2.5, 2.0 + 0.1 * seed])
    write_run(tmp_path, "muon", 2e-3, 0, 40, [5.0, 3.5, 2.6, 2.2, 1.9])
    lines = format_table(summarize(tmp_path)).splitlines()
    adamw = next(line.split() for line in lines if line.startswith("adamw "))
    muon = next(line.split() for line in lines if line.startswith("muon "))
    assert adamw[2:4] == ["2", "2.0500±0.0707"]
    assert muon[2:4] == ["1", "1.9000"]  # one seed: no "±0.0000"
    assert any("finished seeds (of 2 planned)" in line for line in lines)
    from aro.bench.report import format_markdown

    md = format_markdown(summarize(tmp_path)).splitlines()  # the README table: a row short of seeds says so
    assert md[2].split(" | ")[2] == "2.050±0.071" and md[3].split(" | ")[2] == "1.900 (1 seed)"


def test_schedule_warmup_then_cosine_to_ten_percent():
    steps = 100
    f = [lr_factor(t, steps, 0.05, 0.1) for t in range(steps)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        resolve("quick", {"stepz": 3})
    with pytest.raises(ValueError, match="optimizers"):
        resolve("quick", {"optimizers": ("sgd",)})
    with pytest.raises(TypeError, match="steps"):
        resolve("quick", {"steps": "many"})
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"steps": 5, "typo": 1}))
    assert main(["bench", "--config", str(cfg_file), "--out", str(tmp_path / "o")]) == 2
    assert resolve("quick", {"lr_grid": (1e-3,)}).lr_by_optimizer == {}  # a grid replaces the preset's lrs


def test_smoke_bench_end_to_end_and_resume_after_a_crash(tmp_path, monkeypatch):
    from aro.bench import train

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert main(["bench", "--preset", "smoke", "--out", str(out_a), "--no-progress"]) == 0
    # crash the second run in the middle (after its first checkpoint), then resume
    calls = {"n": 0}
    real = train.evaluate

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--preset", "smoke", "--out", str(out_b), "--no-progress"])
    monkeypatch.setattr(train, "evaluate", real)
    assert main(["bench", "--preset", "smoke", "--out", str(out_b), "--no-progress"]) == 0
    for run in (out_a / "runs").iterdir():
        a = [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        b = [json.loads(x)["val_loss"] for x in (out_b / "runs" / run.name / "metrics.jsonl").read_text().splitlines()]
        assert a == b, run.name
        assert not (out_b / "runs" / run.name / "checkpoint.pt").exists()
    # a finished benchmark is not redone; a changed config is refused
    assert main(["bench", "--preset", "smoke", "--out", str(out_b), "--no-progress"]) == 0
    assert main(["bench", "--preset", "smoke", "--steps", "8", "--out", str(out_b), "--no-progress"]) == 2
    # more optimizers can join the same protocol in the same folder, reusing finished runs
    stamp = (out_b / "runs" / "adamw__lr0.002__seed0__steps12" / "result.json").stat().st_mtime_ns
    assert main(["bench", "--preset", "smoke", "--optimizers", "aro-sign", "--out", str(out_b), "--no-progress"]) == 0
    summary = json.loads((out_b / "summary.json").read_text())
    assert set(summary["optimizers"]) == {"aro-sinkhorn", "adamw", "aro-sign"}
    assert (out_b / "runs" / "adamw__lr0.002__seed0__steps12" / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("optimum,expected_extra", [(3e-3, []), (1e-2, [0.016]), (1e-4, [5e-4, 2.5e-4]),
                                                    (1.0, [0.016, 0.032])])
def test_sweep_is_extended_beyond_an_edge_optimum_at_most_twice(optimum, expected_extra):
    import math

    from aro.bench.protocol import _sweep

    # muon's bowl has its minimum at `optimum`, adamw's inside the grid: each is extended on its own
    optima = {"muon": optimum, "adamw": 3e-3}
    cfg = BenchConfig(optimizers=("adamw", "muon"), lr_grid=(1e-3, 2e-3, 4e-3, 8e-3), lr_by_optimizer={})
    batches = []

    def train_all(specs):
        batches.append(specs)
        return [{"final_val_loss": (math.log(s.lr) - math.log(optima[s.optimizer])) ** 2} for s in specs]

    chosen = _sweep(cfg, train_all)
    assert [s.lr for s in batches[0]] == [1e-3, 1e-3, 2e-3, 2e-3, 4e-3, 4e-3, 8e-3, 8e-3]  # interleaved
    extra = [s for batch in batches[1:] for s in batch]
    assert [s.lr for s in extra] == expected_extra and all(s.optimizer == "muon" and s.seed == 0 for s in extra)
    assert all(len(batch) == 1 for batch in batches[1:])  # one extension per round
    assert chosen["adamw"] == 4e-3  # log-distance 0.29 beats 2e-3's 0.41
    assert chosen["muon"] == min([1e-3, 2e-3, 4e-3, 8e-3] + expected_extra, key=lambda lr: abs(math.log(lr / optimum)))


def test_folder_made_before_a_field_existed_resumes(tmp_path):
    """A config.json without a field added later (e.g. `budgets`) reads as that field's default."""
    from aro.bench.data import load_corpus
    from aro.bench.protocol import _write_config

    cfg = resolve("smoke", {"out": str(tmp_path)})
    _write_config(cfg, load_corpus(None).describe())
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("budgets", "budget_seeds", "tokens_per_parameter"):
        del saved["config"][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = _write_config(cfg, load_corpus(None).describe())
    assert config["budgets"] == [] and config["tokens_per_parameter"] == 20.0
    with pytest.raises(ValueError, match="different config"):
        _write_config(resolve("smoke", {"out": str(tmp_path), "budget_seeds": 5}), load_corpus(None).describe())


def test_versus_pairs_seeds_across_run_folders_that_differ_only_in_optimizers(tmp_path, capsys):
    folders = {}
    for name, offset in (("aro-sinkhorn", 0.0), ("aro-sinkhorn-bf16", 0.02)):
        out = tmp_path / name
        out.mkdir()
        cfg = BenchConfig(optimizers=(name,), steps=40, seeds=2, lr_grid=(2e-3,), lr_by_optimizer={name: 2e-3},
                          out=str(out))
        (out / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
        for seed in (0, 1):
            write_run(out, name, 2e-3, seed, 40, [5.0, 3.0, 2.0, 1.9, 1.8 + 0.05 * seed + offset])
        folders[name] = out
    assert main(["report", str(folders["aro-sinkhorn-bf16"]), str(folders["aro-sinkhorn"]), "--markdown",
                 "--versus", "aro-sinkhorn"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| aro-sinkhorn")]
    assert rows[0].startswith("| aro-sinkhorn-bf16 |") and rows[0].endswith("| +0.020 [+0.020, +0.020]* |")
    other = tmp_path / "other"
    other.mkdir()
    cfg = BenchConfig(optimizers=("adamw",), steps=80, seeds=2, lr_grid=(2e-3,), lr_by_optimizer={"adamw": 2e-3},
                      out=str(other))
    (other / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    for seed in (0, 1):
        write_run(other, "adamw", 2e-3, seed, 80, [5.0, 3.0, 2.0, 1.9, 1.9])
    assert main(["report", str(folders["aro-sinkhorn"]), str(other), "--markdown", "--versus", "adamw"]) != 0
    assert "differ in 'steps' (80 vs 40): their seeds are not paired" in capsys.readouterr().err
