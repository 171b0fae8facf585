"""The methods of the quality table, as ONE list of :class:`MethodSpec` (name, how to merge, validation grid).

Every merge goes through mergekit's registry (``merge_state_dicts``). A spec's ``run(ctx)`` merges the
subset's experts, tunes its knob on the validation split with ``ctx.grid_search`` / ``ctx.lambda_search``
and records one or more rows with ``ctx.record``. Adding a method row is one entry::

    MethodSpec("dare_ties", lambda_tuned("dare_ties (d=0.2, val lambda)", "dare_ties",
                                         {"weight": 1.0, "density": 0.2}, grid=[0.5, 1.0, 1.5]))

The module ``benchmarks/baselines.py`` (every mergekit baseline, TSV-M, Iso-C and Iso-CTS), when present, is
asked for a module-level ``METHOD_SPECS`` list, appended after the built-in rows (see :func:`method_specs`).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

from mergekit_wudi.solvers import lwptv
from mergekit_wudi.solvers.subspace_merging import DECORRELATED_PRIOR
from mergekit_wudi.solvers.wudi import FLOW_TIME, RANK_ENERGY, RIDGE

from ..common import mean
from .subset import SubsetContext, linear_flags, merge, scaled

DECORRELATED_ROW = f"wudi decorrelated (prior {DECORRELATED_PRIOR:g})"  # issue 21: recommended for LoRA experts
# issue 21: the callback's default for LoRA experts it trains: Eq. 1 with each adapter's A-update Gram on the LoRA
# layers (WUDIMergeCallback(lora_a_updates)), decorrelated elsewhere
A_UPDATES_ROW = "wudi callback default (LoRA A-update Grams)"

EXTRA_SPEC_MODULES = ("benchmarks.baselines",)


def lwptv_threshold(sd0, experts, fraction):
    """The LwPTV saliency threshold (``mergekit_wudi.solvers.lwptv.saliency``) that drops the ``fraction``
    least salient (task, tensor) pairs of the nn.Linear weights. Fixed fraction, data-free."""
    import torch

    lin, _ = linear_flags(sd0)
    scores = []
    for (k, w0), is_lin in zip(sd0.items(), lin.values):
        if is_lin:  # only the tensors LwPTV is applied to (the nn.Linear weights)
            scores += lwptv.saliency(w0, torch.stack([e[k] - w0 for e in experts])).tolist()
    scores.sort()
    return scores[min(len(scores) - 1, int(fraction * len(scores)))]


def registered() -> set:
    from mergekit import merge_methods

    return {m.spec.name for m in merge_methods.registered_methods()}


def always(_ctx) -> bool:
    return True


@dataclass(frozen=True)
class MethodSpec:
    """One entry of the method table.

    ``run(ctx)`` records the entry's row(s); ``group`` is what ``--refresh`` names (``closed_form``,
    ``spectral``; everything else is ``others``, AWD / LwPTV are ``preprocess``); ``when(ctx)`` says
    whether the entry runs on this subset / seed."""

    name: str
    run: Callable[[SubsetContext], None]
    group: str = "others"
    when: Callable[[SubsetContext], bool] = always


def lambda_tuned(row: str, method: str, params: dict, grid: Sequence[float] | str, with_ood: bool = False,
                 shown: dict | None = None) -> Callable:
    """A mergekit method whose output is ``base + lambda * mixed_delta``: lambda chosen on validation from
    ``grid`` (a list, or the name of a config key holding one), then merged for real at that lambda."""

    def run(ctx):
        values = ctx.cfg[grid] if isinstance(grid, str) else list(grid)
        lam, sd, secs, val_grid = ctx.lambda_search(row, method, params, values)
        ctx.record(row, sd, secs, {"lambda": lam, **(shown or {})}, val_grid, with_ood=with_ood)

    return run


def grid_tuned(row: str, build: Callable, grid: Sequence | str, knob: str, with_ood: bool = False) -> Callable:
    """Any merge ``build(ctx, value) -> (state dict, seconds)``: ``value`` chosen on validation from ``grid``."""

    def run(ctx):
        values = ctx.cfg[grid] if isinstance(grid, str) else list(grid)
        v, sd, secs, val_grid = ctx.grid_search(row, lambda x: build(ctx, x), values)
        ctx.record(row, sd, secs, {knob: v}, val_grid, with_ood=with_ood)

    return run


def _ties(ctx):
    d = ctx.cfg["ties_density"]
    lambda_tuned(f"ties (d={d:g}, val lambda)", "ties", {"weight": 1.0, "density": d}, "ties_grid",
                 shown={"density": d})(ctx)


def record_val_scaled(ctx, solver: str, sd1, secs, grid_key: str = "wudi_scale_grid") -> None:
    """``wudi <solver> (val scaling)``: the merge ``sd1`` (made at scaling 1.0) rescaled by the factor chosen on
    validation (``W0 + s * (sd1 - W0)`` is the merge at scaling ``s``, see :func:`scaled`)."""
    row, one = f"wudi {solver} (val scaling)", f"wudi {solver} (scaling 1.0)"
    s, sd, _, grid = ctx.grid_search(f"wudi {solver} scaling", lambda v: (scaled(ctx.sd0, sd1, v), 0.0),
                                     ctx.cfg[grid_key])
    if s != 1.0 or one not in ctx.res:
        ctx.record(row, sd, secs, {"scaling": s}, grid)
    else:
        ctx.res[row] = {**ctx.res[one], "chosen": {"scaling": 1.0}, "val_grid": grid}


def _wudi_adam(ctx):
    """The authors' solver at scaling 1.0 (the headline), then the scaling chosen on validation."""
    sd1, secs = ctx.merge("wudi", {"solver": "adam", "scaling": 1.0, "linear": ctx.lin})
    ctx.record("wudi adam (scaling 1.0)", sd1, secs, {"scaling": 1.0}, with_ood=True)
    record_val_scaled(ctx, "adam", sd1, secs)


