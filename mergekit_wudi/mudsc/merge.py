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

import difflib
import inspect
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .checks import (MODES, check_alpha, check_dataloader, check_inputs, check_models, check_module_weights,
                     check_options, check_result, check_weights)
from .data import as_args, default_input_fn, modes_restored, reset_batchnorm, take_batches
from .graph import FeatureRecorder, Group, MergeSpec, build_spec
from .matching import match_align, match_zip
from .similarity import CrossCorrelation, dual_space_similarity, weight_correlation
from .states import merge_states, new_module, permute_state, weight_features

__all__ = ["mudsc_merge", "check_parameters", "reset_batchnorm", "default_input_fn", "MODES"]


def _collect(models: Sequence[nn.Module], names: Sequence[str], spec: MergeSpec, dataloader: Iterable,
             input_fn: Callable, max_batches: int, pairs: list) -> dict[int, CrossCorrelation]:
    """Stream the activations of every group's units over at most ``max_batches`` batches (eval mode)."""
    recs = [FeatureRecorder(m, spec, name) for m, name in zip(models, names)]
    accs = {g.gid: CrossCorrelation([g.size] * len(models), pairs) for g in spec.groups}
    seen = 0
    with modes_restored(*models), torch.no_grad():
        for m in models:
            m.eval()
        for batch in take_batches(dataloader, max_batches):
            args = as_args(input_fn(batch))
            feats = [r.record(*args) for r in recs]
            for g in spec.groups:
                keys = spec.feature_keys[g.gid]
                accs[g.gid].update([torch.cat([f[k].reshape(-1, g.size) for k in keys]) for f in feats])
            seen += 1
    if seen == 0:
        raise ValueError("mudsc: the dataloader yielded no batch")
    return accs


class _Matching:
    """The unit matching of one merge: ``U[gid][m]`` (``[n, n]``, 0/1) per group and model, improved
    group by group with ``S = alpha * S_w + (1 - alpha) * S_act`` (MuDSC, Sec. 3)."""

    def __init__(self, spec: MergeSpec, states: list, mode: str, alpha: float, allow_same_model: bool):
        self.spec, self.states, self.mode, self.alpha = spec, states, mode, alpha
        self.allow_same_model = allow_same_model
        self.U = {g.gid: [torch.eye(g.size) for _ in states] for g in spec.groups}
        self.s_act: dict = {}

    def pairs(self) -> list[tuple[int, int]]:
        """The model pairs whose activation correlations are needed."""
        return [(0, 0), (0, 1), (1, 1)] if self.mode == "zip" else [(0, m) for m in range(1, len(self.states))]

    def set_activations(self, accs: dict[int, CrossCorrelation]) -> None:
        for g in self.spec.groups:
            acc = accs[g.gid]
            if self.mode == "zip":  # one [2n, 2n] matrix over both models' units
                c01 = acc.corr(0, 1)
                self.s_act[g.gid] = torch.cat([torch.cat([acc.corr(0, 0), c01], 1),
                                               torch.cat([c01.T, acc.corr(1, 1)], 1)])
            else:
                self.s_act[g.gid] = [None] + [acc.corr(0, m) for m in range(1, len(self.states))]

    def solve(self, g: Group, use_weights: bool, ready: Optional[set] = None) -> float:
        """Re-match group ``g`` given the other groups' matching; returns its mean matched similarity."""
        a = self.alpha if use_weights else 0.0
        if self.mode == "zip":
            return self._zip(g, a, ready)
        return sum(self._align(g, m, a, ready) for m in range(1, len(self.states))) / (len(self.states) - 1)

    def _zip(self, g: Group, a: float, ready: Optional[set]) -> float:
        s_w = None
        if a > 0:
            f0, f1 = weight_features(self.spec, self.states, g.gid, self.U, [0, 1], ready)
            fa = torch.cat([f0, f1])
            s_w = weight_correlation(fa, fa)
        s = dual_space_similarity(s_w, self.s_act.get(g.gid), a)
        cluster, score = match_zip(s, g.size, g.block, g.within, self.allow_same_model)
        n = g.size
        for m in range(2):
            u = torch.zeros(n, n)
            u[torch.arange(n), cluster[m * n:(m + 1) * n]] = 1.0
            self.U[g.gid][m] = u
        return score

    def _align(self, g: Group, m: int, a: float, ready: Optional[set]) -> float:
        s_w = None
        if a > 0:
            f0, fm = weight_features(self.spec, self.states, g.gid, self.U, [0, m], ready)
            s_w = weight_correlation(f0, fm)
        s = dual_space_similarity(s_w, self.s_act[g.gid][m] if self.s_act else None, a)
        perm, score = match_align(s, g.block, g.within)
        u = torch.zeros(g.size, g.size)
        u[perm, torch.arange(g.size)] = 1.0  # unit perm[r] of model m -> merged unit r
        self.U[g.gid][m] = u
        return score

    def run(self, sweeps: int, tol: float) -> tuple[dict, list]:
        """Activation-only start (exact when alpha == 0), then dual-space sweeps until the mean matched
        similarity gains less than ``tol``. Returns the last similarity per group and the objective."""
        groups, last, objective = self.spec.groups, {}, []
        if self.alpha < 1.0:
            for g in groups:
                last[g.gid] = self.solve(g, use_weights=False)
            objective.append(sum(last.values()) / len(last))
        if self.alpha > 0.0:
            prev = None
            for sweep in range(sweeps):
                # weight-only start: the first sweep goes forward through the graph and uses only the
                # tensors whose other axes are already matched (incoming weights), as a forward pass would
                ready = set() if (sweep == 0 and self.alpha == 1.0) else None
                for g in groups:
                    last[g.gid] = self.solve(g, use_weights=True, ready=ready)
                    if ready is not None:
                        ready.add(g.gid)
                obj = sum(last.values()) / len(last)
                objective.append(obj)
                if prev is not None and obj - prev < tol:
                    break
                prev = obj
        return last, objective


