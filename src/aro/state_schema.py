"""The optimizer-state keys of :class:`aro.ARO`, in one place (checkpoints depend on them).

ARO path (matrices):

* ``step`` -- 0-d float32 CPU tensor, steps taken by this parameter.
* ``momentum_buffer`` -- :math:`M`, same shape as the parameter, float32 (float64 for
  float64 parameters), kept in the parameter's frame.
* ``rotation`` -- :math:`R`, ``(m, m)`` for a matrix, ``(E, m, m)`` for a 3-D parameter of
  ``E`` matrices, where ``m`` is the rotated side (see ``orientation``). Absent for
  ``rotation="identity"``.
* ``orientation`` -- ``"rows"`` (R acts on dim -2) or ``"cols"`` (R acts on dim -1), fixed at
  the first step so that a checkpoint resumes with the same frame.
* ``exp_avg_sq`` -- second moment of the Adam projection, in the rotated frame, shaped like
  the oriented matrix ``(m, n)`` or ``(E, m, n)``. Only for ``base="adam"``.

AdamW path (everything else): ``step``, ``exp_avg``, ``exp_avg_sq``, as in :class:`torch.optim.AdamW`.
"""

STEP = "step"
MOMENTUM = "momentum_buffer"
ROTATION = "rotation"
ORIENTATION = "orientation"
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
