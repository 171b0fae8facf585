"""Task-vector merging in singular subspaces: TSV-M, Iso-C and Iso-CTS, tensors in, tensor out.

Every method here merges ONE 2-D weight: from the base ``W0`` and the task vectors
``tau_i = W_i - W0`` it builds a merged task vector ``tau_m`` from the singular value decompositions
of the ``tau_i`` and returns ``W0 + alpha * tau_m`` (computed in float32, float64 for float64, and
cast back to the base's dtype).

- TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025, arXiv 2412.00081, Sec. 5 / Algorithm 1): :func:`tsv_merged_task_vector`.
- Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025, arXiv 2502.04959, Sec. 4.1 and 4.2 / Algorithm 1):
  :func:`iso_c_merged_task_vector`, :func:`iso_cts_merged_task_vector`.

Sources read (2026-11-23): the authors' code, github.com/AntoAndGar/task_singular_vectors
(``src/utils/TSVM_utils.py``, ``compute_and_sum_svd_mem_reduction``) and github.com/danielm1405/
iso-merging (``src/utils/iso.py``, ``src/eval/eval.py``, ``config/method/iso_cts.yaml``). The code
here is our own; where it departs from theirs the docstring says so.

Tensors the authors do not decompose (every non-2-D tensor, and CLIP's ``text_projection``) get
``W0 + alpha * mean_i(tau_i)`` in both codes (a running mean of the task vectors, scaled by the same
alpha); the mergekit kernels apply that rule (``non_linear: mean``) to every tensor that is not a
linear weight (:mod:`mergekit_wudi.linear_weights`). Both codes choose alpha on validation from
``numpy.linspace(0, 3, 31)[1:]`` (:data:`AUTHORS_ALPHA_GRID`).

Zero task vectors (an expert equal to the base on a tensor) are left out of that tensor's merge and
``T`` counts only the others. This is our reading: in the authors' code the SVD of a zero matrix
contributes arbitrary singular vectors with zero singular values, which change the orthogonalisation
of the other tasks' vectors (TSV-M, Iso-CTS) and lower Iso-CTS's mean singular value.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from mergekit_wudi.solvers.numerics import add_cast_, finite_squared_norms, singular_value_floor
from mergekit_wudi.solvers.task_vectors import task_vector_stack
from mergekit_wudi.solvers.wudi_lowrank import OVERSAMPLE, randomized_svd

ISO_CTS_COMMON_SPACE_FRACTION = 0.8  # iso-merging config/method/iso_cts.yaml; the paper's ablation
DECORRELATED_PRIOR = 0.2  # chosen on the quality benchmark's validation split, LoRA experts (docs/lora.md)
# Columns of the sketch tried first for a task vector's nonzero singular triplets: a LoRA update (rank <= 54)
# is then decomposed at O(out in 64) instead of a full SVD; a task vector of higher rank gets the full SVD.
LOW_RANK_SKETCH = 54
AUTHORS_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 31))  # linspace(0, 3, 31)[1:]


def polar_factor(a: torch.Tensor, *, partial: bool = False) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``a = P S Q^T`` (thin SVD): the nearest matrix with
    orthonormal columns (rows, if ``a`` is wide) in Frobenius norm (orthogonal Procrustes). Both
    papers' "orthogonalisation/whitening" of stacked singular vectors is this map. ``partial``: only
    over the numerically nonzero singular values (a partial isometry onto ``a``'s own range), so that
    a rank-deficient ``a`` is not completed with arbitrary directions."""
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    if partial:
        keep = s > singular_value_floor(s, a.shape)
        p, qh = p[:, keep], qh[keep]
    return p @ qh


def _nonzero_svd(tau: torch.Tensor, rank: int):
    """The SVD triplets of ``tau`` that :func:`_stacked_low_rank` keeps with ``nonzero_only`` (top ``rank``,
    numerically nonzero). A low-rank ``tau`` (rank below :data:`LOW_RANK_SKETCH`) gets them from a randomized
    range sketch, used only when it is exact: the sketch is not saturated and the residual
    ``||tau - U S V^T||_F`` is below the nonzero threshold, so every triplet it misses would have been dropped."""
    q = min(rank, LOW_RANK_SKETCH) + OVERSAMPLE
    if 8 * q <= min(tau.shape):  # below that a full SVD is as fast
        u, s, vh = randomized_svd(tau, q)
        floor = singular_value_floor(s, tau.shape)
        if s[-1] <= floor and torch.linalg.matrix_norm(tau - (u * s) @ vh) <= floor:
            return u, s, vh
    return torch.linalg.svd(tau, full_matrices=False)


