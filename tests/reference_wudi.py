"""The WUDI authors' optimisation loop, written out literally: the reference our solvers must match.

Per weight: init = sum of task vectors; Adam(lr, betas (0.9, 0.999), eps 1e-8); each iteration forms
the [T, out, out] products (tau_m - tau_i) tau_i^T and back-propagates
sum_i ||.||_F^2 / ||tau_i||_F^2 through autograd.
"""

import torch


def naive_wudi_loop(task_vectors: torch.Tensor, iterations: int = 300, learning_rate: float = 1e-5) -> torch.Tensor:
    vectors = task_vectors.float() if task_vectors.dtype != torch.float64 else task_vectors
    merging_vector = torch.nn.Parameter(vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merging_vector], lr=learning_rate)
    sq_norms = vectors.reshape(vectors.shape[0], -1).norm(dim=-1).square()
    for _ in range(iterations):
        disturbing = merging_vector.unsqueeze(0) - vectors
        inner = disturbing @ vectors.transpose(1, 2)
        loss = (inner.square() / sq_norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging_vector.detach()


def naive_lowrank_loop(task_vectors: torch.Tensor, iterations: int = 300, learning_rate: float = 1e-5) -> torch.Tensor:
    """OptMerge's loop (the WUDI authors' LLM variant), literally: per task a rank-k projector
    diag(s_k) V_k^T of tau_i and a target mean + rank-k SVD of (tau_i - mean), k = min(out, in) // T."""
    vectors = task_vectors.float()
    T = vectors.shape[0]
    mean = vectors.mean(dim=0)
    projectors, targets = [], []
    for vector in vectors:
        _, s, vh = torch.linalg.svd(vector, full_matrices=False)
        k = s.shape[0] // T
        projector = torch.zeros_like(vector)
        projector[:k] = s[:k, None] * vh[:k]
        u2, s2, vh2 = torch.linalg.svd(vector - mean, full_matrices=False)
        projectors.append(projector)
        targets.append(u2[:, :k] @ torch.diag(s2[:k]) @ vh2[:k] + mean)
    projectors, targets = torch.stack(projectors), torch.stack(targets)
    merging_vector = torch.nn.Parameter(vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merging_vector], lr=learning_rate)
    sq_norms = vectors.reshape(T, -1).norm(dim=-1).square()
    for _ in range(iterations):
        inner = (merging_vector.unsqueeze(0) - targets) @ projectors.transpose(1, 2)
        loss = (inner.square() / sq_norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging_vector.detach()
