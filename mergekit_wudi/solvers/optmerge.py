"""OptMerge's low-rank form of Eq. 1 (Wei et al., arXiv 2505.19892; the WUDI authors' follow-up for LLMs).

This is the InternVL script of OptMerge (``wudi_merging2``): sum init, Adam, mean-centred targets. Their
Qwen2-VL script differs (mean init, SGD with momentum, no mean-centring) and is not reproduced here.
"""

from __future__ import annotations

import torch

from mergekit_wudi.solvers.interference import InterferenceProblem, TensorsLike, _stack, _use_dual
from mergekit_wudi.solvers.numerics import finite_squared_norms


def lowrank_problem(task_vectors: TensorsLike) -> InterferenceProblem:
    """OptMerge's low-rank form of Eq. 1 (the WUDI authors' follow-up for LLMs).

    With ``k = floor(min(out, in) / T)``, ``mean = mean_i tau_i``, ``P_i = diag(s_k) V_k^T`` from the
    SVD of ``tau_i`` and ``A_i = mean + U'_k S'_k V'_k^T`` from the SVD of ``tau_i - mean``:
    ``L(tau) = sum_i ||(tau - A_i) P_i^T||^2 / ||tau_i||^2``, init = sum of task vectors.
    """
    tvs = _stack(task_vectors)
    T, n_out, n_in = tvs.shape
    k = max(1, min(n_out, n_in) // T)
    sq_norms = finite_squared_norms(tvs)
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
