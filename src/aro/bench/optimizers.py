"""The optimizers under test: one registry, whose names are the CLI choices.

Each entry is an :class:`OptimizerSpec`: how to build it on a model and on one matrix, its
matrix-multiply FLOP model, whether it runs on FSDP2-sharded parameters and on 3-D expert
tensors, how many optimizer steps one timed call makes, the dtype of its products, and every
hyperparameter that is not swept with its source. The bench modules read these fields; none of
them branches on an optimizer's name.

Learning-rate scale: the ARO variants and both Muons RMS-match every matrix update to 0.2
(AdamW's typical update RMS), so one lr grid serves all (RMS matching, the paper's §5.1). All
matrix methods but ``aro-sinkhorn-full`` and ``soap`` are *hybrid*: embeddings, LM head,
routers, norm gains and biases are trained by ``torch.optim.AdamW`` with the same lr, betas
(0.9, 0.95), eps 1e-8 and weight decay.

``muon`` is :class:`torch.optim.Muon` (``adjust_lr_fn="match_rms_adamw"``) on the hidden 2-D
matrices. ``torch.optim.Muon`` accepts only 2-D parameters, so 3-D expert tensors (MoE model)
get the same update through :class:`aro.ARO` with the rotation-equivariant Newton-Schulz base,
identity rotation and Nesterov momentum, which is Muon with exact RMS matching.

``muon-fp32`` is that same Muon update on every hidden matrix, batched by shape, with its
Newton-Schulz products in float32. ``torch.optim.Muon`` runs them in bfloat16, which is fast on
GPUs and on CPUs with bfloat16 instructions, but is emulated on CPUs without them;
``muon-fp32`` is then the fair Muon to time against.

The competitors (docs/BENCHMARK.md says why each package):

* ``soap`` -- ``pytorch_optimizer.SOAP`` (Vyas et al., arXiv 2409.11321) on *every* parameter,
  as its authors use it: Adam in the eigenbasis of Shampoo's two Kronecker factors, refreshed
  every 10 steps; vectors get plain Adam. Its update has Adam's scale, but its best lr on the
  standard preset lies far above AdamW's, on the matrix methods' grid.
* ``normuon`` -- ``pytorch_optimizer.NorMuon`` (Li et al., arXiv 2510.05491) on the hidden
  matrices: Muon's orthogonalized momentum, then each row divided by an EMA of its mean square,
  rescaled to RMS 0.2 (``update_scale="match_rms"``, the paper's Algorithm 1).
* ``adamuon`` -- ``pytorch_optimizer.AdaMuon`` (Si et al., arXiv 2507.11005) on the hidden
  matrices: an elementwise second moment of the orthogonalized momentum, rescaled to RMS 0.2
  (``use_adjusted_lr=True``, the package default and the paper's RMS alignment).
* ``dion`` / ``dion-full`` -- :class:`aro.bench.dion.Dion` (Ahn et al., arXiv 2504.05295),
  written from the paper, rank fraction 1/4 / 1, with its authors' √(fan_out/fan_in) step scale
  and one lr shared with the AdamW part (as in their training configurations); ``dion-rms``
  RMS-matches each update to 0.2 instead, the treatment every Muon-like entry gets, so that a
  gap between Dion and the others is not the step scale's doing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import aro

from .dion import Dion, dion_rank

__all__ = ["ADAMW_BETAS", "BASELINES", "OPTIMIZERS", "OptimizerSpec", "build_optimizers", "check_mode"]

# The entries every summary compares the others with (speedups, paired intervals).
BASELINES = ("adamw", "muon")

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
ADAMW_HYPERPARAMETERS = {"adamw.betas": "(0.9, 0.95): the paper's AdamW baseline", "adamw.eps": "1e-8: torch default"}

Builder = Callable[..., list[torch.optim.Optimizer]]  # (model, lr, wd, process_group)
MatrixBuilder = Callable[[nn.Parameter, float, float], torch.optim.Optimizer]  # (matrix, lr, wd)
FlopModel = Callable[[int, int], float]  # matmul FLOPs of one (amortized) step on one m x n matrix


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry: what the bench needs to know about an optimizer, as data.

    ``scope`` says which parameters its own method steps: ``"hidden"`` (hidden matrices; AdamW
    takes embeddings, head, routers and vectors), ``"matrices"`` (every matrix, ARO's full mode),
    ``"all"`` (every parameter, e.g. SOAP) or ``"none"`` (AdamW alone). ``matrix_flops`` is the
    matrix-multiply FLOP model of one step on one ``m x n`` matrix, counted over the parameters
    of ``scope`` (leading dimensions multiply it). ``build_matrix`` builds the method on one
    hidden matrix for ``aro stepbench``; ``None`` where it has no single-matrix form (rotations
    shared across matrices).
    """

    name: str
    description: str
    build: Builder
    matrix_flops: FlopModel
    scope: str = "hidden"
    build_matrix: MatrixBuilder | None = None
    fsdp2: bool = True
    expert_tensors: bool = True
    steps_per_call: int = 1
    products_dtype: torch.dtype = torch.float32
    hyperparameters: dict[str, str] = field(default_factory=dict)
    aro_options: dict[str, Any] = field(default_factory=dict)

    def step_flops(self, model: nn.Module) -> float:
        """Matrix-multiply FLOPs of one optimizer step on ``model`` under this entry's split."""
        total = 0.0
        for p, role in aro.classify_parameters(model).values():
            if p.ndim < 2 or not _in_scope(self.scope, role):
                continue
            total += math.prod(p.shape[:-2]) * self.matrix_flops(p.shape[-2], p.shape[-1])
        return total


