r"""``aro.ARO``: Adaptively Rotated Optimization as a drop-in :class:`torch.optim.Optimizer`.

The class only manages groups and state and dispatches to :mod:`aro.functional`; every piece
of math lives there. Matrices (2-D and batched 3-D parameters, flattened conv weights) take the
ARO path; everything else (and any group with ``algorithm="adamw"``) takes a built-in AdamW.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import state_schema as S, tuning
from .checkpoint import check_grouping, checked_pairs, copy_state_value
from .distributed.executor import Report, local, make_executor
from .engine import Sources, plan_units
from .functional.adamw import adamw_
from .functional.numerics import apply_update_, finite_flags, nesterov
from .spec import SPEC_KEYS, GroupSpec, SpecCache, resolve_checked
from .validation import (index_of, is_named, name_group, param_label, stepping_params, validate_group_keys,
                         validate_hyperparameters, validate_param, validate_sharing)

__all__ = ["ARO"]

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
        qr: ``"householder"`` (default), ``"shifted_cholesky"`` (GEMM-based; falls back to
            Householder per matrix) or ``"auto"``: the faster of the two for each bucket shape,
            timed on its first step (:mod:`aro.tuning`; the two agree to rounding).
        sinkhorn_iters: Sinkhorn iterations K (default 5, the paper's).
        sinkhorn_variant: ``"simultaneous"`` (default, as the paper writes it) or ``"alternating"``.
        nesterov: use the Nesterov momentum :math:`\tilde M_t` for rotation and update
            (default True: in our benchmark it lowers ARO-Sinkhorn's loss clearly, see the
            README's "Ablations" table, and it is torch.optim.Muon's default; False is the
            paper's EMA).
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
            README's step-cost section). ``torch.float32`` is the same as ``None``; ``"auto"``
            times float32 against bfloat16 (where native) per bucket shape (:mod:`aro.tuning`).
        betas: AdamW path :math:`(\beta_1, \beta_2)` (default (0.9, 0.95), LLM practice);
            :math:`\beta_2` is also the Adam projection's.
        eps: AdamW path and Adam projection epsilon (default 1e-8).
        maximize: maximize the objective instead of minimizing.
        nonfinite: what to do with a parameter whose gradient has NaN/Inf: ``"skip"``
            (default; its step is skipped, its state untouched, counted in :meth:`stats`,
            one warning) or ``"raise"`` (``FloatingPointError`` naming the parameter).
        differentiable: not supported; must be False.
        process_group: ``None`` (default), a ``ProcessGroup`` or a ``DeviceMesh``. With
            replicated parameters (DDP) a group splits the rotation work across its ranks
            (see :mod:`aro.distributed.replicated`); without one every rank computes
            everything. DTensor parameters of any placement (FSDP2, tensor parallel, 2-D
            meshes; regular tensors may sit beside them) are detected by themselves and share
            the work over the ranks of their meshes (see :mod:`aro.distributed.sharded`). The
            library never calls ``init_process_group``.

    State (per parameter, declared in :mod:`aro.state_schema`): ``step``,
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
        self._spec = SpecCache(resolve_checked)
        self._counters: dict[tuple[str, torch.device], Tensor] = {}
        self._last_report = Report({}, 0, [])
        self._warned_nonfinite = False
        super().__init__(params, defaults)
        self._executor = make_executor(self._labelled_params(), process_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and torch's ``load_state_dict``, which replaces each group by the saved one:
        values missing from an older checkpoint take this optimizer's defaults."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key in SPEC_KEYS + ("lr", "weight_decay"):
                group.setdefault(key, self.defaults[key])
        self.__dict__.setdefault("_spec", SpecCache(resolve_checked))
        self.__dict__.setdefault("_last_report", Report({}, 0, []))  # pickles of older versions

    def spec(self, group: dict[str, Any]) -> GroupSpec:
        """The resolved spec of one of this optimizer's groups (made again if a value changed)."""
        return self._spec(group)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated: keys, hyperparameters, parameter dtypes, algorithm vs shape),
        resolved into its :class:`aro.spec.GroupSpec`.

        A misspelled key is an error naming the closest valid one (torch would keep it silently
        and use the default). A group without names added to named groups (those of
        :func:`aro.param_groups`) gets names ``added.<group>.<index>``, since torch refuses to mix
        named and unnamed groups.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"add_param_group takes a dict like {{'params': [...]}}, got {type(param_group).__name__}")
        validate_group_keys(param_group, self.defaults)
        if self.param_groups and "param_names" in self.param_groups[0] and not is_named(param_group):
            param_group = name_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_hyperparameters(group)
            for i, p in enumerate(group["params"]):
                validate_param(group, p, param_label(group, i, p))
            validate_sharing(group)
            self._spec(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        if hasattr(self, "_executor"):  # a group added after construction joins the same mode
            self._executor = make_executor(self._labelled_params(), self._executor.process_group)

    def _labelled_params(self) -> list[tuple[str, Tensor]]:
        return [(param_label(g, i, p), p) for g in self.param_groups for i, p in enumerate(g["params"])]

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        ``torch.compile(opt.step)`` runs it eagerly rather than tracing it into a storm of graph
        breaks (README, "torch.compile"); TorchDynamo is only touched if something loaded it."""
        if "torch._dynamo" in sys.modules:
            return _eager_step(type(self))(self, closure)
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last_report = Report({}, 0, [])
        skipped: list[str] = []
        for group in self.param_groups:
            spec = self._spec(group)
            params = self._screen_nonfinite(group, spec, stepping_params(group), skipped)
            self._adamw_step(group, spec, [p for p in params if not spec.uses_aro(p)])
            self._aro_step(group, spec, [p for p in params if spec.uses_aro(p)])
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

    def _screen_nonfinite(self, group: dict[str, Any], spec: GroupSpec, params: list[Tensor],
                          skipped: list[str]) -> list[Tensor]:
        """Drop (or raise for) parameters whose gradient holds NaN or Inf; one host sync. The
        labels of dropped parameters are appended to ``skipped`` (one warning per step names all)."""
        if not params:
            return params
        finite = finite_flags([local(p.grad) for p in params])
        pg = self._executor.process_group
        if pg is not None:  # every rank must take the same decision
            bad_flags = (~finite).to(torch.int32)
            torch.distributed.all_reduce(bad_flags, group=pg)
            finite = bad_flags == 0
        finite = finite.cpu()
        if bool(finite.all()):
            return params
        bad = [p for p, ok in zip(params, finite.tolist()) if not ok]
        labels = [param_label(group, index_of(group, p), p) for p in bad]
        if spec.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradient in {', '.join(labels)}")
        self._count("nonfinite_skips", torch.tensor(len(bad)))
        skipped += labels
        return [p for p, ok in zip(params, finite.tolist()) if ok]

    def _adamw_step(self, group: dict[str, Any], spec: GroupSpec, params: list[Tensor]) -> None:
        if not params:
            return
        for p in params:
            if not self.state[p]:
                S.init_adamw_state(p, self.state[p], S.state_dtype(p.dtype))
        beta1, beta2 = group["betas"]  # read here: OneCycleLR cycles betas[0]
        states = [self.state[p] for p in params]
        adamw_([local(p) for p in params], [local(p.grad) for p in params], [local(s[S.EXP_AVG]) for s in states],
               [local(s[S.EXP_AVG_SQ]) for s in states], [s[S.STEP] for s in states], lr=float(group["lr"]),
               beta1=beta1, beta2=beta2, eps=spec.eps, weight_decay=group["weight_decay"], maximize=spec.maximize)

    def _aro_step(self, group: dict[str, Any], spec: GroupSpec, params: list[Tensor]) -> None:
        if not params:
            return
        group_params = group["params"]
        self._init_states(spec, group_params, params)
        states = [self.state[p] for p in params]
        bufs = [local(s[S.MOMENTUM]) for s in states]
        grads = [local(p.grad).to(b.dtype) for p, b in zip(params, bufs)]
        if spec.maximize:
            grads = torch._foreach_neg(grads)
        torch._foreach_lerp_(bufs, grads, 1.0 - spec.beta)  # M = beta*M + (1-beta)*G
        torch._foreach_add_([s[S.STEP] for s in states], 1)
        momenta = nesterov(grads, bufs, spec.beta) if spec.nesterov else bufs
        src = self._sources(spec, group_params, params, momenta)
        report = self._executor.run(spec, plan_units(spec, group_params, params, self.state), src, self._count)
        self._last_report = self._last_report.merged(report)
        lr = float(group["lr"])
        apply_update_([local(p) for p in params], [report.updates[id(p)] for p in params], lr=lr,
                      weight_decay=group["weight_decay"], scale=-lr)

    def _init_states(self, spec: GroupSpec, group_params: list[Tensor], params: list[Tensor]) -> None:
        """Fresh state for parameters stepping for the first time; a shared rotation lives on its
        holder, which needs state even when it has no gradient."""
        index = {id(p): i for i, p in enumerate(group_params)}
        holders = [group_params[spec.sharing.holder_of[index[id(p)]][0]] for p in params
                   if index[id(p)] in spec.sharing.holder_of]
        for p in params + holders:
            if not self.state[p]:
                S.init_state(spec, index[id(p)], p, self.state[p], S.state_dtype(p.dtype),
                             place=functools.partial(self._executor.place_whole, p=p))

    def _sources(self, spec: GroupSpec, group_params: list[Tensor], params: list[Tensor],
                 momenta: list[Tensor]) -> Sources:
        """The tensors of this step: effective momenta and every rotated-frame state of the group."""
        tensors = {(S.MOMENTUM, id(p)): self._executor.place_rows(M, p) for p, M in zip(params, momenta)}
        keys = [field.key for field in S.rotated_state(spec)]
        for p in group_params:
            st = self.state.get(p)
            if st and S.ORIENTATION in st:
                tensors.update({(key, id(p)): st[key] for key in keys if key in st})
        return Sources(tensors, {id(p): float(self.state[p][S.STEP]) for p in params})

    # ------------------------------------------------------------------ stats
    def _count(self, name: str, value: Tensor) -> None:
        key = (name, value.device)
        prev = self._counters.get(key)
        self._counters[key] = value if prev is None else prev + value

    def stats(self) -> dict[str, Any]:
        """Counters since construction: ``qr_fallbacks`` (shifted-Cholesky matrices redone by
        Householder), ``degenerate_rotations`` (zero/non-finite cross-Grams that kept the
        previous rotation), ``nonfinite_skips`` (parameter steps skipped for NaN/Inf
        gradients), ``qr_per_step`` (rotations computed by this rank in the last step) and, when
        the work is split across ranks, ``rotation_cost_by_rank`` (last step's rotation FLOPs, up
        to a constant, assigned to each rank), ``bytes_sent_per_step`` (the optimizer's payload
        this rank sent to others in the last step), for DTensor parameters ``bytes_floor_per_step``
        (the least that step had to move, summed over all ranks) and ``auto_choices`` (the QR and
        product precision ``"auto"`` chose per bucket shape, in this process)."""
        out: dict[str, Any] = {"qr_fallbacks": 0, "degenerate_rotations": 0, "nonfinite_skips": 0,
                               "auto_choices": tuning.choices()}
        for (name, _), value in self._counters.items():
            out[name] += int(value)
        out["qr_per_step"] = self._last_report.rotations
        out["rotation_cost_by_rank"] = list(self._last_report.loads)
        out["bytes_sent_per_step"] = self._last_report.sent_bytes
        out["bytes_floor_per_step"] = self._last_report.floor_bytes
        return out

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, checked against the parameters; state keeps its saved dtype.

        Raises ``ValueError`` naming the parameter when a saved state does not fit it (other
        model, changed shapes, other orientation). Tensors are copied, never aliased to the
        given ``state_dict``, and float32 state of bf16 parameters stays float32 (torch's
        default loader would cast it to bf16).
        """
        check_grouping(state_dict["param_groups"], self.param_groups)
        pairs = checked_pairs(self.param_groups, state_dict, self.defaults)
        super().load_state_dict(state_dict)
        for p, saved in pairs:
            self.state[p] = {k: copy_state_value(k, v, p) for k, v in saved.items()}


# ---------------------------------------------------------------------- helpers
@functools.cache
def _eager_step(cls: type) -> Callable[..., Any]:
    """``cls._step`` excluded from TorchDynamo: one recorded skip, then the eager step."""
    return torch.compiler.disable(cls._step, reason="ARO's step is data-dependent batched linear algebra (QR, "
                                  "Sinkhorn, bucketing by shape); tracing it breaks the graph at every such call")
