"""Synthetic run folders for the report tests: the files ``aro bench`` leaves behind, written by hand
so a test knows every loss the report reads."""

import json
from pathlib import Path


def write_run(out: Path, optimizer: str, lr: float, seed: int, steps: int, losses: list[float],
              diverged: bool = False) -> None:
    """One finished run: ``losses`` evaluated at evenly spaced steps from 0 to ``steps``; a diverged
    one has no final loss, as ``aro bench`` writes it."""
    d = out / "runs" / f"{optimizer}__lr{lr:g}__seed{seed}__steps{steps}"
    d.mkdir(parents=True)
    evals = [round(i * steps / (len(losses) - 1)) for i in range(len(losses))]
    lines = [{"step": s, "val_loss": v, "train_loss": v, "lr": lr, "step_times": [0.01] * 5, "opt_times": [0.002] * 5}
             for s, v in zip(evals, losses)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = {"spec": {"optimizer": optimizer, "lr": lr, "seed": seed, "steps": steps}, "final_val_loss": None if diverged else losses[-1],
              "diverged": diverged, "step_time_s": 0.01 if optimizer != "aro-sinkhorn" else 0.011,
              "optimizer_step_time_s": 0.002, "optimizer_stats": {}}
    (d / "result.json").write_text(json.dumps(result))
