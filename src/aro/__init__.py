"""aro: Adaptively Rotated Optimization (ARO) for PyTorch.

    >>> import aro
    >>> opt = aro.ARO(aro.param_groups(model), lr=3e-4, weight_decay=0.1)

See :class:`aro.ARO` for the algorithm, :mod:`aro.functional` for the pure tensor functions.
"""

from . import diagnostics, functional, state_schema
from .functional import householder_qr, orthonormalize, rotated_step, shifted_cholesky_qr, sign, sinkhorn
from .groups import classify_parameters, param_groups
from .optimizer import ARO
from .telemetry import Telemetry

__version__ = "0.1.0"

__all__ = [
    "ARO",
    "Telemetry",
    "classify_parameters",
    "diagnostics",
    "functional",
    "householder_qr",
    "orthonormalize",
    "param_groups",
    "rotated_step",
    "shifted_cholesky_qr",
    "sign",
    "sinkhorn",
    "state_schema",
]
