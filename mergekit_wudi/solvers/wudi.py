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
- ``decorrelated``: Eq. 1 with an isotropic input prior ``prior * I`` added to each task's Gram, solved on
  task vectors decorrelated as TSV-M does (numerically nonzero triplets only): ``(1 + prior) / (1 + prior T)``
  times the decorrelated sum (derivation in :func:`.subspace_merging.decorrelated_wudi_merged_task_vector`). The recommended solver for LoRA experts,
  whose row spaces (their ``A``'s, near a random init) say little about the inputs.

``rank=`` (``closed_form`` and ``spectral`` only) solves Eq. 1 for rank-``k`` truncations of the
task vectors in the span of their row spaces, at O(T out in k): see :mod:`.wudi_lowrank`.
"""

from __future__ import annotations

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
from mergekit_wudi.solvers.interference_solvers import (  # noqa: F401  (re-exported: part of this API)
    BETAS,
    EPS,
    FLOW_TIME,
    ITERATIONS,
    KEEP_FRACTION,
    LEARNING_RATE,
    RIDGE,
    adam_solve,
    closed_form_solve,
    spectral_solve,
)
from mergekit_wudi.solvers.numerics import add_cast_, compute_dtype, finite_squared_norms
from mergekit_wudi.solvers.optmerge import lowrank_problem
from mergekit_wudi.solvers.subspace_merging import DECORRELATED_PRIOR, decorrelated_wudi_merged_task_vector
from mergekit_wudi.solvers.task_vectors import task_vectors as task_vectors_of
from mergekit_wudi.solvers.wudi_lowrank import RANK_ENERGY, check_rank_options, low_rank_merged_task_vector

Solver = Literal["adam", "closed_form", "spectral", "lowrank", "decorrelated"]
SOLVERS: tuple[str, ...] = ("adam", "closed_form", "spectral", "lowrank", "decorrelated")


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
    prior: float = DECORRELATED_PRIOR,
    sq_norms: Optional[torch.Tensor] = None,
    overwrite_task_vectors: bool = False,
) -> torch.Tensor:
    """``tau_m`` of Eq. 1 for nonzero task vectors ``[T, out, in]``, by the named solver.

    ``rank`` (``closed_form``/``spectral`` only; None: the exact solvers): an int ``k`` truncates
    each task vector to rank ``k``, ``"auto"`` to the smallest rank keeping ``rank_energy`` of each
    one's energy, then solves in the span of their row spaces (:mod:`.wudi_lowrank`). Where the
    truncation would keep the full rank (``k >= min(out, in)``), the exact solver runs.
    ``sq_norms`` (the task vectors' squared norms, if known) and ``overwrite_task_vectors`` (their
    buffer may hold the result) save passes and allocations on the fast path; the result is the same.
    """
    if rank is not None or not 0 < rank_energy <= 1:
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
    if solver == "decorrelated":
        return decorrelated_wudi_merged_task_vector(_stack(task_vectors), prior=prior)
    if solver in ("closed_form", "spectral"):
        tvs = _stack(task_vectors)
        problem = wudi_problem(tvs, dual=_use_dual_direct(*tvs.shape))
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
    ``learning_rate``, ``ridge``, ``time``, ``keep_fraction``, ``rank``, ``rank_energy``)."""
    _, tvs = task_vectors_of(base, experts)
    return merge_task_vectors(base, tvs, solver=solver, scaling=scaling, weights=weights,
                              overwrite_task_vectors=True, **solver_options)
