r"""The test oracle: ARO written straight from the equations, in float64 NumPy, one matrix at a time.

No batching, no scaling-vector Sinkhorn, no torch: every line is a line of the paper's §2-§3. The tests
compare :class:`aro.ARO` (in float64) against it. It is slow and meant only for small matrices.

Matches the library in the places where the library makes a choice the paper leaves open:
orientation ("auto" rotates the smaller side), RMS-1 renormalization of every f output, the
warm start :math:`\hat A + \delta R_{t-1}` of the QR (see :mod:`aro.functional.qr`), the eigen
sign convention, and bias correction of the Adam projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ReferenceARO"]

_DELTA = 100.0 * np.finfo(np.float64).eps / 2


def _rms(X: np.ndarray) -> float:
    return float(np.sqrt(np.mean(X * X)))


def _to_rms1(X: np.ndarray) -> np.ndarray:
    r = _rms(X)
    return X / r if r > 0 else X


def sinkhorn(X: np.ndarray, num_iters: int, variant: str, eps: float = 1e-8) -> np.ndarray:
    """Sinkhorn with explicit diagonal matrices: Y = D_a X D_b.

    Simultaneous: Y <- sqrt(mn) Dr(Y)^-1 Y Dc(Y)^-1, i.e. a <- sqrt(n)/||rows of X D_b||,
    b <- sqrt(m)/||cols of D_a X|| with the old a; alternating uses the new a. Norms are
    floored at eps (X divided by its largest entry first).
    """
    m, n = X.shape
    X0 = X / np.abs(X).max()
    row_keep, col_keep = _signal(X0)
    a, b = row_keep.astype(float), col_keep.astype(float)
    for _ in range(num_iters):
        a_new = row_keep * np.sqrt(n) / np.maximum(np.linalg.norm(X0 @ np.diag(b), axis=1), eps)
        if variant == "alternating":
            a = a_new
        b = col_keep * np.sqrt(m) / np.maximum(np.linalg.norm(np.diag(a) @ X0, axis=0), eps)
        a = a_new
    return _to_rms1(np.diag(a) @ X0 @ np.diag(b))


def _signal(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows/columns whose norm exceeds rounding noise: 10 u sqrt(max(m, n)) x the largest."""
    tol = 10 * np.finfo(np.float64).eps / 2 * np.sqrt(max(X.shape))
    r, c = np.linalg.norm(X, axis=1), np.linalg.norm(X, axis=0)
    return r > tol * r.max(), c > tol * c.max()


def sign(X: np.ndarray) -> np.ndarray:
    Y = X / np.abs(X).max()
    tol = X.shape[0] * np.finfo(np.float64).eps / 2  # rounding noise counts as zero
    return _to_rms1(np.where(np.abs(Y) > tol, np.sign(Y), 0.0))


def row_norm(X: np.ndarray) -> np.ndarray:
    n = X.shape[1]
    keep = _signal(X)[0][:, None]
    return _to_rms1(np.where(keep, np.sqrt(n) * X / np.linalg.norm(X, axis=1, keepdims=True), 0.0))


def identity(X: np.ndarray) -> np.ndarray:
    return _to_rms1(X)


def qr_q(A: np.ndarray) -> np.ndarray:
    """Q of A = QR with diag(R) >= 0."""
    Q, T = np.linalg.qr(A)
    return Q * np.where(np.diag(T) < 0, -1.0, 1.0)[None, :]


