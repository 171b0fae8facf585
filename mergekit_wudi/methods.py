"""mergekit 0.1.5 kernels: thin adapters that validate, pick tensors and call the solvers.

``merge_method: wudi`` in a mergekit YAML runs :func:`wudi_kernel` once per output tensor. The
math lives in :mod:`mergekit_wudi.solvers`; nothing here reimplements it. Importing this module
has no side effects: :mod:`mergekit_wudi.registration` puts :data:`METHODS` into mergekit's registry.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property
from typing import Any, Mapping, Optional, Union

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerNonBase,
    TensorEntry,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit_wudi.linear_weights import is_linear_weight
from mergekit_wudi.solvers import awd as awd_solvers
from mergekit_wudi.solvers import wudi as wudi_solvers
from mergekit_wudi.solvers.numerics import check_finite, compute_dtype
from mergekit_wudi.solvers.task_vectors import (
    NON_LINEAR_RULES,
    PREPROCESS_CHOICES,
    combine_task_vectors,
    preprocess_steps,
    preprocess_task_vectors,
    task_vector_stack,
)


def _checked(name: str, *, minimum: Optional[float] = None, inclusive: bool = True,
             maximum: Optional[float] = None, choices: Optional[tuple] = None, owner: str = "wudi"):
    """A pydantic check whose error names the YAML parameter at fault: finite, within bounds, or
    one of ``choices``."""

    def check(value):
        if value is None:
            return value
        if choices is not None:
            if value not in choices:
                raise ValueError(f"{owner} parameter '{name}' must be one of {', '.join(choices)}; got {value!r}")
            return value
        if not math.isfinite(value):
            raise ValueError(f"{owner} parameter '{name}' must be a finite number, got {value!r}")
        low_ok = minimum is None or (value >= minimum if inclusive else value > minimum)
        if not low_ok or (maximum is not None and value > maximum):
            bound = f"{'>=' if inclusive else '>'} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise ValueError(f"{owner} parameter '{name}' must be {bound}, got {value!r}")
        return value

    return AfterValidator(check)


def _rank_value(value):
    """``rank``: None (exact solvers), ``"auto"``, or an integer >= 1."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"wudi parameter 'rank' must be an integer >= 1 or 'auto', got {value!r}")
    return value


RankArg = Annotated[Optional[Union[int, str]], AfterValidator(_rank_value)]

# ---------------------------------------------------------------------------------------------
# Task-vector pre-processing (AWD, LwPTV), shared by ``wudi`` and the ``preprocessed_*`` wrappers.

_PRE = "preprocessing"
PreprocessArg = Annotated[str, _checked("preprocess", choices=PREPROCESS_CHOICES, owner=_PRE)]
AwdAlphaArg = Annotated[float, _checked("awd_alpha", minimum=0, owner=_PRE)]
AwdStepsArg = Annotated[int, _checked("awd_steps", minimum=0, owner=_PRE)]
AwdLrArg = Annotated[float, _checked("awd_lr", minimum=0, inclusive=False, owner=_PRE)]
AwdScopeArg = Annotated[str, _checked("awd_scope", choices=awd_solvers.SCOPES, owner=_PRE)]
LwptvThresholdArg = Annotated[Optional[float], _checked("lwptv_threshold", minimum=0, owner=_PRE)]

PREPROCESS_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("preprocess", PreprocessArg, ParameterScope.SHARED, default="none"),
    ParameterSpec("awd_alpha", AwdAlphaArg, ParameterScope.SHARED, default=awd_solvers.ALPHA),
    ParameterSpec("awd_steps", AwdStepsArg, ParameterScope.SHARED, default=awd_solvers.STEPS),
    ParameterSpec("awd_lr", AwdLrArg, ParameterScope.SHARED, default=awd_solvers.LR),
    ParameterSpec("awd_scope", AwdScopeArg, ParameterScope.SHARED, default="tensor"),
    ParameterSpec("lwptv_threshold", LwptvThresholdArg, ParameterScope.SHARED, default=None),
    ParameterSpec("lwptv_mask_file", Optional[str], ParameterScope.SHARED, default=None),
)
PREPROCESS_NAMES: tuple[str, ...] = tuple(p.name for p in PREPROCESS_PARAMETERS)


def check_group_finite(group: TensorGroup) -> None:
    """NaN/Inf in any input is an error naming the tensor and the model."""
    for entry in group.entries:
        check_finite(entry.tensor, f"tensor {group.metadata.name!r} of model {entry.id}")


