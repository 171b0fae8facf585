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