def _stacked_low_rank(task_vectors: Sequence[torch.Tensor], rank: int, *, nonzero_only: bool = False):
    """Per task the top-``rank`` SVD triplet, stacked: ``U [m, T*rank]``, ``s [T*rank]``, ``Vh [T*rank, n]``.
    ``nonzero_only``: per task only those with a numerically nonzero singular value (a LoRA update of rank
    ``r < rank`` then gives ``r`` triplets, not ``rank`` with arbitrary null-space vectors)."""
    us, ss, vhs = [], [], []
    for tau in task_vectors:
        u, s, vh = _nonzero_svd(tau, rank) if nonzero_only else torch.linalg.svd(tau, full_matrices=False)
        k = min(rank, int((s > singular_value_floor(s, tau.shape)).sum())) if nonzero_only else rank
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


def _check_stack(task_vectors: torch.Tensor) -> None:
    if task_vectors.ndim != 3 or task_vectors.shape[0] == 0:
        raise ValueError(f"expected nonzero task vectors of one 2-D weight, [T, out, in]; got shape "
                         f"{tuple(task_vectors.shape)}")


def _per_task_rank(task_vectors: torch.Tensor, sv_reduction: Optional[float]) -> int:
    """TSV-M's ``k = floor(min(out, in) * sv_reduction)`` (at least 1), ``sv_reduction`` defaulting to ``1/T``."""
    _check_stack(task_vectors)
    if sv_reduction is None:
        sv_reduction = 1.0 / task_vectors.shape[0]
    if not 0.0 < sv_reduction <= 1.0:
        raise ValueError(f"sv_reduction must be in (0, 1], got {sv_reduction}")
    return max(1, int(min(task_vectors.shape[1:]) * sv_reduction))


def tsv_merged_task_vector(task_vectors: torch.Tensor, *, sv_reduction: Optional[float] = None) -> torch.Tensor:
    """``tau_m`` of TSV-Merge (TSV-M) for nonzero task vectors ``[T, out, in]`` (arXiv 2412.00081, Sec. 5).

    1. Per task, ``tau_i = U_i S_i V_i^T`` truncated to its top ``k = floor(r * sv_reduction)``
       singular triplets, ``r = min(out, in)``; ``sv_reduction`` defaults to ``1/T`` (the authors'
       code: ``sv_reduction = 1 / len(DATASETS)``, ``k = int(r * sv_reduction)``).
    2. Concatenate: ``U = [U_1 .. U_T]`` ([out, T k]), ``S = diag(S_1 .. S_T)``, ``V = [V_1 .. V_T]``.
    3. Decorrelate ("whitening", the paper's Eq. for ``U_perp``): replace ``U`` and ``V`` by their
       orthogonal polar factors ``U_perp = P_U Q_U^T`` from ``U = P_U S_U Q_U^T`` (same for ``V``),
       which is the whitening ``U (U^T U)^{-1/2}`` when ``U`` has full column rank.
    4. ``tau_m = U_perp S V_perp^T``.

    Our departures: ``k`` is at least 1 (theirs is 0 when ``T > r``, which merges nothing); the
    stacked matrices hold only the ``T k`` kept columns (theirs zero-pads to ``r`` columns; the padding
    has zero singular values and changes nothing).
    """
    rank = _per_task_rank(task_vectors, sv_reduction)
    u, s, vh = _stacked_low_rank(task_vectors, rank)
    return (polar_factor(u) * s) @ polar_factor(vh)