def check_result_finite(result: torch.Tensor, group: TensorGroup, method: str, parameters: Mapping[str, Any]) -> None:
    """A non-finite merge result is an error naming the tensor and the parameters that produced it."""
    shown = {k: v for k, v in parameters.items() if not isinstance(v, Mapping) and v is not None}
    check_finite(result, f"the {method} result for tensor {group.metadata.name!r}", hint=f"parameters {shown}")


def preprocessed_task_vectors(group: TensorGroup, options: Mapping[str, Any]):
    """``(task vectors, processed task vectors)`` of a group in the compute dtype, the second after
    ``options['preprocess']`` (the very same tensor for ``none``). LwPTV drop flags come from
    ``lwptv_mask_file`` when one is given (keyed by the models' ids), else from ``lwptv_threshold``."""
    options = dict(options)
    mask_file = options.pop("lwptv_mask_file", None)
    base = group.base.tensor
    tvs = task_vector_stack(base, [entry.tensor for entry in group.non_base])
    use_lwptv, _ = preprocess_steps(options.get("preprocess", "none"))
    drop = None
    if use_lwptv and mask_file is not None:
        if options.get("lwptv_threshold") is not None:
            raise ValueError("preprocessing: give 'lwptv_threshold' or 'lwptv_mask_file', not both")
        from mergekit_wudi.lwptv_masks import drop_mask

        drop = drop_mask(mask_file, group.metadata.name, [entry.id for entry in group.non_base])
    return tvs, preprocess_task_vectors(base, tvs, drop=drop, **options)


