"""One training run: a model, an optimizer, an lr, a seed, a step budget.

Files in the run folder (all written atomically, temp file + rename):

* ``metrics.jsonl`` -- one line per evaluation: ``step`` (steps done), ``val_loss``,
  ``train_loss`` (mean since the previous line; the language-model loss alone, without an MoE
  model's balancing term), ``lr``, ``step_times`` and ``opt_times`` (seconds per training step
  and per optimizer step, evaluation excluded), and for an MoE model ``expert_shares``: per layer,
  the fraction of the validation batches' routed slots each expert received;
* ``checkpoint.pt`` -- model and optimizer state after the last evaluation (removed when done);
* ``.lock`` -- held (``flock``) by the process training the run;
* ``result.json`` -- written last; its presence marks the run finished. For an MoE model it
  repeats the last ``expert_shares`` and counts the ``starved_experts`` (under
  ``STARVED_FRACTION`` of an even share) in all layers.

A killed run restarts from its checkpoint and loses at most one evaluation interval; batches
are a pure function of ``(seed, step)`` and the model has no dropout, so the resumed run is
the run that would have happened.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import BenchConfig
from .data import Corpus
from .files import RunFolderBusy, atomic_save, atomic_write_text, run_lock
from .models import build_model, lm_loss
from .optimizers import build_optimizers, check_mode
from .parallel import Parallel

__all__ = ["STARVED_FRACTION", "RunSpec", "finished_result", "lr_factor", "run_training", "starved_experts"]

# Steps at the start of a process run about 2x slow (allocator, caches); timing medians skip them.
TIMING_WARMUP_STEPS = 10


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    lr: float
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}__lr{self.lr:g}__seed{self.seed}__steps{self.steps}"


def lr_factor(step: int, steps: int, warmup_frac: float, min_lr_frac: float) -> float:
    """Linear warmup, then cosine from 1 to ``min_lr_frac`` at the last step (``step`` is 0-based)."""
    warmup = round(warmup_frac * steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# An expert is starved when it receives under this fraction of an even share (1/E) of the routed
# slots: with top-k routing it then sees almost no gradient.
STARVED_FRACTION = 0.1


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, autocast) -> tuple[float, list[list[float]]]:
    """Mean validation loss over ``batches`` and, for an MoE model, each layer's expert shares."""
    model.eval()
    total = 0.0
    loads: list[torch.Tensor] = []
    for x, y in batches:
        with autocast():
            total += model.loss(x, y).item()
        batch_loads = model.expert_load()
        loads = batch_loads if not loads else [a + b for a, b in zip(loads, batch_loads)]
    model.train()
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root module's parameters unsharded after a forward (its backward
        # would follow); after a no-grad forward the next training step would then skip their
        # gradient reduction for a step. Resharding restores the state a training step expects.
        model.reshard()
    shares = [[round(v, 5) for v in (load.double() / load.sum()).tolist()] for load in loads]
    return total / len(batches), shares


def starved_experts(shares: list[list[float]]) -> int:
    """How many experts, over all layers, get under ``STARVED_FRACTION`` of an even share."""
    return sum(v < STARVED_FRACTION / len(layer) for layer in shares for v in layer)


def _eval_line(step: int, val: tuple[float, list], train_loss, lr: float, step_times: list, opt_times: list) -> dict:
    val_loss, shares = val
    line = {"step": step, "val_loss": val_loss if math.isfinite(val_loss) else None, "train_loss": train_loss,
            "lr": lr, "step_times": step_times, "opt_times": opt_times}
    if shares:
        line["expert_shares"] = shares
    return line


def finished_result(run_dir: Path) -> dict | None:
    """The run's ``result.json``, or None while it is unfinished."""
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_training(cfg: BenchConfig, spec: RunSpec, corpus: Corpus, run_dir: Path, progress: bool = True,
                 par: Parallel = Parallel()) -> dict:
    """Train (or resume, or just read back) one run; returns the content of ``result.json``.

    Under data parallelism (``par``) every rank calls this; only rank 0 writes files. A single
    process holds the run folder's lock (:func:`aro.bench.files.run_lock`) while it trains, so
    a second process on the same run stops with an error instead of corrupting it; ranks of one
    data-parallel run do not lock (an error on rank 0 would leave the others at a barrier).
    """
    done = finished_result(run_dir)
    if done is not None:
        return done
    try:
        with run_lock(run_dir) if par.world == 1 else nullcontext():
            done = finished_result(run_dir)  # finished by the process that held the lock
            if done is not None:
                return done
            return _train(cfg, spec, corpus, run_dir, progress, par)
    except RunFolderBusy:
        done = finished_result(run_dir)  # the holder had written result.json but not yet let go
        if done is not None:
            return done
        raise


