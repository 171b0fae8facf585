"""Task-vector arithmetic shared by every method: build, pre-process (LwPTV, AWD), combine.

A task vector is ``tau_i = W_i - W0`` (Ilharco et al., 2023). The mergekit kernels and the
Lightning callback call these functions; none of them computes task vectors itself.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from mergekit_wudi.solvers import awd as awd_solvers
from mergekit_wudi.solvers import lwptv as lwptv_solvers
from mergekit_wudi.solvers.numerics import add_cast_, compute_dtype

PREPROCESS_CHOICES: tuple[str, ...] = ("none", "awd", "lwptv", "awd+lwptv")
NON_LINEAR_RULES: tuple[str, ...] = ("base", "mean", "sum")


def task_vector_stack(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[tau_1, ..., tau_T]`` (``tau_i = W_i - W0``) as one ``[T, *shape]`` tensor in the compute
    dtype (float32; float64 stays float64).

    Written into one buffer, each ``W_i`` and ``W0`` cast element-wise on the fly: no float32 copy
    of each input (on an LLM, every large new tensor costs page faults as well as a pass).
    """
    dtype = compute_dtype(base.dtype)
    tvs = torch.empty((len(experts), *base.shape), dtype=dtype, device=base.device)
    for i, (tau, expert) in enumerate(zip(tvs, experts)):
        if expert.shape != base.shape:
            raise ValueError(f"expert {i} has shape {tuple(expert.shape)}, the base {tuple(base.shape)}")
        add_cast_(tau.copy_(expert), base, alpha=-1)
    return tvs


def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W0, [tau_1, ..., tau_T])`` in the compute dtype (float32; float64 stays float64)."""
    return base.to(compute_dtype(base.dtype)), task_vector_stack(base, experts)


def preprocess_steps(preprocess: str) -> Tuple[bool, bool]:
    """``(use_lwptv, use_awd)`` for a ``preprocess`` choice."""
    if preprocess not in PREPROCESS_CHOICES:
        raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS_CHOICES)}; got {preprocess!r}")
    steps = () if preprocess == "none" else tuple(preprocess.split("+"))
    return "lwptv" in steps, "awd" in steps


def preprocess_task_vectors(
    base: torch.Tensor,
    tvs: torch.Tensor,
    *,
    preprocess: str = "none",
    drop: Optional[Sequence[bool]] = None,
    lwptv_threshold: Optional[float] = None,
    awd_alpha: float = awd_solvers.ALPHA,
    awd_steps: int = awd_solvers.STEPS,
    awd_lr: float = awd_solvers.LR,
    awd_scope: str = "tensor",
) -> torch.Tensor:
    """Refine task vectors ``[T, ...]`` before merging: LwPTV first, then AWD.

    LwPTV (arXiv 2506.09093) removes the task vectors of the layers judged redundant: ``drop``
    (one flag per task, e.g. from a mask file) or, if ``drop`` is None, ``saliency < lwptv_threshold``
    (:mod:`.lwptv`). AWD (arXiv 2411.18729, Eq. 1) then subtracts the shared redundant vector from
    the task vectors left (dropped ones stay zero): :func:`.awd.disentangle`.
    """
    use_lwptv, use_awd = preprocess_steps(preprocess)
    processed = tvs
    if use_lwptv:
        if drop is None:
            if lwptv_threshold is None:
                raise ValueError(f"preprocess {preprocess!r} needs lwptv_threshold or a drop mask")
            drop = lwptv_solvers.layer_mask(lwptv_solvers.saliency(base, tvs), threshold=lwptv_threshold)
        processed = lwptv_solvers.apply_mask(processed, torch.as_tensor(drop, dtype=torch.bool))
    if use_awd:
        processed = awd_solvers.disentangle(processed, alpha=awd_alpha, steps=awd_steps, lr=awd_lr, scope=awd_scope)
    return processed


def combine_task_vectors(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    weights: Sequence[float],
    *,
    rule: str,
    scaling: float,
) -> torch.Tensor:
    """A tensor WUDI does not solve for: keep the base (the authors' choice, ``rule="base"``), or
    ``W0 + scaling * sum_i w_i tau_i`` (``"sum"``; ``"mean"`` divides the sum by T)."""
    if rule not in NON_LINEAR_RULES:
        raise ValueError(f"non_linear must be one of {', '.join(NON_LINEAR_RULES)}; got {rule!r}")
    if rule == "base":
        return base
    dtype = compute_dtype(base.dtype)
    base32 = base.to(dtype)
    total = sum(tv.to(dtype) * w for tv, w in zip(task_vectors, weights))
    if rule == "mean":
        total = total / len(task_vectors)
    return (base32 + scaling * total).to(base.dtype)
