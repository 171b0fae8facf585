"""mergekit 0.1.5 kernels: thin adapters that validate, pick tensors and call the solvers.

``merge_method: wudi`` in a mergekit YAML runs :func:`wudi_kernel` once per output tensor. The
math lives in :mod:`mergekit_wudi.solvers`; nothing here reimplements it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import cached_property
from typing import Any, Literal, Optional

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

from mergekit_wudi.solvers import awd as awd_solvers
from mergekit_wudi.solvers import lwptv as lwptv_solvers
from mergekit_wudi.solvers import wudi as wudi_solvers


def _bounded(
    name: str, *, minimum: float, inclusive: bool = True, maximum: Optional[float] = None, owner: str = "wudi"
):
    """A pydantic check whose error names the YAML parameter at fault."""

    def check(value):
        if value is None:
            return value
        low_ok = value >= minimum if inclusive else value > minimum
        if not low_ok or (maximum is not None and value > maximum):
            bound = f"{'>=' if inclusive else '>'} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise ValueError(f"{owner} parameter '{name}' must be {bound}, got {value!r}")
        return value

    return AfterValidator(check)


def _one_of(name: str, choices: tuple[str, ...], owner: str = "wudi"):
    def check(value):
        if value not in choices:
            raise ValueError(f"{owner} parameter '{name}' must be one of {', '.join(choices)}; got {value!r}")
        return value

    return AfterValidator(check)


def _finite(name: str, owner: str = "wudi"):
    def check(value):
        if not math.isfinite(value):
            raise ValueError(f"{owner} parameter '{name}' must be a finite number, got {value!r}")
        return value

    return AfterValidator(check)


NonLinearRule = Literal["base", "mean", "sum"]

# ---------------------------------------------------------------------------------------------
# Task-vector pre-processing (AWD, LwPTV), shared by ``wudi`` and the ``preprocessed_*`` wrappers.

PREPROCESS_CHOICES: tuple[str, ...] = ("none", "awd", "lwptv", "awd+lwptv")
_PRE = "preprocessing"

PreprocessArg = Annotated[str, _one_of("preprocess", PREPROCESS_CHOICES, _PRE)]
AwdAlphaArg = Annotated[float, _bounded("awd_alpha", minimum=0, owner=_PRE)]
AwdStepsArg = Annotated[int, _bounded("awd_steps", minimum=0, owner=_PRE)]
AwdLrArg = Annotated[float, _bounded("awd_lr", minimum=0, inclusive=False, owner=_PRE)]
AwdScopeArg = Annotated[str, _one_of("awd_scope", awd_solvers.SCOPES, _PRE)]
LwptvThresholdArg = Annotated[Optional[float], _bounded("lwptv_threshold", minimum=0, owner=_PRE)]

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

_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.warning(message)


def preprocess_group(
    group: TensorGroup,
    *,
    preprocess: str = "none",
    awd_alpha: float = awd_solvers.ALPHA,
    awd_steps: int = awd_solvers.STEPS,
    awd_lr: float = awd_solvers.LR,
    awd_scope: str = "tensor",
    lwptv_threshold: Optional[float] = None,
    lwptv_mask_file: Optional[str] = None,
) -> TensorGroup:
    """Replace each expert tensor by ``base + processed task vector`` (``preprocess`` != none).

    Order: LwPTV first (drop the redundant layers of each task: from ``lwptv_mask_file``, else
    ``saliency < lwptv_threshold``), then AWD on the task vectors left (dropped ones stay zero, so
    those experts equal the base here). Processed tensors are float32 (float64 stays float64);
    an expert whose task vector is unchanged keeps its own tensor, and if nothing changed the
    group itself comes back (exactly the unprocessed merge). The math: ``solvers.awd``,
    ``solvers.lwptv``.
    """
    if preprocess not in PREPROCESS_CHOICES:
        choices = ", ".join(PREPROCESS_CHOICES)
        raise ValueError(f"{_PRE} parameter 'preprocess' must be one of {choices}; got {preprocess!r}")
    steps = () if preprocess == "none" else tuple(preprocess.split("+"))
    use_lwptv, use_awd = "lwptv" in steps, "awd" in steps
    if use_lwptv:
        if (lwptv_threshold is None) == (lwptv_mask_file is None):
            raise ValueError(
                f"preprocess '{preprocess}' needs exactly one of 'lwptv_threshold' (one pass, per tensor) "
                "or 'lwptv_mask_file' (from python -m mergekit_wudi.lwptv_masks); "
                f"got lwptv_threshold={lwptv_threshold!r}, lwptv_mask_file={lwptv_mask_file!r}"
            )
    elif lwptv_threshold is not None or lwptv_mask_file is not None:
        _warn_once(f"lwptv_threshold / lwptv_mask_file are ignored: preprocess is '{preprocess}'")
    if not steps or not group.non_base:
        return group
    _check_finite(group)
    experts = group.non_base
    base = group.base.tensor
    dtype = wudi_solvers.compute_dtype(base.dtype)
    base32 = base.to(dtype)
    originals = [entry.tensor.to(dtype) for entry in experts]
    tvs = torch.stack([tensor - base32 for tensor in originals])
    processed = tvs
    if use_lwptv:
        if lwptv_mask_file is not None:
            from mergekit_wudi.lwptv_masks import drop_mask

            drop = drop_mask(lwptv_mask_file, group.metadata.name, [entry.id for entry in experts])
        else:
            drop = lwptv_solvers.layer_mask(lwptv_solvers.saliency(base32, tvs), threshold=lwptv_threshold)
        processed = lwptv_solvers.apply_mask(processed, drop)
    if use_awd:
        processed = awd_solvers.disentangle(processed, alpha=awd_alpha, steps=awd_steps, lr=awd_lr, scope=awd_scope)
    unchanged = [bool(torch.equal(new, old)) for new, old in zip(processed, tvs)]
    if all(unchanged):  # a no-op (threshold 0, alpha -> inf): the very same group, in its own dtype
        return group
    new_tensors = {
        entry.id: (original if same else base32 + new)
        for entry, original, new, same in zip(experts, originals, processed, unchanged)
    }
    entries = tuple(
        TensorEntry(id=entry.id, tensor=base32 if entry.is_base else new_tensors[entry.id], is_base=entry.is_base)
        for entry in group.entries
    )
    return dataclasses.replace(group, entries=entries)


def _is_linear_weight(group: TensorGroup, linear: Optional[bool]) -> bool:
    if linear is not None:
        return linear
    return group.base.tensor.ndim == 2 and group.metadata.vocabulary_axis is None


def _check_finite(group: TensorGroup) -> None:
    for entry in group.entries:
        if not bool(torch.isfinite(entry.tensor).all()):
            raise ValueError(
                f"non-finite values (NaN or Inf) in tensor {group.metadata.name!r} of model {entry.id}"
            )


@merge_method(
    name="wudi",
    pretty_name="WUDI-Merging",
    reference_url="https://arxiv.org/abs/2503.08099",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def wudi_kernel(
    group: TensorGroup,
    weight: PerNonBase[Annotated[float, _finite("weight")]] = 1.0,
    solver: Annotated[str, _one_of("solver", wudi_solvers.SOLVERS)] = "adam",
    iterations: Annotated[int, _bounded("iterations", minimum=0)] = wudi_solvers.ITERATIONS,
    learning_rate: Annotated[float, _bounded("learning_rate", minimum=0, inclusive=False)] = wudi_solvers.LEARNING_RATE,
    scaling: Annotated[float, _finite("scaling")] = 1.0,
    non_linear: Annotated[str, _one_of("non_linear", ("base", "mean", "sum"))] = "base",
    ridge: Annotated[float, _bounded("ridge", minimum=0)] = wudi_solvers.RIDGE,
    flow_time: Annotated[float, _bounded("flow_time", minimum=0)] = wudi_solvers.FLOW_TIME,
    keep_fraction: Annotated[float, _bounded("keep_fraction", minimum=0, inclusive=False, maximum=1)] = (
        wudi_solvers.KEEP_FRACTION
    ),
    linear: Optional[bool] = None,
    preprocess: PreprocessArg = "none",
    awd_alpha: AwdAlphaArg = awd_solvers.ALPHA,
    awd_steps: AwdStepsArg = awd_solvers.STEPS,
    awd_lr: AwdLrArg = awd_solvers.LR,
    awd_scope: AwdScopeArg = "tensor",
    lwptv_threshold: LwptvThresholdArg = None,
    lwptv_mask_file: Optional[str] = None,
) -> torch.Tensor:
    """WUDI-Merging (arXiv 2503.08099, Eq. 1) for linear weights; ``non_linear`` for the rest.

    Linear weights are 2-D tensors without a vocabulary axis (``linear`` overrides, per tensor).
    ``preprocess`` (``awd``, ``lwptv``, ``awd+lwptv``) refines the task vectors first, see
    :func:`preprocess_group`.
    """
    _check_finite(group)
    out_dtype = group.base.tensor.dtype
    is_linear = _is_linear_weight(group, linear)
    if is_linear or non_linear != "base":  # (a kept base needs no task vectors)
        group = preprocess_group(
            group,
            preprocess=preprocess,
            awd_alpha=awd_alpha,
            awd_steps=awd_steps,
            awd_lr=awd_lr,
            awd_scope=awd_scope,
            lwptv_threshold=lwptv_threshold,
            lwptv_mask_file=lwptv_mask_file,
        )
    base = group.base.tensor
    experts = [entry.tensor for entry in group.non_base]
    weights = [weight[entry.id] for entry in group.non_base]
    if is_linear:
        merged = wudi_solvers.wudi(
            base,
            experts,
            solver=solver,
            scaling=scaling,
            weights=weights,
            iterations=iterations,
            learning_rate=learning_rate,
            ridge=ridge,
            time=flow_time,
            keep_fraction=keep_fraction,
        )
    else:
        merged = combine_non_linear(base, experts, weights, rule=non_linear, scaling=scaling)
    return merged.to(out_dtype)


def combine_non_linear(base, experts, weights, *, rule: str, scaling: float) -> torch.Tensor:
    """Tensors WUDI does not solve for: keep the base (the authors' choice), or add the mean / sum
    of the weighted task vectors, times ``scaling``."""
    if rule == "base":
        return base
    dtype = wudi_solvers.compute_dtype(base.dtype)
    base32 = base.to(dtype)
    total = sum((e.to(dtype) - base32) * w for e, w in zip(experts, weights))
    if rule == "mean":
        total = total / len(experts)
    return (base32 + scaling * total).to(base.dtype)


@dataclasses.dataclass(frozen=True)
class PreprocessedMerge(GroupMergeMethod):
    """A mergekit built-in (``task_arithmetic``, ``ties``, ...) with AWD / LwPTV pre-processing.

    Accepts ALL of the built-in's parameters plus :data:`PREPROCESS_PARAMETERS`; replaces each
    expert tensor by ``base + processed task vector`` (:func:`preprocess_group`), then calls the
    built-in's own ``merge_group``. With ``preprocess: none`` it IS the built-in.
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
        options = {name: parameters.pop(name) for name in PREPROCESS_NAMES if name in parameters}
        if options.get("preprocess", "none") == "none":
            preprocess_group(group, **options)  # validates and warns about ignored options
            return self.inner.merge_group(group, **parameters)
        out_dtype = group.base.tensor.dtype
        processed = preprocess_group(group, **options)
        return self.inner.merge_group(processed, **parameters).to(out_dtype)


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

# Importing this module first (before mergekit) triggers the registration hook while the module is
# half-initialised; the hook then defers to this line.
from mergekit_wudi.registration import register_methods  # noqa: E402

register_methods()
