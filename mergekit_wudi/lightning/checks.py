"""Input checks of the callback: its arguments (before training) and the tensors it merges.

Everything a user writes is checked in ``setup``, before the first training step (issue #10): the
method and its parameters (:func:`mergekit_wudi.validation.check_parameters`), ``num_tasks``,
``experts``, ``include`` / ``exclude`` patterns against the module's tensor names, per-expert values
against the number of experts, and explicit-mode files (readable, matching names and shapes, from
their headers). Tensors are checked when
they are read (:func:`validate_merge_inputs`) and again after the merge (:func:`check_finite_results`):
nothing non-finite is written or loaded into a module.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

StateDict = Dict[str, torch.Tensor]


class MergeInputError(ValueError):
    """Experts, base or arguments that cannot be merged; the message names the one at fault."""


class MergeResultError(RuntimeError):
    """A merge produced a non-finite tensor; the message names it and the method's parameters."""


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """``fnmatch`` glob match; a pattern without wildcards also matches as a module prefix."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return True
        if not any(c in pattern for c in "*?[") and name.startswith(pattern.rstrip(".") + "."):
            return True
    return False


def select_names(names: Sequence[str], include: Optional[Sequence[str]], exclude: Sequence[str]) -> list:
    """The tensors to merge: those matching ``include`` (all when ``None``) and not ``exclude``."""
    kept = [n for n in names if include is None or matches_any(n, include)]
    return [n for n in kept if not matches_any(n, exclude)]


def check_num_tasks(num_tasks: Any) -> None:
    """``num_tasks`` is ``None`` or a positive integer (``True`` and ``1.5`` are not)."""
    if num_tasks is None:
        return
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise MergeInputError(f"num_tasks must be a positive integer (or None), got {num_tasks!r}")


def check_expert_paths(experts: Any) -> Optional[List[str]]:
    """``experts=``: ``None`` (sequential mode), one path, or a non-empty list of paths; as strings."""
    if experts is None:
        return None
    if isinstance(experts, (str, os.PathLike)):
        return [os.fspath(experts)]
    if not isinstance(experts, Iterable) or isinstance(experts, (bytes, Mapping)):
        raise MergeInputError(f"experts must be a list of paths (or one path), got {type(experts).__name__}")
    paths = list(experts)
    if not paths:
        raise MergeInputError("experts=[] given: pass at least one expert path, or None for sequential mode")
    for index, path in enumerate(paths):
        if not isinstance(path, (str, os.PathLike)):
            raise MergeInputError(f"experts[{index}] must be a path (str or os.PathLike), got {path!r}")
    return [os.fspath(p) for p in paths]


def check_patterns(names: Sequence[str], include: Optional[Sequence[str]], exclude: Sequence[str], where: str) -> None:
    """Every ``include`` / ``exclude`` pattern matches at least one of ``names`` (a typo would
    otherwise silently merge everything, or a head), and something is left to merge."""
    for label, patterns in (("include", include or ()), ("exclude", exclude)):
        for pattern in patterns:
            if not any(matches_any(n, [pattern]) for n in names):
                raise MergeInputError(
                    f"{label} pattern {pattern!r} matches no tensor of {where} "
                    f"(it has {len(names)}, e.g. {list(names)[:5]})"
                )
    if names and not select_names(names, include, exclude):
        raise MergeInputError(f"include={include} / exclude={list(exclude)} leave no tensor of {where} to merge")


def validate_merge_inputs(
    base: Optional[StateDict],
    experts: Sequence[Tuple[str, StateDict]],
    names: Sequence[str],
    *,
    require_change: bool = True,
) -> None:
    """Raise :class:`MergeInputError` for anything that would make a merge wrong or meaningless.

    Checks, for the tensors in ``names``: every expert has them with the reference's shape (the
    reference is ``base``, else the first expert), every value is finite, and -- when ``base`` is
    given and ``require_change`` -- no expert is identical to the base on all of them (an expert
    equal to the base was never trained; the wudi kernel would silently drop it). Meta tensors (shapes
    read from file headers, in ``setup``) get the name and shape checks only.
    """
    reference_label, reference = ("the base", base) if base is not None else experts[0]
    for label, state in ([("the base", base)] if base is not None else []) + list(experts):
        missing = [n for n in names if n not in state]
        if missing:
            raise MergeInputError(
                f"{label} lacks {len(missing)} parameter(s) that {reference_label} has, e.g. {missing[:5]}"
            )
        for name in names:
            tensor = state[name]
            if tuple(tensor.shape) != tuple(reference[name].shape):
                raise MergeInputError(
                    f"tensor {name!r} of {label} has shape {tuple(tensor.shape)}, "
                    f"but {reference_label} has {tuple(reference[name].shape)}"
                )
            if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                raise MergeInputError(f"tensor {name!r} of {label} has non-finite values (NaN or Inf)")
    if base is not None and require_change:
        floating = [n for n in names if base[n].is_floating_point()]
        for label, state in experts:
            if floating and all(torch.equal(state[n], base[n]) for n in floating):
                raise MergeInputError(
                    f"{label} is identical to the base on all {len(floating)} merged tensors: "
                    "it was not trained (or the wrong file was given)"
                )


def check_finite_results(merged: Mapping[str, torch.Tensor], produced_by: str) -> None:
    """A merged tensor with NaN/Inf is an error naming it and what produced it (``produced_by``:
    the method and its parameters); nothing is written or loaded before this check passes."""
    for name, tensor in merged.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MergeResultError(
                f"merged tensor {name!r} has non-finite values (NaN or Inf); produced by {produced_by}"
            )
