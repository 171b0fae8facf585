"""TSV-M, Iso-C and Iso-CTS as the authors' code computes them, written out loop by loop: the independent
oracle the solvers in mergekit_wudi/solvers/subspace_merging.py must match.

Structure follows github.com/AntoAndGar/task_singular_vectors (``compute_and_sum_svd_mem_reduction``) and
github.com/danielm1405/iso-merging (``src/utils/iso.py``): per state-dict key, a 2-D task vector is decomposed
(zero-padded stacks of singular vectors, orthogonalised by ``U_svd @ Vh_svd``); any other key gets the running
mean of the task vectors. Each function maps a list of task-vector dicts to the merged task-vector dict; the
model is ``W0 + alpha * merged``.
"""

import torch


def _running_mean(vectors):
    mean = vectors[0].clone()
    for i, vec in enumerate(vectors[1:], start=1):
        mean += (vec - mean) / (i + 1)
    return mean


def authors_tsv_merge(task_vectors: list[dict]) -> dict:
    T = len(task_vectors)
    sv_reduction = 1 / T
    merged = {}
    for key in task_vectors[0]:
        vecs = [tv[key] for tv in task_vectors]
        if vecs[0].ndim != 2:
            merged[key] = _running_mean(vecs)
            continue
        for i, vec in enumerate(vecs):
            u, s, v = torch.linalg.svd(vec, full_matrices=False)
            if i == 0:
                sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
            k = int(s.shape[0] * sv_reduction)
            sum_u[:, i * k:(i + 1) * k] = u[:, :k]
            sum_s[i * k:(i + 1) * k] = s[:k]
            sum_v[i * k:(i + 1) * k, :] = v[:k, :]
        u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
        u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
        merged[key] = torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))
    return merged


def authors_iso_c(task_vectors: list[dict]) -> dict:
    merged = {}
    for key in task_vectors[0]:
        vecs = [tv[key] for tv in task_vectors]
        merged[key] = sum(vecs) / len(vecs)
        if vecs[0].ndim == 2:
            merged[key] *= len(vecs)
            u, s, v = torch.linalg.svd(merged[key], full_matrices=False)
            merged[key] = torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))
    return merged


def authors_iso_cts(task_vectors: list[dict], common_space_fraction: float = 0.8) -> dict:
    T = len(task_vectors)
    merged = {}
    for key in task_vectors[0]:
        vecs = [tv[key] for tv in task_vectors]
        if vecs[0].ndim != 2:
            merged[key] = _running_mean(vecs)
            continue
        r = min(vecs[0].shape)
        k = int(r * common_space_fraction)
        k = r - round((r - k) / T) * T
        u, s, v = torch.linalg.svd(sum(vecs), full_matrices=False)
        u_c, s_c, v_c = u[:, :k], s[:k], v[:k, :]
        n = int((r - k) / T)
        for i, w in enumerate(vecs):
            u_ts, s_ts, v_ts = torch.linalg.svd(w - u_c @ u_c.T @ w, full_matrices=False)
            if i == 0:
                all_u, all_s, all_v = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
            all_u[:, i * n:(i + 1) * n] = u_ts[:, :n]
            all_s[i * n:(i + 1) * n] = s_ts[:n]
            all_v[i * n:(i + 1) * n, :] = v_ts[:n, :]
        all_u[:, T * n:T * n + k] = u_c
        all_s[T * n:T * n + k] = s_c
        all_v[T * n:T * n + k, :] = v_c
        a, _, b = torch.linalg.svd(all_u, full_matrices=False)
        c, _, d = torch.linalg.svd(all_v, full_matrices=False)
        flat = torch.ones_like(all_s) * all_s.mean()
        merged[key] = torch.linalg.multi_dot((a @ b, torch.diag(flat), c @ d))
    return merged


AUTHORS = {"tsv_merge": authors_tsv_merge, "iso_c": authors_iso_c, "iso_cts": authors_iso_cts}
