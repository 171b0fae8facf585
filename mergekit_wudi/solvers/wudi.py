"""WUDI-Merging solvers: plain functions, tensors in, tensor out.

WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It", ICML 2025,
arXiv 2503.08099) merges one linear weight matrix at a time. With base ``W0`` ([out, in]) and
expert task vectors ``tau_i = W_i - W0`` it solves

    tau_m = argmin  L(tau) = sum_i  w_i * || (tau - tau_i) tau_i^T ||_F^2 ,   w_i = 1 / ||tau_i||_F^2   (Eq. 1)

and returns ``W0 + scaling * tau_m``. The rows of ``tau_i`` stand in for the inputs the layer saw
while it was fine-tuned, so the merged layer reproduces each expert on its own inputs.

Every solver here sees Eq. 1 as one least-squares problem ``L(tau) = ||tau X - Y||_F^2`` with
``X = [sqrt(w_i) P_i^T]_i`` ([in, r]) and ``Y = [A_i sqrt(w_i) P_i^T]_i`` ([out, r]) where, for WUDI,
``P_i = A_i = tau_i`` (``r = T * out``). Its gradient is ``2 (tau C - D)`` with ``C = X X^T`` ([in, in])
and ``D = Y X^T`` ([out, in]), so an optimiser step costs one matrix product instead of 2T, and
the solver works in whichever space is smaller: the primal ``in x in`` Gram ``C`` or the dual
``r x r`` Gram ``G = X^T X``.

Solvers (``solver=`` in :func:`wudi`):

- ``adam``: the authors' algorithm, exactly: init = SUM of task vectors, ``torch.optim.Adam``
  (lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay), 300 full-batch iterations on Eq. 1.
- ``closed_form``: the exact minimiser ``D (C + rho I)^{-1}`` (``D C^+`` as ``ridge -> 0``).
- ``spectral``: exact gradient flow of Eq. 1 from the sum init for time ``t`` (Eq. 2 below),
  optionally restricted to the top share of eigen-directions of ``C``.
- ``lowrank``: the authors' follow-up for LLMs (OptMerge, arXiv 2505.19892): per task keep rank
  ``k = floor(min(out, in) / T)``; target ``A_i = mean + rank-k SVD of (tau_i - mean)``,
  projector ``P_i = diag(s_k) V_k^T`` of ``tau_i``; the same Adam loop.

``rank=`` (``closed_form`` and ``spectral`` only) solves Eq. 1 for rank-``k`` truncations of the
task vectors in the span of their row spaces, at O(T out in k): see :mod:`.wudi_lowrank`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

Solver = Literal["adam", "closed_form", "spectral", "lowrank"]
SOLVERS: tuple[str, ...] = ("adam", "closed_form", "spectral", "lowrank")

# Defaults of the authors' code (ViT script; their RoBERTa script uses lr 2e-5).
ITERATIONS = 300
LEARNING_RATE = 1e-5
BETAS = (0.9, 0.999)
EPS = 1e-8
# This project's defaults for the fast solvers; see README "Solvers" for how they were chosen.
RIDGE = 1e-2
FLOW_TIME = 8.0
KEEP_FRACTION = 1.0
# rank="auto" keeps this share of each task vector's energy. Provisional: to be chosen on the
# validation split of the quality benchmark.
RANK_ENERGY = 0.9

TensorsLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stack(task_vectors: TensorsLike) -> torch.Tensor:
    tvs = task_vectors if isinstance(task_vectors, torch.Tensor) else torch.stack(list(task_vectors))
    if tvs.ndim != 3:
        raise ValueError(f"WUDI solves 2-D weights: expected task vectors [T, out, in], got {tuple(tvs.shape)}")
    return tvs.to(compute_dtype(tvs.dtype))


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
    sq_norms = tvs.square().sum(dim=(1, 2))
    if not bool((sq_norms > 0).all()):
        raise ValueError("wudi_problem: a task vector is exactly zero; drop it before solving")
    init = tvs.sum(dim=0)
    if dual is None:
        dual = _use_dual(n_in, T * n_out)
    if dual:
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


def lowrank_problem(task_vectors: TensorsLike) -> InterferenceProblem:
    """OptMerge's low-rank form of Eq. 1 (the WUDI authors' follow-up for LLMs).

    With ``k = floor(min(out, in) / T)``, ``mean = mean_i tau_i``, ``P_i = diag(s_k) V_k^T`` from the
    SVD of ``tau_i`` and ``A_i = mean + U'_k S'_k V'_k^T`` from the SVD of ``tau_i - mean``:
    ``L(tau) = sum_i ||(tau - A_i) P_i^T||^2 / ||tau_i||^2``, init = sum of task vectors.
    """
    tvs = _stack(task_vectors)
    T, n_out, n_in = tvs.shape
    k = max(1, min(n_out, n_in) // T)
    sq_norms = tvs.square().sum(dim=(1, 2))
    mean = tvs.mean(dim=0)
    xs, ys = [], []
    for tau, sq in zip(tvs, sq_norms):
        _, s, vh = torch.linalg.svd(tau, full_matrices=False)
        x = (vh[:k].T * s[:k]) / sq.sqrt()  # sqrt(w_i) P_i^T, [in, k]
        u2, s2, vh2 = torch.linalg.svd(tau - mean, full_matrices=False)
        target = mean + (u2[:, :k] * s2[:k]) @ vh2[:k]
        xs.append(x)
        ys.append(target @ x)
    X, Y = torch.cat(xs, dim=1), torch.cat(ys, dim=1)
    init = tvs.sum(dim=0)
    if _use_dual(n_in, X.shape[1]):
        return InterferenceProblem(init=init, X=X, Y=Y, G=X.T @ X)
    return InterferenceProblem(init=init, C=X @ X.T, D=Y @ X.T)


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


def _flow_gain(lam: torch.Tensor, time: float) -> torch.Tensor:
    """``(1 - exp(-lam t)) / lam`` (``-> t`` as ``lam -> 0``), without dividing by zero."""
    tiny = torch.finfo(lam.dtype).tiny
    return torch.where(lam > tiny, -torch.expm1(-lam * time) / lam.clamp_min(tiny), torch.full_like(lam, time))


def _chebyshev_gain(bound: float, time: float, tol: float, max_degree: int = 256) -> list[float]:
    """Chebyshev coefficients of ``lam -> (1 - exp(-lam t)) / lam`` on ``[0, bound]``, truncated at the
    first three consecutive coefficients totalling below ``tol * t / 4`` (``t`` is the function's
    maximum; the function is entire, so past its hump the coefficients decay faster than geometrically
    and the dropped tail is below ``tol * t``)."""
    n = 2 * max_degree
    # Host-side scalar work (the result is a list of floats): on the CPU explicitly, whatever the
    # default device is.
    k = torch.arange(n, dtype=torch.float64, device="cpu")
    nodes = torch.cos(math.pi * (k + 0.5) / n)
    values = _flow_gain((nodes + 1) * (bound / 2), time)
    coeffs = (2 / n) * (torch.cos(math.pi * k[: max_degree + 3, None] * (k[None, :] + 0.5) / n) @ values)
    coeffs[0] /= 2
    window = coeffs.abs().unfold(0, 3, 1).sum(1)  # window[j] = |c_j| + |c_j+1| + |c_j+2|
    small = (window[1:] < tol * time / 4).nonzero()
    degree = int(small[0]) if len(small) else max_degree
    return coeffs[: degree + 1].tolist()


def _apply_chebyshev(rhs: torch.Tensor, gram: torch.Tensor, coeffs: list[float], bound: float) -> torch.Tensor:
    """``rhs @ p(gram)`` for the Chebyshev series ``p`` on ``[0, bound]``, by Clenshaw's recurrence
    (one product with ``gram`` per degree). When ``rhs`` has more rows than ``gram``, ``p(gram)`` is
    built first (cheaper) and applied once."""
    n = gram.shape[0]
    if rhs.shape[0] > n:
        return rhs @ _apply_chebyshev(torch.eye(n, dtype=gram.dtype, device=gram.device), gram, coeffs, bound)
    # x in [-1, 1] <-> lam = bound (x + 1) / 2: right-multiplying by G_hat = (2 / bound) G - I.
    scale = 2 / bound
    b1 = torch.zeros_like(rhs)
    b2 = torch.zeros_like(rhs)
    for c in reversed(coeffs[1:]):
        # b_k = c_k rhs + 2 b_{k+1} G_hat - b_{k+2} = 2 scale b_{k+1} G - (b_{k+2} + 2 b_{k+1} - c_k rhs),
        # written over b_{k+2}'s buffer.
        b2.add_(b1, alpha=2).sub_(rhs, alpha=c).addmm_(b1, gram, beta=-1, alpha=2 * scale)
        b2, b1 = b1, b2
    out = torch.addmm(b1, b1, gram, beta=-1, alpha=scale)
    return out.sub_(b2).add_(rhs, alpha=coeffs[0])


def _spectral_bound(gram: torch.Tensor) -> float:
    """An upper bound on the Gram's largest eigenvalue: min(trace, Frobenius norm) (it is PSD)."""
    bound = min(float(gram.diagonal().sum()), float(torch.linalg.matrix_norm(gram)))
    return bound * (1 + 1e-4) + torch.finfo(gram.dtype).tiny


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
    share of eigen-directions (by eigenvalue) move; the others stay at the init.

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


