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
- ``lowrank``: the authors' follow-up for LLMs (OptMerge, arXiv 2505.19892; its InternVL script
  ``wudi_merging2``, not the Qwen2-VL one: see :mod:`.optmerge`): per task keep rank
  ``k = floor(min(out, in) / T)``; target ``A_i = mean + rank-k SVD of (tau_i - mean)``,
  projector ``P_i = diag(s_k) V_k^T`` of ``tau_i``; the same Adam loop.

``prior=`` (``closed_form`` only) adds an isotropic input prior to each task's Gram (Eq. 3 in
:func:`prior_closed_form_solve`): directions of the input space that only one task's proxy supports
are shrunk towards the weighted mean of the task vectors instead of kept whole.

``rank=`` (``closed_form`` and ``spectral`` only) solves Eq. 1 for rank-``k`` truncations of the
task vectors in the span of their row spaces, at O(T out in k): see :mod:`.wudi_lowrank`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Sequence, Union

import torch

from mergekit_wudi.solvers.interference import (  # noqa: F401  (re-exported: the problem is part of this API)
    InterferenceProblem,
    TensorsLike,
    _is_copy,
    _stack,
    _use_dual_direct,
    wudi_problem,
)
from mergekit_wudi.solvers.matrix_functions import _apply_chebyshev, _chebyshev_gain, _flow_gain, _spectral_bound
from mergekit_wudi.solvers.numerics import add_cast_, compute_dtype, finite_squared_norms
from mergekit_wudi.solvers.optmerge import lowrank_problem
from mergekit_wudi.solvers.task_vectors import task_vectors as task_vectors_of

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
# prior= (isotropic input prior, Eq. 3): 0 is Eq. 1 as the authors wrote it; how c_i is tied to the task.
PRIOR = 0.0
PRIOR_SCALES: tuple[str, ...] = ("rank", "dim")
PRIOR_SCALE = "rank"
# proxy= (closed_form): which Gram of the task vector stands in for the layer's data. "input": tau_i^T tau_i
# (Eq. 1 as written); "output": tau_i tau_i^T (Eq. 1 on the transposed task vectors); "both": the mean of the two
# solutions.
PROXIES: tuple[str, ...] = ("input", "output", "both")
PROXY = "input"
# The data-free configuration recommended for merging without a validation split (issue 21): chosen on the
# validation split of the quality benchmark across full fine-tunes and LoRA experts, then fixed. ``solver:
# adam`` (no parameters) stays the authors' algorithm.
RECOMMENDED = {"solver": "closed_form", "prior": 0.3, "prior_scale": "rank"}

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


def check_prior_options(prior: float, prior_scale: str, solver: str, rank=None, proxy: str = PROXY) -> None:
    """A clear error for a bad ``prior`` / ``prior_scale`` / ``proxy`` or a solver without them."""
    if proxy not in PROXIES:
        raise ValueError(f"parameter 'proxy' must be one of {', '.join(PROXIES)}, got {proxy!r}")
    if proxy != "input" and (solver != "closed_form" or rank is not None):
        raise ValueError(f"parameter 'proxy' {proxy!r} works with the exact closed_form solver only "
                         f"(solver {solver!r}, rank {rank!r})")
    if not (isinstance(prior, (int, float)) and math.isfinite(prior) and prior >= 0):
        raise ValueError(f"parameter 'prior' must be a finite number >= 0, got {prior!r}")
    if prior_scale not in PRIOR_SCALES:
        raise ValueError(f"parameter 'prior_scale' must be one of {', '.join(PRIOR_SCALES)}, got {prior_scale!r}")
    if prior > 0 and solver != "closed_form":
        raise ValueError(f"parameter 'prior' works with solver 'closed_form' only, got solver {solver!r}")
    if prior > 0 and rank is not None:
        raise ValueError("parameter 'prior' works with the exact closed_form solver only (rank: null)")


# numerical_ranks looks for ranks below this share of min(out, in); a larger rank counts as full.
RANK_SKETCH_SHARE = 4


def numerical_ranks(tvs: torch.Tensor) -> torch.Tensor:
    """Numerical rank of each task vector ``[T, out, in]``, or ``min(out, in)`` when it is not clearly low.

    The rank of ``tau_i`` is the rank of the sketch ``tau_i Omega`` for a Gaussian ``Omega`` with ``k =
    min(out, in) // RANK_SKETCH_SHARE`` columns whenever it is below ``k`` (with probability 1); its singular
    values above ``s_max * max(out, in) * eps`` of the dtype count (numpy's ``matrix_rank`` rule). At
    O(out in k) per task vector, a quarter of one Gram. A LoRA update ``s B A`` has rank ``r``; a full
    fine-tune's delta counts as ``min(out, in)``. ``Omega`` comes from a generator with a fixed seed.
    """
    T, n_out, n_in = tvs.shape
    full = min(n_out, n_in)
    k = full // RANK_SKETCH_SHARE
    if k < 2:
        return torch.full((T,), float(full), dtype=tvs.dtype, device=tvs.device)
    generator = torch.Generator(device=tvs.device).manual_seed(0)
    omega = torch.randn(n_in, k, generator=generator, dtype=tvs.dtype, device=tvs.device)
    sv = torch.linalg.svdvals(tvs @ omega)  # [T, k], descending
    tol = max(n_out, n_in) * torch.finfo(tvs.dtype).eps
    ranks = (sv > sv[:, :1] * tol).sum(dim=1)
    return torch.where(ranks < k, ranks, torch.full_like(ranks, full)).clamp_min(1).to(tvs.dtype)