def decorrelated_wudi_merged_task_vector(
    task_vectors: torch.Tensor, *, prior: float = DECORRELATED_PRIOR, sv_reduction: Optional[float] = None
) -> torch.Tensor:
    """``tau_m`` of WUDI's Eq. 1 with an isotropic input prior, solved on decorrelated task vectors.

    1. Decorrelate as TSV-M does (:func:`tsv_merged_task_vector`, steps 1-3), with two changes: per task only
       its top-``k`` triplets whose singular value is numerically nonzero, and the stacked ``U`` / ``V``
       replaced by their partial-isometry polar factors (:func:`polar_factor` ``partial=True``). TSV-M keeps
       ``k = min(out, in) / T`` triplets per task even when a task vector has lower rank (a LoRA update), and
       the arbitrary singular vectors of its zero singular values then rotate the other tasks' directions:
       the result leaves the span of the experts' rows and depends on the SVD routine. Here the merge lies in
       the span of the task vectors' rows and columns. ``tau_i' = U_perp,i S_i V_perp,i^T``; when the kept
       right singular vectors are linearly independent (``sum_i k_i <= in``, e.g. ``T r <= in`` for rank-``r``
       LoRA updates), ``V_perp`` has orthonormal rows and the tasks' row spaces ``P_i = V_perp,i V_perp,i^T``
       are mutually orthogonal projectors.
    2. Solve Eq. 1 with each task's (normalised) input Gram ``P_i`` plus an isotropic prior ``c I``, the inputs a
       task also sees outside its own update's row space (``c = prior``):
       ``min_tau sum_i ||(tau - tau_i') (P_i + c I)^{1/2}||_F^2``, whose minimiser is
       ``tau = sum_i tau_i' (P_i + c I) (P + c T I)^{-1}`` with ``P = sum_i P_i``. Every ``tau_i'`` lies in the
       span of ``P``, where ``(P + c T I)^{-1} = 1 / (1 + c T)``, so ``tau_m = (1 + c) / (1 + c T) * sum_i tau_i'``.

    Where the kept right singular vectors are linearly dependent (``sum_i k_i > in``), the ``P_i`` overlap and
    the same closed form is kept: a shrink of the decorrelated sum, no longer the exact minimiser.
    ``c = 0`` is the decorrelated sum (TSV-M on full-rank task vectors); ``c -> inf`` is its mean. The shrink
    grows with the number of tasks ``T`` (each other task adds ``c`` of interference on a task's inputs), which a
    fixed task-arithmetic ``lambda`` cannot do. ``T`` counts the nonzero task vectors given. ``prior`` was chosen
    on the quality benchmark's validation split for LoRA experts (``docs/lora.md``); on full fine-tunes it
    shrinks what needs none: ``prior=0`` (TSV-M) or ``spectral`` with ``rank: auto`` there (docs/benchmarks.md).
    """
    if not (math.isfinite(prior) and prior >= 0):
        raise ValueError(f"prior must be a finite number >= 0, got {prior}")
    rank = _per_task_rank(task_vectors, sv_reduction)
    u, s, vh = _stacked_low_rank(task_vectors, rank, nonzero_only=True)
    shrink = (1 + prior) / (1 + prior * task_vectors.shape[0])
    return (polar_factor(u, partial=True) * (shrink * s)) @ polar_factor(vh, partial=True)