def wudi_merged_task_vector(
    task_vectors: TensorsLike,
    solver: Solver = "adam",
    *,
    iterations: int = ITERATIONS,
    learning_rate: float = LEARNING_RATE,
    ridge: float = RIDGE,
    time: float = FLOW_TIME,
    keep_fraction: float = KEEP_FRACTION,
    rank: Optional[Union[int, str]] = None,
    rank_energy: float = RANK_ENERGY,
) -> torch.Tensor:
    """``tau_m`` of Eq. 1 for nonzero task vectors ``[T, out, in]``, by the named solver.

    ``rank`` (``closed_form``/``spectral`` only; None: the exact solvers): an int ``k`` truncates
    each task vector to rank ``k``, ``"auto"`` to the smallest rank keeping ``rank_energy`` of each
    one's energy, then solves in the span of their row spaces (:mod:`.wudi_lowrank`). Where the
    truncation would keep the full rank (``k >= min(out, in)``), the exact solver runs.
    """
    if rank is not None or not 0 < rank_energy <= 1:
        from mergekit_wudi.solvers.wudi_lowrank import check_rank_options, low_rank_merged_task_vector

        check_rank_options(rank, rank_energy, solver)
        if rank is not None:
            tau_m = low_rank_merged_task_vector(
                task_vectors, solver, rank=rank, rank_energy=rank_energy, ridge=ridge, time=time,
                keep_fraction=keep_fraction,
            )
            if tau_m is not None:
                return tau_m
    if solver == "adam":
        return adam_solve(wudi_problem(task_vectors, residual=True), iterations=iterations, learning_rate=learning_rate)
    if solver == "lowrank":
        return adam_solve(lowrank_problem(task_vectors), iterations=iterations, learning_rate=learning_rate)
    if solver in ("closed_form", "spectral"):
        tvs = _stack(task_vectors)
        problem = wudi_problem(tvs, dual=_use_dual_direct(*tvs.shape))
        if solver == "closed_form":
            return closed_form_solve(problem, ridge=ridge)
        return spectral_solve(problem, time=time, keep_fraction=keep_fraction)
    raise ValueError(f"unknown WUDI solver {solver!r}; expected one of {', '.join(SOLVERS)}")