def prior_strengths(tvs: torch.Tensor, sq_norms: torch.Tensor, prior: float, prior_scale: str) -> torch.Tensor:
    """``a_i = w_i c_i`` of Eq. 3 for nonzero task vectors ``[T, out, in]`` (``w_i = 1 / ||tau_i||^2``).

    ``prior_scale="rank"``: ``c_i = prior ||tau_i||^2 / rank(tau_i)`` (:func:`numerical_ranks`): every input
    direction gets ``prior`` times the mean nonzero eigenvalue of the proxy ``tau_i^T tau_i``, so ``a_i =
    prior / rank_i``. For a full-rank delta that is ``prior / in``; for a LoRA update of rank ``r`` it is
    ``prior / r``, as strong relative to each direction the update spans. ``"dim"``: ``c_i = prior
    ||tau_i||^2 / in`` whatever the rank (``a_i = prior / in``).
    """
    T, n_out, n_in = tvs.shape
    if prior_scale == "dim":
        return torch.full((T,), prior / n_in, dtype=tvs.dtype, device=tvs.device)
    return prior / numerical_ranks(tvs)


def prior_closed_form_solve(
    problem: InterferenceProblem, tvs: torch.Tensor, strengths: torch.Tensor, *, ridge: float = RIDGE
) -> torch.Tensor:
    """Exact minimiser of Eq. 1 with each task's Gram ``tau_i^T tau_i + c_i I`` (an isotropic input prior):

        L(tau) = sum_i w_i || (tau - tau_i) (tau_i^T tau_i + c_i I)^{1/2} ||_F^2                        (Eq. 3)
        tau*   = (D + rho m)(C + (rho + rho_r) I)^{-1},   rho = sum_i a_i,  m = sum_i a_i tau_i / rho

    with ``a_i = w_i c_i`` (:func:`prior_strengths`) and ``rho_r`` the ridge of :func:`closed_form_solve`.
    A ridge that pulls towards the weighted mean ``m`` of the task vectors instead of towards zero: in an
    input direction that no task's proxy supports the solution is ``m``; in one that only task ``i``
    supports, with eigenvalue ``g`` of ``w_i tau_i^T tau_i``, it keeps ``(g + a_i)/(g + rho)`` of ``tau_i``
    (LoRA experts with disjoint row spaces: each expert scaled down, the more the more tasks), while
    directions that several tasks support are solved as in Eq. 1. ``prior -> 0`` gives
    :func:`closed_form_solve`. Computed as ``tau* = c m + (rhs - c m X) (G + rho_t I)^{-1} X^T`` (dual)
    or ``c m + (D - c m C)(C + rho_t I)^{-1}`` (primal), ``c = rho / rho_t``: one closed-form solve.
    """
    rho = float(strengths.sum())
    anchor = torch.einsum("t,toi->oi", strengths / rho, tvs) if rho > 0 else torch.zeros_like(tvs[0])
    gram = problem.gram
    n, trace = gram.shape[0], float(gram.diagonal().sum())
    rho_total = rho + ridge * trace / n
    if rho_total == 0:
        return closed_form_solve(problem, ridge=0.0)
    anchor.mul_(rho / rho_total)
    if problem.dual:
        shifted = dataclasses.replace(problem, Y=problem.Y - anchor @ problem.X, R0=None)
    else:
        shifted = dataclasses.replace(problem, D=problem.D - anchor @ problem.C, R0=None)
    return closed_form_solve(shifted, ridge=rho_total * n / trace).add_(anchor)


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
    prior: float = PRIOR,
    prior_scale: str = PRIOR_SCALE,
    proxy: str = PROXY,
    sq_norms: Optional[torch.Tensor] = None,
    overwrite_task_vectors: bool = False,
) -> torch.Tensor:
    """``tau_m`` of Eq. 1 for nonzero task vectors ``[T, out, in]``, by the named solver.

    ``prior`` > 0 (``closed_form`` only): Eq. 3 with the isotropic input prior of strength ``prior``
    scaled by ``prior_scale`` (:func:`prior_strengths`, :func:`prior_closed_form_solve`). ``proxy``
    (``closed_form`` only): ``"output"`` solves Eq. 1 (or 3) for the transposed task vectors, whose proxy is the
    output Gram ``tau_i tau_i^T`` (for a LoRA update ``s B A`` the column space of ``B``, learned from zero,
    where ``A``'s row space stays near its random init), ``"both"`` averages the input and output solutions.

    ``rank`` (``closed_form``/``spectral`` only; None: the exact solvers): an int ``k`` truncates
    each task vector to rank ``k``, ``"auto"`` to the smallest rank keeping ``rank_energy`` of each
    one's energy, then solves in the span of their row spaces (:mod:`.wudi_lowrank`). Where the
    truncation would keep the full rank (``k >= min(out, in)``), the exact solver runs.
    ``sq_norms`` (the task vectors' squared norms, if known) and ``overwrite_task_vectors`` (their
    buffer may hold the result) save passes and allocations on the fast path; the result is the same.
    """
    check_prior_options(prior, prior_scale, solver, rank, proxy)
    if proxy != "input":
        tvs = _stack(task_vectors)
        same = dict(ridge=ridge, prior=prior, prior_scale=prior_scale, sq_norms=sq_norms)
        out = wudi_merged_task_vector(tvs.transpose(1, 2), solver, **same).T.contiguous()
        if proxy == "both":
            out.add_(wudi_merged_task_vector(tvs, solver, **same)).mul_(0.5)
        return out
    if rank is not None or not 0 < rank_energy <= 1:
        from mergekit_wudi.solvers.wudi_lowrank import check_rank_options, low_rank_merged_task_vector

        check_rank_options(rank, rank_energy, solver)
        if rank is not None:
            tau_m = low_rank_merged_task_vector(
                task_vectors, solver, rank=rank, rank_energy=rank_energy, ridge=ridge, time=time,
                keep_fraction=keep_fraction, sq_norms=sq_norms, overwrite_task_vectors=overwrite_task_vectors,
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
        if solver == "closed_form" and prior > 0:
            sq = finite_squared_norms(tvs) if sq_norms is None else sq_norms
            return prior_closed_form_solve(problem, tvs, prior_strengths(tvs, sq, prior, prior_scale), ridge=ridge)
        if solver == "closed_form":
            return closed_form_solve(problem, ridge=ridge)
        return spectral_solve(problem, time=time, keep_fraction=keep_fraction)
    raise ValueError(f"unknown WUDI solver {solver!r}; expected one of {', '.join(SOLVERS)}")


def merge_task_vectors(
    base: torch.Tensor,
    task_vectors: TensorsLike,
    *,
    solver: Solver = "adam",
    scaling: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    overwrite_task_vectors: bool = False,
    **solver_options,
) -> torch.Tensor:
    """Merge one linear weight from its task vectors: ``W0 + scaling * tau_m``, ``tau_m`` from Eq. 1.

    ``weights[i]`` multiplies task vector ``i`` before solving. Task vectors that are (after
    weighting) zero, or so small that their squared norm is, are skipped: Eq. 1 divides by that
    norm; one with NaN / Inf (or a norm that overflows) raises :class:`.numerics.NonFiniteError`
    naming it. Computes in float32 (float64 for float64 input) and returns the base's dtype.
    ``overwrite_task_vectors``: the caller is done with ``task_vectors`` and lets the solver reuse
    their buffer. ``solver_options`` go to :func:`wudi_merged_task_vector`.
    """
    dtype = compute_dtype(base.dtype)
    weights = [1.0] * len(task_vectors) if weights is None else list(weights)
    if len(weights) != len(task_vectors):
        raise ValueError(f"got {len(weights)} weights for {len(task_vectors)} task vectors")
    # No copy of the (LLM-sized) task vectors unless a weight or a zero task vector asks for one.
    tvs = task_vectors.to(dtype) if isinstance(task_vectors, torch.Tensor) else torch.stack(
        [tv.to(dtype) for tv in task_vectors])
    copied = _is_copy(tvs, task_vectors)
    if any(w != 1 for w in weights):
        tvs = tvs * torch.tensor(weights, dtype=dtype, device=tvs.device).view(-1, *[1] * (tvs.ndim - 1))
        copied = True
    sq_norms = finite_squared_norms(tvs)
    nonzero = sq_norms > 0
    if not bool(nonzero.any()):
        return base.clone()
    if not bool(nonzero.all()):
        tvs, sq_norms, copied = tvs[nonzero], sq_norms[nonzero], True
    tau_m = wudi_merged_task_vector(tvs, solver, sq_norms=sq_norms,
                                    overwrite_task_vectors=overwrite_task_vectors or copied, **solver_options)
    if scaling != 1:
        tau_m.mul_(scaling)
    return add_cast_(tau_m, base).to(base.dtype)


def wudi(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    solver: Solver = "adam",
    scaling: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    **solver_options,
) -> torch.Tensor:
    """Merge one linear weight from the expert weights: :func:`merge_task_vectors` of
    ``tau_i = W_i - W0``. ``solver_options`` go to :func:`wudi_merged_task_vector` (``iterations``,
    ``learning_rate``, ``ridge``, ``time``, ``keep_fraction``, ``rank``, ``rank_energy``, ``prior``,
    ``prior_scale``)."""
    _, tvs = task_vectors_of(base, experts)
    return merge_task_vectors(base, tvs, solver=solver, scaling=scaling, weights=weights,
                              overwrite_task_vectors=True, **solver_options)
