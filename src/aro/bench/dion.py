"""Dion: the low-rank orthonormalized baseline (Ahn et al., "Dion: Distributed Orthonormalized
Updates", arXiv 2504.05295, Algorithm 1), written from the paper because no maintained package
ships it.

For a weight X of shape ``m x n`` (leading dimensions are a batch of independent matrices, as for
MoE expert tensors) with gradient G, momentum buffer M and right factor Q of shape ``n x r``:

    B ← M + G                      the buffer: the gradient is added whole (no (1 − μ) factor)
    P ← orth(B Q)                  one step of power iteration, then a QR (P is m x r, PᵀP = I)
    R ← Bᵀ P                       (n x r)
    M ← B − (1 − μ) P Rᵀ           error feedback: only the applied rank-r part decays faster
    Q ← R / ‖R‖ per column         column normalization
    X ← (1 − lr·λ) X − lr · √(m/n) · P Qᵀ

P Rᵀ = P Pᵀ B is B projected onto the span of P, so the residual (I − P Pᵀ) B that the update
did not apply stays in the momentum untouched, and with full rank on the short side it is zero
(M ← μ B: plain momentum). The step is scaled by √(fan_out / fan_in), the authors' default
("spectral_norm" scaling), with one lr shared with the AdamW part as in their training configs.

Q starts as a Gaussian matrix drawn from ``(seed, parameter index)`` alone (then it is in the
state, so a resumed run continues exactly, also for a matrix first stepped after the resume). A column of R that is exactly zero (B is zero,
e.g. a matrix whose gradient is zero) keeps its previous Q column: a zero Q would make every
later B Q zero and stall the power iteration for good.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch
from torch import Tensor

__all__ = ["Dion", "DionStep", "dion_rank", "dion_update", "initial_factor"]


def dion_rank(shape: tuple[int, ...], rank_fraction: float) -> int:
    """r = ⌈rank_fraction · min(m, n)⌉, at least 1."""
    return max(1, math.ceil(rank_fraction * min(shape[-2], shape[-1])))


class DionStep(NamedTuple):
    P: Tensor  # orthonormal left factor, ... x m x r
    update: Tensor  # P Qᵀ with the new Q (a zero column of R gives a zero column here)
    momentum: Tensor  # B − (1 − μ) P Rᵀ
    Q: Tensor  # the next right factor (a zero column of R keeps the previous column)


def dion_update(B: Tensor, Q: Tensor, mu: float) -> DionStep:
    """One Dion step on the buffer ``B = M + G`` (``... x m x n``) with right factor ``Q``
    (``... x n x r``). Pure: nothing is modified in place. The QR runs in at least float32.
    """
    work = torch.promote_types(B.dtype, torch.float32)
    P, _ = torch.linalg.qr((B @ Q.to(B.dtype)).to(work))
    P = P.to(B.dtype)
    R = B.mT @ P
    momentum = B - (1.0 - mu) * (P @ R.mT)
    norms = R.norm(dim=-2, keepdim=True)
    live = norms > 0
    direction = torch.where(live, R / norms.clamp_min(torch.finfo(R.dtype).tiny), torch.zeros_like(R))
    Q_next = torch.where(live, direction, Q.to(R.dtype)).to(Q.dtype)
    return DionStep(P, P @ direction.mT, momentum, Q_next)


def initial_factor(shape: tuple[int, ...], r: int, seed: int, index: int) -> Tensor:
    """The Gaussian initial Q (``... x n x r``, float32) of the ``index``-th parameter: a function of
    ``(seed, index)`` alone, so a matrix first stepped after a resume draws what it would have."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn((*shape[:-2], shape[-1], r), generator=g, dtype=torch.float32)


class Dion(torch.optim.Optimizer):
    """Dion on matrices (2-D, or 3-D and more with leading batch dimensions).

    Args:
        params: the matrices (embeddings, head and vectors belong to an AdamW beside it).
        lr: learning rate; the step is ``lr * sqrt(m / n)`` times ``P Qᵀ`` (module docstring).
        mu: momentum decay μ (paper: 0.95).
        rank_fraction: r = ⌈rank_fraction · min(m, n)⌉ (1.0: full rank).
        weight_decay: decoupled, ``X ← (1 − lr·λ) X``.
        seed: with the parameter's index, seeds the Gaussian initial Q of each matrix.
        rms_target: ``None`` (default): the authors' ``sqrt(m / n)`` step scale; a number: each
            matrix's update rescaled to that RMS instead (0.2: the benchmark's RMS matching).
    """

    def __init__(self, params: Iterable, lr: float, mu: float = 0.95, rank_fraction: float = 0.25,
                 weight_decay: float = 0.0, seed: int = 0, rms_target: float | None = None):
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"Dion: lr must be a finite number >= 0, got {lr!r}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"Dion: mu must be in [0, 1), got {mu!r}")
        if not 0.0 < rank_fraction <= 1.0:
            raise ValueError(f"Dion: rank_fraction must be in (0, 1] (1 is full rank), got {rank_fraction!r}")
        if not weight_decay >= 0:
            raise ValueError(f"Dion: weight_decay must be >= 0, got {weight_decay!r}")
        if rms_target is not None and not rms_target > 0:
            raise ValueError(f"Dion: rms_target must be > 0 or None, got {rms_target!r}")
        super().__init__(params, dict(lr=lr, mu=mu, rank_fraction=rank_fraction, weight_decay=weight_decay,
                                      rms_target=rms_target))
        self._seed = seed
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Dion: parameters must be matrices (ndim >= 2), got shape {tuple(p.shape)}; "
                                     "give vectors to AdamW")
                if type(p) is not torch.nn.Parameter and type(p) is not Tensor:
                    raise ValueError(f"Dion: {type(p).__name__} parameters (e.g. FSDP2 DTensors) are not supported; "
                                     "this Dion steps whole local matrices")

    def __setstate__(self, state: dict) -> None:
        """Groups saved before an option existed get its default (load_state_dict calls this)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("rms_target", None)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        r = dion_rank(tuple(p.shape), group["rank_fraction"])
        q = initial_factor(tuple(p.shape), r, self._seed, self._index[id(p)])
        state = self.state[p]
        state["momentum"] = torch.zeros_like(p)
        state["Q"] = q.to(device=p.device, dtype=p.dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p, group)
                out = dion_update(state["momentum"] + p.grad, state["Q"], group["mu"])
                state["momentum"].copy_(out.momentum)
                state["Q"].copy_(out.Q)
                if wd:
                    p.mul_(1.0 - lr * wd)
                if group["rms_target"] is None:  # the authors' scale
                    p.sub_(out.update, alpha=lr * math.sqrt(p.shape[-2] / p.shape[-1]))
                else:  # RMS-matched per matrix, as every RMS-matched method of the benchmark
                    rms = out.update.square().mean(dim=(-2, -1), keepdim=True).sqrt()
                    p.sub_(out.update * (group["rms_target"] / rms.clamp_min(torch.finfo(rms.dtype).tiny)), alpha=lr)
        return loss
