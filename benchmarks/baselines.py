"""The baseline table of the quality benchmark (issue #13): every mergekit 0.1.5 method that merges
several fine-tunes of one base, plus TSV-M / Iso-C / Iso-CTS (``tsv_merge``, ``iso_c``, ``iso_cts``,
registered by this package: :mod:`mergekit_wudi.solvers.subspace_merging`), each with the small
validation grid it is tuned over.

Every row is a :class:`MethodSpec`; ``spec.merge(base_sd, expert_sds, params, seed)`` returns the
merged state dict for one grid point ``params``. ``expert_sds`` maps expert ids (e.g. task names) to
state dicts. Every row goes through ``mergekit.merge_methods.api.merge_state_dicts`` (the registry),
with the base under the id ``"base"``; per-model parameters in a grid point are scalars here and are
expanded to ``{expert_id: value}`` mappings. Stochastic rows (DARE and DELLA: Bernoulli masks) seed
torch's global generator with ``seed`` right before the merge, so a (grid point, seed) pair is
reproducible; average them over the benchmark's expert seeds.

``spec.scale_param`` names the knob that only scales the merged task vector (``lambda`` in mergekit's
generalized task arithmetic: ``W0 + lambda * mixed_delta``; ``alpha`` in the subspace rows:
``W0 + alpha * tau_m``), so a runner may merge once at 1.0 and score ``W0 + v * (merged - W0)`` for
every value ``v``. This is exact for the deterministic rows; for stochastic rows it is exact only if
the same seed is used (the masks do not depend on lambda).

Grids (per-model knobs get the same value for every expert; weight = 1 for every expert):

====================  ==========================================================================
task_arithmetic       lambda in {0.1, 0.2, 0.3, 0.5, 0.7, 1.0}
ties                  density in {0.2, 0.5} x lambda in {0.5, 1.0, 1.5, 2.0} (normalize=True default)
dare_ties             density in {0.3, 0.5} x lambda in {0.3, 0.5, 0.7, 1.0} (rescale=True, normalize=False)
dare_linear           density in {0.3, 0.5} x lambda in {0.3, 0.5, 0.7, 1.0}
breadcrumbs           density in {0.8, 0.9}, gamma 0.01 x lambda in {0.3, 0.5, 0.7, 1.0}
breadcrumbs_ties      density in {0.8, 0.9}, gamma 0.01 x lambda in {0.3, 0.5, 0.7, 1.0}
della                 density in {0.3, 0.5}, epsilon 0.1 x lambda in {0.5, 1.0, 1.5} (normalize=True)
della_linear          density in {0.3, 0.5}, epsilon 0.1 x lambda in {0.3, 0.5, 0.7, 1.0}
model_stock           filter_wise in {False, True} (needs >= 2 experts)
sce                   select_topk in {0.1, 0.3, 1.0}
karcher               defaults (max_iter 10, tol 1e-5), experts only: no knob changes what it targets
linear                plain average of the experts (weight 1, normalize True), no knob
multislerp            with_base in {True, False} (task vectors on the sphere around the base, or the
                      raw expert weights), weight 1
tsv_merge             alpha in ALPHAS_REFERENCE (0.5 ... 16), sv_reduction 1/T
iso_c                 alpha in ALPHAS_REFERENCE
iso_cts               alpha in ALPHAS_REFERENCE, common_space_fraction 0.8
====================  ==========================================================================

The subspace rows decompose every 2-D floating tensor, as the authors' code does (embeddings
included; the ``linear`` parameter is set per tensor), and give every other tensor
``W0 + alpha * mean tau`` (their ``non_linear: mean`` default, the authors' rule). The lambda grids
for the sum-based rows (normalize=False) centre on ~1/T..1 as task arithmetic's does; the normalized
rows (ties, della: mean of the kept deltas) on 1..2 as TIES's paper. The alpha grids of the subspace
rows first covered the part of the authors' ``linspace(0, 3, 31)[1:]`` search where their chosen values
lie for 8 tasks (about 1: 0.5 ... 2); on the benchmark's full fine-tunes Iso-C and Iso-CTS chose the edge, 2, in
almost every subset and seed, and kept improving on validation up to 4-8 (``benchmarks/results/issue21/
variants_t_full.json``): their flat spectrum puts every singular value at the MEAN over all ``min(out, in)``
of them, and the task-vector sums of these short fine-tunes have a low effective rank, so that mean sits far
below the singular values that carry the tasks. The grid now runs to 16: on the full fine-tunes the chosen values
(2.5-8) lie inside it; on the LoRA experts, whose sums have a lower rank still, Iso-C / Iso-CTS chose 16, the new
edge, in 11 / 12 of 30 cases; issue 21's LoRA screen (``quality_variants.py``) runs them on ``ALPHAS_LORA``
(... 64), where validation picks 5-32 (4-task test rows up to +0.8, 7-task rows unchanged).
WUDI, AWD, LwPTV and lowrank are not here: the quality code already runs them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from mergekit_wudi.solvers.numerics import compute_dtype
from mergekit_wudi.solvers.subspace_merging import ISO_CTS_COMMON_SPACE_FRACTION

StateDict = Mapping[str, torch.Tensor]
MergeFn = Callable[[StateDict, Mapping[str, StateDict], Mapping[str, Any], int], dict]
BASE_ID = "base"

LAMBDAS_SUM = (0.3, 0.5, 0.7, 1.0)
ALPHAS_REFERENCE = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)
# LoRA experts (issue 21's screen): a sum of T rank-r updates has rank <= T r, far below min(out, in), so the
# flat spectrum's mean singular value is lower still and 16 was the chosen edge in a third of the cases.
ALPHAS_LORA = ALPHAS_REFERENCE + (24.0, 32.0, 48.0, 64.0)
SUBSPACE_METHODS = ("tsv_merge", "iso_c", "iso_cts")  # the "subspace" family: alpha-scaled, --refresh subspace
PER_MODEL = {  # mergekit parameters with ParameterScope.NON_BASE / INPUT (a value per model)
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "breadcrumbs": ("weight", "density", "gamma"),
    "breadcrumbs_ties": ("weight", "density", "gamma"),
    "della": ("weight", "density", "epsilon"),
    "della_linear": ("weight", "density", "epsilon"),
    "linear": ("weight",),
    "multislerp": ("weight",),
}


def product_grid(**axes) -> list[dict]:
    """Every combination of the given axes, e.g. ``product_grid(density=(0.2, 0.5), lambda_=(1.0,))``
    (a trailing underscore is dropped so ``lambda`` can be named)."""
    keys = [k.rstrip("_") for k in axes]
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: how to merge at one grid point, and the grid to tune on validation."""

    name: str
    family: str
    grid: list[dict]
    stochastic: bool
    merge: MergeFn = field(repr=False)
    scale_param: Optional[str] = None
    min_experts: int = 1


