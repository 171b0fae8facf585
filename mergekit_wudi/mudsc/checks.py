"""Early checks of :func:`~.merge.mudsc_merge`'s arguments and models, and of its results.

Every argument is checked before any model runs, with an error naming the argument; NaN/Inf in a
model's tensors, in ``weights`` / ``module_weights`` or in the activations collected (see
:class:`~.features.FeatureRecorder`) is an error naming the model and tensor or layer; a merged tensor
that is not finite is an error naming it, before it is loaded into a module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable as IterableABC
from numbers import Integral
from typing import Any, Mapping, Optional, Sequence

import torch

from mergekit_wudi.solvers.numerics import check_finite
import torch.nn as nn

__all__ = ["MODES", "require_finite", "check_result", "check_models", "check_alpha", "check_options",
           "check_dataloader", "check_inputs", "check_weights", "check_module_weights"]

MODES = ("align", "zip", "average")


def require_finite(tensor: torch.Tensor, what: str, hint: Optional[str] = None) -> None:
    """:func:`mergekit_wudi.solvers.numerics.check_finite` with the ``mudsc:`` prefix on ``what``."""
    check_finite(tensor, f"{what} (mudsc)", hint)


def check_result(state: Mapping[str, torch.Tensor], produced_by: str) -> None:
    """Every floating tensor of a merged state dict must be finite (checked before it is loaded)."""
    for name, tensor in state.items():
        if torch.is_floating_point(tensor):
            require_finite(tensor, f"the merged tensor {name!r}", f"produced by {produced_by}")


def check_models(models: Sequence[nn.Module]) -> list[dict]:
    """Two or more modules of one class with the same tensors (names, shapes, dtypes, devices), all
    finite; returns their state dicts."""
    if len(models) < 2:
        raise ValueError("mudsc: need at least two models")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"mudsc: model {i} is a {type(m).__name__}, not a torch.nn.Module")
    c0 = type(models[0])
    states = [m.state_dict() for m in models]
    for i, (m, st) in enumerate(zip(models, states)):
        if type(m) is not c0:
            raise ValueError(f"mudsc: model {i} is a {type(m).__name__}, model 0 a {c0.__name__}")
        if list(st) != list(states[0]) or any(st[k].shape != states[0][k].shape for k in st):
            raise ValueError(f"mudsc: model {i} does not have the same tensors as model 0")
        for name, tensor in st.items():
            first = states[0][name]
            if (tensor.dtype, tensor.device) != (first.dtype, first.device):
                raise ValueError(
                    f"mudsc: tensor {name!r} of model {i} is {tensor.dtype} on {tensor.device}, of model 0 "
                    f"{first.dtype} on {first.device}: put the models in one dtype and on one device "
                    "(e.g. model.float().cpu())"
                )
        for name, tensor in st.items():
            if torch.is_floating_point(tensor):
                require_finite(tensor, f"model {i}, tensor {name!r}")
    return states


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"mudsc: {name} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"mudsc: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"mudsc: {name} must be finite, got {value}")
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"mudsc: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_alpha(alpha: Optional[float], a: Optional[float]) -> float:
    """The paper's ``a`` (``alpha``; ``a=`` is an alias), default 0.5, in [0, 1]."""
    if a is not None and alpha is not None and a != alpha:
        raise ValueError("mudsc: give either alpha or a (the same parameter), not both")
    if alpha is None and a is None:
        return 0.5
    alpha = _number("alpha", alpha if alpha is not None else a)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mudsc: alpha must be in [0, 1], got {alpha}")
    return alpha


def check_options(*, mode: Any, sweeps: Any, tol: Any, max_batches: Any, bn_batches: Any, input_fn: Any,
                  reset_bn: Any, allow_same_model: Any, return_info: Any) -> None:
    """Every option but ``alpha`` and the weights (see :func:`~.merge.mudsc_merge` for the meanings)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mudsc: mode must be one of {MODES}, got {mode!r}")
    _positive_int("sweeps", sweeps)
    if _number("tol", tol) < 0:
        raise ValueError(f"mudsc: tol must be >= 0, got {tol}")
    _positive_int("max_batches", max_batches)
    if bn_batches is not None:
        _positive_int("bn_batches", bn_batches)
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"mudsc: input_fn must be callable (batch -> model inputs), got {input_fn!r}")
    for name, value in (("reset_bn", reset_bn), ("allow_same_model", allow_same_model), ("return_info", return_info)):
        if not isinstance(value, bool):
            raise TypeError(f"mudsc: {name} must be True or False, got {value!r}")


def check_inputs(model: nn.Module, example: tuple) -> None:
    """``model`` runs on the first batch's inputs (in eval mode, without gradients); otherwise an
    error naming their shapes and dtypes, before the model is traced."""
    was = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*example)
    except Exception as error:  # noqa: BLE001  (any failure of the user's forward on these inputs)
        shown = ", ".join(f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                          for x in example)
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"mudsc: model 0 cannot run on the inputs of the first batch ({shown}): {type(error).__name__}: "
            f"{detail}; check the dataloader and input_fn (batch -> model inputs)"
        ) from error
    finally:
        for m, training in was:
            m.train(training)


def check_dataloader(dataloader: Any) -> None:
    if not isinstance(dataloader, IterableABC):
        raise TypeError(f"mudsc: dataloader must be an iterable of batches, got {type(dataloader).__name__}")


def _model_weights(what: str, values: Any, n: int) -> list[float]:
    """One finite, non-negative weight per model, not all zero; returned scaled to a largest weight
    of 1 (the same ratios; the sum of huge weights such as ``1e308`` would overflow to Inf)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, IterableABC):
        raise TypeError(f"mudsc: {what} must be a sequence of {n} numbers, got {values!r}")
    values = [_number(what, v) for v in values]
    if len(values) != n or min(values) < 0 or max(values) <= 0:
        raise ValueError(f"mudsc: {what} must hold one non-negative weight per model ({n}), not all zero; "
                         f"got {values}")
    largest = max(values)
    return [v / largest for v in values]


def check_weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    """Per-model averaging weights (default uniform), normalised to sum 1."""
    scaled = _model_weights("weights", [1.0] * n if weights is None else weights, n)
    total = sum(scaled)
    return [v / total for v in scaled]


def check_module_weights(module_weights: Optional[Mapping[str, Sequence[float]]], n: int,
                         tensor_names: Optional[Sequence[str]] = None) -> Optional[dict[str, list[float]]]:
    """``{module prefix: per-model weights}``; every prefix must name a module that holds tensors
    (checked when ``tensor_names`` is given).

    The weights are returned with the same ratios, scaled to a largest weight of 1: the merge
    normalises them per tensor."""
    if not module_weights:
        return None
    if not isinstance(module_weights, Mapping):
        raise TypeError(f"mudsc: module_weights must map module names to per-model weights, got {module_weights!r}")
    checked = {}
    for prefix, values in module_weights.items():
        if not isinstance(prefix, str):
            raise TypeError(f"mudsc: module_weights keys must be module names, got {prefix!r}")
        scaled = _model_weights(f"module_weights[{prefix!r}]", values, n)
        if tensor_names is not None and not any(name == prefix or name.startswith(prefix + ".") for name in tensor_names):
            raise ValueError(f"mudsc: module_weights[{prefix!r}] names no tensor of the model")
        checked[prefix] = scaled
    return checked
