"""A low-rank fast path for the ``closed_form`` and ``spectral`` WUDI solvers (issue #12).

Eq. 1 sees the task vectors only through their row spaces. Write each one as a product
``tau_i = L_i R_i`` (``L_i`` [out, r_i], ``R_i`` [r_i, in]: a LoRA adapter ``s_i B_i A_i``, or a
truncated SVD) and let ``Q`` ([in, K], ``K <= sum_i r_i``) be an orthonormal basis of the span of
the rows of all ``R_i``. With the projected task vectors ``p_i = tau_i Q`` ([out, K]):

    C = Q M Q^T,   D = (D Q) Q^T,   M = sum_i w_i p_i^T p_i,   D Q = sum_i w_i p_i p_i^T p_i,
    w_i = 1 / ||tau_i||_F^2 = 1 / ||p_i||_F^2,

so Eq. 1 for the ``tau_i`` is Eq. 1 for the ``p_i``, mapped back by ``Q^T``. The existing solvers of
:mod:`.wudi` run unchanged on that small problem; every product costs O(out in K) (never an
[in, in] or [T out, T out] matrix unless ``K`` itself reaches ``in``):

- ``closed_form``: ``(D Q)(M + rho I)^{-1} Q^T``, with ``rho`` the exact solver's (``ridge`` times
  the mean eigenvalue of the full problem's smaller Gram).
- ``spectral``: the exact flow (Eq. 2) from ``init`` is ``init - (init Q - t(time)) Q^T`` with
  ``t`` the small flow from ``init Q``. The component of ``init`` outside ``span(Q)`` does not
  move: those are zero-eigenvalue directions of ``C`` where the residual ``init C - D`` also
  vanishes, so the exact flow leaves them where they are too. ``keep_fraction`` keeps the same
  NUMBER of top eigen-directions as the exact solver (``ceil(keep_fraction n)``, ``n`` the full
  problem's Gram size), so exactly-low-rank input gives the exact result.

:func:`wudi_factored` solves already factored task vectors exactly (to rounding);
:func:`low_rank_factors` truncates dense ones to rank ``k`` (or to an energy share, ``rank="auto"``)
with a randomized range finder, and :func:`low_rank_merged_task_vector` solves the truncated
problem with the same code, starting the spectral flow from the sum of the UNtruncated task vectors.

Cost model (issue #22). Per weight, with ``T`` task vectors of shape [out, in] and ``k`` kept
directions each, the range finder costs ``2 (1 + POWER_ITERATIONS)`` passes of ``[out, in] x q``
(``q = k + OVERSAMPLE``) per task vector and the solve ``O(out in T k)`` more: ``O(T out in k)`` in all,
against ``O(out in min(in, T out))`` for the exact solvers and ``O(T out in)`` for reading the task
vectors (what task arithmetic costs). So the fast path's time over task arithmetic's depends on ``k``,
not on the model's width. ``rank=k`` fixes ``k``. ``rank="auto"`` takes the smallest ``k`` keeping
``rank_energy`` of each task vector's energy, capped at :data:`AUTO_MAX_RANK`: ``k`` is set by the
spectrum for low-rank (LoRA-like) deltas and by the cap for full fine-tunes, whose 90%-energy rank
is 10-20% of ``min(out, in)`` (hundreds at 7B: without the cap that cost as much as the exact solve).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Optional, Sequence, Union

import torch

from mergekit_wudi.solvers.interference import TensorsLike, _is_copy, _stack, _use_dual_direct, wudi_problem
from mergekit_wudi.solvers.interference_solvers import (
    FLOW_TIME,
    KEEP_FRACTION,
    RIDGE,
    closed_form_solve,
    spectral_solve,
)
from mergekit_wudi.solvers.numerics import (
    check_finite,
    compute_dtype,
    finite_squared_norms,
    one_cpu_thread,
    singular_value_floor,
)

FAST_SOLVERS: tuple[str, ...] = ("closed_form", "spectral")
# Randomized range finder (Halko, Martinsson & Tropp 2011): extra columns beyond the rank sought,
# subspace iterations, and the fixed seed of its test matrix. One iteration (torch.svd_lowrank uses
# 2) is enough for fine-tuning deltas, whose spectra decay fast; each one costs two [out, in] x q
# products per task vector, the largest cost of the fast path on an LLM (README, speed sweep).
OVERSAMPLE = 10
POWER_ITERATIONS = 1
SEED = 0
# rank="auto" (issue #22): at most AUTO_MAX_RANK directions per task vector, found with sketches of
# AUTO_START + OVERSAMPLE columns that double up to AUTO_MAX_RANK + OVERSAMPLE. A full fine-tune needs
# 10-20% of min(out, in) for 90% of its energy; chasing that share made the fast path cost as much as the
# exact solve on realistic experts, while the quality benchmark scored a small rank at least as well with
# spectral (whose untruncated init stays outside the kept span). With AUTO_MAX_RANK == AUTO_START
# the search is ONE sketch whatever the experts, so the cost per weight is bounded (module docstring).
AUTO_START = 8
AUTO_MAX_RANK = 8
# rank="auto" keeps this share of each task vector's energy (within AUTO_MAX_RANK): the best of
# 0.5 / 0.8 / 0.9 / 0.95 for ``spectral`` on the quality benchmark's validation split (a flat grid).
RANK_ENERGY = 0.9

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


def check_rank_options(rank, rank_energy: float, solver: str) -> None:
    """A clear error for a bad ``rank`` / ``rank_energy`` or a solver without a fast path."""
    if not 0 < rank_energy <= 1:
        raise ValueError(f"parameter 'rank_energy' must be in (0, 1], got {rank_energy!r}")
    if rank is None:
        return
    if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"parameter 'rank' must be an integer >= 1, 'auto' or None, got {rank!r}")
    if solver not in FAST_SOLVERS:
        raise ValueError(
            f"parameter 'rank' works with solver 'closed_form' or 'spectral' only, got solver {solver!r}"
        )


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a thin ``y`` [n, q] (Householder QR). The fast path's
    factorizations (this QR, the SVD of [q, in], the small problem's eigh) are small: one thread
    (:func:`.numerics.one_cpu_thread`); the big products around them keep every thread."""
    with one_cpu_thread(y.device):
        return torch.linalg.qr(y).Q