def _wudi_knob(ctx, solver, knob, values_key, default, val_key, best_row=None):
    """A fast WUDI solver at its default ``knob``, the ``knob`` grid scored on validation (kept under
    ``val_key``), and, with ``best_row``, a row for the value validation chose."""
    best, sd_best, secs_best, grid = ctx.grid_search(f"wudi {solver} {knob}", lambda v: ctx.merge(
        "wudi", {"solver": solver, knob: v, "linear": ctx.lin}), ctx.cfg[values_key])
    ctx.res[val_key] = grid
    sd, secs = ctx.merge("wudi", {"solver": solver, "linear": ctx.lin})
    ctx.record(f"wudi {solver} ({knob} {default:g})", sd, secs, {knob: default})
    if best_row:
        ctx.record(best_row, sd_best, secs_best, {knob: best}, grid)


def _wudi_closed_form(ctx):
    """The exact minimiser at the solver's default ridge; the ridge grid on validation is reported."""
    _wudi_knob(ctx, "closed_form", "ridge", "ridges", RIDGE, "_closed_form_ridge_val")


def _wudi_spectral(ctx):
    """The default flow_time and the flow_time chosen on validation."""
    _wudi_knob(ctx, "spectral", "flow_time", "flow_times", FLOW_TIME, "_spectral_flow_time_val",
               best_row="wudi spectral (val flow_time)")


def _wudi_lowrank(ctx):
    sd, secs = ctx.merge("wudi", {"solver": "lowrank", "linear": ctx.lin})
    ctx.record("wudi lowrank", sd, secs)


def _lowrank_wanted(ctx) -> bool:
    c = ctx.cfg
    return c["lowrank"] and len(ctx.subset) in c["lowrank_subsets"] and (
        c["lowrank_seeds"] is None or c["_seed"] in c["lowrank_seeds"])