def mergekit_merge(method: str, *, stochastic: bool, with_base: bool = True,
                   linear: Optional[Callable[[str, torch.Tensor], bool]] = None) -> MergeFn:
    """A ``merge`` for a registered mergekit method through ``merge_state_dicts``.

    Grid keys listed in ``PER_MODEL[method]`` become ``{expert_id: value}`` mappings; every other key
    is a global parameter, except ``with_base`` (multislerp only here), which decides whether the
    base model is an input (the default is this function's ``with_base``). ``linear(name, base tensor)``
    sets the per-tensor ``linear`` parameter (our methods: which tensors are decomposed)."""
    from mergekit.merge_methods import PerGroupValues
    from mergekit.merge_methods.api import merge_state_dicts

    per_model = PER_MODEL.get(method, ())

    def merge(base_sd: StateDict, expert_sds: Mapping[str, StateDict], params: Mapping[str, Any], seed: int):
        if BASE_ID in expert_sds:
            raise ValueError(f"expert id {BASE_ID!r} is reserved for the base model")
        params = dict(params)
        use_base = params.pop("with_base", with_base)
        models = {BASE_ID: base_sd, **expert_sds} if use_base else dict(expert_sds)
        parameters = {
            key: ({expert_id: value for expert_id in expert_sds} if key in per_model else value)
            for key, value in params.items()
        }
        if linear is not None:
            parameters["linear"] = PerGroupValues([linear(name, t) for name, t in base_sd.items()])
        if stochastic:
            torch.manual_seed(seed)
        with torch.no_grad():
            return merge_state_dicts(models, method, base=BASE_ID if use_base else None, parameters=parameters)

    return merge


