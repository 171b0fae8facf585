"""Eq. 1 of WUDI-Merging (arXiv 2503.08099) as a least-squares problem, kept in its cheaper space.

``L(tau) = sum_i w_i ||(tau - tau_i) tau_i^T||_F^2 = ||tau X - Y||_F^2`` with ``X = [sqrt(w_i) tau_i^T]_i``,
``Y = [tau_i sqrt(w_i) tau_i^T]_i``; gradient ``2 (tau C - D)``, ``C = X X^T``, ``D = Y X^T``. The solvers
of :mod:`.wudi` work on an :class:`InterferenceProblem` in the primal (``C``, ``D``: ``in x in``) or the dual
(``X``, ``Y``, ``G = X^T X``: ``r x r``) form, whichever is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from mergekit_wudi.solvers.numerics import compute_dtype, finite_squared_norms

TensorsLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def _stack(task_vectors: TensorsLike) -> torch.Tensor:
    tvs = task_vectors if isinstance(task_vectors, torch.Tensor) else torch.stack(list(task_vectors))
    if tvs.ndim != 3:
        raise ValueError(f"WUDI solves 2-D weights: expected task vectors [T, out, in], got {tuple(tvs.shape)}")
    return tvs.to(compute_dtype(tvs.dtype))


def _is_copy(stacked: torch.Tensor, given: TensorsLike) -> bool:
    """True when ``stacked`` (``given`` stacked or cast) is a new tensor: the caller may overwrite it."""
    return not isinstance(given, torch.Tensor) or stacked.data_ptr() != given.data_ptr()


@dataclass
class InterferenceProblem:
    """The quadratic ``L(tau) = ||tau X - Y||_F^2`` of Eq. 1, kept in its cheaper space.

    Primal form holds ``C = X X^T`` and ``D = Y X^T``; dual form holds ``X``, ``Y`` and
    ``G = X^T X``. ``init`` is the starting point of the iterative solvers (the sum of task vectors).
    """

    init: torch.Tensor
    C: Optional[torch.Tensor] = None
    D: Optional[torch.Tensor] = None
    X: Optional[torch.Tensor] = None
    Y: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    # Optional, for accuracy: the half-gradient at ``init`` (``init C - D`` / ``init X - Y``) computed
    # without cancellation. Iterative solvers then evaluate ``(tau - init) C + R0``: the same gradient,
    # but float32 rounding no longer grows as ``tau C`` and ``D`` cancel (they nearly do near a minimum).
    R0: Optional[torch.Tensor] = None

    @property
    def dual(self) -> bool:
        return self.X is not None

    def half_gradient(self, tau: torch.Tensor) -> torch.Tensor:
        """``(tau C - D)``, half of ``dL/dtau``."""
        if self.dual:
            return (tau @ self.X - self.Y) @ self.X.T
        return torch.addmm(self.D, tau, self.C, beta=-1)

    @property
    def gram(self) -> torch.Tensor:
        """The Gram the solvers factor: ``G`` (dual) or ``C`` (primal)."""
        return self.G if self.dual else self.C

    @property
    def rhs(self) -> torch.Tensor:
        """``Y`` (dual) or ``D`` (primal): the minimiser is ``rhs gram^{-1}`` (times ``X^T`` in dual form)."""
        return self.Y if self.dual else self.D

    def eigh(self):
        """Eigen-pairs of the smaller Gram, in descending order of eigenvalue.

        Computed in float64 (and returned in the Gram's dtype): besides being more accurate, MKL's
        float32 ``syevd`` is erratically slow on some CPUs (tens of seconds for n ~ 1000-3000 on AMD EPYC),
        its float64 path is not.
        """
        gram = self.gram
        lam, vec = torch.linalg.eigh(gram.double() if gram.dtype == torch.float32 else gram)
        return lam.flip(0).clamp_min(0).to(gram.dtype), vec.flip(1).to(gram.dtype)


def _use_dual(n_in: int, rank: int) -> bool:
    # Iterative solvers: a step costs ~out*in^2 primal, ~2*out*in*r dual: pick the smaller.
    return 2 * rank < n_in


def _use_dual_direct(n_tasks: int, n_out: int, n_in: int) -> bool:
    """Space for the one-shot solvers (closed_form, spectral): the smaller Gram.

    It is the full-rank one (``C`` has rank <= min(in, T*out)), so its Cholesky factor exists in
    float32, and it is also the cheaper: the dual's set-up ``T(T+1)/2 out^2 in`` (distinct blocks of
    ``G``) + ``out r in`` (back-projection) against the primal's ``2 T out in^2`` (``C`` and ``D``),
    and the factorisation is ``min(in, r)^3 / 3``.
    """
    return n_tasks * n_out < n_in


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``a^T a`` for ``a`` [m, n]; for large ``n`` only 3 of its 4 half-blocks are multiplied (it is
    symmetric), 3/4 of the multiply-adds of one product."""
    n = a.shape[1]
    if n < 512:
        return a.T @ a
    h = n // 2
    a0, a1 = a[:, :h], a[:, h:]
    out = torch.empty(n, n, dtype=a.dtype, device=a.device)
    out[:h, :h] = a0.T @ a0
    off = a0.T @ a1
    out[:h, h:] = off
    out[h:, :h] = off.T
    out[h:, h:] = a1.T @ a1
    return out