def _merge_states_of(models: Sequence[nn.Module], names: Sequence[str], dataloader: Iterable, spec: MergeSpec, *,
                     mode: str, alpha: float, sweeps: int, tol: float, max_batches: int, input_fn: Callable,
                     weights: list, module_weights: Optional[dict], allow_same_model: bool) -> tuple[dict, dict]:
    """Match the models' units and average them: the merged state dict and the info dict."""
    states = [m.state_dict() for m in models]
    matching = _Matching(spec, states, mode, alpha, allow_same_model)
    info = {"mode": mode, "alpha": alpha, "groups": [], "objective": []}
    if mode == "average" or not spec.groups:
        return merge_states(spec, states, matching.U, weights, module_weights), info
    if mode == "zip" and len(models) != 2:
        raise AssertionError("zip merges pairs")
    if alpha < 1.0:
        matching.set_activations(_collect(models, names, spec, dataloader, input_fn, max_batches, matching.pairs()))
    last, info["objective"] = matching.run(sweeps, tol)
    info["groups"] = [{"name": g.name, "units": g.size, "block": g.block, "similarity": last[g.gid]}
                      for g in spec.groups]
    if mode == "align":
        info["aligned_states"] = [permute_state(spec, st, {k: v[m] for k, v in matching.U.items()})
                                  for m, st in enumerate(states)]
    return merge_states(spec, states, matching.U, weights, module_weights), info


def _finish(template: nn.Module, state: dict, produced_by: str, dataloader: Iterable, *, reset_bn: bool,
            input_fn: Callable, bn_batches: int) -> nn.Module:
    """The merged module: every tensor checked finite before it is loaded, and after the BatchNorm reset."""
    check_result(state, produced_by)
    merged = new_module(template, state)
    if reset_bn:
        reset_batchnorm(merged, dataloader, input_fn=input_fn, max_batches=bn_batches)
        check_result(merged.state_dict(), f"{produced_by}, then the BatchNorm reset on the merge data")
    return merged


