r"""The test oracle: ARO written straight from the equations, in float64 NumPy, one matrix at a time.

No batching, no scaling-vector Sinkhorn, no torch: every line is a line of SPEC §2-§3. The tests
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
    m, n = X.shape
    Y = X / np.abs(X).max()
    for _ in range(num_iters):
        if variant == "simultaneous":
            # Y <- sqrt(mn) Dr(Y)^-1 Y Dc(Y)^-1
            r = np.linalg.norm(Y, axis=1)
            c = np.linalg.norm(Y, axis=0)
            r = np.where(r > eps, r / np.sqrt(n), 1.0)
            c = np.where(c > eps, c / np.sqrt(m), 1.0)
            Y = Y / r[:, None] / c[None, :]
        else:
            # Y <- sqrt(n) Dr(Y)^-1 Y ; Y <- sqrt(m) Y Dc(Y)^-1
            r = np.linalg.norm(Y, axis=1)
            Y = Y / np.where(r > eps, r / np.sqrt(n), 1.0)[:, None]
            c = np.linalg.norm(Y, axis=0)
            Y = Y / np.where(c > eps, c / np.sqrt(m), 1.0)[None, :]
    return _to_rms1(Y)


def sign(X: np.ndarray) -> np.ndarray:
    Y = X / np.abs(X).max()
    tol = X.shape[0] * np.finfo(np.float64).eps / 2  # rounding noise counts as zero
    return _to_rms1(np.where(np.abs(Y) > tol, np.sign(Y), 0.0))


def row_norm(X: np.ndarray) -> np.ndarray:
    n = X.shape[1]
    return _to_rms1(np.sqrt(n) * X / np.linalg.norm(X, axis=1, keepdims=True))


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
    M: np.ndarray  # momentum, parameter layout
    R: list[np.ndarray]  # one rotation per matrix (oriented)
    V: list[np.ndarray]  # Adam second moments, rotated frame
    transposed: bool
    step: int = 0


@dataclass
class ReferenceARO:
    """Float64 reference ARO over a list of 2-D or 3-D NumPy arrays (modified in place)."""

    lr: float = 1e-3
    beta: float = 0.95
    weight_decay: float = 0.01
    base: str = "sinkhorn"
    rotation: str = "aro"
    sinkhorn_iters: int = 5
    sinkhorn_variant: str = "simultaneous"
    nesterov: bool = False
    rms_target: float | None = 0.2
    orientation: str = "auto"
    beta2: float = 0.95
    eps: float = 1e-8
    states: dict[int, _MatrixState] = field(default_factory=dict)

    def f(self, X: np.ndarray) -> np.ndarray:
        if self.base == "sinkhorn":
            return sinkhorn(X, self.sinkhorn_iters, self.sinkhorn_variant)
        return {"sign": sign, "row_norm": row_norm, "identity": identity}[self.base](X)

    def adam(self, Z: np.ndarray, V: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (direction, new V) for V = beta2 V + (1-beta2) Z^2."""
        V_new = self.beta2 * V + (1 - self.beta2) * Z * Z
        D = Z / (np.sqrt(V_new / (1 - self.beta2**step)) + self.eps)
        return _to_rms1(D), V_new

    def _matrix_update(self, X: np.ndarray, st: _MatrixState, k: int) -> np.ndarray:
        """The update U for one oriented momentum matrix X (m x n)."""
        m, n = X.shape
        adam = self.base == "adam"
        if self.rotation == "identity":
            if adam:
                D, st.V[k] = self.adam(X, st.V[k], st.step)
                return D
            return self.f(X)
        R = st.R[k]
        if self.rotation == "eigen_exact":
            R = eigvecs_descending(X @ X.T)
        else:
            if self.rotation == "eigen":
                A = X @ X.T @ R
            else:
                Z = R.T @ X
                F = self.adam(Z, st.V[k], st.step)[0] if adam else self.f(Z)  # look-ahead
                A = X @ F.T
            A = A / np.linalg.norm(A) + _DELTA * R
            R = polar(A) if self.rotation == "polar" else qr_q(A)
        st.R[k] = R
        Z = R.T @ X
        if adam:
            D, st.V[k] = self.adam(Z, st.V[k], st.step)
        else:
            D = self.f(Z)
        return R @ D

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        for i, (W, G) in enumerate(zip(params, grads)):
            batch = W[None] if W.ndim == 2 else W
            gb = G[None] if G.ndim == 2 else G
            E, m0, n0 = batch.shape
            if i not in self.states:
                transposed = self.orientation == "cols" or (self.orientation == "auto" and m0 > n0)
                m, n = (n0, m0) if transposed else (m0, n0)
                self.states[i] = _MatrixState(
                    np.zeros_like(batch), [np.eye(m) for _ in range(E)], [np.zeros((m, n)) for _ in range(E)], transposed
                )
            st = self.states[i]
            st.step += 1
            st.M = self.beta * st.M + (1 - self.beta) * gb
            M_eff = self.beta * st.M + (1 - self.beta) * gb if self.nesterov else st.M
            for k in range(E):
                X = M_eff[k].T if st.transposed else M_eff[k]
                U = self._matrix_update(X, st, k)
                if self.rms_target is not None:
                    U = self.rms_target * U / _rms(U)
                U = U.T if st.transposed else U
                batch[k] = (1 - self.lr * self.weight_decay) * batch[k] - self.lr * U
