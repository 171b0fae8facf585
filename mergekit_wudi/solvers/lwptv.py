"""LwPTV, Layer-wise Pruning Task Vector (arXiv 2506.09093): plain functions.

LwPTV pre-processes task vectors before any merge: per task and per layer, a saliency score
decides whether that layer's task vector is redundant; redundant layers are dropped from that
task's vector (the merged model keeps the pre-trained weights there, as far as that task is
concerned). The aim is better out-of-domain behaviour at no in-domain cost.

The paper's exact score was not available to us. THIS PROJECT'S READING, computed from the
task vectors alone: the saliency of layer ``l`` for task ``i`` is its relative update

    s_{i,l} = ||tau_{i,l}||_F / ||W0_l||_F          (``||W0_l||_F`` replaced by 1 where it is 0)

where ``tau_{i,l} = W_{i,l} - W0_l`` and a "layer" is one weight tensor, or (``unit="block"``
in :func:`layer_masks`) all tensors of one transformer block together:
``s_{i,B} = sqrt(sum_{l in B} ||tau_{i,l}||^2) / sqrt(sum_{l in B} ||W0_l||^2)``.
A layer whose fine-tuning barely moved it relative to its pre-trained size carries little of
the task and mostly noise that costs generalisation: it is the redundant one. Two rules:

- threshold (one pass, per tensor): drop layer ``l`` of task ``i`` iff ``s_{i,l} < threshold``.
  ``threshold = 0`` drops nothing.
- ratio (needs a view across layers, so a pre-pass): for each task, drop the
  ``floor(ratio * L)`` layers with the lowest ``s_{i,l}`` (ties broken by layer order).
  ``ratio = 0`` drops nothing, ``ratio = 1`` drops everything (the pre-trained model).

Masks are boolean ``drop`` masks: ``True`` means "this task's vector is removed here".
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from mergekit_wudi.solvers.numerics import check_finite, compute_dtype

SCORE = "relative_norm"
UNITS: tuple[str, ...] = ("tensor", "block")
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def saliency_from_norms(task_sq_norms: torch.Tensor, base_sq_norm: float) -> torch.Tensor:
    """``s_i = sqrt(task_sq_norms[i]) / sqrt(base_sq_norm)`` (denominator 1 where the base is 0)."""
    denominator = math.sqrt(base_sq_norm) if base_sq_norm > 0 else 1.0
    return task_sq_norms.clamp_min(0).sqrt() / denominator


def saliency(base: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
    """Saliency ``s_i = ||tau_i||_F / ||W0||_F`` of one layer for each task: ``[T, ...] -> [T]``."""
    dtype = compute_dtype(task_vectors.dtype)
    tvs = task_vectors.to(dtype)
    if tvs.shape[1:] != base.shape:
        raise ValueError(f"task vectors {tuple(tvs.shape)} do not match the base {tuple(base.shape)}")
    check_finite(base, "the base tensor given to LwPTV")
    check_finite(tvs, "the task vectors given to LwPTV")
    sq = tvs.reshape(tvs.shape[0], -1).square().sum(dim=1)
    return saliency_from_norms(sq, float(base.to(dtype).square().sum()))


def layer_mask(
    scores: torch.Tensor, *, threshold: Optional[float] = None, ratio: Optional[float] = None
) -> torch.Tensor:
    """Boolean drop mask from saliency scores; give exactly one of ``threshold`` / ``ratio``.

    ``scores``: ``[T]`` (one layer) or ``[T, L]`` (each task's layers). ``threshold``: drop where
    ``score < threshold``. ``ratio`` (``[T, L]`` only): per task, drop the ``floor(ratio * L)``
    lowest-scoring layers.
    """
    if (threshold is None) == (ratio is None):
        raise ValueError("LwPTV layer_mask: give exactly one of threshold or ratio")
    if threshold is not None:
        if not threshold >= 0:
            raise ValueError(f"LwPTV threshold must be >= 0, got {threshold}")
        return scores < threshold
    if not 0 <= ratio <= 1:
        raise ValueError(f"LwPTV ratio must be in [0, 1], got {ratio}")
    if scores.ndim != 2:
        raise ValueError("LwPTV ratio needs scores across layers, shaped [T, L]")
    T, L = scores.shape
    count = math.floor(ratio * L + 1e-9)
    drop = torch.zeros(T, L, dtype=torch.bool, device=scores.device)
    if count:
        order = torch.argsort(scores, dim=1, stable=True)
        drop.scatter_(1, order[:, :count], True)
    return drop


def apply_mask(task_vectors: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero the task vectors of the dropped tasks: ``[T, ...]`` and a bool ``[T]`` mask."""
    drop = torch.as_tensor(drop, dtype=torch.bool, device=task_vectors.device)
    if drop.shape != task_vectors.shape[:1]:
        raise ValueError(f"LwPTV mask of shape {tuple(drop.shape)} for {task_vectors.shape[0]} task vectors")
    keep = (~drop).to(task_vectors.dtype).reshape((-1,) + (1,) * (task_vectors.ndim - 1))
    return task_vectors * keep


def layer_unit(name: str, unit: str = "block") -> str:
    """The layer a tensor belongs to: itself (``unit="tensor"``), or its transformer block
    (``unit="block"``: the name up to its first ``.<number>.``, e.g. ``model.layers.3``)."""
    if unit not in UNITS:
        raise ValueError(f"LwPTV unit must be one of {', '.join(UNITS)}; got {unit!r}")
    if unit == "tensor":
        return name
    match = _BLOCK.match(name)
    return match.group(1) if match else name


def layer_masks(
    base: Callable[[str], torch.Tensor],
    experts: Mapping[str, Callable[[str], torch.Tensor]],
    names: Sequence[str],
    *,
    threshold: Optional[float] = None,
    ratio: Optional[float] = None,
    unit: str = "block",
) -> Dict[str, list]:
    """The two-pass flow's first pass: which tensors each expert drops.

    ``base(name)`` and ``experts[key](name)`` return a tensor (read lazily, one at a time);
    ``names`` are the tensors to consider. Scores are per layer unit (see :func:`layer_unit`),
    then thresholded or ranked per task. Returns ``{expert_key: [dropped tensor names]}``.
    """
    keys = list(experts)
    units: Dict[str, list] = {}
    base_sq: Dict[str, float] = {}
    task_sq: Dict[str, torch.Tensor] = {}
    for name in names:
        w0 = base(name)
        if not w0.is_floating_point():
            continue
        dtype = compute_dtype(w0.dtype)
        w0 = w0.to(dtype)
        tvs = torch.stack([experts[key](name).to(dtype) - w0 for key in keys])
        scores_input = tvs.reshape(len(keys), -1)
        check_finite(scores_input, f"tensor {name!r} (LwPTV saliency)")
        layer = layer_unit(name, unit)
        units.setdefault(layer, []).append(name)
        base_sq[layer] = base_sq.get(layer, 0.0) + float(w0.square().sum())
        sq = scores_input.double().square().sum(dim=1)
        task_sq[layer] = task_sq[layer] + sq if layer in task_sq else sq
    layers = list(units)
    if not layers:
        return {key: [] for key in keys}
    scores = torch.stack([saliency_from_norms(task_sq[layer], base_sq[layer]) for layer in layers], dim=1)
    drop = layer_mask(scores, threshold=threshold, ratio=ratio)
    return {
        key: [name for j, layer in enumerate(layers) if bool(drop[i, j]) for name in units[layer]]
        for i, key in enumerate(keys)
    }