def authors_matrices(name: str, tensor: torch.Tensor) -> bool:
    """The tensors TSV-M / Iso decompose in the authors' code: every 2-D floating tensor (theirs also
    skips CLIP's ``text_projection``, which our models do not have)."""
    return tensor.ndim == 2 and tensor.is_floating_point()


def method_table() -> list[MethodSpec]:
    """All rows, each merging through mergekit's registry."""
    w = {"weight": 1.0}

    def gta(name, family, densities, lambdas, stochastic, **fixed):
        grid = [{**w, **fixed, **point} for point in product_grid(density=densities, lambda_=lambdas)]
        return MethodSpec(name, family, grid, stochastic, mergekit_merge(name, stochastic=stochastic),
                          scale_param="lambda")

    def ref(name, **fixed):
        grid = [{**fixed, "alpha": a} for a in ALPHAS_REFERENCE]
        return MethodSpec(name, "subspace", grid, False,
                          mergekit_merge(name, stochastic=False, linear=authors_matrices), scale_param="alpha")

    return [
        MethodSpec("task_arithmetic", "task arithmetic",
                   [{**w, "lambda": v} for v in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)], False,
                   mergekit_merge("task_arithmetic", stochastic=False), scale_param="lambda"),
        gta("ties", "sign consensus", (0.2, 0.5), (0.5, 1.0, 1.5, 2.0), False),
        gta("dare_ties", "random drop (DARE)", (0.3, 0.5), LAMBDAS_SUM, True),
        gta("dare_linear", "random drop (DARE)", (0.3, 0.5), LAMBDAS_SUM, True),
        gta("breadcrumbs", "magnitude drop", (0.8, 0.9), LAMBDAS_SUM, False, gamma=0.01),
        gta("breadcrumbs_ties", "magnitude drop", (0.8, 0.9), LAMBDAS_SUM, False, gamma=0.01),
        gta("della", "random drop (DARE)", (0.3, 0.5), (0.5, 1.0, 1.5), True, epsilon=0.1),
        gta("della_linear", "random drop (DARE)", (0.3, 0.5), LAMBDAS_SUM, True, epsilon=0.1),
        MethodSpec("model_stock", "averaging", [{"filter_wise": False}, {"filter_wise": True}], False,
                   mergekit_merge("model_stock", stochastic=False), min_experts=2),
        MethodSpec("sce", "sign consensus", [{"select_topk": v} for v in (0.1, 0.3, 1.0)], False,
                   mergekit_merge("sce", stochastic=False)),
        MethodSpec("karcher", "averaging", [{"max_iter": 10, "tol": 1e-5}], False,
                   mergekit_merge("karcher", stochastic=False, with_base=False)),
        MethodSpec("linear", "averaging", [{**w, "normalize": True}], False,
                   mergekit_merge("linear", stochastic=False, with_base=False)),
        MethodSpec("multislerp", "averaging", [{**w, "with_base": True}, {**w, "with_base": False}], False,
                   mergekit_merge("multislerp", stochastic=False)),
        ref("tsv_merge"),
        ref("iso_c"),
        ref("iso_cts", common_space_fraction=ISO_CTS_COMMON_SPACE_FRACTION),
    ]