def wudi(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    solver: Solver = "adam",
    scaling: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    **solver_options,
) -> torch.Tensor:
    """Merge one linear weight: ``W0 + scaling * tau_m`` with ``tau_m`` from Eq. 1.

    ``weights[i]`` multiplies expert ``i``'s task vector before solving. Experts whose (weighted)
    task vector is exactly zero are skipped: Eq. 1 divides by its norm. Computes in float32
    (float64 for float64 input) and returns the base's dtype. ``solver_options`` go to
    :func:`wudi_merged_task_vector` (``iterations``, ``learning_rate``, ``ridge``, ``time``,
    ``keep_fraction``, ``rank``, ``rank_energy``).
    """
    dtype = compute_dtype(base.dtype)
    weights = [1.0] * len(experts) if weights is None else list(weights)
    if len(weights) != len(experts):
        raise ValueError(f"got {len(weights)} weights for {len(experts)} experts")
    base32 = base.to(dtype)
    tvs = [(e.to(dtype) - base32) * w for e, w in zip(experts, weights)]
    tvs = [tv for tv in tvs if bool(tv.any())]
    if not tvs:
        return base.clone()
    tau_m = wudi_merged_task_vector(torch.stack(tvs), solver, **solver_options)
    return (base32 + scaling * tau_m).to(base.dtype)