def _train(cfg: BenchConfig, spec: RunSpec, corpus: Corpus, run_dir: Path, progress: bool, par: Parallel) -> dict:
    result_path, metrics_path, ckpt_path = run_dir / "result.json", run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    if par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.batch_size % par.world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {par.world} ranks; use a multiple")
    check_mode(spec.optimizer, par.mode)

    model = build_model(cfg.model, spec.seed)
    train_model = par.wrap(model)
    optimizers = build_optimizers(spec.optimizer, model, spec.lr, cfg.weight_decay, par.process_group)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    seq_len = model.cfg.seq_len
    val = corpus.val_batches(cfg.eval_batches, cfg.batch_size, seq_len)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.precision == "bf16" else nullcontext

    start, lines = 0, []
    if ckpt_path.exists():
        start = par.load(ckpt_path, model, optimizers)
        lines = [line for line in _read_lines(metrics_path) if line["step"] <= start]
        par.barrier()  # every rank has read the log before rank 0 rewrites it
        if par.is_main:
            atomic_write_text(metrics_path, "".join(json.dumps(line) + "\n" for line in lines))
    if not lines:
        lines = [_eval_line(0, evaluate(model, val, autocast), None, 0.0, [], [])]
        if par.is_main:
            atomic_write_text(metrics_path, json.dumps(lines[0]) + "\n")

    bar = _progress(spec, start, progress and par.is_main)
    train_losses: list[float] = []
    step_times: list[float] = []
    opt_times: list[float] = []
    diverged = False
    params = list(model.parameters())
    for step in range(start, spec.steps):
        factor = lr_factor(step, spec.steps, cfg.warmup_frac, cfg.min_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        x, y = par.local_batch(*corpus.batch(spec.seed, step, cfg.batch_size, seq_len))
        t0 = time.perf_counter()
        with autocast():
            loss = lm_loss(train_model(x), y)
            aux = model.aux_loss()  # an MoE model's balancing term, trained on but not reported
        (loss if aux is None else loss + aux).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        step_times.append(t3 - t0)
        opt_times.append(t2 - t1)
        value = par.mean(loss)
        train_losses.append(value)
        if bar is not None:
            bar.update(1)
        done = step + 1
        if not math.isfinite(value):
            diverged = True
        if done % cfg.eval_every == 0 or done == spec.steps or diverged:
            evaluation = evaluate(model, val, autocast)
            val_loss = evaluation[0]
            train_loss = statistics.fmean(train_losses) if all(map(math.isfinite, train_losses)) else None
            line = _eval_line(done, evaluation, train_loss, spec.lr * factor, step_times, opt_times)
            lines.append(line)
            if par.is_main:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(line) + "\n")
            train_losses, step_times, opt_times = [], [], []
            if bar is not None:
                bar.set_postfix(val=f"{val_loss:.4f}")
            if diverged or not math.isfinite(val_loss):
                diverged = True
                break
            if done < spec.steps:
                state = par.state(model, optimizers)  # collective under FSDP2
                if par.is_main:
                    atomic_save({"step": done, **state}, ckpt_path)
    if bar is not None:
        bar.close()
    result = _result(spec, lines, diverged, optimizers)
    if par.is_main:
        atomic_write_text(result_path, json.dumps(result, indent=1))
        if ckpt_path.exists():
            ckpt_path.unlink()
        for stale in run_dir.glob(".*.tmp*"):  # a write cut short by a kill before this run resumed
            stale.unlink()
    par.barrier()  # the run's files are complete before any rank moves on
    return result


def _result(spec: RunSpec, lines: list[dict], diverged: bool, optimizers: list) -> dict:
    steps = [t for line in lines for t in line["step_times"]]
    opts = [t for line in lines for t in line["opt_times"]]
    skip = TIMING_WARMUP_STEPS if len(steps) > 2 * TIMING_WARMUP_STEPS else 0
    stats: dict = {}
    for opt in optimizers:
        if hasattr(opt, "stats"):
            for k, v in opt.stats().items():
                if isinstance(v, list):  # per-rank values: add rank by rank
                    old = stats.get(k, [0] * len(v))
                    stats[k] = [a + b for a, b in zip(old, v)]
                elif isinstance(v, dict):  # descriptions (auto_choices): merged
                    stats[k] = {**stats.get(k, {}), **v}
                else:
                    stats[k] = stats.get(k, 0) + v
    result = {
        "spec": asdict(spec),
        "final_val_loss": None if diverged else lines[-1]["val_loss"],
        "diverged": diverged,
        "step_time_s": statistics.median(steps[skip:]) if steps[skip:] else None,
        "optimizer_step_time_s": statistics.median(opts[skip:]) if opts[skip:] else None,
        "threads": torch.get_num_threads(),  # the step times are comparable only at one thread count
        "optimizer_stats": stats,
    }
    shares = lines[-1].get("expert_shares")
    if shares and not diverged:  # an MoE model: routing at the end (not of a diverged run's NaN router)
        result["expert_shares"] = shares
        result["starved_experts"] = starved_experts(shares)
    return result


def _progress(spec: RunSpec, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=spec.steps, initial=start, desc=f"{spec.optimizer} lr={spec.lr:g} seed={spec.seed}",
                leave=False, dynamic_ncols=True, mininterval=1.0)
