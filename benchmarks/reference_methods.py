"""Reference rows for the quality benchmark: TSV-Merge, Iso-C and Iso-CTS as plain functions.

These are benchmark code, not registered mergekit methods. Every per-matrix function takes the base
weight ``W0`` and the expert weights ``W_i`` of ONE 2-D tensor and returns ``W0 + alpha * tau_m``
(same shape and dtype as ``W0``), where ``tau_i = W_i - W0`` and ``tau_m`` is the method's merged
task vector. Computation is in float32 (float64 stays float64), the result is cast back.

- TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  CVPR 2025, arXiv 2412.00081): :func:`tsv_merge`.
- Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025, arXiv 2502.04959): :func:`iso_c`, :func:`iso_cts`.

Sources read (2026-11-23): the authors' code, github.com/AntoAndGar/task_singular_vectors
(``src/utils/TSVM_utils.py``, ``compute_and_sum_svd_mem_reduction``) and github.com/danielm1405/
iso-merging (``src/utils/iso.py``, ``src/eval/eval.py``, ``config/method/iso_cts.yaml``). The code
here is our own; where it departs from theirs the docstring says so.

Whole models: :func:`merge_state_dict` applies a method to the tensors picked by ``is_matrix``
(default: every 2-D floating tensor; the authors' code uses every 2-D tensor except CLIP's
``text_projection``) and, exactly as both authors' codes do, sets every other floating tensor to
``W0 + alpha * mean_i(tau_i)`` (the averaged task vector, scaled by the same alpha). Non-floating
tensors are copied from the base. In both codes alpha is chosen on validation from
``numpy.linspace(0, 3, 31)[1:]`` (iso-merging ``src/eval/eval.py``, for "TSVM", "iso_c", "iso_cts").

Zero task vectors (an expert equal to the base on a tensor) are left out of that tensor's merge and
``T`` counts only the others. This is our reading: in the authors' code the SVD of a zero matrix
contributes arbitrary singular vectors with zero singular values, which change the orthogonalisation
of the other tasks' vectors (TSV-M, Iso-CTS) and lower Iso-CTS's mean singular value.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional, Sequence

import torch

from mergekit_wudi.solvers.wudi import compute_dtype

IsMatrix = Callable[[str, torch.Tensor], bool]
ISO_CTS_COMMON_SPACE_FRACTION = 0.8  # iso-merging config/method/iso_cts.yaml
AUTHORS_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 31))  # linspace(0, 3, 31)[1:]


# ------------------------------------------------------------------------------------------ helpers


def _task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], name: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(W0, [tau_i != 0])`` in the compute dtype; checks shapes and finiteness, naming the tensor."""
    if not base.is_floating_point():
        raise ValueError(f"{name}: base tensor has non-floating dtype {base.dtype}")
    if len(experts) == 0:
        raise ValueError(f"{name}: at least one expert tensor is required")
    dtype = compute_dtype(base.dtype)
    w0 = base.to(dtype)
    if not bool(torch.isfinite(w0).all()):
        raise ValueError(f"{name}: the base tensor has non-finite values")
    taus = []
    for index, expert in enumerate(experts):
        if expert.shape != base.shape:
            raise ValueError(f"{name}: expert {index} has shape {tuple(expert.shape)}, base {tuple(base.shape)}")
        tau = expert.to(dtype) - w0
        if not bool(torch.isfinite(tau).all()):
            raise ValueError(f"{name}: expert {index} has non-finite values")
        if bool(tau.any()):
            taus.append(tau)
    return w0, taus


def _finish(base: torch.Tensor, w0: torch.Tensor, merged_tau: torch.Tensor, alpha: float, name: str):
    merged = w0 + alpha * merged_tau
    if not bool(torch.isfinite(merged).all()):
        raise ValueError(f"{name}: the merged tensor has non-finite values")
    return merged.to(base.dtype)


def _check_matrix(base: torch.Tensor, name: str) -> None:
    if base.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(base.shape)}")


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Q^T`` of ``a = P S Q^T`` (thin SVD): the nearest matrix with
    orthonormal columns (rows, if ``a`` is wide) in Frobenius norm (orthogonal Procrustes). Both
    papers' "orthogonalisation/whitening" of stacked singular vectors is this map."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _stacked_low_rank(taus: Sequence[torch.Tensor], rank: int):
    """Per task the top-``rank`` SVD triplet, stacked: ``U [m, T*rank]``, ``s [T*rank]``, ``Vh [T*rank, n]``."""
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vhs.append(vh[:rank])
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


