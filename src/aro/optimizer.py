r"""``aro.ARO``: Adaptively Rotated Optimization as a drop-in :class:`torch.optim.Optimizer`.

The class only manages groups and state and dispatches to :mod:`aro.functional`; every piece
of math lives there. Matrices (2-D and batched 3-D parameters, flattened conv weights) take the
ARO path; everything else (and any group with ``algorithm="adamw"``) takes a built-in AdamW.
"""

from __future__ import annotations

import copy
import functools
import sys
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import state_keys as K
from .functional.adamw import adamw_
from .distributed.replicated import replicated_run_units
from .engine import expected_shapes, init_state, local_sources, plan_units, run_units, shared_owner
from .functional.projections import make_projection
from .validation import validate_group_keys, validate_hyperparameters, validate_param, validate_sharing

__all__ = ["ARO"]

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes (and keeps state) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ARO(Optimizer):
    r"""Adaptively Rotated Optimization (Gong et al., 2026, arXiv 2602.09006).

    Normed steepest descent in an adaptively rotated frame. For each (oriented) weight matrix
    :math:`W \in \mathbb{R}^{m\times n}` with gradient :math:`G`:

    .. math::
        \begin{aligned}
        &\textbf{input}: \eta\ (\text{lr}),\ \beta\ (\text{beta}),\ \lambda\ (\text{weight decay}),
            \ f\ (\text{base}),\ \rho\ (\text{rms\_target})\\
        &\textbf{initialize}: M_0 = 0,\ R_0 = I_m\\
        &\textbf{for}\ t = 1, 2, \ldots\\
        &\quad M_t = \beta M_{t-1} + (1-\beta) G_t\\
        &\quad \tilde M_t = \beta M_t + (1-\beta) G_t
            \quad(\text{Nesterov, default; } \tilde M_t = M_t \text{ with nesterov=False})\\
        &\quad R_t = \mathrm{QR}\big(\tilde M_t\, f(R_{t-1}^\top \tilde M_t)^\top\big)\\
        &\quad U_t = R_t\, f(R_t^\top \tilde M_t)\\
        &\quad W_t = (1-\eta\lambda)\, W_{t-1} - \eta\,\rho\, U_t/\mathrm{RMS}(U_t)\\
        &\textbf{return}\ W_t
        \end{aligned}

    Every matrix update is RMS-matched to :math:`\rho = 0.2`, AdamW's typical update RMS (the
    paper's §5.1), which puts the lr on AdamW's scale; whether AdamW's best lr is also ARO's
    depends on the training budget (README, "Choosing a learning rate"). Parameters that are not
    matrices (and groups with ``algorithm="adamw"``) get AdamW with ``betas``/``eps``.

    Args:
        params: parameters or param groups. With ``model.parameters()`` every matrix takes
            the ARO path; use :func:`aro.param_groups` to keep embeddings and the LM head on
            AdamW (the paper's hybrid mode). A group may set ``algorithm`` to ``"auto"``
            (default: ndim >= 2 -> ARO), ``"aro"`` or ``"adamw"``, ``matrix_view`` to
            ``"auto"`` or ``"flatten"`` (see :mod:`aro.layout`), and any argument below.
        lr: learning rate (default 1e-3). Start at a tuned AdamW lr for compute-optimal or
            longer training (up to 4x it for short runs), or at the lr of ``torch.optim.Muon``
            with ``adjust_lr_fn="match_rms_adamw"``, and sweep x2 around it (README,
            "Choosing a learning rate").
        beta: momentum EMA coefficient :math:`\beta` (default 0.95, the paper's).
        weight_decay: decoupled weight decay :math:`\lambda`, both paths (default 0.01, as AdamW).
        base: base projection f: ``"sinkhorn"`` (default, the paper's strongest variant),
            ``"sign"``, ``"row_norm"``, ``"identity"``, ``"adam"`` (with look-ahead),
            ``"newton_schulz"`` (rotation-equivariant: Muon) or a callable ``f(X) -> Tensor``
            on ``(..., m, n)`` batches.
        rotation: policy, one of ``"aro"`` (default), ``"eigen"``, ``"eigen_exact"``,
            ``"polar"``, ``"identity"`` (see :mod:`aro.functional.rotation`).
        qr: ``"householder"`` (default; exact and, on CPU, as fast as the alternative) or
            ``"shifted_cholesky"`` (GEMM-based, for GPUs; falls back to Householder per matrix).
        sinkhorn_iters: Sinkhorn iterations K (default 5, the paper's).
        sinkhorn_variant: ``"simultaneous"`` (default, as the paper writes it) or ``"alternating"``.
        nesterov: use the Nesterov momentum :math:`\tilde M_t` for rotation and update
            (default True: in our benchmark it lowers ARO-Sinkhorn's loss clearly, see the
            README's "Ablations" table: 1.450 vs 1.481 final loss, 1.05x vs 0.95x Muon's steps --
            and it is torch.optim.Muon's default; False is the paper's EMA).
        rms_target: update RMS :math:`\rho` (default 0.2); ``None`` leaves f's RMS 1.
        orientation: which side the rotation acts on: ``"auto"`` (default; the smaller side,
            so no rotation exceeds the matrix rank), ``"rows"`` or ``"cols"``.
        estimator: how a rotation shared by several matrices (a group's ``shared`` plan, made
            by :func:`aro.param_groups` with ``sharing="global"|"chain"``) is estimated:
            ``"sum"`` (default) of the members' cross-Grams, or ``"stack"``: f on the stacked
            momenta (see :mod:`aro.functional.rotation`). No effect without sharing.
        rotation_every: compute a new rotation every ``k``-th step of a matrix (its steps
            1, k+1, 2k+1, ...) and keep :math:`R_t = R_{t-1}` in between, which skips the
            cross-Gram, its look-ahead f and the QR on those steps (default 1: every step, the
            paper's algorithm; see the README's step-cost section for what larger k costs in
            steps and saves in time).
        matmul_dtype: ``None`` (default: products in the state's dtype, float32),
            ``torch.bfloat16`` or ``torch.float16``: the products with :math:`R`
            (:math:`R^\top M`, the cross-Gram, :math:`R f(\cdot)`) run in that dtype, as Muon's
            Newton-Schulz does in bfloat16; f, the QR and the state stay float32 (see the
            README's step-cost section). ``torch.float32`` is the same as ``None``.
        betas: AdamW path :math:`(\beta_1, \beta_2)` (default (0.9, 0.95), LLM practice);
            :math:`\beta_2` is also the Adam projection's.
        eps: AdamW path and Adam projection epsilon (default 1e-8).
        maximize: maximize the objective instead of minimizing.
        nonfinite: what to do with a parameter whose gradient has NaN/Inf: ``"skip"``
            (default; its step is skipped, its state untouched, counted in :meth:`stats`,
            one warning) or ``"raise"`` (``FloatingPointError`` naming the parameter).
        differentiable: not supported; must be False.
        process_group: ``None`` (default), a ``ProcessGroup`` or a 1-D ``DeviceMesh``. With
            replicated parameters (DDP) a group splits the rotation work across its ranks
            (see :mod:`aro.distributed.replicated`); without one every rank computes
            everything. DTensor parameters (FSDP2 ``fully_shard``) are detected by themselves
            and use their mesh (see :mod:`aro.distributed.sharded`). The library never calls
            ``init_process_group``.

    State (per parameter, documented in :mod:`aro.state_keys`): ``step``,
    ``momentum_buffer``, ``rotation``, ``orientation``, ``exp_avg_sq`` (Adam projection) on
    the ARO path; ``step``, ``exp_avg``, ``exp_avg_sq`` on the AdamW path. State is float32
    for float32/bf16/fp16 parameters and float64 for float64 parameters.

    Departures from the paper: the Sinkhorn scaling is iterated on its scaling vectors and,
    like row-norm, never written out: :math:`f(Z) = D_a Z D_b` enters the products as
    :math:`(M D_b) Z^\top D_a` and :math:`(R D_a) Z D_b` (same result, fewer passes over memory;
    a user callable f is written out); every f output is renormalized to RMS 1; a zero or
    non-finite cross-Gram keeps the previous rotation.

    References:
        W. Gong et al., *A New Lens On Matrix Optimization For Large Models*, arXiv 2602.09006.
        M. Scetbon et al., *Gradient Multi-Normalization for Stateless and Scalable LLM
        Training* (SinkGD), arXiv 2502.06742.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        beta: float = 0.95,
        weight_decay: float = 0.01,
        base: str | Callable[[Tensor], Tensor] = "sinkhorn",
        rotation: str = "aro",
        qr: str = "householder",
        sinkhorn_iters: int = 5,
        sinkhorn_variant: str = "simultaneous",
        nesterov: bool = True,
        rms_target: float | None = 0.2,
        orientation: str = "auto",
        estimator: str = "sum",
        rotation_every: int = 1,
        matmul_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        maximize: bool = False,
        nonfinite: str = "skip",
        differentiable: bool = False,
        process_group: Any = None,
    ) -> None:
        if differentiable:
            raise ValueError("Invalid differentiable: True; ARO does not support differentiating through its step")
        defaults = dict(
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            base=base,
            rotation=rotation,
            qr=qr,
            sinkhorn_iters=sinkhorn_iters,
            sinkhorn_variant=sinkhorn_variant,
            nesterov=nesterov,
            rms_target=rms_target,
            orientation=orientation,
            betas=betas,
            eps=eps,
            maximize=maximize,
            nonfinite=nonfinite,
            algorithm="auto",
            matrix_view="auto",
            shared=None,
            estimator=estimator,
            rotation_every=rotation_every,
            matmul_dtype=matmul_dtype,
        )
        validate_hyperparameters(defaults)
        self._counters: dict[tuple[str, torch.device], Tensor] = {}
        self._last_qr_count = 0
        self._last_loads: list[float] = []
        self._warned_nonfinite = False
        self._process_group: Any = None
        self._mode = "local"
        super().__init__(params, defaults)
        self._setup_distribution(process_group)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated: keys, hyperparameters, parameter dtypes, algorithm vs shape).

        A misspelled key is an error naming the closest valid one (torch would keep it silently
        and use the default). A group without names added to named groups (those of
        :func:`aro.param_groups`) gets names ``added.<group>.<index>``, since torch refuses to mix
        named and unnamed groups.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"add_param_group takes a dict like {{'params': [...]}}, got {type(param_group).__name__}")
        validate_group_keys(param_group, self.defaults)
        if self.param_groups and "param_names" in self.param_groups[0] and not _is_named(param_group):
            param_group = _name_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_hyperparameters(group)
            for i, p in enumerate(group["params"]):
                validate_param(group, p, _param_label(group, i, p))
            validate_sharing(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    @staticmethod
    def _uses_aro(group: dict[str, Any], p: Tensor) -> bool:
        algorithm = group["algorithm"]
        return algorithm == "aro" or (algorithm == "auto" and p.ndim >= 2)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Excluded from ``torch.compile``: ``torch.compile(opt.step)`` (PyTorch's recipe for
        compiled optimizers) runs this step eagerly instead of tracing it into a storm of graph
        breaks (README, "torch.compile"). The exclusion needs TorchDynamo, which is loaded only
        where something compiles; importing it here would double the import time of ``aro``.
        """
        if "torch._dynamo" in sys.modules:
            return _eager_step(type(self))(self, closure)
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last_qr_count = 0
        self._last_loads = []
        skipped: list[str] = []
        for group in self.param_groups:
            params = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"ARO does not support sparse gradients ({_param_label(group, i, p)}); "
                        "use a dense embedding (sparse=False) or torch.optim.SparseAdam for it"
                    )
                if p.numel() == 0:
                    continue  # nothing to update (global size: every rank decides alike)
                params.append(p)
            params = self._screen_nonfinite(group, params, skipped)
            self._adamw_step(group, [p for p in params if not self._uses_aro(group, p)])
            self._aro_step(group, [p for p in params if self._uses_aro(group, p)])
        if skipped and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"ARO skipped the step of {len(skipped)} parameter(s) with a non-finite gradient: "
                f"{'; '.join(skipped)} (nonfinite='skip'; state untouched; see ARO.stats()['nonfinite_skips']). "
                "Further skips are counted, not warned.",
                RuntimeWarning,
                stacklevel=4,  # the caller of opt.step(), past step, _step and torch's step wrapper
            )
        return loss

    def _screen_nonfinite(self, group: dict[str, Any], params: list[Tensor], skipped: list[str]) -> list[Tensor]:
        """Drop (or raise for) parameters whose gradient holds NaN or Inf; one host sync. The
        labels of dropped parameters are appended to ``skipped`` (one warning per step names all)."""
        if not params:
            return params
        grads = [_local(p.grad) for p in params]
        finite = _finite_tensors(grads)
        if self._process_group is not None:  # every rank must take the same decision
            bad_flags = (~finite).to(torch.int32)
            torch.distributed.all_reduce(bad_flags, group=self._process_group)
            finite = bad_flags == 0
        finite = finite.cpu()
        if bool(finite.all()):
            return params
        bad = [p for p, ok in zip(params, finite.tolist()) if not ok]
        labels = [_param_label(group, _index_of(group, p), p) for p in bad]
        if group["nonfinite"] == "raise":
            raise FloatingPointError(f"non-finite gradient in {', '.join(labels)}")
        self._count("nonfinite_skips", torch.tensor(len(bad)))
        skipped += labels
        return [p for p, ok in zip(params, finite.tolist()) if ok]

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                dt = _compute_dtype(p.dtype)
                state[K.STEP] = torch.tensor(0.0)
                state[K.EXP_AVG] = _zeros_like(p, dt)
                state[K.EXP_AVG_SQ] = _zeros_like(p, dt)
        beta1, beta2 = group["betas"]
        adamw_(
            [_local(p) for p in params],
            [_local(p.grad) for p in params],
            [_local(self.state[p][K.EXP_AVG]) for p in params],
            [_local(self.state[p][K.EXP_AVG_SQ]) for p in params],
            [self.state[p][K.STEP] for p in params],
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )

    def _aro_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if not params:
            return
        index = {id(p): i for i, p in enumerate(group["params"])}
        owners = shared_owner(group)
        # a shared rotation lives on its owner, which needs state even when it has no gradient
        needing = params + [group["params"][owners[index[id(p)]][0]] for p in params if index[id(p)] in owners]
        for p in needing:
            if not self.state[p]:
                wrap = None
                if self._mode == "sharded":
                    from .distributed.sharded import shard_like  # imports torch.distributed.tensor

                    wrap = lambda t, p=p: shard_like(t, p)  # noqa: E731
                init_state(group, index[id(p)], p, self.state[p], _compute_dtype(p.dtype), wrap=wrap)
        states = [self.state[p] for p in params]
        bufs = [_local(s[K.MOMENTUM]) for s in states]
        grads = [_local(p.grad).to(b.dtype) for p, b in zip(params, bufs)]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        # M = beta*M + (1-beta)*G
        torch._foreach_lerp_(bufs, grads, 1.0 - group["beta"])
        torch._foreach_add_([s[K.STEP] for s in states], 1)
        f = make_projection(
            group["base"],
            sinkhorn_iters=group["sinkhorn_iters"],
            sinkhorn_variant=group["sinkhorn_variant"],
            beta2=group["betas"][1],
            eps=group["eps"],
        )
        units = plan_units(group, params, self.state)
        adam = group["base"] == "adam"
        if self._mode == "sharded":
            # beta*M + (1-beta)*G on the local rows
            momentum = {id(p): torch.lerp(g, b, group["beta"]) if group["nesterov"] else b
                        for p, g, b in zip(params, grads, bufs)}
            from .distributed.sharded import sharded_run_units

            updates, n_rotations, loads = sharded_run_units(
                group, units, momentum, self.state, f, self._count, self._process_group, adam
            )
        else:
            src = local_sources(group, params, grads, self.state)
            if self._mode == "replicated":
                updates, n_rotations, loads = replicated_run_units(
                    group, units, src, f, self._count, self._process_group, adam
                )
            else:
                updates, n_rotations = run_units(group, units, src, f, self._count)
                loads = []
        self._last_qr_count += n_rotations
        self._last_loads = [a + b for a, b in zip(self._last_loads, loads)] if self._last_loads else loads
        _apply_update_([_local(p) for p in params], [updates[id(p)] for p in params], lr=float(group["lr"]),
                       weight_decay=group["weight_decay"])

    def _setup_distribution(self, process_group: Any) -> None:
        """local / replicated (DDP work split) / sharded (FSDP2 DTensor parameters)."""
        params = [p for g in self.param_groups for p in g["params"]]
        sharded = [p for p in params if _is_dtensor(p)]
        pg = _normalize_process_group(process_group)
        if sharded:
            if len(sharded) != len(params):
                raise ValueError("ARO got a mix of DTensor and regular parameters; shard all of them (fully_shard) or none")
            for i, p in enumerate(sharded):
                if p.device_mesh.ndim != 1 or any(type(pl).__name__ != "Shard" or pl.dim != 0 for pl in p.placements):
                    raise ValueError(
                        f"ARO supports DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2 fully_shard); "
                        f"parameter {i} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh"
                    )
            mesh_group = sharded[0].device_mesh.get_group()
            self._process_group = pg if pg is not None else mesh_group
            self._mode = "sharded"
        elif pg is not None:
            self._process_group = pg
            self._mode = "replicated"
        else:
            self._process_group = None
            self._mode = "local"

    # ------------------------------------------------------------------ stats
    def _count(self, name: str, value: Tensor) -> None:
        key = (name, value.device)
        prev = self._counters.get(key)
        self._counters[key] = value if prev is None else prev + value

    def stats(self) -> dict[str, int]:
        """Counters since construction: ``qr_fallbacks`` (shifted-Cholesky matrices redone by
        Householder), ``degenerate_rotations`` (zero/non-finite cross-Grams that kept the
        previous rotation), ``nonfinite_skips`` (parameter steps skipped for NaN/Inf
        gradients), ``qr_per_step`` (rotations computed by this rank in the last step) and, when
        the work is split across ranks, ``rotation_cost_by_rank`` (last step's rotation FLOPs, up
        to a constant, assigned to each rank)."""
        out = {"qr_fallbacks": 0, "degenerate_rotations": 0, "nonfinite_skips": 0}
        for (name, _), value in self._counters.items():
            out[name] += int(value)
        out["qr_per_step"] = self._last_qr_count
        out["rotation_cost_by_rank"] = list(self._last_loads)
        return out

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, checked against the parameters; state keeps its saved dtype.

        Raises ``ValueError`` naming the parameter when a saved state does not fit it (other
        model, changed shapes, other orientation). Tensors are copied, never aliased to the
        given ``state_dict``, and float32 state of bf16 parameters stays float32 (torch's
        default loader would cast it to bf16).
        """
        saved_groups = state_dict["param_groups"]
        _check_grouping(saved_groups, self.param_groups)
        saved_state = state_dict["state"]
        pairs: list[tuple[Tensor, dict[str, Any]]] = []
        for group, saved in zip(self.param_groups, saved_groups):
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                if pid in saved_state:
                    _check_saved_state(saved, i, p, saved_state[pid], _param_label(group, i, p))
                    pairs.append((p, saved_state[pid]))
        super().load_state_dict(state_dict)
        for p, saved in pairs:
            self.state[p] = {k: _copy_state_value(k, v, p) for k, v in saved.items()}


# ---------------------------------------------------------------------- helpers
def _apply_update_(params: list[Tensor], updates: list[Tensor], *, lr: float, weight_decay: float) -> None:
    """W = (1 - lr*wd)*W - lr*U; low-precision parameters are rounded once, at the end."""
    same = [i for i, p in enumerate(params) if p.dtype == updates[i].dtype]
    if same:
        ps = [params[i] for i in same]
        if weight_decay:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        torch._foreach_add_(ps, [updates[i] for i in same], alpha=-lr)
    for p, u in zip(params, updates):
        if p.dtype != u.dtype:
            p.copy_(p.to(u.dtype).mul_(1.0 - lr * weight_decay).add_(u, alpha=-lr))


def _finite_tensors(tensors: list[Tensor]) -> Tensor:
    """Bool vector: which tensors hold no NaN/Inf (on the first tensor's device).

    One multi-tensor 2-norm pass: NaN and Inf make the norm non-finite. A norm can also
    overflow for a large but finite tensor (1e30 is a legal float32 gradient), so those few are
    checked again exactly, by their min and max.
    """
    device = tensors[0].device
    idx = [i for i, t in enumerate(tensors) if t.numel()]
    finite = torch.ones(len(tensors), dtype=torch.bool, device=device)
    if idx:
        norms = torch._foreach_norm([tensors[i] for i in idx])
        if any(n.device != device or n.dtype != norms[0].dtype for n in norms):
            norms = [n.float().to(device) for n in norms]
        finite[idx] = torch.isfinite(torch.stack(norms))
    if not bool(finite.all()):
        for i in (~finite).nonzero().flatten().tolist():
            finite[i] = bool(torch.isfinite(torch.stack(torch.aminmax(tensors[i]))).all())
    return finite


@functools.cache
def _eager_step(cls: type) -> Callable[..., Any]:
    """``cls._step`` excluded from TorchDynamo: one recorded skip, then the eager step."""
    return torch.compiler.disable(cls._step, reason="ARO's step is data-dependent batched linear algebra (QR, "
                                  "Sinkhorn, bucketing by shape); tracing it breaks the graph at every such call")


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard, any other tensor itself (without importing torch.distributed.tensor,
    which ``import aro`` avoids: it is slow to import and only FSDP2 users need it)."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" or (hasattr(t, "device_mesh") and hasattr(t, "placements"))


def _zeros_like(p: Tensor, dtype: torch.dtype) -> Tensor:
    if _is_dtensor(p):
        return torch.zeros_like(p, dtype=dtype)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)


def _normalize_process_group(pg: Any) -> Any:
    """ProcessGroup, 1-D DeviceMesh or None; anything else is a TypeError."""
    if pg is None:
        return None
    if not torch.distributed.is_available():
        raise TypeError("process_group needs torch.distributed, which this torch build lacks")
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(pg, DeviceMesh):
        if pg.ndim != 1:
            raise ValueError(f"Invalid process_group: a {pg.ndim}-D DeviceMesh; pass a 1-D mesh or one of its groups")
        return pg.get_group()
    if isinstance(pg, ProcessGroup):
        return pg
    raise TypeError(
        f"Invalid process_group: {type(pg).__name__}; expected None, a torch.distributed.ProcessGroup or a DeviceMesh"
    )


_REGROUP = ("rebuild the optimizer with the grouping it was saved with (the same aro.param_groups(model, mode=..., "
            "sharing=..., no_decay=...); checkpoints from before no_decay existed need no_decay=()), or load only "
            "the model and start a fresh optimizer")
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")


def _unwrapped(name: str) -> str:
    """A parameter name without the prefixes torch.compile, DDP and FSDP1 wrappers add."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
        name = name.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
    return name


def _sharing_plan(group: dict[str, Any]) -> list | None:
    plan = group.get("shared")
    return None if plan is None else [[list(entry) for entry in spec] for spec in plan]


def _check_grouping(saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """The saved optimizer must group the parameters as this one does; say so before any
    per-parameter check would report a confusing shape error about an unrelated parameter."""
    if len(saved_groups) != len(groups):
        raise ValueError(f"the saved optimizer state has {len(saved_groups)} parameter groups, this optimizer has "
                         f"{len(groups)}: the grouping (mode, sharing) differs; {_REGROUP}")
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        mine, theirs = _sharing_plan(group), _sharing_plan(saved)
        if mine != theirs:
            describe = lambda plan: "no shared rotations" if plan is None else f"{len(plan)} shared rotation(s)"
            raise ValueError(f"param_groups[{g}]: saved with {describe(theirs)}, this optimizer has {describe(mine)}: "
                             f"the sharing plan differs; {_REGROUP}")
        names, saved_names = group.get("param_names"), saved.get("param_names")
        if names is not None and saved_names is not None:
            mine_n, theirs_n = [_unwrapped(n) for n in names], [_unwrapped(n) for n in saved_names]
            if mine_n != theirs_n:
                i = next(i for i, (a, b) in enumerate(zip(mine_n + [None], theirs_n + [None])) if a != b)
                here = mine_n[i] if i < len(mine_n) else "nothing"
                there = theirs_n[i] if i < len(theirs_n) else "nothing"
                raise ValueError(f"param_groups[{g}] holds other parameters than the saved one (at index {i}: "
                                 f"{here!r} here, {there!r} saved); the grouping differs; {_REGROUP}")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param_groups[{g}] has {len(group['params'])} parameters, the saved one "
                             f"{len(saved['params'])}: the grouping differs; {_REGROUP}")


def _is_named(group: dict[str, Any]) -> bool:
    params = group["params"]
    if isinstance(params, Tensor):
        return False
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs; use a list")
    params = list(params)
    group["params"] = params  # a generator is read once
    return "param_names" in group or (bool(params) and isinstance(params[0], tuple))


def _name_group(group: dict[str, Any], g: int) -> dict[str, Any]:
    params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
    return {**group, "params": [(f"added.{g}.{i}", p) for i, p in enumerate(params)]}


def _param_label(group: dict[str, Any], index: int, p: Tensor) -> str:
    names = group.get("param_names")
    name = f"{names[index]!r} " if names and index < len(names) else ""
    return f"parameter {name}(index {index}, shape {tuple(p.shape)}, dtype {p.dtype})"


def _index_of(group: dict[str, Any], p: Tensor) -> int:
    return next(i for i, q in enumerate(group["params"]) if q is p)


def _copy_state_value(key: str, value: Any, p: Tensor) -> Any:
    if isinstance(value, Tensor):
        if key == K.STEP:
            return value.detach().clone()
        return value.detach().to(device=p.device, copy=True)
    return copy.deepcopy(value)


def _check_saved_state(group: dict[str, Any], index: int, p: Tensor, st: dict[str, Any], label: str) -> None:
    """Raise ValueError if the saved state ``st`` cannot belong to parameter ``index`` of ``group``."""
    for key in (K.MOMENTUM, K.EXP_AVG):
        if key in st and tuple(st[key].shape) != tuple(p.shape):
            raise ValueError(f"saved state {key!r} has shape {tuple(st[key].shape)}, which does not fit {label}")
    if K.ORIENTATION not in st:
        if K.EXP_AVG_SQ in st and tuple(st[K.EXP_AVG_SQ].shape) != tuple(p.shape):
            raise ValueError(f"saved state 'exp_avg_sq' has shape {tuple(st[K.EXP_AVG_SQ].shape)}, which does not fit {label}")
        return
    orientation = st[K.ORIENTATION]
    if orientation not in ("rows", "cols"):
        raise ValueError(f"saved state 'orientation' is {orientation!r} for {label}; expected 'rows' or 'cols'")
    if p.ndim < 2:
        raise ValueError(f"saved state holds a rotation, but {label} is not a matrix")
    owners = shared_owner(group)
    if index in owners and owners[index][1] != orientation:
        raise ValueError(f"saved orientation {orientation!r} of {label} differs from the sharing plan's {owners[index][1]!r}")
    for key, shape in expected_shapes(group, index, p, orientation).items():
        if shape is not None and key in st and tuple(st[key].shape) != shape:
            raise ValueError(f"saved state {key!r} has shape {tuple(st[key].shape)}, expected {shape} for {label}")
