"""The three solvers of Eq. 1 (:mod:`.interference`) and their defaults: plain functions of an
:class:`~.interference.InterferenceProblem`, tensors in, tensor out.

:mod:`.wudi` picks one of them per weight; :mod:`.wudi_lowrank` runs ``closed_form`` and ``spectral``
on the projected (rank-``k``) problem. Both import them from here, so neither imports the other's
internals. The equations are in :mod:`.wudi`'s docstring (Eq. 1) and :func:`spectral_solve` (Eq. 2).
"""

from __future__ import annotations

import math

import torch

from mergekit_wudi.solvers.interference import InterferenceProblem
from mergekit_wudi.solvers.matrix_functions import _apply_chebyshev, _chebyshev_gain, _flow_gain, _spectral_bound

# Defaults of the authors' code (ViT script; their RoBERTa script uses lr 2e-5).
ITERATIONS = 300
LEARNING_RATE = 1e-5
BETAS = (0.9, 0.999)
EPS = 1e-8
# This project's defaults for the fast solvers; see README "Solvers" for how they were chosen.
RIDGE = 1e-2
FLOW_TIME = 8.0
KEEP_FRACTION = 1.0


def adam_solve(
    problem: InterferenceProblem,
    *,
    iterations: int = ITERATIONS,
    learning_rate: float = LEARNING_RATE,
    betas: tuple[float, float] = BETAS,
    eps: float = EPS,
) -> torch.Tensor:
    """Minimise Eq. 1 with ``torch.optim.Adam`` from ``problem.init`` (the authors' loop).

    The gradient ``2 (tau C - D)`` is the exact autograd gradient of the authors' loss, so the
    trajectory is theirs up to floating-point rounding.
    """
    init = problem.init
    tau = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.Adam([tau], lr=learning_rate, betas=betas, eps=eps, weight_decay=0)
    with torch.no_grad():
        # grad/2 = tau C - D = (tau - init) C + R0: same value, no cancellation of two large terms.
        r0 = problem.R0
        if r0 is None:  # the residual at init, in the space the step works in
            r0 = torch.addmm(problem.Y, init, problem.X, beta=-1) if problem.dual else problem.half_gradient(init)
        delta = torch.empty_like(init)
        for _ in range(iterations):
            torch.sub(tau, init, out=delta)
            if problem.dual:
                grad = torch.addmm(r0, delta, problem.X) @ problem.X.T
            else:
                grad = torch.addmm(r0, delta, problem.C)
            tau.grad = grad.mul_(2)
            optimizer.step()
    return tau.detach()


def closed_form_solve(problem: InterferenceProblem, *, ridge: float = RIDGE) -> torch.Tensor:
    """Exact minimiser of Eq. 1: ``tau* = D (C + rho I)^{-1} = Y (G + rho I)^{-1} X^T``.

    ``rho = ridge * trace(C) / n`` (``n`` the Gram's size): ridge is relative to the mean eigenvalue,
    so it does not depend on the scale of the task vectors. As ``ridge -> 0`` this is ``D C^+``,
    the minimum-norm minimiser. A Cholesky solve; falls back to an eigen-decomposition
    pseudo-inverse if the regularised Gram is still not numerically positive definite.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    gram, rhs = problem.gram, problem.rhs
    n = gram.shape[0]
    rho = ridge * float(gram.diagonal().sum()) / n
    shifted = gram.clone()
    shifted.diagonal().add_(rho)
    factor, info = torch.linalg.cholesky_ex(shifted)
    del shifted
    if int(info) == 0:
        coef = torch.cholesky_solve(rhs.T, factor).T
    else:
        del factor
        lam, vec = problem.eigh()
        cutoff = max(rho, float(lam[0]) * n * torch.finfo(gram.dtype).eps)
        inv = torch.where(lam > cutoff, 1 / (lam + rho).clamp_min(cutoff), torch.zeros_like(lam))
        coef = ((rhs @ vec) * inv) @ vec.T
    return coef @ problem.X.T if problem.dual else coef


def spectral_solve(
    problem: InterferenceProblem,
    *,
    time: float = FLOW_TIME,
    keep_fraction: float = KEEP_FRACTION,
) -> torch.Tensor:
    """Exact gradient flow ``d tau / ds = -(tau C - D)`` of Eq. 1 from ``init`` for time ``t``.

    With ``C = V diag(lam) V^T`` and ``f = 1 - exp(-lam t)``:                          (Eq. 2)

        tau(t) = init - (init C - D) V diag(f / lam) V^T
               = init - (init X - Y) W diag(f / lam) W^T X^T     (dual, G = X^T X = W diag(lam) W^T)

    Per eigen-direction this interpolates between the init (``f = 0``) and the exact minimiser
    (``f = 1``): early stopping as a spectral filter, the regularisation that makes the authors'
    300 Adam steps beat the exact minimiser. ``C``'s trace equals the number of tasks whatever the
    scale of the task vectors, so ``t`` is dimensionless. ``keep_fraction < 1`` lets only the top
    share of eigen-directions (by eigenvalue) move; the others stay at the init. The share counts the
    eigenvalues of the smaller Gram (size ``min(in, T*out)``), not a rank of the ``in``-dimensional
    input space: on wide layers (``in > T*out``) it keeps a different number of directions than a rank
    ratio over ``in`` such as SWUDI's ``truncate_rank_ratio``.

    With ``keep_fraction = 1`` the matrix function ``V diag(f / lam) V^T`` is applied as a Chebyshev
    series on ``[0, lam_max bound]`` (accurate to the working precision, no eigen-decomposition:
    a handful of matrix products); an eigen-decomposition is used when ``keep_fraction < 1`` or when
    ``lam_max * t`` is so large that the series would cost more.
    """
    if time < 0:
        raise ValueError(f"time must be >= 0, got {time}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if time == 0:
        return problem.init.clone()
    gram = problem.gram
    n = gram.shape[0]
    if problem.dual:
        residual = torch.addmm(problem.Y, problem.init, problem.X, beta=-1)  # init X - Y
    else:
        residual = problem.half_gradient(problem.init)  # init C - D
    coeffs = None
    if keep_fraction == 1 and time > 0:
        bound = _spectral_bound(gram)
        tol = 1e-13 if gram.dtype == torch.float64 else 2e-7
        coeffs = _chebyshev_gain(bound, time, tol)
        if (len(coeffs) - 1) * min(residual.shape[0], n) > 30 * n:
            coeffs = None  # an eigen-decomposition is cheaper
    if coeffs is not None:
        update = _apply_chebyshev(residual, gram, coeffs, bound)
    else:
        lam, vec = problem.eigh()
        keep = max(1, math.ceil(keep_fraction * lam.numel()))
        lam, vec = lam[:keep], vec[:, :keep]
        update = ((residual @ vec) * _flow_gain(lam, time)) @ vec.T
    del residual
    if problem.dual:
        return torch.addmm(problem.init, update, problem.X.T, alpha=-1)
    return problem.init - update
