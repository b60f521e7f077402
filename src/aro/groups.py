r"""Parameter classification: which parameters ARO rotates and which go to AdamW.

:func:`param_groups` turns a model into param groups for :class:`aro.ARO`:

===================  ==============================  ==================
role                 how it is recognised            optimizer
===================  ==============================  ==================
hidden matrix        any other parameter with ndim>=2  ARO
conv weight          weight of ``nn.Conv{1,2,3}d``    ARO, flattened to (out, in*k)
embedding            weight of ``nn.Embedding``       AdamW (hybrid) / ARO (full)
LM head              ``get_output_embeddings()``, else a module named
                     ``lm_head``, else the last ``nn.Linear`` whose
                     out_features is the embedding vocabulary; a tied
                     head is the embedding tensor    AdamW (hybrid) / ARO (full)
router               module named ``router`` or ``gate`` (MoE)  AdamW (hybrid) / ARO (full)
norm gain, bias      ndim < 2                         AdamW
===================  ==============================  ==================

*Hybrid* is the paper's standard comparison (ARO on hidden matrices only); *full* runs ARO on
every matrix, embeddings and LM head included (the paper's §5.1). Norm gains and biases get no weight
decay by default (``no_decay``). Every parameter lands in exactly one group; the result is
checked against ``model.parameters()``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from .sharing import SHARING_MODES, plan_residual_stream, sharing_specs, warn_unshared

__all__ = ["MODES", "NO_DECAY_ROLES", "classify_parameters", "param_groups"]

MODES = ("hybrid", "full")
_ROUTER_NAMES = ("router", "gate")
_HEAD_NAMES = ("lm_head",)
_CLASSIFIER_NAMES = ("head", "classifier", "score")


def classify_parameters(model: nn.Module) -> "OrderedDict[str, tuple[Tensor, str]]":
    """Map each parameter name (first occurrence of tied tensors) to ``(param, role)``.

    Roles: ``"matrix"``, ``"conv"``, ``"embedding"``, ``"head"`` (an untied LM head),
    ``"router"``, ``"vector"`` (norm gains, biases, scalars). A tied embedding/head tensor is an
    ``"embedding"``.
    """
    roles: dict[int, str] = {}
    vocab = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            roles[id(module.weight)] = "embedding"
            vocab = max(vocab, module.num_embeddings)
    head = _find_head(model, vocab)
    if head is not None and id(head.weight) not in roles:
        roles[id(head.weight)] = "head"
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or id(weight) in roles:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            roles[id(weight)] = "conv"
        elif leaf in _ROUTER_NAMES and weight.ndim >= 2:
            roles[id(weight)] = "router"
    layer_weights = {id(p) for m in model.modules() if isinstance(m, _LAYERS) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if id(p) not in roles and id(p) not in layer_weights and p.ndim >= 2 and _is_token_parameter(name, p):
            roles[id(p)] = "embedding"
    out: "OrderedDict[str, tuple[Tensor, str]]" = OrderedDict()
    for name, p in model.named_parameters():  # deduplicates tied tensors
        role = roles.get(id(p)) or ("matrix" if p.ndim >= 2 else "vector")
        if role in ("embedding", "head", "router", "conv") and p.ndim < 2:
            role = "vector"
        out[name] = (p, role)
    return out


_LAYERS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)
_TOKEN_NAMES = ("cls_token", "dist_token", "mask_token", "register_tokens", "reg_token", "pos_embed",
                "position_embedding", "position_embeddings", "pos_embedding", "positional_embedding")


def _is_token_parameter(name: str, p: Tensor) -> bool:
    """A raw parameter (not a layer's weight) used as an embedding rather than multiplied as a
    matrix: a class, register or position token of a vision transformer, by name, or one with a
    size-1 leading dimension (``(1, 1, d)``, ``(1, N, d)``), which no rotation could act on."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in _TOKEN_NAMES or p.shape[0] == 1


def _find_head(model: nn.Module, vocab: int) -> nn.Module | None:
    """The output module, in this order: ``get_output_embeddings()`` (Hugging Face LMs); a module
    named ``lm_head``; one named ``head``, ``classifier`` or ``score`` (timm, torchvision and
    Hugging Face classifiers), or ``fc`` at the top level (torchvision's ResNets) -- a
    ``Sequential`` there gives its last ``nn.Linear``; the last ``nn.Linear`` whose
    ``out_features`` is the (largest) embedding vocabulary; else the last module with parameters
    when it is an ``nn.Linear`` (an MLP's output layer)."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        found = getter()
        if isinstance(getattr(found, "weight", None), Tensor):
            return found
    modules = list(model.named_modules())
    by_depth = sorted(modules, key=lambda nm: nm[0].count("."))  # the shallowest match wins
    for names in (_HEAD_NAMES, _CLASSIFIER_NAMES):
        for name, module in by_depth:
            leaf = name.rsplit(".", 1)[-1]
            if name and (leaf in names or (names is _CLASSIFIER_NAMES and name == "fc")):
                found = _last_linear(module)
                if found is not None:
                    return found
    by_vocab = [m for _, m in modules if isinstance(m, nn.Linear) and vocab and m.out_features == vocab]
    if by_vocab:
        return by_vocab[-1]
    # an output layer registered last at the top level (or last in a Sequential model); never a
    # module inside a block, whose last Linear is a hidden matrix
    top = [m for name, m in modules if name and "." not in name and list(m.parameters())]
    return top[-1] if top and isinstance(top[-1], nn.Linear) else None


def _last_linear(module: nn.Module) -> nn.Module | None:
    if isinstance(getattr(module, "weight", None), Tensor) and module.weight.ndim == 2:
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def param_groups(model: nn.Module, mode: str = "hybrid", sharing: str = "none",
                 no_decay: tuple[str, ...] = ("vector",), **overrides: Any) -> list[dict[str, Any]]:
    """Param groups for :class:`aro.ARO` (and any optimizer taking named param groups).

    Args:
        model: the model (an ``nn.Module``; its roles come from its modules, so a parameter
            list cannot be classified).
        mode: ``"hybrid"`` (embeddings, LM head and routers on AdamW) or ``"full"`` (ARO on
            every matrix).
        sharing: ``"none"`` (a rotation per matrix), ``"global"`` (one rotation for the
            residual stream) or ``"chain"`` (a rotation between consecutive blocks); see
            :mod:`aro.sharing`. Matrices the plan cannot place keep their own rotation and are
            listed in one warning.
        no_decay: roles whose parameters get ``weight_decay=0``: by default ``("vector",)``,
            norm gains and biases, as Hugging Face and nanoGPT do; add ``"embedding"`` (and
            ``"head"``, ``"router"``) to spare those too, or pass ``()`` to decay everything
            with the optimizer's ``weight_decay``.
        **overrides: hyperparameters set on the ARO groups (e.g. ``rotation="eigen"``,
            ``estimator="stack"``); each must be an argument of :class:`aro.ARO`.

    Returns:
        Named param groups: ARO matrices (with the ``shared`` plan, if any), ARO conv weights
        (``matrix_view="flatten"``), AdamW parameters, and those of ``no_decay`` split off with
        ``weight_decay=0``. Empty groups are left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"aro.param_groups takes the model (an nn.Module), got {type(model).__name__}; "
                        "pass the module itself, not model.parameters(): the roles come from its modules")
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r}; expected one of {MODES}")
    if sharing not in SHARING_MODES:
        raise ValueError(f"Invalid sharing: {sharing!r}; expected one of {SHARING_MODES}")
    no_decay = (no_decay,) if isinstance(no_decay, str) else tuple(no_decay)
    bad = [r for r in no_decay if r not in NO_DECAY_ROLES]
    if bad:
        raise ValueError(f"Invalid no_decay role(s) {bad}; choose from {NO_DECAY_ROLES}")
    _check_overrides(overrides)
    roles = classify_parameters(model)
    aro, conv, adamw = [], [], []
    for name, (p, role) in roles.items():
        if role == "vector" or (mode == "hybrid" and role in ("embedding", "head", "router")):
            adamw.append((name, p))
        elif role == "conv":
            conv.append((name, p))
        else:
            aro.append((name, p))
    spared = {name for name, (_, role) in roles.items() if role in no_decay}
    if sharing != "none":  # a shared rotation's members must stay in one group
        kept = sorted(spared & {name for name, _ in aro})
        if kept:
            warnings.warn(f"no_decay: {kept} stay in the ARO group and are decayed, because sharing={sharing!r} "
                          "keeps every member of a shared rotation in one group", UserWarning, stacklevel=2)
        spared -= set(kept)
    groups = []
    if aro:
        group: dict[str, Any] = {"params": [(n, p) for n, p in aro if n not in spared], "algorithm": "aro",
                                 **overrides}
        if sharing != "none":
            placements, left, L = plan_residual_stream(model, roles, [n for n, _ in aro])
            specs = sharing_specs(placements, sharing, L)
            warn_unshared(left, sharing)
            ordered = [(pl.name, pl.param) for spec in specs for pl in spec]
            placed = {n for n, _ in ordered}
            group["params"] = ordered + [(n, p) for n, p in aro if n not in placed]
            position = {n: i for i, (n, _) in enumerate(group["params"])}
            group["shared"] = [[[position[pl.name], pl.side] for pl in spec] for spec in specs]
        groups.append(group)
    if conv:
        groups.append({"params": [(n, p) for n, p in conv if n not in spared], "algorithm": "aro",
                       "matrix_view": "flatten", **overrides})
    if adamw:
        groups.append({"params": [(n, p) for n, p in adamw if n not in spared], "algorithm": "adamw"})
    if spared:
        groups.append({"params": [(n, p) for n, p in aro if n in spared], "algorithm": "aro", **overrides,
                       "weight_decay": 0.0})
        groups.append({"params": [(n, p) for n, p in adamw if n in spared], "algorithm": "adamw",
                       "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    _check_coverage(model, groups)
    return groups


NO_DECAY_ROLES = ("vector", "embedding", "head", "router")


def _check_overrides(overrides: dict[str, Any]) -> None:
    import difflib
    import inspect

    from .optimizer import ARO

    valid = [n for n in inspect.signature(ARO.__init__).parameters
             if n not in ("self", "params", "process_group", "differentiable")]
    # a misspelling of param_groups' own arguments lands here too ("modee"): suggest those as well
    own = [n for n in inspect.signature(param_groups).parameters if n not in ("model", "overrides")]
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, own + valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {own + valid}"
            raise ValueError(f"aro.param_groups: unknown option {key!r}{hint}")


def _check_coverage(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    seen: set[int] = set()
    for g in groups:
        for name, p in g["params"]:
            if id(p) in seen:
                raise RuntimeError(f"parameter {name!r} was placed in two groups")
            seen.add(id(p))
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise RuntimeError(f"parameters left out of every group: {missing}")
