"""MuDSC merge driver: features -> dual-space similarity -> matching sweeps -> merged module.

Implements the procedure of MuDSC (Xu et al., CVPR 2024, arXiv 2403.01753) for models with the same
architecture but no shared base:

1. run every model on a few batches of unlabeled inputs and stream the Pearson correlation of the
   units of every permutation group (:mod:`.graph` finds the groups);
2. for every group compute ``S = alpha * S_w + (1 - alpha) * S_act`` (the paper's ``a`` is ``alpha``),
   ``S_w`` from the weight slices of the units under the current matching of all other groups;
3. match (``align``: Hungarian onto the first model; ``zip``: ZipIt greedy, may merge units of one
   model), group after group, and repeat sweeps until the mean matched similarity stops improving
   (by less than ``tol``) or ``sweeps`` is reached;
4. average the matched units (ZipIt merge/unmerge matrices; permutations are the special case), then
   recompute BatchNorm running statistics on the same unlabeled data (REPAIR-style reset).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .graph import FeatureRecorder, MergeSpec, build_spec
from .matching import match_align, match_zip
from .similarity import CrossCorrelation, dual_space_similarity, weight_correlation

__all__ = ["mudsc_merge", "reset_batchnorm", "default_input_fn", "MODES"]

MODES = ("align", "zip", "average")


def default_input_fn(batch: Any) -> Any:
    """Inputs of a batch, never its labels: ``(x, y, ...)`` -> ``x``; dict -> its first input-like key."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        for k in ("x", "input", "inputs", "input_ids", "pixel_values", "image", "images"):
            if k in batch:
                return batch[k]
        raise ValueError(f"mudsc: cannot find the inputs in a dict batch with keys {list(batch)}; pass input_fn=")
    return batch


def _as_args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, tuple) else (x,)


def _batches(dataloader: Iterable, n: int) -> Iterable:
    for i, b in enumerate(dataloader):
        if i >= n:
            break
        yield b


def reset_batchnorm(model: nn.Module, dataloader: Iterable, *, input_fn: Callable = default_input_fn,
                    max_batches: int = 8) -> nn.Module:
    """Recompute the running statistics of every BatchNorm of ``model`` on unlabeled batches (in place).

    Uses a cumulative average (``momentum=None``) with only the BatchNorm layers in training mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was = {m: m.training for m in model.modules()}
    moms = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    with torch.no_grad():
        for batch in _batches(dataloader, max_batches):
            model(*_as_args(input_fn(batch)))
            seen += 1
    for bn, mom in zip(bns, moms):
        bn.momentum = mom
    for m, t in was.items():
        m.train(t)
    if seen == 0:
        raise ValueError("mudsc: the dataloader yielded no batch for the BatchNorm reset")
    return model


def _apply_along(t: torch.Tensor, axis: int, mat: torch.Tensor, tile: int = 1) -> torch.Tensor:
    """Contract axis ``axis`` of ``t`` with ``mat`` [p, q] (axis holds ``tile`` x ``q`` units x ``rep``)."""
    size = t.shape[axis]
    mat = mat.contiguous()
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
    sel = [m for m in mems if all(a == m.axis or g2 in ready for a, g2, _, _ in spec.param_axes[m.param])]
    return sel or list(mems)


def _unit_features(spec: MergeSpec, state: dict, gid: int, U_m: dict, ready: Optional[set] = None) -> list[torch.Tensor]:
    """Per member, the ``[n, f]`` weight slices of a group's units, other axes mapped by ``U_m``."""
    g = spec.group(gid)
    out = []
    for mem in _members(spec, gid, ready):
        t = state[mem.param].detach().float()
        for axis, g2, role, tile in spec.param_axes[mem.param]:
            if axis != mem.axis:
                t = _apply_along(t, axis, U_m[g2].T, tile)
        x = t.movedim(mem.axis, 0)
        size = x.shape[0]
        rep = size // (mem.tile * g.size)
        x = x.reshape(mem.tile, g.size, rep, -1).permute(1, 0, 2, 3).reshape(g.size, -1)
        out.append(x)
    return out


