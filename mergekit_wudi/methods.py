"""mergekit 0.1.5 kernels: thin adapters that validate, pick tensors and call the solvers.

``merge_method: wudi`` in a mergekit YAML runs :func:`wudi_kernel` once per output tensor. The
math lives in :mod:`mergekit_wudi.solvers`; nothing here reimplements it.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit_wudi.solvers import wudi as wudi_solvers


def _bounded(name: str, *, minimum: float, inclusive: bool = True, maximum: Optional[float] = None):
    """A pydantic check whose error names the YAML parameter at fault."""

    def check(value):
        low_ok = value >= minimum if inclusive else value > minimum
        if not low_ok or (maximum is not None and value > maximum):
            bound = f"{'>=' if inclusive else '>'} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise ValueError(f"wudi parameter '{name}' must be {bound}, got {value!r}")
        return value

    return AfterValidator(check)


def _one_of(name: str, choices: tuple[str, ...]):
    def check(value):
        if value not in choices:
            raise ValueError(f"wudi parameter '{name}' must be one of {', '.join(choices)}; got {value!r}")
        return value

    return AfterValidator(check)


NonLinearRule = Literal["base", "mean", "sum"]


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
    weight: PerNonBase[float] = 1.0,
    solver: Annotated[str, _one_of("solver", wudi_solvers.SOLVERS)] = "adam",
    iterations: Annotated[int, _bounded("iterations", minimum=0)] = wudi_solvers.ITERATIONS,
    learning_rate: Annotated[float, _bounded("learning_rate", minimum=0, inclusive=False)] = wudi_solvers.LEARNING_RATE,
    scaling: float = 1.0,
    non_linear: Annotated[str, _one_of("non_linear", ("base", "mean", "sum"))] = "base",
    ridge: Annotated[float, _bounded("ridge", minimum=0)] = wudi_solvers.RIDGE,
    flow_time: Annotated[float, _bounded("flow_time", minimum=0)] = wudi_solvers.FLOW_TIME,
    keep_fraction: Annotated[float, _bounded("keep_fraction", minimum=0, inclusive=False, maximum=1)] = (
        wudi_solvers.KEEP_FRACTION
    ),
    linear: Optional[bool] = None,
) -> torch.Tensor:
    """WUDI-Merging (arXiv 2503.08099, Eq. 1) for linear weights; ``non_linear`` for the rest.

    Linear weights are 2-D tensors without a vocabulary axis (``linear`` overrides, per tensor).
    """
    _check_finite(group)
    base = group.base.tensor
    experts = [entry.tensor for entry in group.non_base]
    weights = [weight[entry.id] for entry in group.non_base]
    if _is_linear_weight(group, linear):
        return wudi_solvers.wudi(
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
    return combine_non_linear(base, experts, weights, rule=non_linear, scaling=scaling)


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


METHODS = (wudi_kernel,)