@contextlib.contextmanager
def auto_rank_cap(cap):
    """``rank: auto`` merges inside use ``cap`` (an int, or ``"none"``: the uncapped rule of issue #12)
    instead of :data:`mergekit_wudi.solvers.wudi_lowrank.AUTO_MAX_RANK`, which is read at call time.
    The merges run in this process (``merge_state_dicts``), so this is what they use."""
    from mergekit_wudi.solvers import wudi_lowrank

    saved = wudi_lowrank.AUTO_MAX_RANK
    wudi_lowrank.AUTO_MAX_RANK = 10**9 if cap == "none" else int(cap)
    try:
        yield
    finally:
        wudi_lowrank.AUTO_MAX_RANK = saved


def _wudi_rank_fast_path(ctx):
    """The low-rank fast path (issues #12, #22) of ``closed_form`` and ``spectral``: fixed ranks, then
    ``rank: auto`` at the package's defaults. For ``spectral`` (the fast path README recommends for full
    fine-tunes) two validation grids choose those defaults: the cap on auto's rank (``rank_caps``, kept
    under ``_spectral_rank_cap_val``; ``"none"`` is issue #12's uncapped rule) at the default
    ``rank_energy``, and ``rank_energies`` at the default cap (``_spectral_rank_energy_val``)."""
    from mergekit_wudi.solvers.wudi_lowrank import AUTO_MAX_RANK

    for solver in ("closed_form", "spectral"):
        for k in ctx.cfg["ranks"]:
            sd, secs = ctx.merge("wudi", {"solver": solver, "rank": k, "linear": ctx.lin})
            ctx.record(f"wudi {solver} (rank {k})", sd, secs, {"rank": k})
        if solver == "spectral":
            def capped(cap):
                with auto_rank_cap(cap):
                    return ctx.merge("wudi", {"solver": solver, "rank": "auto", "linear": ctx.lin})

            _, _, _, grid = ctx.grid_search(f"wudi {solver} rank cap", capped, ctx.cfg["rank_caps"])
            ctx.res[f"_{solver}_rank_cap_val"] = grid
            _, _, _, grid = ctx.grid_search(f"wudi {solver} rank_energy", lambda e: ctx.merge(
                "wudi", {"solver": solver, "rank": "auto", "rank_energy": e, "linear": ctx.lin}),
                ctx.cfg["rank_energies"])
            ctx.res[f"_{solver}_rank_energy_val"] = grid
        sd, secs = ctx.merge("wudi", {"solver": solver, "rank": "auto", "linear": ctx.lin})
        ctx.record(f"wudi {solver} (rank auto <= {AUTO_MAX_RANK}, energy {RANK_ENERGY:g})", sd, secs,
                   {"rank": "auto", "rank_energy": RANK_ENERGY, "max_rank": AUTO_MAX_RANK})


def _preprocess_variant(ctx, method, pre) -> None:
    """One AWD / LwPTV variant of ``method``, pre-processing only the nn.Linear weights (as WUDI);
    embeddings / norms / biases stay plain task vectors. Lambda on validation, OOD on held-out tasks."""
    from mergekit.merge_methods import PerGroupValues

    params = dict(pre["params"])
    if params.get("preprocess") == "lwptv":
        params["lwptv_threshold"] = lwptv_threshold(ctx.sd0, [ctx.models[t] for t in ctx.subset],
                                                    ctx.cfg["lwptv_drop_fraction"])
    params["preprocess"] = PerGroupValues([params["preprocess"] if f else "none" for f in ctx.lin.values])
    base_params = {"weight": 1.0, **params}
    if method.endswith("ties"):
        base_params["density"] = ctx.cfg["ties_density"]
    values = ctx.cfg["ta_grid"] if method.endswith("arithmetic") else ctx.cfg["ties_grid"]
    try:
        lam, sd, secs, grid = ctx.lambda_search(f"{method} {pre['name']}", method, base_params, values, remerge=False)
    except Exception as exc:  # noqa: BLE001 - report, keep the rest of the benchmark
        ctx.res[f"_{method} {pre['name']}"] = f"failed: {type(exc).__name__}: {exc}"
        ctx.log(f"    {method} {pre['name']} failed: {exc}")
        return
    shown = {**params, "preprocess": pre["name"] + " (nn.Linear weights only)"}
    ctx.record(f"{method} {pre['name']} (val lambda)", sd, secs, {"lambda": lam, **shown}, grid, with_ood=True)


