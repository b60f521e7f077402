"""``aro diagnose``: the paper's rotation analyses (Figure 2, the stability-speed tradeoff).

(a) ``spectra``: singular values (normalised to max 1) of the update ``R f(R^T G)`` for one
    random Gaussian ``G`` (square 128x128 and wide 128x512): ARO-Sinkhorn and ARO-Sign after
    100 ARO iterations on it from ``R = I``; Eigen-Sinkhorn and Eigen-Sign with the exact
    eigenvectors of ``GG^T``. (Sinkhorn with its default 5 iterations.)
(b) ``gain``: over a short ARO-Sinkhorn training run of a bench model, the mean relative gain
    ``J(R_ARO)/J(R_eigen) - 1`` of the rotation objective and the fraction of matrices where ARO
    scores higher, per logged step (from :class:`aro.Telemetry`).
(c) ``alignment``: a noisy quadratic -- the true gradient ``G`` is fixed, each step sees
    ``G + sigma * noise`` -- and each rotation policy (identity, eigen, ARO, polar) runs on the
    noisy gradients; the alignment ``cos(G, U)`` of its update is recorded after a burn-in, and
    its mean and standard deviation are reported for several noise levels.

Everything is written to ``OUT/diagnose.json`` and three PNGs, from seeded computations.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import aro
from aro.diagnostics import cosine
from aro.functional.projections import sign, sinkhorn
from aro.functional.rotation import rotated_step

from .data import load_corpus
from .models import PRESETS, build_model
from .files import atomic_write_text
from .options import check_options, option
from .train import lr_factor

__all__ = ["DiagnoseOptions", "run_diagnose"]

POLICIES = ("identity", "eigen", "aro", "polar")


@dataclass(frozen=True)
class DiagnoseOptions:
    """The options of ``aro diagnose``, declared once: the flags are generated from the fields
    (:mod:`aro.bench.options`)."""

    out: Path = option(Path("docs/figures"), "folder for diagnose.json and the PNGs")
    model: str = option("small", "bench model preset of the training-run analysis", choices=sorted(PRESETS))
    steps: int = option(200, "training steps of that run", minimum=1)
    lr: float = option(1.6e-2, "its lr (ARO-Sinkhorn's standard-sweep choice)")

    def __post_init__(self) -> None:
        check_options(self)
        if not self.lr > 0:
            raise ValueError(f"--lr {self.lr}: it must be > 0")


def update_spectra(shapes: tuple[tuple[int, int], ...] = ((128, 128), (128, 512)), iters: int = 100,
                   seed: int = 0) -> dict[str, dict[str, list[float]]]:
    return {f"{m}x{n}": _spectra(m, n, iters, seed) for m, n in shapes}


def _spectra(m: int, n: int, iters: int, seed: int) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    out = {}
    for name, policy, f in (("ARO-Sinkhorn", "aro", sinkhorn), ("ARO-Sign", "aro", sign),
                            ("Eigen-Sinkhorn", "eigen_exact", sinkhorn), ("Eigen-Sign", "eigen_exact", sign)):
        R = torch.eye(m, dtype=torch.float64)
        for _ in range(iters):
            step = rotated_step(G, R, policy=policy, f=f)
            R = step.rotation
        s = torch.linalg.svdvals(step.update)
        out[name] = (s / s.max()).tolist()
    return out


def alignment(sigmas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0), m: int = 32, n: int = 64, burn_in: int = 50,
              steps: int = 300, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Mean and std of cos(G, U) per policy and noise level (noise RMS = sigma x G's RMS)."""
    g = torch.Generator().manual_seed(seed)
    U0 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -2, m, dtype=torch.float64)
    G = (U0 * s) @ V0.T
    rms = G.square().mean().sqrt()
    f = partial(sinkhorn, num_iters=5)
    result: dict[str, dict[str, list[float]]] = {p: {"mean": [], "std": []} for p in POLICIES}
    for sigma in sigmas:
        for policy in POLICIES:
            noise = torch.Generator().manual_seed(seed + 1)  # the same noise for every policy
            R = torch.eye(m, dtype=torch.float64)
            scores = []
            for t in range(burn_in + steps):
                Gn = G + sigma * rms * torch.randn(m, n, generator=noise, dtype=torch.float64)
                step = rotated_step(Gn, None if policy == "identity" else R, policy=policy, f=f)
                R = step.rotation if step.rotation is not None else R
                if t >= burn_in:
                    scores.append(cosine(G, step.update).item())
            result[policy]["mean"].append(statistics.fmean(scores))
            result[policy]["std"].append(statistics.pstdev(scores))
    result["sigmas"] = list(sigmas)  # type: ignore[assignment]
    return result


