"""Early checks of what a user writes for our merge methods: every name and value, before any tensor.

mergekit 0.1.5 silently ignores unknown parameter names in a YAML (``iteratons: 20`` merges with the
default), ignores a global parameter written under one model, and reports a badly typed value only
while planning, without naming it. For the methods of this package these are errors here, raised by
:func:`check_merge_config` (called before a ``mergekit-yaml`` run does any work) and
:func:`check_parameters` (the in-memory API and the Lightning callback).
"""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Iterator, Mapping, Optional, Tuple

from pydantic import ValidationError


class MergeConfigError(ValueError):
    """A parameter name or value that cannot work; the message names it and where it was written."""


def _spec(method: str):
    from mergekit import merge_methods

    return merge_methods.get(method).spec


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid names: {', '.join(sorted(choices))}"


def _leaves(setting: Any, where: str) -> Iterator[Tuple[Any, str]]:
    """The scalar values of a mergekit parameter setting (scalar, gradient list, ``{filter, value}``
    entries or a list of them), each with a location for error messages."""
    if hasattr(setting, "model_dump"):  # a parsed ConditionalParameter
        setting = setting.model_dump()
    if isinstance(setting, Mapping):
        unknown = set(setting) - {"filter", "value"}
        if unknown or "value" not in setting:
            raise MergeConfigError(
                f"{where}: a filtered setting is {{filter: <tensor name part>, value: ...}}; "
                f"got keys {sorted(map(str, setting))}"
            )
        yield from _leaves(setting["value"], f"{where} (filter {setting.get('filter')!r})")
    elif isinstance(setting, (list, tuple)):
        for index, item in enumerate(setting):
            yield from _leaves(item, f"{where}[{index}]")
    else:
        yield setting, where


def _check_value(parameter, value: Any, where: str) -> None:
    """One scalar through the parameter's own type and bounds, plus what pydantic lets through: a
    boolean where a number goes (``true`` -> 1) and a number that only becomes non-finite on parsing
    (``"1e999"`` -> inf)."""
    try:
        result = parameter.validate(value)
    except (ValidationError, ValueError, TypeError) as error:
        detail = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise MergeConfigError(f"{where}: bad value {value!r} for parameter {parameter.name!r}: {detail}") from None
    if isinstance(value, bool) and not isinstance(result, bool):
        raise MergeConfigError(f"{where}: parameter {parameter.name!r} takes a number, got the boolean {value!r}")
    if isinstance(result, float) and not math.isfinite(result):
        raise MergeConfigError(f"{where}: parameter {parameter.name!r} must be a finite number, got {value!r}")


def check_parameters(
    method: str,
    parameters: Optional[Mapping[str, Any]],
    *,
    where: str = "parameters",
    per_model: bool = False,
    cross_checks: bool = True,
) -> None:
    """Check names and values of one parameter block of ``method`` (a registered merge method).

    ``per_model=True`` for a block that mergekit reads per input model (``models[i].parameters``,
    slice sources): a global parameter there would be ignored by mergekit, so it is an error.
    Values may be mergekit settings (gradients, ``{filter, value}`` entries); each scalar is
    validated with the parameter's own type and bounds. mergekit's ``PerGroupValues`` (the
    in-memory API's per-tensor values) are checked element by element.
    """
    if not parameters:
        return
    spec = _spec(method)
    by_name = {p.name: p for p in spec.parameters}
    for name, setting in parameters.items():
        parameter = by_name.get(name)
        if parameter is None:
            raise MergeConfigError(f"{where}: unknown parameter {name!r} for merge_method {method!r}{_suggest(name, by_name)}")
        if per_model and parameter in spec.shared_parameters:
            raise MergeConfigError(
                f"{where}: {name!r} is a global parameter of {method!r}; mergekit ignores it per model. "
                "Write it under the top-level 'parameters' (use {filter, value} entries to vary it by tensor)."
            )
        values = getattr(setting, "values", None)  # PerGroupValues
        if isinstance(values, tuple):
            setting = list(values)
        elif isinstance(setting, Mapping) and parameter not in spec.shared_parameters and not per_model:
            if not {"filter", "value"} >= set(setting):  # a per-model mapping {model id: value} (in-memory API)
                for key, value in setting.items():
                    _check_value(parameter, value, f"{where}.{name}[{key!r}]")
                continue
        for value, location in _leaves(setting, f"{where}.{name}"):
            _check_value(parameter, value, location)
    if cross_checks and "preprocess" in by_name:
        check_preprocess_settings([parameters], method)
    if cross_checks and "rank" in by_name:
        check_rank_settings([parameters], method)
    if cross_checks and "prior" in by_name:
        check_prior_settings([parameters], method)