def wudi_problem(
    task_vectors: TensorsLike, *, dual: Optional[bool] = None, residual: bool = False
) -> InterferenceProblem:
    """Build Eq. 1 for nonzero task vectors ``[T, out, in]`` (zero ones must be dropped first).

    ``dual=None`` picks the space that makes an optimiser step cheaper (:func:`_use_dual`);
    ``True``/``False`` force the dual (``X, Y, G``) or primal (``C, D``) form. ``R0`` (the
    cancellation-free half-gradient at ``init``) is always filled in the dual form, where it is free;
    in the primal form only with ``residual=True`` (it costs as much as ``D``).
    """
    tvs = _stack(task_vectors)
    T, n_out, n_in = tvs.shape
    sq_norms = finite_squared_norms(tvs)
    if not bool((sq_norms > 0).all()):
        raise ValueError("wudi_problem: a task vector is exactly zero; drop it before solving")
    init = tvs.sum(dim=0)
    if dual is None:
        dual = _use_dual(n_in, T * n_out)
    if dual:
        return _dual_problem(tvs, sq_norms, init)
    C = torch.zeros(n_in, n_in, dtype=tvs.dtype, device=tvs.device)
    D = torch.zeros(n_out, n_in, dtype=tvs.dtype, device=tvs.device)
    R0 = torch.zeros(n_out, n_in, dtype=tvs.dtype, device=tvs.device) if residual else None
    for tau, sq in zip(tvs, sq_norms):
        gram_i = _gram(tau)
        C.add_(gram_i, alpha=1 / float(sq))
        if n_in <= 2 * n_out:
            D.addmm_(tau, gram_i, alpha=1 / float(sq))
            if R0 is not None:  # R0 = sum_i w_i (init - tau_i) tau_i^T tau_i
                R0.addmm_(init - tau, gram_i, alpha=1 / float(sq))
        else:  # (tau tau^T) tau is cheaper for wide weights
            D.addmm_(tau @ tau.T, tau, alpha=1 / float(sq))
            if R0 is not None:
                R0.addmm_((init - tau) @ tau.T, tau, alpha=1 / float(sq))
    return InterferenceProblem(init=init, C=C, D=D, R0=R0)


def _dual_problem(tvs: torch.Tensor, sq_norms: torch.Tensor, init: torch.Tensor) -> InterferenceProblem:
    """The dual form of :func:`wudi_problem`: ``X``, ``Y``, ``G = X^T X`` and the free residual ``R0``."""
    T, n_out, n_in = tvs.shape
    scale = sq_norms.rsqrt()
    # X^T = [sqrt(w_i) tau_i] stacked by rows: [T*out, in], contiguous; X is its transpose view.
    Xt = (tvs * scale[:, None, None]).reshape(T * n_out, n_in)
    # G = X^T X is symmetric: compute its T(T+1)/2 distinct blocks only.
    G = torch.empty(T * n_out, T * n_out, dtype=tvs.dtype, device=tvs.device)
    blocks = [Xt[i * n_out:(i + 1) * n_out] for i in range(T)]
    for i in range(T):
        for j in range(i, T):
            blk = _gram(blocks[i].T) if i == j else blocks[i] @ blocks[j].T
            G[i * n_out:(i + 1) * n_out, j * n_out:(j + 1) * n_out] = blk
            if j != i:
                G[j * n_out:(j + 1) * n_out, i * n_out:(i + 1) * n_out] = blk.T
    # Y_i = tau_i X_i = sqrt(w_i) tau_i tau_i^T = G_ii / sqrt(w_i): free from the Gram.
    Y = torch.cat(
        [G[i * n_out:(i + 1) * n_out, i * n_out:(i + 1) * n_out] / scale[i] for i in range(T)], dim=1
    )
    # R0_i = (init - tau_i) X_i = sum_{j != i} tau_j X_i = sum_{j != i} G_ji / sqrt(w_j): also free.
    R0 = torch.cat(
        [
            sum(
                (G[j * n_out:(j + 1) * n_out, i * n_out:(i + 1) * n_out] / scale[j] for j in range(T) if j != i),
                torch.zeros(n_out, n_out, dtype=tvs.dtype, device=tvs.device),
            )
            for i in range(T)
        ],
        dim=1,
    )
    return InterferenceProblem(init=init, X=Xt.T, Y=Y, G=G, R0=R0)