def _preprocessed(ctx):
    """AWD / LwPTV pre-processing (present once mergekit_wudi registers them)."""
    names = registered()
    for method in ctx.cfg["preprocess_methods"]:
        if method not in names:
            ctx.res[f"_{method}"] = "not registered in this mergekit_wudi version"
            continue
        for pre in ctx.cfg["preprocess_variants"]:
            _preprocess_variant(ctx, method, pre)


def _wudi_decorrelated(ctx):
    """``solver: decorrelated`` at its default prior (issue 21), nothing tuned on validation: the configuration
    recommended for LoRA experts (the callback's default for them), checked in ``summary.claims``."""
    sd, secs = ctx.merge("wudi", {"solver": "decorrelated", "linear": ctx.lin})
    ctx.record(DECORRELATED_ROW, sd, secs, {"solver": "decorrelated"}, with_ood=True)


BUILTIN_SPECS = [
    MethodSpec("task_arithmetic", lambda_tuned("task_arithmetic (val lambda)", "task_arithmetic", {"weight": 1.0},
                                               "ta_grid", with_ood=True)),
    MethodSpec("ties", _ties),
    MethodSpec("wudi adam", _wudi_adam),
    MethodSpec("wudi closed_form", _wudi_closed_form, group="closed_form"),
    MethodSpec("wudi spectral", _wudi_spectral, group="spectral"),
    MethodSpec("wudi lowrank", _wudi_lowrank, when=_lowrank_wanted),
    MethodSpec("wudi rank fast path", _wudi_rank_fast_path, group="rank",
               when=lambda ctx: len(ctx.subset) in ctx.cfg["rank_subsets"]),
    MethodSpec("wudi decorrelated", _wudi_decorrelated, group="decorrelated"),
    MethodSpec("awd / lwptv", _preprocessed, group="preprocess",
               when=lambda ctx: len(ctx.subset) in ctx.cfg["preprocess_subsets"]),
]


def method_specs() -> list[MethodSpec]:
    """The built-in rows, then ``METHOD_SPECS`` of each module in ``EXTRA_SPEC_MODULES`` that exists."""
    specs = list(BUILTIN_SPECS)
    for name in EXTRA_SPEC_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but one of ITS imports is missing: say so
                raise
            continue
        specs += list(getattr(module, "METHOD_SPECS", []))
    return specs


def selected(spec: MethodSpec, ctx) -> bool:
    """``--preprocess-only``: only the pre-processing rows; ``--refresh``: only the named groups."""
    cfg = ctx.cfg
    if cfg["preprocess_only"]:
        return spec.group == "preprocess"
    group = "others" if spec.group == "preprocess" else spec.group
    if cfg["refresh"] and group not in cfg["refresh"]:
        return False
    return spec.when(ctx)


def run_subset(cfg, evaluator, sd0, experts, heads, subset, held_out, expert_acc, log, specs=None) -> dict:
    """Every selected entry of the method table on one set of merged tasks. Returns {row: record}."""
    ctx = SubsetContext(cfg, evaluator, sd0, experts, heads, list(subset), list(held_out), expert_acc, log)
    for spec in method_specs() if specs is None else specs:
        if selected(spec, ctx):
            spec.run(ctx)
    return ctx.res


__all__ = ["MethodSpec", "lambda_tuned", "grid_tuned", "method_specs", "run_subset", "merge", "linear_flags",
           "scaled", "lwptv_threshold", "mean"]
