r"""Sharing plans: which matrices read from or write to which residual stream (the paper's §6).

In a pre-norm transformer, rotating the residual stream by :math:`R` leaves the function
(nearly) unchanged if every *consumer* (``W_Q, W_K, W_V, W_up, W_gate``, LM head, router) is
right-multiplied by :math:`R^\top` and every *producer* (embeddings, ``W_O``, ``W_down``) is
left-multiplied by :math:`R`. With each matrix oriented so that the residual side ``d`` is the
rotated side ("Design 3"), all of them are left multiplications, so they can share one ``d x d``
rotation:

* ``"global"``: one rotation for the whole residual stream;
* ``"chain"``: rotations :math:`R_0, \dots, R_L` between blocks -- block ``b`` (0-based) consumes
  in :math:`R_b` and produces in :math:`R_{b+1}`; :math:`R_0` also serves the embeddings and
  :math:`R_L` the LM head. ``L + 1`` QR factorizations per step instead of one per matrix.

A tied embedding / LM head tensor is one parameter with two roles; it joins :math:`R_0` (its
embedding role) in ``"chain"`` mode.

Recognition is by module type and name, which covers ``aro.bench`` models, Hugging Face GPT-2
(``Conv1D`` weights stored ``[in, out]``), Llama-style models (``q/k/v/o_proj``,
``gate/up/down_proj``, grouped-query K/V), ``nn.MultiheadAttention`` (``in_proj_weight``,
``out_proj``) and MLPs written as ``nn.Sequential`` (first Linear reads, last Linear writes). Raw 3-D expert parameters (``[E, d, h]`` used as
``x @ W``) are input-major: a consumer's residual side is dim -2, a producer's dim -1. Anything
not recognised stays per-matrix, listed in one warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["CONSUMER_NAMES", "PRODUCER_NAMES", "SHARING_MODES", "Placement", "plan_residual_stream"]

SHARING_MODES = ("none", "global", "chain")
CONSUMER_NAMES = frozenset({
    "q", "k", "v", "q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv", "c_attn", "Wqkv", "in_proj",
    "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "up", "gate", "up_proj", "gate_proj", "c_fc", "fc1", "w1", "w3", "w_up", "w_in", "wi", "router",
})
PRODUCER_NAMES = frozenset({
    "o", "o_proj", "out_proj", "c_proj", "dense", "down", "down_proj", "fc2", "w2", "w_down", "w_out", "wo",
})


@dataclass(frozen=True)
class Placement:
    """One matrix of the residual stream."""

    name: str
    param: Tensor
    role: str  # "consumer" | "producer"
    side: str  # "rows" | "cols": which of the parameter's last two dims is the residual side
    stream: int  # chain index of its rotation: block b consumes stream b, produces stream b + 1


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer blocks: the longest ``nn.ModuleList`` of same-type modules holding matrices."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(p.ndim >= 2 for p in module[0].parameters()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def _side(module: nn.Module | None, p: Tensor, role: str, d: int) -> str | None:
    """Which dim of ``p`` is the residual side, or None if its shape does not fit ``d``."""
    if isinstance(module, nn.Embedding):
        side = "cols"
    elif isinstance(module, (nn.Linear, nn.MultiheadAttention)):  # [out, in] (MHA's in_proj_weight too)
        side = "cols" if role == "consumer" else "rows"
    elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layout: weight [in, out]
        side = "rows" if role == "consumer" else "cols"
    else:  # raw parameter used as x @ W: [..., in, out]
        side = "rows" if role == "consumer" else "cols"
    size = p.shape[-2] if side == "rows" else p.shape[-1]
    return side if size == d else None


def _modules_holding(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """id(param) -> (leaf name, module holding it) for every parameter."""
    out = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            leaf = mod_name.rsplit(".", 1)[-1] if p_name == "weight" else p_name
            out.setdefault(id(p), (leaf, module))
    return out


def plan_residual_stream(
    model: nn.Module, roles: dict[str, tuple[Tensor, str]], aro_names: list[str]
) -> tuple[list[Placement], list[str], int]:
    """Place the ARO matrices ``aro_names`` on the residual stream.

    Returns the placements, the names left unplaced (to stay per-matrix) and the number of
    blocks ``L``. ``roles`` is :func:`aro.classify_parameters`'s output.
    """
    blocks = _find_blocks(model)
    d = next((m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if blocks is None or d is None:
        return [], list(aro_names), 0
    prefix, block_list = blocks
    L = len(block_list)
    holding = _modules_holding(model)
    placements, left = [], []
    for name in aro_names:
        p, role_kind = roles[name]
        leaf, module = holding[id(p)]
        stream = None
        if role_kind == "embedding":
            role, stream = "producer", 0
        elif role_kind == "head":
            role, stream = "consumer", L
        else:
            parts = name.split(".")
            head = prefix.split(".") if prefix else []
            if parts[: len(head)] != head or len(parts) <= len(head) or not parts[len(head)].isdigit():
                left.append(name)
                continue
            block = int(parts[len(head)])
            role = "consumer" if role_kind == "router" or leaf in CONSUMER_NAMES else (
                "producer" if leaf in PRODUCER_NAMES else _sequential_role(model, name))
            if role is None:
                left.append(name)
                continue
            stream = block if role == "consumer" else block + 1
        side = _side(module, p, role, d)
        if side is None:
            left.append(name)
            continue
        placements.append(Placement(name, p, role, side, stream))
    return placements, left, L


def _sequential_role(model: nn.Module, name: str) -> str | None:
    """An MLP written as ``nn.Sequential(Linear, act, ..., Linear)``: its first Linear reads the
    stream (consumer), its last writes it (producer); the ones between are internal."""
    path = name.rsplit(".", 1)[0]  # the module holding the weight, e.g. "blocks.0.mlp.0"
    parent_path, _, index = path.rpartition(".")
    if not index.isdigit():
        return None
    parent = model.get_submodule(parent_path) if parent_path else model
    if not isinstance(parent, nn.Sequential):
        return None
    linears = [i for i, m in enumerate(parent) if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        return None
    return {linears[0]: "consumer", linears[-1]: "producer"}.get(int(index))


def sharing_specs(placements: list[Placement], sharing: str, L: int) -> list[list[Placement]]:
    """Group placements into shared rotations: one for ``"global"``, ``L + 1`` for ``"chain"``."""
    if sharing == "global":
        return [placements] if placements else []
    streams: list[list[Placement]] = [[] for _ in range(L + 1)]
    for pl in placements:
        streams[pl.stream].append(pl)
    return [s for s in streams if s]


def warn_unshared(names: list[str], sharing: str) -> None:
    if names:
        warnings.warn(
            f"sharing={sharing!r}: {len(names)} matrices were not recognised as residual-stream readers or "
            f"writers and keep per-matrix rotations: {', '.join(names)}",
            UserWarning,
            stacklevel=3,
        )