# ------------------------------------------------------------------------------------- per matrix


def tsv_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    sv_reduction: Optional[float] = None,
    name: str = "tensor",
) -> torch.Tensor:
    """TSV-Merge (TSV-M) of one 2-D weight (Gargiulo et al. 2025, Sec. 5 / Algorithm 1).

    1. Per task, ``tau_i = U_i S_i V_i^T`` truncated to its top ``k = floor(r * sv_reduction)``
       singular triplets, ``r = min(out, in)``; ``sv_reduction`` defaults to ``1/T`` (the authors'
       code: ``sv_reduction = 1 / len(DATASETS)``, ``k = int(r * sv_reduction)``).
    2. Concatenate: ``U = [U_1 .. U_T]`` ([out, T k]), ``S = diag(S_1 .. S_T)``, ``V = [V_1 .. V_T]``.
    3. Decorrelate ("whitening" in the paper): replace ``U`` and ``V`` by their orthogonal polar
       factors ``U_perp = P_U Q_U^T`` from ``U = P_U S_U Q_U^T`` (same for ``V``), which the paper
       shows is the whitening ``U (U^T U)^{-1/2}`` when ``U`` has full column rank.
    4. ``tau_m = U_perp S V_perp^T``; return ``W0 + alpha * tau_m``.

    Defaults: ``alpha = 1.0``; the paper reports TSV-M without tuning alpha (our reading of its
    experiments section), while the authors' evaluation code also searches alpha in
    ``linspace(0, 3, 31)[1:]`` on validation. Our departures: ``k`` is at least 1 (theirs is 0 when
    ``T > r``, which merges nothing); the stacked matrices hold only the ``T k`` kept columns (theirs
    zero-pads to ``r`` columns; the padding has zero singular values and changes nothing);
    zero task vectors are left out (module docstring).
    """
    _check_matrix(base, name)
    w0, taus = _task_vectors(base, experts, name)
    if not taus:
        return base.clone()
    if sv_reduction is None:
        sv_reduction = 1.0 / len(taus)
    if not 0.0 < sv_reduction <= 1.0:
        raise ValueError(f"{name}: sv_reduction must be in (0, 1], got {sv_reduction}")
    rank = max(1, int(min(base.shape) * sv_reduction))
    u, s, vh = _stacked_low_rank(taus, rank)
    merged_tau = polar_factor(u) @ torch.diag(s) @ polar_factor(vh)
    return _finish(base, w0, merged_tau, alpha, name)


def iso_c(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    name: str = "tensor",
) -> torch.Tensor:
    """Iso-C of one 2-D weight (Marczak et al. 2025, Sec. 4.1, Eq. for ``tau_Iso-C``).

    ``tau_TA = sum_i tau_i = U S V^T`` (thin SVD, ``r = min(out, in)`` values); every singular value
    is replaced by their mean: ``tau_m = mean(S) * U V^T`` (the spectrum made flat, the singular
    directions kept). Return ``W0 + alpha * tau_m``.

    Defaults: the authors choose alpha on validation from ``linspace(0, 3, 31)[1:]``
    (iso-merging ``src/eval/eval.py``); ``alpha = 1.0`` here is only the function default.
    The mean runs over all ``r`` singular values, zeros included, as in the authors' ``iso_c``.
    """
    _check_matrix(base, name)
    w0, taus = _task_vectors(base, experts, name)
    if not taus:
        return base.clone()
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(0), full_matrices=False)
    merged_tau = s.mean() * (u @ vh)
    return _finish(base, w0, merged_tau, alpha, name)


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