def randomized_svd(tau: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``q`` SVD ``U diag(s) Vh`` of ``tau`` [out, in], at O(out in q).

    The algorithm of ``torch.svd_lowrank`` (Halko et al. 2011, Alg. 4.4 with ``POWER_ITERATIONS``
    subspace iterations, then Alg. 5.1), written out so that its Gaussian test matrix comes from a
    generator seeded with ``SEED`` on ``tau``'s device: ``torch.svd_lowrank`` draws from the global
    RNG, which would make merges irreproducible and shift the caller's random stream.
    ``U diag(s) Vh`` is the exact SVD of ``B B^T tau`` for the orthonormal range basis ``B``, so the
    rank-k truncation returned keeps exactly ``sum_{j<k} s_j^2`` of the energy (<= the optimum).
    """
    generator = torch.Generator(device=tau.device).manual_seed(SEED)
    omega = torch.randn(tau.shape[1], q, generator=generator, dtype=tau.dtype, device=tau.device)
    basis = _orthonormal_basis(tau @ omega)
    for _ in range(POWER_ITERATIONS):
        basis = _orthonormal_basis(tau.T @ basis)
        basis = _orthonormal_basis(tau @ basis)
    small = basis.T @ tau
    with one_cpu_thread(tau.device):
        u, s, vh = torch.linalg.svd(small, full_matrices=False)
    return basis @ u, s, vh


def _energy_rank(s: torch.Tensor, sq_norm: torch.Tensor, share: float) -> Optional[int]:
    """Smallest ``k`` with ``sum_{j<k} s_j^2 >= share * sq_norm``; None if no ``k <= len(s)`` does."""
    hit = (torch.cumsum(s.square(), 0) >= share * sq_norm).nonzero()
    return int(hit[0]) + 1 if len(hit) else None


def _auto_rank(tau: torch.Tensor, share: float, limit: int, sq_norm: torch.Tensor):
    """(k, svd, True) for the smallest ``k <= limit`` keeping ``share`` of ``tau``'s energy
    (``sq_norm``), or (limit, svd, False) when no ``k <= limit`` does. ``q``
    doubles from ``AUTO_START + OVERSAMPLE`` up to ``limit + OVERSAMPLE`` until ``k`` fits with
    ``OVERSAMPLE`` spare columns (the estimated top singular values are then accurate)."""
    q = min(limit, AUTO_START) + OVERSAMPLE
    while True:
        svd = randomized_svd(tau, q)
        k = _energy_rank(svd[1], sq_norm, share)
        if k is not None and k + OVERSAMPLE <= q:
            return min(k, limit), svd, k <= limit
        if q >= limit + OVERSAMPLE:
            return limit, svd, False
        q = min(limit + OVERSAMPLE, 2 * q)


def _truncate(svd, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U_k diag(s_k), Vh_k)``, without numerically-zero singular values."""
    u, s, vh = svd
    k = min(k, len(s))
    floor = singular_value_floor(s, (u.shape[0], vh.shape[1]))
    k = max(1, min(k, int((s[:k] > floor).sum())))
    return u[:, :k] * s[:k], vh[:k]


def low_rank_factors(
    task_vectors: TensorsLike,
    rank,
    rank_energy: float = RANK_ENERGY,
    *,
    sq_norms: Optional[torch.Tensor] = None,
    max_rank: Optional[int] = None,
) -> Optional[list]:
    """Rank-``k`` factors ``(left [out, k], right [k, in])`` of nonzero task vectors ``[T, out, in]``.

    ``rank=k`` (int): each task vector's randomized rank-``k`` SVD (``k + OVERSAMPLE`` columns).
    ``rank="auto"``: one ``k`` per tensor, the smallest that keeps ``rank_energy`` of EACH task
    vector's squared Frobenius norm, capped at ``max_rank`` (default :data:`AUTO_MAX_RANK`),
    estimated from the same randomized SVD: the estimate is exact for the truncation returned (it
    may pick a ``k`` slightly above the optimal SVD's, never one that keeps less than the share,
    unless the cap binds). Cost per task vector: ``O(out in (max_rank + OVERSAMPLE))`` at most,
    independent of how fast its spectrum decays. Numerically-zero singular values are dropped.
    Returns None when no truncation is wanted: ``k >= min(out, in)``, ``rank_energy == 1``, or, on
    a tensor so small that ``min(out, in) / 2`` is below the cap, an auto ``k`` above
    ``min(out, in) / 2`` (its exact solve costs about as much and keeps all of the energy).
    ``sq_norms``: the task vectors' squared Frobenius norms if the caller has them (``rank="auto"``
    needs them; one pass over each task vector saved).
    """
    tvs = _stack(task_vectors)
    _, n_out, n_in = tvs.shape
    full = min(n_out, n_in)
    if rank == "auto":
        cap = AUTO_MAX_RANK if max_rank is None else max_rank
        if rank_energy >= 1:
            return None
        limit = min(cap, full // 2)
        sq_norms = finite_squared_norms(tvs) if sq_norms is None else sq_norms
        found = [_auto_rank(tau, rank_energy, limit, sq) for tau, sq in zip(tvs, sq_norms)]
        if limit < cap and not all(reached for _, _, reached in found):
            return None
        k = max(k for k, _, _ in found)
        q = min(full, k + OVERSAMPLE)  # tasks whose search stopped below q are redone at q
        svds = [svd if len(svd[1]) >= q else randomized_svd(tau, q) for tau, (_, svd, _) in zip(tvs, found)]
    else:
        if rank >= full:
            return None
        k = rank
        svds = [randomized_svd(tau, min(full, k + OVERSAMPLE)) for tau in tvs]
    return [_truncate(svd, k) for svd in svds]


def _checked_factors(factors: Factors) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The factors in the compute dtype (float64 if any is float64, else float32), or a clear error."""
    if len(factors) == 0:
        raise ValueError("wudi_factored: no factors given")
    shape = None
    for i, (left, right) in enumerate(factors):
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(
                f"factors[{i}]: expected left [out, r] and right [r, in], "
                f"got {tuple(left.shape)} and {tuple(right.shape)}"
            )
        shape = shape or (left.shape[0], right.shape[1])
        if (left.shape[0], right.shape[1]) != shape:
            raise ValueError(f"factors[{i}]: product is {left.shape[0]}x{right.shape[1]}, factors[0]'s is {shape}")
        check_finite(left, f"factors[{i}] (left)")
        check_finite(right, f"factors[{i}] (right)")
    dtype = compute_dtype(functools.reduce(torch.promote_types, (t.dtype for pair in factors for t in pair)))
    return [(left.to(dtype), right.to(dtype)) for left, right in factors]


def wudi_factored(
    factors: Factors,
    solver: str = "closed_form",
    *,
    ridge: float = RIDGE,
    time: float = FLOW_TIME,
    keep_fraction: float = KEEP_FRACTION,
    init: Optional[torch.Tensor] = None,
    overwrite_init: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``tau_m`` of Eq. 1 for task vectors given as products ``tau_i = left_i @ right_i``.

    For a LoRA expert pass ``(scale_i * B_i, A_i)``. The result equals the dense solver's
    (:func:`.wudi.wudi_merged_task_vector` on the products, same options) up to rounding, at
    O(out in K + out K^2 + in K^2) with ``K = sum_i r_i`` (see the module docstring). Products that
    are exactly zero are skipped, as :func:`.wudi.wudi` skips zero task vectors; with none left the
    result is zero. ``init`` (default: the sum of the products) is the spectral flow's start
    (``closed_form`` ignores it); with ``overwrite_init`` the result
    may be written into it, saving an [out, in] copy. ``out`` (``closed_form``; contiguous, of
    the compute dtype): where to write the result, saving the same allocation.
    Computes in float32 (float64 if any factor is float64), returns that dtype.
    """
    if solver not in FAST_SOLVERS:
        raise ValueError(f"wudi_factored: solver must be 'closed_form' or 'spectral', got {solver!r}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    factors = _checked_factors(factors)
    n_out, n_in = factors[0][0].shape[0], factors[0][1].shape[1]
    if init is not None and tuple(init.shape) != (n_out, n_in):
        raise ValueError(f"wudi_factored: init is {tuple(init.shape)}, the products are {(n_out, n_in)}")
    dtype = factors[0][0].dtype
    # Orthonormal basis of the span of all rows of the right factors (Householder QR: orthonormal
    # even if the rows are dependent; the extra directions have zero eigenvalue and change nothing).
    basis = _orthonormal_basis(torch.cat([right.T for _, right in factors], dim=1))  # [in, K]
    projected = [p for p in (left @ (right @ basis) for left, right in factors) if bool(p.any())]
    if not projected:  # Eq. 1 has no terms: nothing moves
        if init is None or solver == "closed_form":
            return torch.zeros(n_out, n_in, dtype=dtype, device=basis.device)
        return init.to(dtype).clone()
    projected = torch.stack(projected)
    n_tasks, _, n_small = projected.shape
    problem = wudi_problem(projected, dual=_use_dual_direct(n_tasks, n_out, n_small))
    full_gram_size = n_tasks * n_out if _use_dual_direct(n_tasks, n_out, n_in) else n_in
    small_gram_size = problem.gram.shape[0]
    if solver == "closed_form":
        # closed_form_solve's rho = ridge * trace / (its Gram's size); both traces are T.
        with one_cpu_thread(basis.device):
            small = closed_form_solve(problem, ridge=ridge * small_gram_size / full_gram_size)
        if out is not None and out.shape == (n_out, n_in) and out.dtype == dtype and out.is_contiguous():
            return torch.mm(small, basis.T, out=out)
        return small @ basis.T
    keep = math.ceil(keep_fraction * full_gram_size)  # directions the exact solver would keep
    small_keep_fraction = 1.0 if keep >= small_gram_size else (keep - 0.5) / small_gram_size
    if init is None:  # the sum of the products lies in span(Q): nothing outside it to keep
        with one_cpu_thread(basis.device):
            small = spectral_solve(problem, time=time, keep_fraction=small_keep_fraction)
        return small @ basis.T
    init = init.to(dtype)
    problem = dataclasses.replace(problem, init=init @ basis, R0=None)
    with one_cpu_thread(basis.device):
        moved = problem.init - spectral_solve(problem, time=time, keep_fraction=small_keep_fraction)
    if overwrite_init and init.is_contiguous():
        return init.addmm_(moved, basis.T, alpha=-1)
    return torch.addmm(init, moved, basis.T, alpha=-1)


def low_rank_merged_task_vector(
    task_vectors: TensorsLike,
    solver: str,
    *,
    rank: Union[int, str],
    rank_energy: float = RANK_ENERGY,
    ridge: float = RIDGE,
    time: float = FLOW_TIME,
    keep_fraction: float = KEEP_FRACTION,
    sq_norms: Optional[torch.Tensor] = None,
    overwrite_task_vectors: bool = False,
) -> Optional[torch.Tensor]:
    """``tau_m`` of Eq. 1 for the rank-``k`` truncations of nonzero task vectors ``[T, out, in]``
    (:func:`low_rank_factors`), solved by :func:`wudi_factored`; the spectral flow starts from the
    sum of the untruncated task vectors, whose part outside the truncations' row span stays as it is.
    Returns None when :func:`low_rank_factors` wants no truncation (use the exact solver).

    ``sq_norms``: the task vectors' squared norms, if known. ``overwrite_task_vectors``: the caller
    no longer needs the (float32 / float64) task vectors; the result is built in ``task_vectors[0]``
    (on an LLM a fresh [out, in] buffer costs more in page faults than the arithmetic put in it).
    """
    check_rank_options(rank, rank_energy, solver)
    tvs = _stack(task_vectors)
    factors = low_rank_factors(tvs, rank, rank_energy, sq_norms=sq_norms)
    if factors is None:
        return None
    reuse = tvs.is_contiguous() and (_is_copy(tvs, task_vectors) or overwrite_task_vectors)
    if solver == "closed_form":
        return wudi_factored(factors, solver, ridge=ridge, out=tvs[0] if reuse else None)
    if reuse:
        init = tvs[0]
        for tau in tvs[1:]:
            init.add_(tau)
    else:
        init = tvs.sum(dim=0)
    return wudi_factored(factors, solver, time=time, keep_fraction=keep_fraction, init=init, overwrite_init=True)