def _zip_one_at_a_time(models: list, dataloader: Iterable, spec: MergeSpec, weights: list,
                       module_weights: Optional[dict], finish: Callable, **kw) -> tuple[nn.Module, dict]:
    """``zip`` with N > 2 models: zip model k into the merge of models 0..k-1, k = 1..N-1."""
    merged, cum = models[0], weights[0]
    mw_cum = {k: float(v[0]) for k, v in (module_weights or {}).items()}
    infos = []
    for k in range(1, len(models)):
        mw = {p: [mw_cum[p], float(v[k])] for p, v in (module_weights or {}).items()}
        mw = {p: (v if sum(v) > 0 else [1.0, 0.0]) for p, v in mw.items()}
        names = ["model 0" if k == 1 else f"the merge of models 0-{k - 1}", f"model {k}"]
        state, info = _merge_states_of([merged, models[k]], names, dataloader, spec, weights=[cum, weights[k]],
                                       module_weights=mw or None, **kw)
        merged = finish(state, f"step {k} (zipping model {k} in)")
        cum += weights[k]
        mw_cum = {p: mw_cum[p] + float(v[k]) for p, v in (module_weights or {}).items()}
        infos.append(info)
    return merged, {"mode": "zip", "alpha": kw["alpha"], "steps": infos}


