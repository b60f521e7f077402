"""The optimizers under test: one registry, whose names are the CLI choices.

Every method gets the same learning rate scale: AdamW's. The ARO variants and the Muon baseline
RMS-match every matrix update to 0.2 (AdamW's typical update RMS), so one lr grid serves all
(SPEC §7). All variants but ``aro-sinkhorn-full`` are *hybrid*: embeddings, LM head, routers,
norm gains and biases are trained by AdamW with the same lr, betas (0.9, 0.95) and weight decay.

``muon`` is :class:`torch.optim.Muon` (``adjust_lr_fn="match_rms_adamw"``) on the hidden 2-D
matrices. ``torch.optim.Muon`` accepts only 2-D parameters, so 3-D expert tensors (MoE model)
get the same update through :class:`aro.ARO` with the rotation-equivariant Newton-Schulz base,
identity rotation and Nesterov momentum, which is Muon with exact RMS matching.

``muon-fp32`` is that same Muon update on every hidden matrix, batched by shape, with its
Newton-Schulz products in float32. ``torch.optim.Muon`` runs them in bfloat16, which is fast on
GPUs and on CPUs with bfloat16 instructions, but is emulated (about 16x slower per step) on
CPUs without them; ``muon-fp32`` is then the fair (and stronger) Muon to time against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import aro

__all__ = ["ADAMW_BETAS", "OPTIMIZERS", "OptimizerSpec", "build_optimizers"]

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    description: str
    build: Callable[..., list[torch.optim.Optimizer]]  # (model, lr, wd, process_group)
    aro_options: dict[str, Any] = field(default_factory=dict)


def _adamw(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
    return [torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=wd)]


def _muon(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
    roles = aro.classify_parameters(model)
    matrices = [(n, p) for n, (p, role) in roles.items() if role == "matrix" and p.ndim == 2]
    batched = [(n, p) for n, (p, role) in roles.items() if role == "matrix" and p.ndim > 2]
    taken = {id(p) for _, p in matrices + batched}
    rest = [p for _, (p, _) in roles.items() if id(p) not in taken]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.Muon([p for _, p in matrices], lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=wd),
    ]
    if batched:
        opts.append(
            aro.ARO(
                [p for _, p in batched],
                lr=lr,
                weight_decay=wd,
                base="newton_schulz",
                rotation="identity",
                nesterov=True,
                process_group=process_group,
            )
        )
    return opts


def _aro(mode: str = "hybrid", sharing: str = "none", **options: Any) -> Callable[..., list[torch.optim.Optimizer]]:
    def build(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
        groups = aro.param_groups(model, mode=mode, sharing=sharing)
        return [aro.ARO(groups, lr=lr, weight_decay=wd, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                        process_group=process_group, **options)]

    return build


def _spec(name: str, description: str, mode: str = "hybrid", sharing: str = "none", **options: Any) -> OptimizerSpec:
    return OptimizerSpec(name, description, _aro(mode, sharing, **options), {"mode": mode, "sharing": sharing, **options})


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in [
        OptimizerSpec("adamw", "torch.optim.AdamW on every parameter", _adamw),
        OptimizerSpec("muon", "torch.optim.Muon (match_rms_adamw) on hidden matrices, AdamW elsewhere", _muon),
        _spec("muon-fp32", "Muon's update in float32: Nesterov momentum, quintic Newton-Schulz, RMS 0.2, batched "
              "(aro.ARO with base='newton_schulz', rotation='identity')", rotation="identity", base="newton_schulz"),
        _spec("sinkgd", "momentum SinkGD: identity rotation, Sinkhorn f", rotation="identity", base="sinkhorn"),
        _spec("eigen-sinkhorn", "eigen-rotation (power iteration on M M^T), Sinkhorn f", rotation="eigen", base="sinkhorn"),
        _spec("eigen-adam", "eigen-rotation, Adam f: one-sided SOAP-like", rotation="eigen", base="adam"),
        _spec("aro-sinkhorn", "ARO rotation, Sinkhorn f (the paper's default)", rotation="aro", base="sinkhorn"),
        _spec("aro-sign", "ARO rotation, sign f", rotation="aro", base="sign"),
        _spec("aro-adam", "ARO rotation, Adam f with look-ahead", rotation="aro", base="adam"),
        _spec("aro-rownorm", "ARO rotation, row-norm f (converges toward Muon)", rotation="aro", base="row_norm"),
        _spec("aro-sinkhorn-full", "ARO-Sinkhorn on every matrix, embeddings and LM head too", mode="full"),
        # rotations shared along the residual stream (aro.sharing)
        _spec("aro-sinkhorn-global", "ARO-Sinkhorn, one rotation for the residual stream", sharing="global"),
        _spec("aro-sinkhorn-chain", "ARO-Sinkhorn, chain-coupled rotations between blocks", sharing="chain"),
        _spec("aro-sinkhorn-global-full", "global shared rotation, full-model mode", mode="full", sharing="global"),
        _spec("aro-sinkhorn-chain-full", "chain-coupled rotations, full-model mode", mode="full", sharing="chain"),
        _spec("aro-sinkhorn-chain-stack", "chain-coupled, f on the stacked momenta", sharing="chain", estimator="stack"),
        # ablations of the options aro.ARO exposes (not in the standard preset)
        _spec("aro-sinkhorn-ema", "ARO-Sinkhorn with the paper's plain EMA momentum (no Nesterov)", nesterov=False),
        _spec("aro-sinkhorn-alternating", "ARO-Sinkhorn, SinkGD's alternating Sinkhorn", sinkhorn_variant="alternating"),
        _spec("aro-sinkhorn-scqr", "ARO-Sinkhorn with shifted Cholesky QR", qr="shifted_cholesky"),
        _spec("aro-sinkhorn-every4", "ARO-Sinkhorn, a new rotation every 4th step", rotation_every=4),
        _spec("aro-sinkhorn-bf16", "ARO-Sinkhorn with the products by R in bfloat16", matmul_dtype=torch.bfloat16),
        _spec("aro-sinkhorn-rows", "ARO-Sinkhorn rotating the rows (out side) of every matrix", orientation="rows"),
        _spec("polar-sinkhorn", "exact Procrustes (polar) rotation, Sinkhorn f", rotation="polar"),
        _spec("eigen-exact-sinkhorn", "exact eigenvectors of M M^T (eigh), Sinkhorn f", rotation="eigen_exact"),
    ]
}


def build_optimizers(name: str, model: nn.Module, lr: float, weight_decay: float,
                     process_group=None) -> list[torch.optim.Optimizer]:
    """The optimizers of registry entry ``name`` covering every parameter of ``model`` once.

    ``process_group`` (data-parallel replicas, DDP) lets ``aro.ARO`` split its rotation work
    across ranks; sharded (FSDP2) parameters are detected by ``aro.ARO`` itself.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    opts = OPTIMIZERS[name].build(model, lr, weight_decay, process_group)
    covered = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    expected = {id(p) for p in model.parameters()}
    if len(covered) != len(set(covered)) or set(covered) != expected:
        raise RuntimeError(f"optimizer {name!r} does not cover every parameter exactly once")
    return opts
