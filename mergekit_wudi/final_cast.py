"""NaN/Inf is checked in the dtype a merge result is returned or written in, after the last cast.

Our kernels compute in float32 and cast back to the inputs' dtype; mergekit then casts once more to
``out_dtype`` (YAML) or ``out_dtype=`` (in-memory API) before writing or returning. A float32 result
that is finite can overflow float16 (max 65504) on either cast. So the check runs on what is kept:

- in the kernels, after the cast to the inputs' dtype (:func:`cast_checked`);
- in mergekit's writer tasks (``SaveTensor``, ``ReturnTensor``), after their cast to ``out_dtype``,
  for tensors merged by this package's methods (:func:`install`, run by the start-up hook);
- in the in-memory API, after the cast to ``out_dtype=`` (:class:`ChecksOutDtype`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from mergekit_wudi.solvers.numerics import NonFiniteError, all_finite

# Parameters that scale a merge result, named in the suggestion when the config sets them.
_SCALE_KNOBS = ("scaling", "lambda", "alpha", "weight")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shown(parameters: Mapping[str, Any]) -> dict:
    return {k: parameters[k] for k in sorted(parameters) if parameters[k] is not None
            and not isinstance(parameters[k], Mapping)}


def check_cast_finite(tensor: torch.Tensor, name: Optional[str], method: str, parameters: Mapping[str, Any],
                      where: str = "") -> None:
    """:class:`NonFiniteError` naming the tensor, its dtype and the parameters if ``tensor`` (a merge
    result after its cast) holds NaN or Inf, with the fix: smaller scale factors or a wider dtype."""
    if all_finite(tensor):
        return
    dtype = _dtype_name(tensor.dtype)
    knobs = [k for k in _SCALE_KNOBS if k in parameters] or list(_SCALE_KNOBS)
    raise NonFiniteError(
        f"non-finite values (NaN or Inf) in the {method} result for tensor {name!r} once cast to {dtype}{where}; "
        f"parameters {_shown(parameters)}. The merged values exceed the range of {dtype} "
        f"(max {torch.finfo(tensor.dtype).max:.4g}): use a smaller {' / '.join(knobs)}, or a wider dtype "
        "(float32 or bfloat16: 'out_dtype' / 'dtype' in a YAML, dtype= / out_dtype= in memory)"
    )


def cast_checked(result: torch.Tensor, dtype: torch.dtype, name: Optional[str], method: str,
                 parameters: Mapping[str, Any]) -> torch.Tensor:
    """``result.to(dtype)``, checked finite after the cast (a no-op cast is not checked again)."""
    cast = result.to(dtype)
    if cast.dtype != result.dtype:
        check_cast_finite(cast, name, method, parameters, " (the models' dtype)")
    return cast


class ChecksOutDtype:
    """Mixin for a mergekit ``GroupMergeMethod``: the in-memory API's ``out_dtype=`` cast is checked."""

    def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
        results = super()._execute(groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype)
        if out_dtype is not None:
            for group, result, bound in zip(groups, results, parameters):
                check_cast_finite(result, group.metadata.name, self.spec.name, bound, " (out_dtype)")
        return results


def install(tasks_module, method_names: Callable[[], Iterable[str]]) -> None:
    """Check ``SaveTensor`` / ``ReturnTensor`` results of our methods (``method_names()``) after their
    ``out_dtype`` cast (idempotent). Called by :mod:`mergekit_wudi._startup` right after
    ``mergekit.io.tasks`` loads; the names come from the caller so that this module, which the kernels
    import, imports no kernel."""

    def ours(tensor_task) -> Optional[str]:
        method = getattr(tensor_task, "method_name", None)
        return method if method in method_names() else None

    for cls_name in ("SaveTensor", "ReturnTensor"):
        cls = getattr(tasks_module, cls_name, None)
        if cls is None or getattr(cls.execute, "_mergekit_wudi_checked", False):
            continue
        original = cls.execute

        @functools.wraps(original)
        def execute(self, *args, _original=original, **kwargs):
            tensor = kwargs.get("tensor", args[-1] if args else None)
            method = ours(self.tensor_task) if isinstance(tensor, torch.Tensor) else None
            target = getattr(self, "dtype", None)
            if method is not None and target:
                from mergekit.common import dtype_from_name

                dtype = dtype_from_name(target)
                if dtype != tensor.dtype:
                    cast = tensor.to(dtype)  # the very cast mergekit does next (a no-op for it then)
                    name = getattr(self, "tensor_name", None) or getattr(getattr(self, "weight_info", None), "name", None)
                    parameters = dict(getattr(self.tensor_task, "parameters", {}) or {})
                    check_cast_finite(cast, name, method, parameters, " (out_dtype)")
                    if "tensor" in kwargs:
                        kwargs["tensor"] = cast
                    else:
                        args = (*args[:-1], cast)
            return _original(self, *args, **kwargs)

        execute._mergekit_wudi_checked = True
        cls.execute = execute
