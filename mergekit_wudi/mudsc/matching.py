"""Unit matching for MuDSC: Hungarian alignment and ZipIt-style greedy zipping, unit- or block-wise.

MuDSC (arXiv 2403.01753) matches units with a dual-space similarity ``S = a*S_w + (1-a)*S_act`` and
either aligns model B onto model A (permutation, Hungarian algorithm) or *zips* them (ZipIt!,
Stoica et al., arXiv 2305.03053: greedily merge the most similar pair of units, which may belong to
the same model). Units that must move together (attention heads, GroupNorm groups) are matched as
blocks: the similarity of two blocks is the mean similarity of their best within-block matching
(or of their diagonal, when units may not move inside a block), Hungarian/greedy between blocks,
then Hungarian within matched blocks.

Framework-free: tensors in, index tensors out.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["hungarian", "match_align", "match_zip", "block_similarity"]


def hungarian(sim: torch.Tensor) -> torch.Tensor:
    """Maximum-similarity assignment of a square ``[n, n]`` matrix: ``perm[r]`` = column matched to row r."""
    s = sim.detach().to(torch.float64).cpu().numpy()
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = np.empty(s.shape[0], dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def block_similarity(sim: torch.Tensor, block: int, within: bool) -> tuple[torch.Tensor, list]:
    """Block-level similarity ``[nb_a, nb_b]`` from unit similarity ``[nb_a*block, nb_b*block]``.

    ``within=True``: mean similarity of the best (Hungarian) matching inside each block pair, whose
    permutations are returned (``inner[i][j]`` = perm of block j's units onto block i's);
    ``within=False``: mean of the diagonal (units keep their order inside a block).
    """
    na, nb = sim.shape[0] // block, sim.shape[1] // block
    s4 = sim.reshape(na, block, nb, block).permute(0, 2, 1, 3)  # [na, nb, block, block]
    if not within or block == 1:
        bs = s4.diagonal(dim1=2, dim2=3).mean(-1)
        ident = torch.arange(block)
        return bs, [[ident] * nb for _ in range(na)]
    bs = torch.empty(na, nb)
    inner = [[None] * nb for _ in range(na)]
    for i in range(na):
        for j in range(nb):
            p = hungarian(s4[i, j])
            inner[i][j] = p
            bs[i, j] = s4[i, j][torch.arange(block), p].mean()
    return bs, inner


def match_align(sim: torch.Tensor, block: int = 1, within: bool = True) -> tuple[torch.Tensor, float]:
    """Align model B onto model A. ``sim`` is ``[n, n]`` (rows: A's units, columns: B's units).

    Returns ``perm`` (B's unit placed at A's position r is ``perm[r]``) and the mean matched similarity.
    With ``block > 1`` units are matched as contiguous blocks of ``block`` units (heads, GN groups).
    """
    n = sim.shape[0]
    if block == 1:
        perm = hungarian(sim)
    else:
        bs, inner = block_similarity(sim, block, within)
        bperm = hungarian(bs)
        perm = torch.empty(n, dtype=torch.long)
        for i in range(n // block):
            j = int(bperm[i])
            perm[i * block:(i + 1) * block] = j * block + inner[i][j]
    score = float(sim[torch.arange(n), perm].mean())
    return perm, score


def _greedy_pairs(sim: torch.Tensor, n_pairs: int) -> list[tuple[int, int]]:
    """Greedily pair the most similar free items of a symmetric ``[k, k]`` matrix (``-inf`` = forbidden)."""
    k = sim.shape[0]
    s = sim.detach().to(torch.float64).clone()
    iu = torch.triu_indices(k, k, offset=1)
    vals = s[iu[0], iu[1]]
    order = torch.argsort(vals, descending=True)
    free = np.ones(k, dtype=bool)
    pairs: list[tuple[int, int]] = []
    for idx in order.tolist():
        if len(pairs) == n_pairs:
            break
        if not np.isfinite(float(vals[idx])):
            break
        i, j = int(iu[0, idx]), int(iu[1, idx])
        if free[i] and free[j]:
            free[i] = free[j] = False
            pairs.append((i, j))
    if len(pairs) < n_pairs:
        raise RuntimeError("zip: could not pair all units (too many forbidden pairs)")
    return pairs


def match_zip(sim: torch.Tensor, n: int, block: int = 1, within: bool = True,
              allow_same_model: bool = True) -> tuple[torch.Tensor, float]:
    """ZipIt-style zip of two models' ``n`` units each into ``n`` merged units.

    ``sim`` is ``[2n, 2n]`` over A's units then B's units. Greedily merges the most similar pair of
    still-free units (same-model pairs allowed unless ``allow_same_model=False``) until every unit has
    a partner. Returns ``cluster`` ([2n], merged unit of every original unit) and the mean pair similarity.
    """
    if sim.shape != (2 * n, 2 * n):
        raise ValueError(f"zip needs a [2n, 2n] similarity, got {tuple(sim.shape)} for n={n}")
    s = sim.detach().to(torch.float64).clone()
    s = (s + s.T) / 2
    nb = n // block
    if block == 1:
        bs = s
        inner = None
    else:
        bs, inner = block_similarity(s, block, within)
    owner = torch.cat([torch.zeros(nb, dtype=torch.long), torch.ones(nb, dtype=torch.long)])
    bs = bs.clone().to(torch.float64)
    bs.fill_diagonal_(float("-inf"))
    if not allow_same_model:
        same = owner[:, None] == owner[None, :]
        bs[same] = float("-inf")
    pairs = _greedy_pairs(bs, nb)
    cluster = torch.empty(2 * n, dtype=torch.long)
    scores = []
    for r, (i, j) in enumerate(pairs):
        scores.append(float(bs[i, j]))
        if block == 1:
            cluster[i] = r
            cluster[j] = r
        else:
            p = inner[i][j]  # unit k of block i <-> unit p[k] of block j
            for k in range(block):
                cluster[i * block + k] = r * block + k
                cluster[j * block + int(p[k])] = r * block + k
    return cluster, float(np.mean(scores))