def scaled_state_dict(base_sd: StateDict, merged: StateDict, value: float) -> dict:
    """``W0 + value * (merged - W0)`` for floating tensors (others as merged): the merge at
    ``spec.scale_param = value`` when ``merged`` was made at 1.0 (see the module docstring)."""
    out = {}
    for k, v in merged.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        dtype = compute_dtype(v.dtype)
        w0 = base_sd[k].to(dtype)
        out[k] = (w0 + value * (v.to(dtype) - w0)).to(v.dtype)
    return out


def scale_groups(spec: MethodSpec) -> list[tuple[dict, list[float]]]:
    """The grid as (point at scale 1.0, [scale values]) pairs: one merge per pair when ``spec.scale_param``
    only scales the merged task vector; otherwise every point is its own pair with scale ``None``."""
    if spec.scale_param is None:
        return [(dict(point), [None]) for point in spec.grid]
    groups: dict = {}
    for point in spec.grid:
        rest = {k: v for k, v in point.items() if k != spec.scale_param}
        key = repr(sorted(rest.items()))
        groups.setdefault(key, ({**rest, spec.scale_param: 1.0}, []))[1].append(point[spec.scale_param])
    return list(groups.values())


def tune_on_validation(spec: MethodSpec, base_sd: StateDict, merge_point, score) -> tuple[dict, dict]:
    """(best grid point, {repr(point): validation score}). ``merge_point(point) -> state dict``; ``score(sd)``
    is the validation score. Points that differ only in ``spec.scale_param`` share one merge at 1.0, scored as
    ``W0 + v * (merged - W0)`` (:func:`scaled_state_dict`), which is the merge at ``v`` (module docstring)."""
    scores, best = {}, None
    for point, scales in scale_groups(spec):
        merged = merge_point(point)
        for v in scales:
            p = point if v is None else {**point, spec.scale_param: v}
            sd = merged if v is None else scaled_state_dict(base_sd, merged, v)
            scores[repr(p)] = score(sd)
            if best is None or scores[repr(p)] > best[0]:
                best = (scores[repr(p)], p)
    return best[1], scores


def quality_rows(table: Optional[list[MethodSpec]] = None, skip=("task_arithmetic", "ties")) -> list:
    """This table as rows of the quality benchmark (:mod:`benchmarks.qualitybench.methods`): the grid is scored
    on the validation split (:func:`tune_on_validation`), the best point is merged again for real (that merge is
    tested and timed). Stochastic rows draw their masks from the benchmark's expert seed, so they are averaged
    over the same seeds. A row runs at the largest subset of tasks (not with ``--quick``), and at every subset
    when its name is in the config's ``baselines_every_subset``. ``skip``: rows the quality benchmark already has (its own task
    arithmetic and TIES rows)."""
    from benchmarks.common import mean
    from benchmarks.qualitybench.methods import MethodSpec as QualityRow

    def row(spec: MethodSpec):
        def run(ctx):
            experts = {task: ctx.experts[task] for task in ctx.subset}

            def merge_point(point):
                return spec.merge(ctx.sd0, experts, point, ctx.cfg["_seed"])

            best, scores = tune_on_validation(spec, ctx.sd0, merge_point, lambda sd: mean(ctx.val(sd).values()))
            ctx.log(f"    [{spec.name} val] best {best}")
            start = time.perf_counter()
            merged = merge_point(best)
            ctx.record(f"{spec.name} (val grid)", merged, time.perf_counter() - start, {"parameters": best}, scores)

        def wanted(ctx):  # --quick: only the family representatives
            every = ctx.cfg.get("baselines_every_subset")
            largest = len(ctx.subset) == max(ctx.cfg["subsets"]) and not ctx.cfg.get("quick")
            return len(ctx.subset) >= spec.min_experts and (every is None or largest or spec.name in every)

        return QualityRow(spec.name, run, group="subspace" if spec.family == "subspace" else "baselines",
                          when=wanted)

    return [row(spec) for spec in (table if table is not None else method_table()) if spec.name not in skip]


METHOD_SPECS = quality_rows()