@merge_method(
    name="wudi",
    pretty_name="WUDI-Merging",
    reference_url="https://arxiv.org/abs/2503.08099",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def wudi_kernel(
    group: TensorGroup,
    weight: PerNonBase[Annotated[float, _checked("weight")]] = 1.0,
    solver: Annotated[str, _checked("solver", choices=wudi_solvers.SOLVERS)] = "adam",
    iterations: Annotated[int, _checked("iterations", minimum=0)] = wudi_solvers.ITERATIONS,
    learning_rate: Annotated[float, _checked("learning_rate", minimum=0, inclusive=False)] = wudi_solvers.LEARNING_RATE,
    scaling: Annotated[float, _checked("scaling")] = 1.0,
    non_linear: Annotated[str, _checked("non_linear", choices=NON_LINEAR_RULES)] = "base",
    ridge: Annotated[float, _checked("ridge", minimum=0)] = wudi_solvers.RIDGE,
    flow_time: Annotated[float, _checked("flow_time", minimum=0)] = wudi_solvers.FLOW_TIME,
    keep_fraction: Annotated[float, _checked("keep_fraction", minimum=0, inclusive=False, maximum=1)] = (
        wudi_solvers.KEEP_FRACTION
    ),
    linear: Optional[bool] = None,
    rank: RankArg = None,
    rank_energy: Annotated[float, _checked("rank_energy", minimum=0, inclusive=False, maximum=1)] = (
        wudi_solvers.RANK_ENERGY
    ),
    prior: Annotated[float, _checked("prior", minimum=0)] = wudi_solvers.PRIOR,
    prior_scale: Annotated[str, _checked("prior_scale", choices=wudi_solvers.PRIOR_SCALES)] = wudi_solvers.PRIOR_SCALE,
    proxy: Annotated[str, _checked("proxy", choices=wudi_solvers.PROXIES)] = wudi_solvers.PROXY,
    preprocess: PreprocessArg = "none",
    awd_alpha: AwdAlphaArg = awd_solvers.ALPHA,
    awd_steps: AwdStepsArg = awd_solvers.STEPS,
    awd_lr: AwdLrArg = awd_solvers.LR,
    awd_scope: AwdScopeArg = "tensor",
    lwptv_threshold: LwptvThresholdArg = None,
    lwptv_mask_file: Optional[str] = None,
) -> torch.Tensor:
    """WUDI-Merging (arXiv 2503.08099, Eq. 1) for linear weights; ``non_linear`` for the rest.

    Which tensors are linear weights: :func:`mergekit_wudi.linear_weights.is_linear_weight`
    (``linear`` overrides, per tensor). ``rank`` (``closed_form``/``spectral``) solves for rank-k
    truncated task vectors in the span of their row spaces (:mod:`mergekit_wudi.solvers.wudi_lowrank`).
    ``prior`` (``closed_form``) adds an isotropic input prior to each task's Gram
    (:func:`mergekit_wudi.solvers.wudi.prior_closed_form_solve`). ``preprocess`` (``awd``, ``lwptv``, ``awd+lwptv``)
    refines the task vectors first (:func:`mergekit_wudi.solvers.task_vectors.preprocess_task_vectors`).
    """
    check_group_finite(group)
    base = group.base.tensor
    meta = group.metadata
    is_linear = is_linear_weight(meta.name, base.shape, meta.vocabulary_axis, linear)
    if not is_linear and non_linear == "base":
        return base
    weights = [weight[entry.id] for entry in group.non_base]
    options = dict(preprocess=preprocess, awd_alpha=awd_alpha, awd_steps=awd_steps, awd_lr=awd_lr,
                   awd_scope=awd_scope, lwptv_threshold=lwptv_threshold, lwptv_mask_file=lwptv_mask_file)
    _, tvs = preprocessed_task_vectors(group, options)
    if is_linear:
        merged = wudi_solvers.merge_task_vectors(
            base, tvs, solver=solver, scaling=scaling, weights=weights, iterations=iterations,
            learning_rate=learning_rate, ridge=ridge, time=flow_time, keep_fraction=keep_fraction,
            rank=rank, rank_energy=rank_energy, prior=prior, prior_scale=prior_scale, proxy=proxy,
            overwrite_task_vectors=True,  # tvs are this call's own
        )
    else:
        merged = combine_task_vectors(base, tvs, weights, rule=non_linear, scaling=scaling)
    parameters = dict(solver=solver, iterations=iterations, learning_rate=learning_rate, scaling=scaling,
                      ridge=ridge, flow_time=flow_time, keep_fraction=keep_fraction, rank=rank, prior=prior,
                      prior_scale=prior_scale, proxy=proxy, **options)
    check_result_finite(merged, group, "wudi", parameters)
    return merged.to(base.dtype)


@dataclasses.dataclass(frozen=True)
class PreprocessedMerge(GroupMergeMethod):
    """A mergekit built-in (``task_arithmetic``, ``ties``, ...) with AWD / LwPTV pre-processing.

    Accepts ALL of the built-in's parameters plus :data:`PREPROCESS_PARAMETERS`; replaces each
    expert tensor by ``base + processed task vector``, then calls the built-in's own
    ``merge_group``. With ``preprocess: none`` it IS the built-in (plus finite checks).
    """

    inner_name: str
    method_name: str
    method_pretty_name: str

    @property
    def inner(self) -> GroupMergeMethod:
        from mergekit import merge_methods

        return merge_methods.get(self.inner_name)

    @cached_property
    def spec(self) -> MergeMethodSpec:
        inner = self.inner.spec
        return dataclasses.replace(
            inner,
            name=self.method_name,
            pretty_name=self.method_pretty_name,
            parameters=tuple(inner.parameters) + PREPROCESS_PARAMETERS,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        check_group_finite(group)
        options = {name: parameters.pop(name) for name in PREPROCESS_NAMES if name in parameters}
        processed = group
        if options.get("preprocess", "none") != "none":
            base = group.base.tensor.to(compute_dtype(group.base.tensor.dtype))
            processed = self._with_task_vectors(group, base, *preprocessed_task_vectors(group, options))
        merged = self.inner.merge_group(processed, **parameters)
        check_result_finite(merged, group, self.method_name, {**parameters, **options})
        return merged if processed is group else merged.to(group.base.tensor.dtype)

    @staticmethod
    def _with_task_vectors(group: TensorGroup, base: torch.Tensor, tvs: torch.Tensor, processed: torch.Tensor):
        """The group with each expert replaced by ``base + tau`` where its task vector changed; the
        very same group if none did (a no-op pre-processing merges exactly like the built-in)."""
        experts = group.non_base
        changed = {entry.id: new for entry, new, old in zip(experts, processed, tvs) if not torch.equal(new, old)}
        if not changed:
            return group
        entries = tuple(
            TensorEntry(
                id=entry.id,
                tensor=base if entry.is_base else (base + changed[entry.id] if entry.id in changed
                                                   else entry.tensor.to(base.dtype)),
                is_base=entry.is_base,
            )
            for entry in group.entries
        )
        return dataclasses.replace(group, entries=entries)


preprocessed_task_arithmetic = PreprocessedMerge(
    inner_name="task_arithmetic",
    method_name="preprocessed_task_arithmetic",
    method_pretty_name="Task Arithmetic with AWD/LwPTV pre-processing",
)
preprocessed_ties = PreprocessedMerge(
    inner_name="ties",
    method_name="preprocessed_ties",
    method_pretty_name="TIES with AWD/LwPTV pre-processing",
)

METHODS = (wudi_kernel, preprocessed_task_arithmetic, preprocessed_ties)
