"""Unit similarities for MuDSC (Xu et al., "Training-Free Pretrained Model Merging", CVPR 2024, arXiv 2403.01753).

MuDSC matches units (neurons, channels, attention heads, GroupNorm groups) of models that share no
base by a *dual-space* similarity

    S = a * S_w + (1 - a) * S_act                                        (MuDSC, Sec. 3)

- ``S_act``: Pearson correlation of unit activations over a few batches of unlabeled inputs
  (streamed with :class:`CrossCorrelation`);
- ``S_w``: Pearson correlation of the units' weight slices (incoming and outgoing, other axes brought
  into the common frame by the current matching), :func:`weight_correlation`.

Framework-free: plain tensors in, tensors out.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["CrossCorrelation", "weight_correlation", "dual_space_similarity"]


class CrossCorrelation:
    """Streaming Pearson correlation between the units of several feature sets.

    ``sizes[m]`` is the number of units of set ``m``; ``pairs`` lists the ``(i, j)`` blocks whose full
    ``[n_i, n_j]`` correlation is wanted. Feed ``update([X_0, X_1, ...])`` with ``X_m`` of shape
    ``[samples, n_m]`` (same samples for every set). Sums are kept in float64.
    """

    def __init__(self, sizes: Sequence[int], pairs: Iterable[tuple[int, int]]):
        self.sizes = list(sizes)
        self.pairs = sorted(set(pairs))
        self.count = 0
        self.sum = [torch.zeros(n, dtype=torch.float64) for n in self.sizes]
        self.sumsq = [torch.zeros(n, dtype=torch.float64) for n in self.sizes]
        self.cross = {(i, j): torch.zeros(self.sizes[i], self.sizes[j], dtype=torch.float64) for i, j in self.pairs}

    def update(self, feats: Sequence[torch.Tensor]) -> None:
        xs = [f.detach().to(torch.float64).reshape(-1, n) for f, n in zip(feats, self.sizes)]
        s = xs[0].shape[0]
        if any(x.shape[0] != s for x in xs):
            raise ValueError("all feature sets must have the same number of samples")
        self.count += s
        for m, x in enumerate(xs):
            self.sum[m] += x.sum(0)
            self.sumsq[m] += (x * x).sum(0)
        for i, j in self.pairs:
            self.cross[(i, j)] += xs[i].T @ xs[j]

    def corr(self, i: int, j: int, eps: float = 1e-8) -> torch.Tensor:
        """Pearson correlation ``[n_i, n_j]``; units with zero variance correlate 0 with everything."""
        if self.count == 0:
            raise RuntimeError("no samples seen")
        if (i, j) in self.cross:
            c = self.cross[(i, j)]
        elif (j, i) in self.cross:
            c = self.cross[(j, i)].T
        else:
            raise KeyError(f"pair {(i, j)} was not accumulated")
        n = self.count
        mi, mj = self.sum[i] / n, self.sum[j] / n
        cov = c / n - mi[:, None] * mj[None, :]
        si = (self.sumsq[i] / n - mi * mi).clamp_min(0).sqrt()
        sj = (self.sumsq[j] / n - mj * mj).clamp_min(0).sqrt()
        den = si[:, None] * sj[None, :]
        out = torch.where(den > eps, cov / den.clamp_min(eps), torch.zeros_like(cov))
        return out.clamp(-1.0, 1.0).to(torch.float32)


def weight_correlation(fa: torch.Tensor, fb: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation between rows: ``fa`` [n_a, F], ``fb`` [n_b, F] -> [n_a, n_b].

    Each row is the concatenated weight slice of one unit (its incoming and outgoing weights, biases
    and norm affine parameters), i.e. the paper's weight-space feature of the unit.
    """
    fa = fa.to(torch.float64)
    fb = fb.to(torch.float64)
    fa = fa - fa.mean(1, keepdim=True)
    fb = fb - fb.mean(1, keepdim=True)
    na = fa.norm(dim=1, keepdim=True)
    nb = fb.norm(dim=1, keepdim=True)
    fa = torch.where(na > eps, fa / na.clamp_min(eps), torch.zeros_like(fa))
    fb = torch.where(nb > eps, fb / nb.clamp_min(eps), torch.zeros_like(fb))
    return (fa @ fb.T).clamp(-1.0, 1.0).to(torch.float32)


def dual_space_similarity(s_w: torch.Tensor | None, s_act: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``S = alpha * S_w + (1 - alpha) * S_act`` (the paper's ``a`` is ``alpha``); skips a zero-weight term."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return s_act
    if alpha == 1.0:
        return s_w
    return alpha * s_w + (1.0 - alpha) * s_act
