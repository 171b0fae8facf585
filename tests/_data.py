"""Small synthetic inputs shared by the solver and kernel tests."""

import torch


def task_vector_family(T=4, shape=(24, 16), shared=1.0, scale=0.01, seed=0):
    """Task vectors with a shared component (as fine-tuning from one base gives) and a base."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(*shape, generator=g)
    tvs = torch.stack([shared * common + torch.randn(*shape, generator=g) for _ in range(T)]) * scale
    base = torch.randn(*shape, generator=g)
    return base, tvs


def kernel_tensors(dtype=torch.float32):
    """[base, expert_1, expert_2, expert_3] for one 24x16 tensor."""
    base, tvs = task_vector_family(T=3, scale=0.05)
    return [base.to(dtype)] + [(base + tv).to(dtype) for tv in tvs]
