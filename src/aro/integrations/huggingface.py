"""ARO for the Hugging Face ``Trainer``, keeping the paper's hybrid split.

``Trainer(optimizer_cls_and_kwargs=(aro.ARO, {...}))`` hands the optimizer the Trainer's own
groups (decay / no-decay lists of bare tensors), so every matrix, embeddings and LM head
included, would take the ARO path: full mode, silently. Build the optimizer from the model
instead and give it to the Trainer::

    from aro.integrations.huggingface import trainer_optimizer

    opt = trainer_optimizer(model, lr=1e-3, weight_decay=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

The Trainer then makes its learning-rate schedule (``args.lr_scheduler_type``, warmup) around
this optimizer; ``args.learning_rate`` is not used (the lr is the one given here).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..groups import param_groups
from ..optimizer import ARO

__all__ = ["trainer_optimizer"]


def trainer_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, mode: str = "hybrid",
                      no_decay: tuple[str, ...] = ("vector",), **kwargs: Any) -> ARO:
    """:class:`aro.ARO` over :func:`aro.param_groups` of ``model`` (hybrid by default: embeddings
    and head on AdamW; norm gains and biases without weight decay, as the Trainer does).

    ``kwargs`` are :class:`aro.ARO` arguments. Only parameters that require a gradient are
    optimized (a partly frozen model, e.g. adapters, works as with the Trainer's own optimizer).
    """
    groups = param_groups(model, mode=mode, no_decay=no_decay)
    trainable = [{**g, "params": [(n, p) for n, p in g["params"] if p.requires_grad]} for g in groups]
    trainable = [g for g in trainable if g["params"]]
    if not trainable:
        raise ValueError("trainer_optimizer: the model has no parameter that requires a gradient")
    return ARO(trainable, lr=lr, weight_decay=weight_decay, **kwargs)
