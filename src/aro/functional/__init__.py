"""Pure tensor functions of ARO: base projections, QR backends, rotation policies, AdamW.

No ``torch.optim`` and no ``torch.distributed`` here: the optimizer class and the distributed
layer both call these functions.
"""

from .adamw import adamw_
from .numerics import rms_normalize, unit_scale
from .projections import AdamProjection, identity, make_projection, row_norm, sign, sinkhorn
from .qr import QR_METHODS, householder_qr, orthonormalize, polar, shifted_cholesky_qr
from .rotation import ROTATION_POLICIES, cross_gram, eigen_rotation, new_rotation, rotated_step, rotated_update

__all__ = [
    "QR_METHODS",
    "ROTATION_POLICIES",
    "AdamProjection",
    "adamw_",
    "cross_gram",
    "eigen_rotation",
    "householder_qr",
    "identity",
    "make_projection",
    "new_rotation",
    "orthonormalize",
    "polar",
    "rms_normalize",
    "rotated_step",
    "rotated_update",
    "row_norm",
    "shifted_cholesky_qr",
    "sign",
    "sinkhorn",
    "unit_scale",
]
