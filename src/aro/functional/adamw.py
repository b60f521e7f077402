r"""AdamW for the parameters ARO does not rotate (norm gains, biases, embeddings in hybrid mode).

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
    \theta_t = (1-\eta\lambda)\,\theta_{t-1} - \eta\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}

This is :class:`torch.optim.AdamW`'s update; it is reimplemented (with foreach kernels) only
because ARO keeps its state in float32 for bf16/fp16 parameters, which ``torch.optim``'s
functional AdamW does not allow, because the caller filters non-finite gradients first, and
because the second moment saturates at the dtype's largest value instead of overflowing.
State keys are torch's: ``exp_avg``, ``exp_avg_sq``, ``step``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .numerics import apply_update_

__all__ = ["adamw_"]


def adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One AdamW step, in place. ``exp_avgs``/``exp_avg_sqs`` may be wider than the params
    (float32 state for bf16 params): the arithmetic runs in the state's dtype."""
    if not params:
        return
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(steps, 1)
    # m = beta1*m + (1-beta1)*g ; v = beta2*v + (1-beta2)*g*g
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    # saturate instead of overflowing (|g| > 1.8e19 in float32): no Inf ever enters the state
    torch._foreach_clamp_max_(exp_avg_sqs, torch.finfo(exp_avg_sqs[0].dtype).max)
    step_values = [float(s) for s in steps]
    bias1 = [1.0 - beta1**t for t in step_values]
    bias2_sqrt = [(1.0 - beta2**t) ** 0.5 for t in step_values]
    # denom = sqrt(v)/sqrt(1-beta2^t) + eps ; update = (m/(1-beta1^t)) / denom
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(updates, [-lr / b for b in bias1])
    apply_update_(params, updates, lr=lr, weight_decay=weight_decay, scale=1.0)