def polar(A: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(A)
    return U @ Vt


def eigvecs_descending(C: np.ndarray) -> np.ndarray:
    _, V = np.linalg.eigh(C)
    V = V[:, ::-1]
    pivot = V[np.abs(V).argmax(axis=0), np.arange(V.shape[1])]
    return V * np.where(pivot < 0, -1.0, 1.0)[None, :]


@dataclass
class _MatrixState:
    M: np.ndarray  # momentum, parameter layout (batched: E x m0 x n0)
    V: list[np.ndarray]  # Adam second moments, rotated frame, one per matrix
    transposed: bool
    step: int = 0


@dataclass
class ReferenceARO:
    """Float64 reference ARO over a list of 2-D or 3-D NumPy arrays (modified in place).

    ``shared`` lists shared rotations as ``[[param_index, "rows"|"cols"], ...]`` (the indices
    of :class:`aro.ARO`'s ``shared`` group key); every other matrix has its own rotation.
    Rotations are kept in ``rotations``: key ``("shared", k)`` or ``(param_index, expert)``.
    """

    lr: float = 1e-3
    beta: float = 0.95
    weight_decay: float = 0.01
    base: str = "sinkhorn"
    rotation: str = "aro"
    sinkhorn_iters: int = 5
    sinkhorn_variant: str = "simultaneous"
    nesterov: bool = True
    rms_target: float | None = 0.2
    orientation: str = "auto"
    beta2: float = 0.95
    eps: float = 1e-8
    shared: list | None = None
    estimator: str = "sum"
    states: dict[int, _MatrixState] = field(default_factory=dict)
    rotations: dict = field(default_factory=dict)

    def f(self, X: np.ndarray) -> np.ndarray:
        if self.base == "sinkhorn":
            return sinkhorn(X, self.sinkhorn_iters, self.sinkhorn_variant)
        return {"sign": sign, "row_norm": row_norm, "identity": identity}[self.base](X)

    def adam(self, Z: np.ndarray, V: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (direction, new V) for V = beta2 V + (1-beta2) Z^2."""
        V_new = self.beta2 * V + (1 - self.beta2) * Z * Z
        D = Z / (np.sqrt(V_new / (1 - self.beta2**step)) + self.eps)
        return _to_rms1(D), V_new

    def _unit(self, key, members: list[tuple[np.ndarray, _MatrixState, int]]) -> list[np.ndarray]:
        """Updates U_j for the oriented momenta X_j of one unit (X_j, its state, matrix index)."""
        adam = self.base == "adam"
        step = members[0][1].step

        def project(X, st, k, look):  # f in the frame of X, Adam state only written when not look-ahead
            if not adam:
                return self.f(X)
            D, V = self.adam(X, st.V[k], step)
            if not look:
                st.V[k] = V
            return D

        if self.rotation == "identity":
            return [project(X, st, k, False) for X, st, k in members]
        d = members[0][0].shape[0]
        R = self.rotations.get(key, np.eye(d))
        if self.rotation == "eigen_exact":
            R = eigvecs_descending(sum(X @ X.T for X, _, _ in members))
        else:
            scale = max(np.abs(X).max() for X, _, _ in members)
            Xs = [X / scale for X, _, _ in members]
            if self.rotation == "eigen":
                A = sum(Y @ Y.T @ R for Y in Xs)
            elif self.estimator == "stack" and len(members) > 1:
                stack = np.hstack(Xs)
                A = stack @ self.f(R.T @ stack).T
            else:
                A = sum(Y @ project(R.T @ X, st, k, True).T for Y, (X, st, k) in zip(Xs, members))
            A = A / np.linalg.norm(A) + _DELTA * R
            R = polar(A) if self.rotation == "polar" else qr_q(A)
        self.rotations[key] = R
        out = []
        for X, st, k in members:
            U = R @ project(R.T @ X, st, k, False)
            if X.shape[1] < X.shape[0]:  # tall member: back onto the span of its momentum
                Q = np.linalg.qr(X)[0]
                U = Q @ (Q.T @ U)
            out.append(U)
        return out

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        sides = {i: side for spec in (self.shared or []) for i, side in spec}
        batches = {}
        for i, (W, G) in enumerate(zip(params, grads)):
            batch = W[None] if W.ndim == 2 else W  # a view: writing batch writes W
            gb = G[None] if G.ndim == 2 else G
            E, m0, n0 = batch.shape
            if i not in self.states:
                if i in sides:
                    transposed = sides[i] == "cols"
                else:
                    transposed = self.orientation == "cols" or (self.orientation == "auto" and m0 > n0)
                m, n = (n0, m0) if transposed else (m0, n0)
                self.states[i] = _MatrixState(np.zeros_like(batch), [np.zeros((m, n)) for _ in range(E)], transposed)
            st = self.states[i]
            st.step += 1
            st.M = self.beta * st.M + (1 - self.beta) * gb
            M_eff = self.beta * st.M + (1 - self.beta) * gb if self.nesterov else st.M
            batches[i] = (batch, [(M_eff[k].T if st.transposed else M_eff[k]) for k in range(E)])
        units = []
        for k, spec in enumerate(self.shared or []):
            units.append((("shared", k), [(i, e) for i, _ in spec for e in range(len(batches[i][1]))]))
        for i in range(len(params)):
            if i not in sides:
                units += [((i, e), [(i, e)]) for e in range(len(batches[i][1]))]
        for key, members in units:
            Us = self._unit(key, [(batches[i][1][e], self.states[i], e) for i, e in members])
            for (i, e), U in zip(members, Us):
                if self.rms_target is not None:
                    U = self.rms_target * U / _rms(U)
                U = U.T if self.states[i].transposed else U
                batch = batches[i][0]
                batch[e] = (1 - self.lr * self.weight_decay) * batch[e] - self.lr * U