def iso_cts(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    alpha: float = 1.0,
    common_space_fraction: float = ISO_CTS_COMMON_SPACE_FRACTION,
    name: str = "tensor",
) -> torch.Tensor:
    """Iso-CTS of one 2-D weight (Marczak et al. 2025, Sec. 4.2, Algorithm 1).

    1. Common subspace: top ``k`` singular triplets ``(U_c, S_c, V_c)`` of ``tau_TA = sum_i tau_i``,
       sizes from :func:`iso_cts_sizes` (``k ~ common_space_fraction * r``).
    2. Task-specific subspaces: per task, ``tau_i - U_c U_c^T tau_i`` (the part of ``tau_i`` outside
       the common left subspace), its top ``k_ts = (r - k) / T`` singular triplets.
    3. Stack ``U = [U_1 .. U_T, U_c]``, ``V`` likewise, and orthogonalise both with the polar factor
       (:func:`polar_factor`), as in TSV-M.
    4. Flat spectrum: ``sigma = mean`` of all ``r`` kept singular values (task-specific and common);
       ``tau_m = sigma * U_perp V_perp^T``. Return ``W0 + alpha * tau_m``.

    Defaults: ``common_space_fraction = 0.8`` (iso-merging ``config/method/iso_cts.yaml``; the
    paper's ablation picks 0.8); alpha chosen on validation from ``linspace(0, 3, 31)[1:]`` by the
    authors, ``1.0`` here is only the function default. When ``k_ts == 0`` this is Iso-C.
    """
    _check_matrix(base, name)
    w0, taus = _task_vectors(base, experts, name)
    if not taus:
        return base.clone()
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(0), full_matrices=False)
    k_common, k_per_task = iso_cts_sizes(s.numel(), len(taus), common_space_fraction)
    u_c, s_c, vh_c = u[:, :k_common], s[:k_common], vh[:k_common]
    if k_per_task == 0:
        merged_tau = s.mean() * (u @ vh)
        return _finish(base, w0, merged_tau, alpha, name)
    residuals = [tau - u_c @ (u_c.T @ tau) for tau in taus]
    u_ts, s_ts, vh_ts = _stacked_low_rank(residuals, k_per_task)
    u_all = torch.cat([u_ts, u_c], dim=1)
    vh_all = torch.cat([vh_ts, vh_c], dim=0)
    sigma = torch.cat([s_ts, s_c]).mean()
    merged_tau = sigma * (polar_factor(u_all) @ polar_factor(vh_all))
    return _finish(base, w0, merged_tau, alpha, name)


REFERENCE_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "tsv_merge": tsv_merge,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
}


# ------------------------------------------------------------------------------------- state dicts


def default_is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """Every 2-D floating tensor (the authors': every 2-D tensor except CLIP's ``text_projection``)."""
    return tensor.ndim == 2 and tensor.is_floating_point()


def average_task_vector(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0, name: str = "tensor"
) -> torch.Tensor:
    """``W0 + alpha * mean_i(tau_i)``: what both authors' codes do with the tensors they do not
    decompose (mean over all experts, zero task vectors included, as in their running mean)."""
    w0, _ = _task_vectors(base, experts, name)
    mean_tau = torch.stack([e.to(w0.dtype) for e in experts]).mean(0) - w0
    return _finish(base, w0, mean_tau, alpha, name)


def merge_state_dict(
    method: str,
    base_sd: Mapping[str, torch.Tensor],
    expert_sds: Sequence[Mapping[str, torch.Tensor]],
    *,
    alpha: float = 1.0,
    is_matrix: Optional[IsMatrix] = None,
    others: Literal["average", "base"] = "average",
    **method_params,
) -> dict[str, torch.Tensor]:
    """Apply ``REFERENCE_METHODS[method]`` to every tensor ``is_matrix(name, base_tensor)`` picks.

    Other floating tensors: ``others="average"`` gives ``W0 + alpha * mean_i(tau_i)`` (both authors'
    codes), ``"base"`` keeps ``W0`` (WUDI's authors' convention). Non-floating tensors are copied
    from the base. ``method_params`` go to the per-matrix function (``sv_reduction``,
    ``common_space_fraction``). Missing keys or shape mismatches raise ``ValueError`` naming them.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"unknown reference method {method!r}; known: {sorted(REFERENCE_METHODS)}")
    if others not in ("average", "base"):
        raise ValueError(f"others must be 'average' or 'base', got {others!r}")
    fn = REFERENCE_METHODS[method]
    is_matrix = is_matrix or default_is_matrix
    merged = {}
    for name, w0 in base_sd.items():
        for index, sd in enumerate(expert_sds):
            if name not in sd:
                raise ValueError(f"{name}: missing from expert {index}")
        if not w0.is_floating_point():
            merged[name] = w0.clone()
            continue
        experts = [sd[name] for sd in expert_sds]
        if is_matrix(name, w0):
            merged[name] = fn(w0, experts, alpha=alpha, name=name, **method_params)
        elif others == "average":
            merged[name] = average_task_vector(w0, experts, alpha=alpha, name=name)
        else:
            merged[name] = w0.clone()
    return merged
