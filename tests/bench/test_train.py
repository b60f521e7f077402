import json

from aro.bench.cli import main
from aro.bench.report import format_table
from aro.bench.train import STARVED_FRACTION, starved_experts


def _run(tmp_path, model):
    out = tmp_path / model
    argv = ["bench", "--preset", "smoke", "--model", model, "--optimizers", "adamw", "--lr", "0.004", "--steps", "3",
            "--eval-every", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    (run,) = (out / "runs").iterdir()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run / "result.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    if "starved_experts" in result:  # the summary and its table carry the count per seed
        assert summary["optimizers"]["adamw"]["starved_experts"] == [result["starved_experts"]]
        assert f"adamw {result['starved_experts']}" in format_table(summary)
    else:
        assert "starved_experts" not in summary["optimizers"]["adamw"]
        assert "starved experts" not in format_table(summary)
    return lines, result


def test_moe_runs_log_expert_shares_and_train_on_the_balancing_term_without_reporting_it(tmp_path):
    plain, plain_result = _run(tmp_path, "moe-small")
    balanced, balanced_result = _run(tmp_path, "moe-small-balanced")
    for line in plain + balanced:
        assert len(line["expert_shares"]) == 4
        assert all(len(layer) == 8 and abs(sum(layer) - 1) < 1e-4 for layer in line["expert_shares"])
    for lines, result in ((plain, plain_result), (balanced, balanced_result)):
        assert result["expert_shares"] == lines[-1]["expert_shares"]
        assert result["starved_experts"] == starved_experts(lines[-1]["expert_shares"])
    # same weights and batches: the first step's reported train loss is the language-model loss
    # of the same forward, equal bit for bit; the next losses differ, as the balancing term
    # entered the first gradient
    assert plain[0]["val_loss"] == balanced[0]["val_loss"]
    assert plain[1]["train_loss"] == balanced[1]["train_loss"]
    assert plain[1]["val_loss"] != balanced[1]["val_loss"] and plain[2]["train_loss"] != balanced[2]["train_loss"]


def test_starved_experts_counts_shares_under_a_tenth_of_even_in_every_layer():
    even = [0.25] * 4
    edge = STARVED_FRACTION / 4
    assert starved_experts([even, even]) == 0
    assert starved_experts([[0.5, 0.5, 0.0, 0.0], [1 - edge, edge * 0.99, 0.0, 0.01 * edge]]) == 2 + 3
    assert starved_experts([[1 - edge, edge, 0.0, 0.0]]) == 2  # exactly a tenth is not starved


def test_dense_runs_log_no_expert_shares(tmp_path):
    lines, result = _run(tmp_path, "tiny")
    assert "expert_shares" not in lines[-1] and "starved_experts" not in result


def test_a_diverged_moe_run_reports_no_starved_experts():
    from aro.bench.train import RunSpec, _result

    shares = [[1.0, 0.0], [0.5, 0.5]]
    line = {"step": 2, "val_loss": None, "step_times": [0.1], "opt_times": [0.01], "expert_shares": shares}
    spec = RunSpec("adamw", 1e-3, 0, 2)
    assert _result(spec, [line], False, [])["starved_experts"] == 1
    assert "starved_experts" not in _result(spec, [line], True, [])