def _in_scope(scope: str, role: str) -> bool:
    return {"none": False, "hidden": role == "matrix", "matrices": role != "vector", "all": True}[scope]


# ---------------------------------------------------------------- FLOP models (m x n matrix)
def aro_flops(m: int, n: int, rotation: str = "aro", every: int = 1) -> float:
    """One ARO step on an ``m x n`` matrix whose rotated side is ``s = min(m, n)`` and other side
    ``t = max(m, n)``: :math:`Z_0 = R_{t-1}^\\top M`, the cross-Gram :math:`M f(Z_0)^\\top`,
    :math:`Z_1 = R_t^\\top M` and the update :math:`R_t f(Z_1)` (four products of :math:`2s^2t`)
    and a QR with its Q (:math:`\\tfrac83 s^3`); the eigen policy forms :math:`M (R^\\top M)^\\top`
    in place of the cross-Gram, at the same cost. With a new rotation every ``every`` steps the
    update's two products run every step and the rest is amortized."""
    s, t = min(m, n), max(m, n)
    if rotation == "identity":
        return 0.0
    new_rotation = 2 * 2.0 * s * s * t + 8.0 / 3.0 * s**3
    return 2 * 2.0 * s * s * t + new_rotation / every


def muon_flops(m: int, n: int, steps: int = 5) -> float:
    """Quintic Newton-Schulz: per iteration :math:`A = XX^\\top` (:math:`2s^2t`),
    :math:`B = bA + cA^2` (:math:`2s^3`) and :math:`BX` (:math:`2s^2t`)."""
    s, t = min(m, n), max(m, n)
    return steps * (4.0 * s * s * t + 2.0 * s**3)


def dion_flops(m: int, n: int, rank_fraction: float = 0.25) -> float:
    """B Q, Bᵀ P, the error feedback P Rᵀ and the update P Qᵀ (each :math:`2mnr`) and the QR
    of the ``m x r`` matrix P with its Q (:math:`4mr^2 - \\tfrac43 r^3`)."""
    r = dion_rank((m, n), rank_fraction)
    return 4 * 2.0 * m * n * r + 4.0 * m * r * r - 4.0 / 3.0 * r**3


def soap_flops(m: int, n: int, every: int = 10) -> float:
    """Per step: the two Kronecker factors :math:`GG^\\top`, :math:`G^\\top G` and three
    two-sided projections (gradient and first moment into the eigenbasis, the update back),
    :math:`2mn(m+n)` each; every ``every`` steps, per side of size k, the power-iteration
    product (:math:`2k^3`) and its QR with Q (:math:`\\tfrac83 k^3`)."""
    per_step = 4 * 2.0 * m * n * (m + n)
    refresh = (2.0 + 8.0 / 3.0) * (m**3 + n**3)
    return per_step + refresh / every