def training_gain(model_name: str, steps: int, lr: float, every: int = 10, seed: int = 0,
                  log: Path | None = None) -> dict[str, list[float]]:
    """Relative gain of ARO over the exact eigen-rotation during an ARO-Sinkhorn run."""
    corpus = load_corpus(None)
    model = build_model(model_name, seed)
    opt = aro.ARO(aro.param_groups(model), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    log = log or Path("telemetry.jsonl")
    if log.exists():
        log.unlink()
    with aro.Telemetry(opt, log, every=every):
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, steps, 0.05, 0.1)
            x, y = corpus.batch(seed, step, 16, model.cfg.seq_len)
            opt.zero_grad(set_to_none=True)
            model.train_loss(x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    by_step: dict[int, list[float]] = {}
    for line in map(json.loads, log.read_text().splitlines()):
        if line.get("gain") is not None:
            by_step.setdefault(line["step"], []).append(line["gain"])
    ks = sorted(by_step)
    return {"step": ks, "mean_gain": [statistics.fmean(by_step[k]) for k in ks],
            "fraction_aro_higher": [sum(v > 0 for v in by_step[k]) / len(by_step[k]) for k in ks],
            "matrices": len(by_step[ks[0]]) if ks else 0}


def run_diagnose(options: DiagnoseOptions, *, progress=print) -> dict:
    out, model, steps, lr = options.out, options.model, options.steps, options.lr
    out.mkdir(parents=True, exist_ok=True)
    progress("(a) update spectra")
    spectra = update_spectra()
    progress("(c) alignment on a noisy quadratic")
    align = alignment()
    progress(f"(b) rotation objective during {steps} steps of ARO-Sinkhorn on '{model}'")
    gain = training_gain(model, steps, lr, log=out / "diagnose_telemetry.jsonl")
    result = {"spectra": spectra, "alignment": align, "gain": gain,
              "settings": {"model": model, "steps": steps, "lr": lr}}
    atomic_write_text(out / "diagnose.json", json.dumps(result, indent=1))
    _plot(result, out)
    return result


def _plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = result["spectra"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (shape, spectra) in zip(axes[0], shapes.items()):
        for name, s in spectra.items():
            ax.plot(range(1, len(s) + 1), s, label=name, linestyle="--" if name.startswith("Eigen") else "-")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value / max")
        ax.set_title(f"random Gaussian gradient {shape}")
        ax.legend()
    fig.suptitle("singular values of the update (rotation converged on a fixed gradient)")
    fig.tight_layout()
    fig.savefig(out / "diagnose_spectra.png", dpi=120)
    plt.close(fig)

    g = result["gain"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(g["step"], [100 * x for x in g["mean_gain"]], marker="o")
    a1.axhline(0, color="grey", lw=0.8)
    a1.set_xlabel("step")
    a1.set_ylabel("mean J(ARO)/J(eigen) - 1 (%)")
    a2.plot(g["step"], [100 * x for x in g["fraction_aro_higher"]], marker="o", color="C1")
    a2.set_ylim(0, 100)
    a2.set_xlabel("step")
    a2.set_ylabel("matrices with J(ARO) > J(eigen) (%)")
    fig.suptitle(f"rotation objective during ARO-Sinkhorn training ({g['matrices']} matrices)")
    fig.tight_layout()
    fig.savefig(out / "diagnose_gain.png", dpi=120)
    plt.close(fig)

    al = result["alignment"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in POLICIES:
        a1.plot(al["sigmas"], al[p]["mean"], marker="o", label=p)
        a2.plot(al["sigmas"], al[p]["std"], marker="o", label=p)
    a1.set_xlabel("noise RMS / gradient RMS")
    a1.set_ylabel("mean cos(true gradient, update)")
    a2.set_xlabel("noise RMS / gradient RMS")
    a2.set_ylabel("std of cos(true gradient, update)")
    a1.legend()
    fig.suptitle("noisy quadratic: alignment of each rotation policy (Sinkhorn f)")
    fig.tight_layout()
    fig.savefig(out / "diagnose_alignment.png", dpi=120)
    plt.close(fig)