def _parameter_blocks(raw: Mapping[str, Any]) -> Iterator[Tuple[Optional[Mapping], str, bool]]:
    """Every ``parameters`` block of a mergekit config dict: (block, location, is_per_model)."""

    def model_blocks(models, where):
        for index, entry in enumerate(models or ()):
            if isinstance(entry, Mapping):
                yield entry.get("parameters"), f"{where}[{index}] ({entry.get('model')})", True

    def slice_blocks(slices, where):
        for index, entry in enumerate(slices or ()):
            if isinstance(entry, Mapping):
                yield entry.get("parameters"), f"{where}[{index}]", False
                yield from model_blocks(entry.get("sources"), f"{where}[{index}].sources")

    yield raw.get("parameters"), "parameters", False
    yield from model_blocks(raw.get("models"), "models")
    yield from slice_blocks(raw.get("slices"), "slices")
    for name, module in (raw.get("modules") or {}).items():
        if isinstance(module, Mapping):
            yield module.get("parameters"), f"modules.{name}", False
            yield from model_blocks(module.get("models"), f"modules.{name}.models")
            yield from slice_blocks(module.get("slices"), f"modules.{name}.slices")


def check_merge_config(raw: Mapping[str, Any]) -> None:
    """Check every parameter block of a mergekit config (the YAML as a dict) for its ``merge_method``,
    then the method's cross-parameter rules (:func:`check_preprocess_settings`)."""
    method = raw["merge_method"]
    blocks = list(_parameter_blocks(raw))
    for block, where, per_model in blocks:
        if block is not None and not isinstance(block, Mapping):
            raise MergeConfigError(f"{where}: 'parameters' must be a mapping of names to values, got {block!r}")
        check_parameters(method, block, where=where if where == "parameters" else f"{where}.parameters",
                         per_model=per_model, cross_checks=False)
    names = {p.name for p in _spec(method).parameters}
    if "preprocess" in names:
        check_preprocess_settings([b for b, _, _ in blocks if b], method)
    if "rank" in names:
        check_rank_settings([b for b, _, _ in blocks if b], method)
    if "prior" in names:
        check_prior_settings([b for b, _, _ in blocks if b], method)


def _all_values(blocks, name: str) -> list:
    return [value for block in blocks if name in block for value, _ in _leaves(block[name], name)]


def check_preprocess_settings(blocks, method: str) -> None:
    """AWD/LwPTV options that cannot work together: LwPTV needs a threshold or a mask file (not
    both), and a mask file must be readable (:func:`mergekit_wudi.lwptv_masks.load_mask_file`)."""
    from mergekit_wudi.lwptv_masks import load_mask_file

    lwptv = [v for v in _all_values(blocks, "preprocess") if isinstance(v, str) and "lwptv" in v]
    thresholds = [v for v in _all_values(blocks, "lwptv_threshold") if v is not None]
    mask_files = [v for v in _all_values(blocks, "lwptv_mask_file") if v is not None]
    if lwptv and not thresholds and not mask_files:
        raise MergeConfigError(
            f"merge_method {method!r}: preprocess {lwptv[0]!r} needs 'lwptv_threshold' (one pass, per tensor) "
            "or 'lwptv_mask_file' (from python -m mergekit_wudi.lwptv_masks)"
        )
    if (thresholds or mask_files) and not lwptv:
        logging.getLogger(__name__).warning(
            "lwptv_threshold / lwptv_mask_file are ignored: no 'preprocess' setting of %r uses lwptv", method
        )
    if thresholds and mask_files:
        raise MergeConfigError(f"merge_method {method!r}: give 'lwptv_threshold' or 'lwptv_mask_file', not both")
    for path in mask_files:
        load_mask_file(path)


def check_rank_settings(blocks, method: str) -> None:
    """``rank`` is for the ``closed_form`` and ``spectral`` solvers: an error when it is set and no
    setting of ``solver`` picks one of them (the default solver is ``adam``)."""
    ranks = [v for v in _all_values(blocks, "rank") if v is not None]
    solvers = _all_values(blocks, "solver") or ["adam"]
    if ranks and not {"closed_form", "spectral"} & set(solvers):
        raise MergeConfigError(
            f"merge_method {method!r}: 'rank' is for solver closed_form or spectral; the solver here is "
            f"{', '.join(map(repr, sorted(set(solvers))))}"
        )


def check_prior_settings(blocks, method: str) -> None:
    """``prior`` > 0 and ``proxy`` other than ``input`` are for the exact ``closed_form`` solver: an error when
    one is set and a setting of ``solver`` picks another one (the default solver is ``adam``) or ``rank`` is set."""
    used = [name for name, values in (
        ("prior", [v for v in _all_values(blocks, "prior") if isinstance(v, (int, float)) and v > 0]),
        ("proxy", [v for v in _all_values(blocks, "proxy") if v != "input"])) if values]
    if not used:
        return
    solvers = set(_all_values(blocks, "solver") or ["adam"])
    if solvers != {"closed_form"}:
        raise MergeConfigError(
            f"merge_method {method!r}: '{used[0]}' is for solver closed_form; the solver here is "
            f"{', '.join(map(repr, sorted(solvers)))}"
        )
    if [v for v in _all_values(blocks, "rank") if v is not None]:
        raise MergeConfigError(f"merge_method {method!r}: '{used[0]}' works with the exact closed_form solver only "
                               "(leave 'rank' unset)")