def _no_flops(m: int, n: int) -> float:
    return 0.0


# ---------------------------------------------------------------- builders
def _adamw(params, lr: float, wd: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=wd)


def _hidden_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(hidden 2-D matrices, hidden matrices with leading batch dimensions, everything else)."""
    roles = aro.classify_parameters(model)
    flat = [p for p, role in roles.values() if role == "matrix" and p.ndim == 2]
    batched = [p for p, role in roles.values() if role == "matrix" and p.ndim > 2]
    taken = {id(p) for p in flat + batched}
    return flat, batched, [p for p, _ in roles.values() if id(p) not in taken]


def _adamw_all(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
    return [_adamw(model.parameters(), lr, wd)]


def _torch_muon(params, lr: float, wd: float) -> torch.optim.Muon:
    return torch.optim.Muon(params, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")


def _muon(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
    flat, batched, rest = _hidden_split(model)
    opts: list[torch.optim.Optimizer] = [_torch_muon(flat, lr, wd), _adamw(rest, lr, wd)]
    if batched:
        opts.append(aro.ARO(batched, lr=lr, weight_decay=wd, base="newton_schulz", rotation="identity",
                            nesterov=True, process_group=process_group))
    return opts


def _hybrid(name: str, matrix_opt: MatrixBuilder | Callable[..., torch.optim.Optimizer]) -> Builder:
    """``matrix_opt`` on the hidden matrices, AdamW on the rest. A method that would flatten a
    3-D expert tensor into one matrix (``E x d·h``) instead of stepping its experts is refused."""

    def build(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
        flat, batched, rest = _hidden_split(model)
        if batched and not OPTIMIZERS[name].expert_tensors:
            raise ValueError(f"optimizer {name!r}: the package flattens 3-D expert tensors into one matrix instead "
                             "of stepping each expert; use a dense model, or dion / muon / aro-* for MoE models")
        return [matrix_opt(flat + batched, lr, wd), _adamw(rest, lr, wd)]

    return build


def _package(attr: str):
    try:
        import pytorch_optimizer
    except ImportError as err:  # the bench extra pins it
        raise ImportError(f"this registry entry needs pytorch-optimizer: pip install 'aro[bench]' ({err})") from None
    return getattr(pytorch_optimizer, attr)


SOAP_KWARGS = dict(betas=(0.95, 0.95), shampoo_beta=None, precondition_frequency=10, max_precondition_dim=10000,
                   merge_dims=False, precondition_1d=False, correct_bias=True, normalize_gradient=False, eps=1e-8)
NORMUON_KWARGS = dict(momentum=0.95, beta2=0.95, nesterov=True, ns_steps=5, update_scale="match_rms", eps=1e-10)
ADAMUON_KWARGS = dict(betas=(0.9, 0.95), ns_steps=5, use_adjusted_lr=True, eps=1e-10)


def _soap(params, lr: float, wd: float) -> torch.optim.Optimizer:
    return _package("SOAP")(params, lr=lr, weight_decay=wd, **SOAP_KWARGS)


def _soap_model(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
    return [_soap(model.parameters(), lr, wd)]


def _normuon(params, lr: float, wd: float) -> torch.optim.Optimizer:
    return _package("NorMuon")([dict(params=list(params), use_muon=True, lr=lr, weight_decay=wd)], **NORMUON_KWARGS)


def _adamuon(params, lr: float, wd: float) -> torch.optim.Optimizer:
    return _package("AdaMuon")([dict(params=list(params), use_muon=True, lr=lr, weight_decay=wd)], **ADAMUON_KWARGS)


def _dion(rank_fraction: float, rms_target: float | None = None) -> Callable[..., torch.optim.Optimizer]:
    def build(params, lr: float, wd: float) -> torch.optim.Optimizer:
        return Dion(list(params), lr=lr, mu=0.95, rank_fraction=rank_fraction, weight_decay=wd, rms_target=rms_target)

    return build


def _aro(mode: str = "hybrid", sharing: str = "none", **options: Any) -> Builder:
    def build(model: nn.Module, lr: float, wd: float, process_group=None) -> list[torch.optim.Optimizer]:
        # no_decay=(): the protocol decays every parameter, as torch.optim.AdamW does for the baselines
        groups = aro.param_groups(model, mode=mode, sharing=sharing, no_decay=())
        return [aro.ARO(groups, lr=lr, weight_decay=wd, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                        process_group=process_group, **options)]

    return build


def _aro_matrix(**options: Any) -> MatrixBuilder:
    def build(p: nn.Parameter, lr: float, wd: float) -> torch.optim.Optimizer:
        return aro.ARO([p], lr=lr, weight_decay=wd, **options)

    return build


def _spec(name: str, description: str, mode: str = "hybrid", sharing: str = "none", **options: Any) -> OptimizerSpec:
    """An :class:`aro.ARO` configuration."""
    rotation, every = options.get("rotation", "aro"), options.get("rotation_every", 1)
    muon_like = options.get("base") == "newton_schulz"
    flops = muon_flops if muon_like else (lambda m, n: aro_flops(m, n, rotation, every))
    return OptimizerSpec(
        name, description, _aro(mode, sharing, **options), flops, scope="hidden" if mode == "hybrid" else "matrices",
        build_matrix=_aro_matrix(**options) if sharing == "none" else None, steps_per_call=every,
        # "auto" picks bfloat16 only where it is native: never the slow emulation the dtype warns of
        products_dtype=md if isinstance(md := options.get("matmul_dtype"), torch.dtype) else torch.float32,
        hyperparameters=dict(ADAMW_HYPERPARAMETERS),
        aro_options={"mode": mode, "sharing": sharing, **options},
    )


def _single(builder: Callable[..., torch.optim.Optimizer]) -> MatrixBuilder:
    return lambda p, lr, wd: builder([p], lr, wd)


def _baseline_entries() -> list[OptimizerSpec]:
    """The paper's baselines: AdamW, ``torch.optim.Muon`` and Muon's update in float32."""
    return [
        OptimizerSpec("adamw", "torch.optim.AdamW on every parameter", _adamw_all, _no_flops, scope="none",
                      build_matrix=_single(_adamw), hyperparameters=dict(ADAMW_HYPERPARAMETERS)),
        OptimizerSpec("muon", "torch.optim.Muon (match_rms_adamw) on hidden matrices, AdamW elsewhere", _muon,
                      muon_flops, build_matrix=_single(_torch_muon), fsdp2=False, products_dtype=torch.bfloat16,
                      hyperparameters={"momentum": "0.95: torch default", "nesterov": "True: torch default",
                                       "ns_steps": "5: torch default", **ADAMW_HYPERPARAMETERS}),
        _spec("muon-fp32", "Muon's update in float32: Nesterov momentum, quintic Newton-Schulz, RMS 0.2, batched "
              "(aro.ARO with base='newton_schulz', rotation='identity')", rotation="identity", base="newton_schulz"),
    ]


def _competitor_entries() -> list[OptimizerSpec]:
    """Other matrix optimizers: SOAP, NorMuon and AdaMuon from ``pytorch_optimizer``, and Dion
    (:mod:`aro.bench.dion`) at rank 1/4, at full rank and RMS-matched."""
    return [
        OptimizerSpec("soap", "pytorch_optimizer.SOAP on every parameter (Adam in Shampoo's eigenbasis)", _soap_model,
                      soap_flops, scope="all", build_matrix=_single(_soap), fsdp2=False,
                      steps_per_call=SOAP_KWARGS["precondition_frequency"],  # timed over whole refresh periods
                      hyperparameters={k: f"{v!r}: package default = SOAP paper" for k, v in SOAP_KWARGS.items()}),
        OptimizerSpec("normuon", "pytorch_optimizer.NorMuon (row-normalized Muon, RMS 0.2) on hidden matrices",
                      _hybrid("normuon", _normuon), muon_flops, build_matrix=_single(_normuon), fsdp2=False,
                      expert_tensors=False, products_dtype=torch.bfloat16,
                      hyperparameters={**{k: f"{v!r}: package default = official NorMuon code"
                                          for k, v in NORMUON_KWARGS.items()},
                                       "update_scale": "'match_rms': RMS 0.2 as in the paper's Algorithm 1",
                                       **ADAMW_HYPERPARAMETERS}),
        OptimizerSpec("adamuon", "pytorch_optimizer.AdaMuon (second moment on the orthogonalized update, RMS 0.2) on "
                      "hidden matrices", _hybrid("adamuon", _adamuon), muon_flops, build_matrix=_single(_adamuon),
                      fsdp2=False, expert_tensors=False, products_dtype=torch.bfloat16,
                      hyperparameters={**{k: f"{v!r}: package default" for k, v in ADAMUON_KWARGS.items()},
                                       "sign step, Nesterov": "absent: the package has neither (docs/BENCHMARK.md)",
                                       **ADAMW_HYPERPARAMETERS}),
        OptimizerSpec("dion", "Dion, rank 1/4 (aro.bench.dion, from the paper) on hidden matrices, AdamW elsewhere",
                      _hybrid("dion", _dion(0.25)), dion_flops, build_matrix=_single(_dion(0.25)), fsdp2=False,
                      hyperparameters={"mu": "0.95: Dion paper", "rank_fraction": "0.25: Dion paper's default",
                                       "lr scale": "sqrt(fan_out/fan_in): Dion authors' default",
                                       **ADAMW_HYPERPARAMETERS}),
        OptimizerSpec("dion-full", "Dion at full rank on hidden matrices, AdamW elsewhere",
                      _hybrid("dion-full", _dion(1.0)), lambda m, n: dion_flops(m, n, 1.0),
                      build_matrix=_single(_dion(1.0)), fsdp2=False,
                      hyperparameters={"mu": "0.95: Dion paper", "rank_fraction": "1.0: full rank",
                                       "lr scale": "sqrt(fan_out/fan_in): Dion authors' default",
                                       **ADAMW_HYPERPARAMETERS}),
        OptimizerSpec("dion-rms", "Dion, rank 1/4, each update RMS-matched to 0.2 like the ARO and Muon entries",
                      _hybrid("dion-rms", _dion(0.25, 0.2)), dion_flops, build_matrix=_single(_dion(0.25, 0.2)),
                      fsdp2=False,
                      hyperparameters={"mu": "0.95: Dion paper", "rank_fraction": "0.25: Dion paper's default",
                                       "rms_target": "0.2: the benchmark's RMS matching (not the authors' scale)",
                                       **ADAMW_HYPERPARAMETERS}),
    ]


def _rotation_entries() -> list[OptimizerSpec]:
    """:class:`aro.ARO` configurations: the paper's rotation and base-optimizer variants, shared
    rotations, ablations of its options and exact-rotation references."""
    return [
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
        _spec("aro-sinkhorn-auto", "ARO-Sinkhorn, QR and product precision chosen by timing per shape",
              qr="auto", matmul_dtype="auto"),
        _spec("aro-sinkhorn-rows", "ARO-Sinkhorn rotating the rows (out side) of every matrix", orientation="rows"),
        _spec("polar-sinkhorn", "exact Procrustes (polar) rotation, Sinkhorn f", rotation="polar"),
        _spec("eigen-exact-sinkhorn", "exact eigenvectors of M M^T (eigh), Sinkhorn f", rotation="eigen_exact"),
    ]


def _entries() -> list[OptimizerSpec]:
    """The registry, in its order: baselines, other optimizers, ARO configurations."""
    return _baseline_entries() + _competitor_entries() + _rotation_entries()


OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in _entries()}


def check_mode(name: str, parallel: str) -> None:
    """Refuse, before anything is trained, an optimizer that cannot run in execution mode ``parallel``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    if parallel == "fsdp2" and not OPTIMIZERS[name].fsdp2:
        raise ValueError(f"--optimizers {name}: it cannot step FSDP2-sharded (DTensor) parameters; "
                         "use --parallel ddp, or an optimizer that supports FSDP2 (adamw, muon-fp32, aro-*)")


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
