"""Training budgets in the paper's unit: multiples of the compute-optimal data, 20 tokens per
parameter (Hoffmann et al. 2022, "Chinchilla"; the ARO paper's Figure 1 measures from 1x to 8x).

Which parameters are counted: **all of them**, embeddings and LM head included. That is
Chinchilla's N (Kaplan et al. 2020 counted non-embedding parameters, and Pearce & Song 2024 trace
most of the gap between the two scaling laws to that difference). For our byte-level models the
choice matters more than at scale (a 256-byte vocabulary against widths of 64-128 makes embeddings
and head a sizeable share), so the non-embedding count is recorded beside it. For an MoE model N is
the total, not the active, parameter count.

A budget K trains on ``K * 20 * N`` tokens; with ``batch x seq_len`` tokens per step that is
``round(K * 20 * N / (batch * seq_len))`` steps (at least 1). ``--tokens-per-parameter`` changes
the 20 (the data-optimal ratio of byte-level models need not be Chinchilla's; tests use tiny units).
"""

from __future__ import annotations

import functools

from torch import nn

from .models import build_model

__all__ = ["TOKENS_PER_PARAMETER", "budget_of_steps", "budget_unit", "count_parameters", "steps_for_budget"]

TOKENS_PER_PARAMETER = 20.0


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``all`` (tied tensors once) and ``non_embedding`` (without token/position embeddings and an
    untied LM head: every ``nn.Embedding`` weight and the output projection)."""
    unique = {id(p): p for p in model.parameters()}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embedding.add(id(head.weight))
    total = sum(p.numel() for p in unique.values())
    return {"all": total, "non_embedding": total - sum(unique[i].numel() for i in embedding if i in unique)}


def budget_unit(model_name: str, batch_size: int, tokens_per_parameter: float = TOKENS_PER_PARAMETER) -> dict:
    """What one budget unit means for ``model_name``: the ``budget_unit`` record of a summary."""
    if not tokens_per_parameter > 0:
        raise ValueError(f"--tokens-per-parameter must be > 0, got {tokens_per_parameter!r}")
    return dict(_budget_unit(model_name, batch_size, float(tokens_per_parameter)))


@functools.lru_cache(maxsize=None)
def _budget_unit(model_name: str, batch_size: int, tokens_per_parameter: float) -> dict:
    model = build_model(model_name, 0)
    counts = count_parameters(model)
    tokens_per_step = batch_size * model.cfg.seq_len
    return {"tokens_per_parameter": tokens_per_parameter, "parameters": counts["all"],
            "non_embedding_parameters": counts["non_embedding"], "which_parameters": "all (Chinchilla's N)",
            "tokens_per_step": tokens_per_step, "steps_per_unit": tokens_per_parameter * counts["all"] / tokens_per_step}


def steps_for_budget(budget: float, unit: dict) -> int:
    """Steps that train on ``budget`` units (``budget * tokens_per_parameter * parameters`` tokens)."""
    if not budget > 0:
        raise ValueError(f"--budgets: a budget must be > 0 (multiples of the compute-optimal data), got {budget!r}")
    return max(1, round(budget * unit["steps_per_unit"]))


def budget_of_steps(steps: int, unit: dict) -> float:
    """The budget (in units) that ``steps`` steps train on."""
    return steps / unit["steps_per_unit"]
