"""State-dict math of MuDSC (arXiv 2403.01753): weight-space unit features, permuting and averaging units.

A matching is, per group and model, a 0/1 matrix ``U[gid][m]`` of shape ``[n, n_merged]`` (unit i of
model m goes to merged unit j); ZipIt's merge/unmerge matrices, of which permutations are the special
case. Tensors are computed in float32 (float64 stays float64) and cast back to the dtype of model 0.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn

from mergekit_wudi.solvers.numerics import compute_dtype

from .spec import OUT, MergeSpec

__all__ = ["apply_along", "weight_features", "merge_states", "permute_state", "new_module"]


def _dtype(states: Sequence[dict], name: str) -> torch.dtype:
    """Compute dtype of tensor ``name``: float64 if any model holds it in float64, else float32."""
    return compute_dtype(torch.float64 if any(st[name].dtype == torch.float64 for st in states) else torch.float32)


def apply_along(t: torch.Tensor, axis: int, mat: torch.Tensor, tile: int = 1) -> torch.Tensor:
    """Contract axis ``axis`` of ``t`` with ``mat`` [p, q] (axis holds ``tile`` x ``q`` units x ``rep``)."""
    size = t.shape[axis]
    mat = mat.to(t.dtype).contiguous()
    p, q = mat.shape
    rep = size // (tile * q)
    if rep * tile * q != size:
        raise ValueError(f"axis of size {size} does not hold {tile} x {q} units")
    if rep > 1:
        mat = torch.kron(mat, torch.eye(rep, dtype=mat.dtype))
    if tile > 1:
        mat = torch.block_diag(*([mat] * tile))
    x = t.movedim(axis, 0)
    rest = x.shape[1:]
    y = mat @ x.reshape(size, -1)
    return y.reshape(mat.shape[0], *rest).movedim(0, axis)


def _members(spec: MergeSpec, gid: int, ready: Optional[set]) -> list:
    """The group's tensors; with ``ready``, only those whose other axes are fixed or in ``ready`` groups."""
    # weight space only: BatchNorm running statistics are data statistics, not weights
    mems = [m for m in spec.group(gid).members if not m.param.endswith(("running_mean", "running_var"))]
    if ready is None:
        return list(mems)
    sel = [m for m in mems if all(a.axis == m.axis or a.gid in ready for a in spec.param_axes[m.param])]
    return sel or list(mems)


def _unit_features(spec: MergeSpec, state: dict, gid: int, U_m: dict, ready: Optional[set]) -> list[torch.Tensor]:
    """Per member, the ``[n, f]`` weight slices of a group's units, other axes mapped by ``U_m``."""
    g = spec.group(gid)
    out = []
    for mem in _members(spec, gid, ready):
        t = state[mem.param].detach()
        t = t.to(compute_dtype(t.dtype))
        for axis in spec.param_axes[mem.param]:
            if axis.axis != mem.axis:
                t = apply_along(t, axis.axis, U_m[axis.gid].T, axis.tile)
        x = t.movedim(mem.axis, 0)
        rep = x.shape[0] // (mem.tile * g.size)
        out.append(x.reshape(mem.tile, g.size, rep, -1).permute(1, 0, 2, 3).reshape(g.size, -1))
    return out


def weight_features(spec: MergeSpec, states: list, gid: int, U: dict, idx: Sequence[int],
                    ready: Optional[set] = None) -> list[torch.Tensor]:
    """Standardised weight features of the group's units for models ``idx`` (list of [n, F])."""
    per_model = [_unit_features(spec, states[m], gid, {k: v[m] for k, v in U.items()}, ready) for m in idx]
    feats = []
    for j in range(len(per_model[0])):
        allj = torch.cat([pm[j] for pm in per_model])
        mean, std = allj.mean(), allj.std() if allj.numel() > 1 else torch.tensor(0.0)
        if not torch.isfinite(std) or std < 1e-8:  # constant tensor (fresh norm params): no information
            feats.append([torch.zeros_like(pm[j]) for pm in per_model])
        else:
            feats.append([(pm[j] - mean) / std for pm in per_model])
    return [torch.cat([f[i] for f in feats], dim=1) for i in range(len(idx))]


def _tensor_weights(name: str, weights: list, module_weights: Optional[dict]) -> list:
    """The per-model weights of tensor ``name``: those of its longest ``module_weights`` prefix, if any."""
    best = None
    for prefix in module_weights or {}:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is None:
        return list(weights)
    w = [float(v) for v in module_weights[best]]
    s = sum(w)
    return [v / s for v in w]


def merge_states(spec: MergeSpec, states: list, U: dict, weights: list, module_weights: Optional[dict]) -> dict:
    """Weighted average of the models' units in the merged order (MuDSC's merge step; ZipIt's
    ``sum_m w_m U_m^T W_m``, each merged unit normalised by the weight of the units that form it)."""
    merged = {}
    weights = [float(v) / sum(weights) for v in weights]
    for name, t0 in states[0].items():
        if not torch.is_floating_point(t0):
            merged[name] = t0.clone()
            continue
        w = _tensor_weights(name, weights, module_weights)
        dtype = _dtype(states, name)
        total = None
        for m, st in enumerate(states):
            t = st[name].detach().to(dtype)
            has_out = False
            for axis, gid, role, tile in spec.param_axes.get(name, []):
                if role == OUT:
                    has_out = True
                    t = apply_along(t, axis, _averaging_matrix(U[gid], w, m, dtype), tile)
                else:
                    t = apply_along(t, axis, U[gid][m].T, tile)
            if not has_out:
                t = t * w[m]
            total = t if total is None else total + t
        merged[name] = total.to(t0.dtype)
    return merged


def _averaging_matrix(U_g: list, w: list, m: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n_merged, n]``: model ``m``'s share of every merged unit of one group."""
    U_g = [u.to(dtype) for u in U_g]
    den = sum(w[k] * U_g[k].sum(0) for k in range(len(U_g)))  # [n_merged]
    if (den <= 0).any():
        # a merged unit made only of zero-weight units: average it plainly
        plain = sum(U_g[k].sum(0) for k in range(len(U_g)))
        wm = torch.where(den > 0, w[m] / den.clamp_min(1e-12), 1.0 / plain.clamp_min(1))
    else:
        wm = w[m] / den
    return (U_g[m] * wm[None, :]).T


def permute_state(spec: MergeSpec, state: dict, U_m: dict) -> dict:
    """Model ``m`` itself, its units put in the merged order (align mode: function-preserving)."""
    out = {}
    for name, t in state.items():
        if torch.is_floating_point(t):
            x = t.detach().to(compute_dtype(t.dtype))
            for axis, gid, _role, tile in spec.param_axes.get(name, []):
                x = apply_along(x, axis, U_m[gid].T, tile)
            out[name] = x.to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def new_module(template: nn.Module, state: dict) -> nn.Module:
    """A copy of ``template`` (sharing, never copying, a Lightning trainer) holding ``state``."""
    memo = {}
    tr = getattr(template, "_trainer", None)
    if tr is not None:
        memo[id(tr)] = tr
    out = copy.deepcopy(template, memo)
    out.load_state_dict(state)
    return out
