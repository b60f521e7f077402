r"""Rotation telemetry for :class:`aro.ARO`: opt-in, read-only, free when not attached.

    telemetry = aro.Telemetry(opt, "runs/mine/telemetry.jsonl", every=10)   # attach
    ...train...
    telemetry.close()                                                       # detach

Every ``every`` optimizer steps, for each ARO matrix (3-D parameters: the mean over their
matrices), one JSON line with:

* ``J`` and ``J_eigen`` -- the rotation objective :math:`\langle M, Rf(R^\top M)\rangle` of the
  current rotation and of the exact eigen-rotation of :math:`MM^\top` (``M`` the momentum
  buffer), and ``gain`` = J / J_eigen - 1 (see :mod:`aro.diagnostics`; None for ``base="adam"``,
  whose f depends on its state);
* ``update_rms`` -- RMS of the applied update :math:`U = ((1-\eta\lambda)W_{t-1} - W_t)/\eta`;
* ``drift`` -- :math:`\|R_t - R_{t-1}\|_F`; ``orth_error`` -- :math:`\max|R^\top R - I|`;
* ``cos_update_momentum`` -- :math:`\cos(U, M)`;

and one line per logged step with the optimizer's counters (``qr_fallbacks``, ...). With
``tensorboard_dir`` the same scalars go to TensorBoard when it is installed (a warning
otherwise). The hooks only read: a run with telemetry attached computes exactly the numbers it
computes without.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import state_schema as S
from .diagnostics import cosine, orthogonality_error, relative_gain, rotation_objective
from .layout import oriented

__all__ = ["Telemetry"]


class Telemetry:
    """Per-matrix rotation diagnostics of an :class:`aro.ARO` (module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, path: str | Path, *, every: int = 1,
                 tensorboard_dir: str | Path | None = None) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Telemetry every={every!r}: give a positive integer (log every k-th step)")
        for group in optimizer.param_groups:
            if any(type(p).__name__ == "DTensor" for p in group["params"]):
                raise ValueError("Telemetry reads whole matrices; FSDP2 (DTensor) parameters are not supported. "
                                 "Attach it to a single-process or DDP run.")
        self.optimizer = optimizer
        self.every = every
        self.steps = 0
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._writer = _tensorboard(tensorboard_dir)
        self._before: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    # ------------------------------------------------------------------ hooks
    def _due(self) -> bool:
        return (self.steps + 1) % self.every == 0

    def _pre(self, opt, args, kwargs) -> None:
        if not self._due():
            return
        self._before = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p, {})
                rot = st.get(S.ROTATION)
                self._before[id(p)] = (p.detach().clone(), None if rot is None else rot.clone())

    @torch.no_grad()
    def _post(self, opt, args, kwargs) -> None:
        self.steps += 1
        if not self._before:
            return
        lines = []
        for group in opt.param_groups:
            spec = opt.spec(group)
            names = group.get("param_names") or [f"param{i}" for i in range(len(group["params"]))]
            for i, p in enumerate(group["params"]):
                st = opt.state.get(p, {})
                if S.ORIENTATION not in st or id(p) not in self._before:
                    continue
                lines.append(self._matrix_line(group, spec, names[i], p, st, spec.sharing.holder_of.get(i)))
        stats = opt.stats() if hasattr(opt, "stats") else {}
        lines.append({"step": self.steps, "counters": {k: v for k, v in stats.items() if not isinstance(v, list)}})
        for line in lines:
            self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._writer is not None:
            for line in lines[:-1]:
                for key in ("gain", "update_rms", "drift", "orth_error", "cos_update_momentum"):
                    if line[key] is not None:
                        self._writer.add_scalar(f"{key}/{line['param']}", line[key], self.steps)
        self._before = {}

    def _matrix_line(self, group: dict, spec, name: str, p: Tensor, st: dict, holder) -> dict[str, Any]:
        W0, R0 = self._before[id(p)]
        f = None if spec.stateful_f else spec.f  # the Adam projection's f depends on its state
        ms = spec.matrix_shape(p, st[S.ORIENTATION])
        dtype = st[S.MOMENTUM].dtype
        M = oriented(st[S.MOMENTUM].to(dtype), ms)
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        U = oriented(((1 - lr * wd) * W0.to(dtype) - p.detach().to(dtype)) / lr if lr else torch.zeros_like(M), ms)
        R = st.get(S.ROTATION)
        if R is None and holder is not None:  # a member of a shared rotation: its holder has it
            R = self.optimizer.state[group["params"][holder[0]]].get(S.ROTATION)
            R0 = self._before[id(group["params"][holder[0]])][1]
        line: dict[str, Any] = {"step": self.steps, "param": name, "shape": list(p.shape),
                                "update_rms": _mean(U.square().mean(dim=(-2, -1)).sqrt()),
                                "cos_update_momentum": _mean(cosine(U, M)),
                                "J": None, "J_eigen": None, "gain": None, "drift": None, "orth_error": None}
        if R is not None and R.shape[-1] == M.shape[-2]:
            R = R.to(dtype)
            line["orth_error"] = _mean(orthogonality_error(R))
            if R0 is not None:
                line["drift"] = _mean(torch.linalg.matrix_norm(R - R0.to(dtype)))
            if f is not None and (M != 0).any():
                j = rotation_objective(M, R, f)
                gain = relative_gain(M, R, f)
                line.update(J=_mean(j), J_eigen=_mean(j / (1 + gain)), gain=_mean(gain))
        return line

    def close(self) -> None:
        """Detach the hooks and close the log (and the TensorBoard writer)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mean(t: Tensor) -> float:
    return float(t.double().mean())


def _tensorboard(logdir):
    if logdir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("Telemetry: tensorboard is not installed (pip install tensorboard); logging JSONL only",
                      RuntimeWarning, stacklevel=3)
        return None
    return SummaryWriter(str(logdir))