def iso_c_merged_task_vector(task_vectors: torch.Tensor) -> torch.Tensor:
    """``tau_m`` of Iso-C for nonzero task vectors ``[T, out, in]`` (arXiv 2502.04959, Sec. 4.1).

    ``tau_TA = sum_i tau_i = U S V^T`` (thin SVD, ``r = min(out, in)`` values); every singular value
    is replaced by their mean: ``tau_m = mean(S) * U V^T`` (the spectrum made flat, the singular
    directions kept). The mean runs over all ``r`` singular values, zeros included, as in the
    authors' ``iso_c``.
    """
    _check_stack(task_vectors)
    u, s, vh = torch.linalg.svd(task_vectors.sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_sizes(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k_common, k_per_task)`` with ``k_common + n_tasks * k_per_task == rank``.

    The authors' rule: ``k = int(r * fraction)``; ``k_ts = round((r - k) / T)``; ``k = r - T k_ts``.
    Our guard: ``k_ts <= floor(r / T)`` (their ``round`` can make ``k`` negative for a small
    fraction, e.g. r=5, T=3, fraction 0)."""
    if not 0.0 <= common_space_fraction <= 1.0:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {common_space_fraction}")
    k_common = int(rank * common_space_fraction)
    k_per_task = min(round((rank - k_common) / n_tasks), rank // n_tasks)
    return rank - n_tasks * k_per_task, k_per_task


def iso_cts_merged_task_vector(
    task_vectors: torch.Tensor, *, common_space_fraction: float = ISO_CTS_COMMON_SPACE_FRACTION
) -> torch.Tensor:
    """``tau_m`` of Iso-CTS for nonzero task vectors ``[T, out, in]`` (arXiv 2502.04959, Sec. 4.2, Algorithm 1).

    1. Common subspace: top ``k`` singular triplets ``(U_c, S_c, V_c)`` of ``tau_TA = sum_i tau_i``,
       sizes from :func:`iso_cts_sizes` (``k ~ common_space_fraction * r``).
    2. Task-specific subspaces: per task, ``tau_i - U_c U_c^T tau_i`` (the part of ``tau_i`` outside
       the common left subspace), its top ``k_ts = (r - k) / T`` singular triplets.
    3. Stack ``U = [U_1 .. U_T, U_c]``, ``V`` likewise, and orthogonalise both with the polar factor
       (:func:`polar_factor`), as in TSV-M.
    4. Flat spectrum: ``sigma = mean`` of all ``r`` kept singular values (task-specific and common);
       ``tau_m = sigma * U_perp V_perp^T``.

    ``common_space_fraction = 0.8`` is the authors' (iso-merging ``config/method/iso_cts.yaml``; the
    paper's ablation picks 0.8). When ``k_ts == 0`` (e.g. fraction 1) this is Iso-C.
    """
    _check_stack(task_vectors)
    u, s, vh = torch.linalg.svd(task_vectors.sum(0), full_matrices=False)
    k_common, k_per_task = iso_cts_sizes(s.numel(), task_vectors.shape[0], common_space_fraction)
    if k_per_task == 0:
        return s.mean() * (u @ vh)
    u_c, s_c, vh_c = u[:, :k_common], s[:k_common], vh[:k_common]
    residuals = task_vectors - u_c @ (u_c.T @ task_vectors)
    u_ts, s_ts, vh_ts = _stacked_low_rank(residuals, k_per_task)
    u_all = torch.cat([u_ts, u_c], dim=1)
    vh_all = torch.cat([vh_ts, vh_c], dim=0)
    sigma = torch.cat([s_ts, s_c]).mean()
    return sigma * (polar_factor(u_all) @ polar_factor(vh_all))


MERGED_TASK_VECTOR: dict[str, Callable[..., torch.Tensor]] = {
    "tsv_merge": tsv_merged_task_vector,
    "iso_c": iso_c_merged_task_vector,
    "iso_cts": iso_cts_merged_task_vector,
}
"""Method name (as registered in mergekit) -> its ``tau_m`` function."""


def merge_task_vectors(
    base: torch.Tensor, task_vectors: torch.Tensor, method: str, *, alpha: float = 1.0, **options
) -> torch.Tensor:
    """``W0 + alpha * tau_m`` of one 2-D weight, ``tau_m`` by ``method`` (a key of :data:`MERGED_TASK_VECTOR`)
    from the task vectors ``[T, out, in]`` (in the compute dtype, e.g. from
    :func:`~.task_vectors.task_vector_stack`). Zero task vectors are left out (module docstring); if
    all are zero the base is returned. One with NaN / Inf raises :class:`.numerics.NonFiniteError`
    naming it. ``options``: ``sv_reduction`` (TSV-M), ``common_space_fraction`` (Iso-CTS)."""
    if method not in MERGED_TASK_VECTOR:
        raise ValueError(f"unknown subspace merge {method!r}; expected one of {', '.join(MERGED_TASK_VECTOR)}")
    if base.ndim != 2 or task_vectors.shape[1:] != base.shape:
        raise ValueError(f"{method} merges one 2-D weight: base {tuple(base.shape)}, task vectors "
                         f"{tuple(task_vectors.shape)}")
    nonzero = finite_squared_norms(task_vectors) > 0
    if not bool(nonzero.any()):
        return base.clone()
    tau_m = MERGED_TASK_VECTOR[method](task_vectors[nonzero], **options)
    if alpha != 1:
        tau_m.mul_(alpha)
    return add_cast_(tau_m, base).to(base.dtype)


def _merge(method: str, base: torch.Tensor, experts: Sequence[torch.Tensor], alpha: float, **options):
    return merge_task_vectors(base, task_vector_stack(base, experts), method, alpha=alpha, **options)


def tsv_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0,
              sv_reduction: Optional[float] = None) -> torch.Tensor:
    """TSV-M of one 2-D weight from the expert weights: ``W0 + alpha * tau_m``
    (:func:`tsv_merged_task_vector`). The paper reports TSV-M at ``alpha = 1`` (our reading of its
    experiments section); the authors' evaluation code also searches :data:`AUTHORS_ALPHA_GRID`."""
    return _merge("tsv_merge", base, experts, alpha, sv_reduction=sv_reduction)


def iso_c(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0) -> torch.Tensor:
    """Iso-C of one 2-D weight from the expert weights: ``W0 + alpha * tau_m``
    (:func:`iso_c_merged_task_vector`). The authors choose alpha on validation from
    :data:`AUTHORS_ALPHA_GRID`; ``1.0`` is only the default."""
    return _merge("iso_c", base, experts, alpha)


def iso_cts(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0,
            common_space_fraction: float = ISO_CTS_COMMON_SPACE_FRACTION) -> torch.Tensor:
    """Iso-CTS of one 2-D weight from the expert weights: ``W0 + alpha * tau_m``
    (:func:`iso_cts_merged_task_vector`). The authors choose alpha on validation from
    :data:`AUTHORS_ALPHA_GRID`; ``1.0`` is only the default."""
    return _merge("iso_cts", base, experts, alpha, common_space_fraction=common_space_fraction)