def _weight_similarity(spec: MergeSpec, states: list, gid: int, U: dict, idx: Sequence[int],
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


def _merge_state(spec: MergeSpec, states: list, U: dict, weights: list, module_weights: Optional[dict]) -> dict:
    merged = {}
    weights = [float(v) / sum(weights) for v in weights]
    for name, t0 in states[0].items():
        if not torch.is_floating_point(t0):
            merged[name] = t0.clone()
            continue
        w = list(weights)
        if module_weights:
            best = None
            for prefix, mw in module_weights.items():
                if name == prefix or name.startswith(prefix + "."):
                    if best is None or len(prefix) > len(best):
                        best = prefix
            if best is not None:
                w = [float(v) for v in module_weights[best]]
                if len(w) != len(states) or min(w) < 0 or sum(w) <= 0:
                    raise ValueError(f"module_weights[{best!r}] must hold {len(states)} non-negative weights")
                s = sum(w)
                w = [v / s for v in w]
        axes = spec.param_axes.get(name, [])
        total = None
        for m, st in enumerate(states):
            t = st[name].detach().float()
            has_out = False
            for axis, gid, role, tile in axes:
                if role == "out":
                    has_out = True
                    den = sum(w[k] * U[gid][k].sum(0) for k in range(len(states)))  # [n_merged]
                    if (den <= 0).any():
                        # a merged unit made only of zero-weight units: average it plainly
                        plain = sum(U[gid][k].sum(0) for k in range(len(states)))
                        wm = torch.where(den > 0, w[m] / den.clamp_min(1e-12), 1.0 / plain.clamp_min(1))
                    else:
                        wm = w[m] / den
                    mat = (U[gid][m] * wm[None, :]).T
                else:
                    mat = U[gid][m].T
                t = _apply_along(t, axis, mat, tile)
            if not has_out:
                t = t * w[m]
            total = t if total is None else total + t
        merged[name] = total.to(t0.dtype)
    return merged


def _new_module(template: nn.Module, state: dict) -> nn.Module:
    memo = {}
    tr = getattr(template, "_trainer", None)
    if tr is not None:
        memo[id(tr)] = tr  # share, never copy, a Lightning trainer
    out = copy.deepcopy(template, memo)
    out.load_state_dict(state)
    return out


def _collect(models, spec, dataloader, input_fn, max_batches, pairs) -> dict:
    recs = [FeatureRecorder(m, spec) for m in models]
    n_models = len(models)
    accs = {g.gid: CrossCorrelation([g.size] * n_models, pairs) for g in spec.groups}
    modes = [{mm: mm.training for mm in m.modules()} for m in models]
    for m in models:
        m.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in _batches(dataloader, max_batches):
                args = _as_args(input_fn(batch))
                feats = [r.record(*args) for r in recs]
                for g in spec.groups:
                    keys = spec.feature_keys[g.gid]
                    accs[g.gid].update([torch.cat([f[k].reshape(-1, g.size) for k in keys]) for f in feats])
                seen += 1
    finally:
        for md in modes:
            for mm, t in md.items():
                mm.train(t)
    if seen == 0:
        raise ValueError("mudsc: the dataloader yielded no batch")
    return accs


def _check_models(models: Sequence[nn.Module]) -> list[dict]:
    if len(models) < 2:
        raise ValueError("mudsc: need at least two models")
    c0 = type(models[0])
    states = [m.state_dict() for m in models]
    for i, (m, st) in enumerate(zip(models, states)):
        if type(m) is not c0:
            raise ValueError(f"mudsc: model {i} is a {type(m).__name__}, model 0 a {c0.__name__}")
        if list(st) != list(states[0]) or any(st[k].shape != states[0][k].shape for k in st):
            raise ValueError(f"mudsc: model {i} does not have the same tensors as model 0")
    return states


def _merge_two_or_more(models, dataloader, spec, *, mode, alpha, sweeps, tol, max_batches, input_fn, weights,
                       module_weights, allow_same_model):
    states = _check_models(models)
    n_models = len(models)
    groups = spec.groups
    U = {g.gid: [torch.eye(g.size) for _ in range(n_models)] for g in groups}
    info = {"mode": mode, "alpha": alpha, "groups": [], "objective": []}
    if mode == "average" or not groups:
        return _merge_state(spec, states, U, weights, module_weights), info
    if mode == "zip" and n_models != 2:
        raise AssertionError("zip merges pairs")
    pairs = [(0, 0), (0, 1), (1, 1)] if mode == "zip" else [(0, m) for m in range(1, n_models)]
    s_act = {}
    if alpha < 1.0:
        accs = _collect(models, spec, dataloader, input_fn, max_batches, pairs)
        for g in groups:
            acc = accs[g.gid]
            if mode == "zip":
                c01 = acc.corr(0, 1)
                s_act[g.gid] = torch.cat([torch.cat([acc.corr(0, 0), c01], 1), torch.cat([c01.T, acc.corr(1, 1)], 1)])
            else:
                s_act[g.gid] = [None] + [acc.corr(0, m) for m in range(1, n_models)]

    def solve(g, use_weights: bool, ready: Optional[set] = None) -> float:
        a = alpha if use_weights else 0.0
        if mode == "zip":
            s_w = None
            if a > 0:
                f0, f1 = _weight_similarity(spec, states, g.gid, U, [0, 1], ready)
                fa = torch.cat([f0, f1])
                s_w = weight_correlation(fa, fa)
            s = dual_space_similarity(s_w, s_act.get(g.gid), a)
            cluster, score = match_zip(s, g.size, g.block, g.within, allow_same_model)
            n = g.size
            for m in range(2):
                u = torch.zeros(n, n)
                u[torch.arange(n), cluster[m * n:(m + 1) * n]] = 1.0
                U[g.gid][m] = u
            return score
        scores = []
        for m in range(1, n_models):
            s_w = None
            if a > 0:
                f0, fm = _weight_similarity(spec, states, g.gid, U, [0, m], ready)
                s_w = weight_correlation(f0, fm)
            s = dual_space_similarity(s_w, s_act[g.gid][m] if s_act else None, a)
            perm, score = match_align(s, g.block, g.within)
            u = torch.zeros(g.size, g.size)
            u[perm, torch.arange(g.size)] = 1.0  # unit perm[r] of model m -> merged unit r
            U[g.gid][m] = u
            scores.append(score)
        return sum(scores) / len(scores)

    last = {}
    if alpha < 1.0:  # activation-only initialisation (exact when alpha == 0)
        for g in groups:
            last[g.gid] = solve(g, use_weights=False)
        info["objective"].append(sum(last.values()) / len(last))
    if alpha > 0.0:
        prev = None
        for sweep in range(max(1, sweeps)):
            # weight-only start: the first sweep goes forward through the graph and uses only the
            # tensors whose other axes are already matched (incoming weights), as a forward pass would
            ready = set() if (sweep == 0 and alpha == 1.0) else None
            for g in groups:
                last[g.gid] = solve(g, use_weights=True, ready=ready)
                if ready is not None:
                    ready.add(g.gid)
            obj = sum(last.values()) / len(last)
            info["objective"].append(obj)
            if prev is not None and obj - prev < tol:
                break
            prev = obj
    info["groups"] = [{"name": g.name, "units": g.size, "block": g.block, "similarity": last[g.gid]} for g in groups]
    if mode == "align":
        info["aligned_states"] = [_permute_state(spec, st, {k: v[m] for k, v in U.items()})
                                  for m, st in enumerate(states)]
    return _merge_state(spec, states, U, weights, module_weights), info


def _permute_state(spec: MergeSpec, state: dict, U_m: dict) -> dict:
    """Model ``m`` itself, its units put in the merged order (align mode: function-preserving)."""
    out = {}
    for name, t in state.items():
        if torch.is_floating_point(t):
            x = t.detach().float()
            for axis, gid, _role, tile in spec.param_axes.get(name, []):
                x = _apply_along(x, axis, U_m[gid].T, tile)
            out[name] = x.to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def mudsc_merge(models: Sequence[nn.Module], dataloader: Iterable, *, mode: str = "align",
                alpha: Optional[float] = None, a: Optional[float] = None, sweeps: int = 10, tol: float = 1e-4,
                max_batches: int = 8, input_fn: Optional[Callable] = None, weights: Optional[Sequence[float]] = None,
                module_weights: Optional[Mapping[str, Sequence[float]]] = None, reset_bn: bool = True,
                bn_batches: Optional[int] = None, allow_same_model: bool = True, return_info: bool = False):
    """Merge N models of one architecture that share no base (MuDSC, arXiv 2403.01753).

    Args:
        models: the models (same class, same tensors). They are not modified.
        dataloader: iterable of batches of *unlabeled* inputs; labels in ``(x, y)`` batches are ignored
            (``input_fn`` picks the inputs). Used for activations and the BatchNorm reset.
        mode: ``"align"`` (Hungarian: every model is permuted onto ``models[0]``, then averaged),
            ``"zip"`` (ZipIt greedy: units may merge within one model; N > 2 models are zipped one at a
            time into the running merge), or ``"average"`` (no matching: plain weight averaging, a baseline).
        alpha: the paper's ``a`` in ``S = a*S_w + (1-a)*S_act``; ``a`` is accepted as an alias. Default 0.5.
            ``1`` = weight space only (no data needed for matching), ``0`` = activations only.
        sweeps: maximum number of alternating passes over the groups (when ``alpha > 0``).
        tol: stopping rule: stop when a sweep raises the mean matched similarity by less than ``tol``.
        max_batches: batches used for activation statistics (and, unless ``bn_batches``, the BN reset).
        input_fn: ``batch -> model inputs`` (a tensor, or a tuple of positional inputs).
        weights: per-model averaging weights (default uniform).
        module_weights: ``{module prefix: per-model weights}`` overriding ``weights`` for the tensors of
            that module, e.g. ``{"head_a": [1, 0], "head_b": [0, 1]}`` keeps each task's own head (mapped
            into the merged unit order) instead of averaging heads.
        reset_bn: recompute BatchNorm running statistics of the merged model on the data.
        allow_same_model: zip only: may two units of one model be merged (ZipIt default: yes).
        return_info: also return a dict: per-group matched similarity, objective per sweep, and in
            ``align`` mode ``aligned_states``: every model's own state dict with its units permuted
            into the merged order (function-preserving), e.g. to take each task's own head.

    Returns:
        A new module of the class of ``models[0]`` with the merged weights (and ``info`` if asked).

    Raises:
        UnsupportedModuleError: the model holds a module or function MuDSC cannot merge (named).
    """
    if a is not None and alpha is not None and a != alpha:
        raise ValueError("mudsc: give either alpha or a (the same parameter), not both")
    alpha = 0.5 if alpha is None and a is None else float(alpha if alpha is not None else a)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mudsc: alpha must be in [0, 1], got {alpha}")
    if mode not in MODES:
        raise ValueError(f"mudsc: mode must be one of {MODES}, got {mode!r}")
    models = list(models)
    n = len(models)
    weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("mudsc: weights must hold one non-negative weight per model")
    weights = [w / sum(weights) for w in weights]
    input_fn = input_fn or default_input_fn
    _check_models(models)
    example = None
    for batch in _batches(dataloader, 1):
        example = _as_args(input_fn(batch))
    if example is None:
        raise ValueError("mudsc: the dataloader yielded no batch")
    spec = build_spec(models[0], example)
    kw = dict(mode=mode, alpha=alpha, sweeps=sweeps, tol=tol, max_batches=max_batches, input_fn=input_fn,
              allow_same_model=allow_same_model)
    bn_batches = bn_batches or max_batches
    if mode == "zip" and n > 2:
        merged, cum = models[0], weights[0]
        mw_cum = {k: float(v[0]) for k, v in (module_weights or {}).items()}
        infos = []
        for k in range(1, n):
            mw = {p: [mw_cum[p], float(v[k])] for p, v in (module_weights or {}).items()}
            mw = {p: (v if sum(v) > 0 else [1.0, 0.0]) for p, v in mw.items()}
            state, info = _merge_two_or_more([merged, models[k]], dataloader, spec, weights=[cum, weights[k]],
                                             module_weights=mw or None, **kw)
            merged = _new_module(models[0], state)
            if reset_bn:
                reset_batchnorm(merged, dataloader, input_fn=input_fn, max_batches=bn_batches)
            cum += weights[k]
            mw_cum = {p: mw_cum[p] + float(v[k]) for p, v in (module_weights or {}).items()}
            infos.append(info)
        info = {"mode": mode, "alpha": alpha, "steps": infos}
    else:
        state, info = _merge_two_or_more(models, dataloader, spec, weights=weights,
                                         module_weights=dict(module_weights) if module_weights else None, **kw)
        merged = _new_module(models[0], state)
        if reset_bn:
            reset_batchnorm(merged, dataloader, input_fn=input_fn, max_batches=bn_batches)
    return (merged, info) if return_info else merged