def mudsc_merge(models: Sequence[nn.Module], dataloader: Iterable, *, mode: str = "align",
                alpha: Optional[float] = None, a: Optional[float] = None, sweeps: int = 10, tol: float = 1e-4,
                max_batches: int = 8, input_fn: Optional[Callable] = None, weights: Optional[Sequence[float]] = None,
                module_weights: Optional[Mapping[str, Sequence[float]]] = None, reset_bn: bool = True,
                bn_batches: Optional[int] = None, allow_same_model: bool = True, return_info: bool = False):
    """Merge N models of one architecture that share no base (MuDSC, arXiv 2403.01753).

    Args:
        models: the models (same class, same tensors in one dtype, all finite). They are not modified.
        dataloader: iterable of batches of *unlabeled* inputs; labels in ``(x, y)`` batches are ignored
            (``input_fn`` picks the inputs). Used for activations and the BatchNorm reset. A one-pass
            iterator (a generator, ``iter(loader)``) is read once into a list of its first
            ``max(max_batches, bn_batches)`` batches.
        mode: ``"align"`` (Hungarian: every model is permuted onto ``models[0]``, then averaged),
            ``"zip"`` (ZipIt greedy: units may merge within one model; N > 2 models are zipped one at a
            time into the running merge), or ``"average"`` (no matching: plain weight averaging, a baseline).
        alpha: the paper's ``a`` in ``S = a*S_w + (1-a)*S_act``; ``a`` is accepted as an alias. Default 0.5.
            ``1`` = weight space only (no data needed for matching), ``0`` = activations only.
        sweeps: maximum number of alternating passes over the groups (when ``alpha > 0``), >= 1.
        tol: stopping rule (>= 0): stop when a sweep raises the mean matched similarity by less than ``tol``.
        max_batches: batches used for activation statistics (and, unless ``bn_batches``, the BN reset).
        input_fn: ``batch -> model inputs`` (a tensor, or a tuple of positional inputs).
        weights: per-model averaging weights (default uniform; finite, non-negative, not all zero).
        module_weights: ``{module prefix: per-model weights}`` overriding ``weights`` for the tensors of
            that module, e.g. ``{"head_a": [1, 0], "head_b": [0, 1]}`` keeps each task's own head (mapped
            into the merged unit order) instead of averaging heads.
        reset_bn: recompute BatchNorm running statistics of the merged model on the data.
        bn_batches: batches used for the BatchNorm reset (default ``max_batches``).
        allow_same_model: zip only: may two units of one model be merged (ZipIt default: yes).
        return_info: also return a dict: per-group matched similarity, objective per sweep, and in
            ``align`` mode ``aligned_states``: every model's own state dict with its units permuted
            into the merged order (function-preserving), e.g. to take each task's own head.

    Tensors are computed in float32 (float64 when the models hold float64) and cast back.

    Returns:
        A new module of the class of ``models[0]`` with the merged weights (and ``info`` if asked).

    Raises:
        UnsupportedModuleError: the model holds a module or function MuDSC cannot merge (named).
        ValueError / TypeError: a bad argument (named), NaN/Inf in a model (model and tensor named), in
            the activations (model and layer named) or in a merged tensor (tensor named), before it is used.
    """
    alpha = check_alpha(alpha, a)
    check_options(mode=mode, sweeps=sweeps, tol=tol, max_batches=max_batches, bn_batches=bn_batches,
                  input_fn=input_fn, reset_bn=reset_bn, allow_same_model=allow_same_model, return_info=return_info)
    check_dataloader(dataloader)
    models = list(models)
    states = check_models(models)
    n = len(models)
    weights = check_weights(weights, n)
    module_weights = check_module_weights(module_weights, n, list(states[0]))
    input_fn = input_fn or default_input_fn
    if isinstance(dataloader, Iterator):  # one pass only, and the merge reads the data up to three times
        dataloader = list(take_batches(dataloader, max(max_batches, bn_batches or max_batches)))
    example = None
    for batch in take_batches(dataloader, 1):
        example = as_args(input_fn(batch))
    if example is None:
        raise ValueError("mudsc: the dataloader yielded no batch")
    check_inputs(models[0], example)
    spec = build_spec(models[0], example)
    kw = dict(mode=mode, alpha=alpha, sweeps=sweeps, tol=tol, max_batches=max_batches, input_fn=input_fn,
              allow_same_model=allow_same_model)
    produced_by = f"mudsc_merge(mode={mode!r}, alpha={alpha}, weights={weights}, module_weights={module_weights})"

    def finish(state: dict, step: str = "") -> nn.Module:
        return _finish(models[0], state, produced_by + (f", {step}" if step else ""), dataloader,
                       reset_bn=reset_bn, input_fn=input_fn, bn_batches=bn_batches or max_batches)

    if mode == "zip" and n > 2:
        merged, info = _zip_one_at_a_time(models, dataloader, spec, weights, module_weights, finish, **kw)
    else:
        state, info = _merge_states_of(models, [f"model {i}" for i in range(n)], dataloader, spec,
                                       weights=weights, module_weights=module_weights, **kw)
        merged = finish(state)
    return (merged, info) if return_info else merged


_OPTIONS = ("mode", "sweeps", "tol", "max_batches", "bn_batches", "input_fn", "reset_bn", "allow_same_model",
            "return_info")


def check_parameters(parameters: Mapping[str, Any], n_models: Optional[int] = None) -> None:
    """Check keyword parameters of :func:`mudsc_merge` before any model or data exists (e.g. in a
    Lightning callback's ``setup``): an unknown name is an error suggesting the closest valid one, and
    every value is checked as :func:`mudsc_merge` would; with ``n_models``, ``weights`` and
    ``module_weights`` too (which modules ``module_weights`` names is checked by the merge)."""
    signature = inspect.signature(mudsc_merge)
    accepted = list(signature.parameters)[2:]  # after models, dataloader
    for name in parameters:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"mudsc: unknown parameter {name!r}{hint} (parameters: {', '.join(accepted)})")
    values = {name: signature.parameters[name].default for name in accepted}
    values.update(parameters)
    check_alpha(values["alpha"], values["a"])
    check_options(**{name: values[name] for name in _OPTIONS})
    if n_models is not None:
        check_weights(values["weights"], n_models)
        check_module_weights(values["module_weights"], n_models)
