"""Early checks of what a user writes for our merge methods: every name and value, before any tensor.

mergekit 0.1.5 silently ignores unknown keys in a YAML (``iteratons: 20`` merges with the default,
``paramters:`` drops a whole block), ignores a global parameter written under one model, buries a
null value in pages of pydantic output and reports a badly typed value only while planning, without
naming it. For the methods of this package these are errors here, raised by
:func:`check_config_text` (run by ``MergeConfiguration.model_validate`` itself, :func:`install`),
:func:`check_merge_config` (called before a ``mergekit-yaml`` run does any work),
:func:`check_tensor_settings` (per tensor of the base, from its headers) and
:func:`check_parameters` (the in-memory API and the Lightning callback). Settings that have no
effect (``rank_energy`` without ``rank: auto``, ``awd_*`` without AWD, ``lwptv_*`` without LwPTV)
are named in a warning.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union, get_args, get_origin

from pydantic import ValidationError

from mergekit_wudi.inputs import ModelFileError, check_model_shapes, warn_experts_equal_to_base


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
            problem = f"unknown key(s) {sorted(map(str, unknown))}" if unknown else "'value' is missing"
            raise MergeConfigError(
                f"{where}: a filtered setting is {{filter: <tensor name part>, value: ...}}; {problem} "
                f"(got keys {sorted(map(str, setting))})"
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
        check_solver_settings([parameters], method)


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


def install(config_module) -> None:
    """Make ``MergeConfiguration.model_validate`` run :func:`check_config_text` first on a config
    (a dict) for one of our methods (idempotent). Called by :mod:`mergekit_wudi._startup` when
    ``mergekit.config`` loads: ``mergekit-yaml`` parses the YAML before anything else, and pydantic
    would drop unknown keys or bury a null value in 47-68 lines of union errors."""
    configuration = config_module.MergeConfiguration
    original = configuration.model_validate
    if getattr(original, "_mergekit_wudi_checked", False):
        return

    @functools.wraps(original)
    def model_validate(obj, *args, **kwargs):
        if isinstance(obj, Mapping) and _is_ours(obj.get("merge_method")):
            check_config_text(obj)
        return original(obj, *args, **kwargs)

    model_validate._mergekit_wudi_checked = True
    configuration.model_validate = staticmethod(model_validate)


def _is_ours(method: Any) -> bool:
    from mergekit_wudi.registration import method_names

    return isinstance(method, str) and method in method_names()


def check_config_text(raw: Mapping[str, Any]) -> None:
    """What mergekit's parsing of a config (the YAML as a dict) would drop silently or report as
    pages of pydantic output: unknown keys anywhere (:func:`check_config_keys`), parameter blocks
    that are not mappings, null parameter values, malformed ``{filter, value}`` entries, and every
    parameter name and value (:func:`check_parameters`). Raises only, never warns."""
    check_config_keys(raw)
    method = raw["merge_method"]
    for block, where, per_model in _parameter_blocks(raw):
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise MergeConfigError(f"{where}: 'parameters' must be a mapping of names to values, got {block!r}")
        where = where if where == "parameters" else f"{where}.parameters"
        for name, setting in block.items():
            for value, location in _leaves(setting, f"{where}.{name}"):
                if value is None:
                    raise MergeConfigError(
                        f"{location}: parameter {name!r} has no value (null, or nothing after the colon); "
                        "mergekit's config accepts no null parameter values: write a value, or leave the key "
                        "out for the default"
                    )
        check_parameters(method, block, where=where, per_model=per_model, cross_checks=False)


def check_merge_config(raw: Mapping[str, Any]) -> None:
    """:func:`check_config_text`, then the method's cross-parameter rules over all blocks
    (:func:`check_preprocess_settings`, :func:`check_solver_settings`) and the models' list
    (:func:`check_model_list`)."""
    check_config_text(raw)
    method = raw["merge_method"]
    blocks = list(_parameter_blocks(raw))
    check_model_list(raw)
    names = {p.name for p in _spec(method).parameters}
    if "preprocess" in names:
        check_preprocess_settings([b for b, _, _ in blocks if b], method)
    if "rank" in names:
        check_solver_settings([b for b, _, _ in blocks if b], method)


def _pydantic_models(annotation) -> list:
    """The pydantic model classes an annotation admits (through Optional/Union)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is Union:
        return [model for arg in get_args(annotation) for model in _pydantic_models(arg)]
    return []


def _containers(annotation, kind) -> list:
    """The item annotations of the ``list`` / ``dict`` forms (``kind``) an annotation admits."""
    origin = get_origin(annotation)
    if origin is Union:
        return [item for arg in get_args(annotation) for item in _containers(arg, kind)]
    if kind is list and origin in (list, tuple) and get_args(annotation):
        return [get_args(annotation)[0]]
    if kind is dict and origin is dict and len(get_args(annotation)) == 2:
        return [get_args(annotation)[1]]
    return []


def _check_keys(value: Any, annotation, where: str) -> None:
    """Every mapping in ``value`` has only keys of the mergekit pydantic model its place in the config
    admits (``annotation``, a field type of ``MergeConfiguration`` or a nested model); recursive.
    Parameter blocks are left to :func:`check_parameters` (their names depend on the method)."""
    if isinstance(value, Mapping):
        models = _pydantic_models(annotation)
        if models:
            keys = {str(k) for k in value}
            fitting = [m for m in models if keys <= _field_names(m)]
            if not fitting:
                valid = set().union(*(_field_names(m) for m in models))
                name = sorted(keys - valid)[0]
                raise MergeConfigError(
                    f"{where}: unknown key {name!r}{_suggest(name, valid)} (mergekit would silently ignore it)"
                )
            for field, field_info in fitting[0].model_fields.items():
                if field in value and field != "parameters":
                    _check_keys(value[field], field_info.annotation, f"{where}.{field}" if where else field)
            return
        for item_annotation in _containers(annotation, dict)[:1]:
            for key, item in value.items():
                _check_keys(item, item_annotation, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for item_annotation in _containers(annotation, list)[:1]:
            for index, item in enumerate(value):
                named = f" ({item['model']})" if isinstance(item, Mapping) and isinstance(item.get("model"), str) else ""
                _check_keys(item, item_annotation, f"{where}[{index}]{named}")


def _field_names(model) -> set:
    return {name for name, info in model.model_fields.items()} | {
        info.alias for info in model.model_fields.values() if info.alias}


def check_config_keys(raw: Mapping[str, Any]) -> None:
    """Unknown keys anywhere in a mergekit config (the YAML as a dict) are an error with the closest
    valid key: mergekit's pydantic models ignore them (``paramters:`` would merge with defaults)."""
    from mergekit.config import MergeConfiguration

    top = set(_field_names(MergeConfiguration))
    unknown = sorted(str(k) for k in raw if str(k) not in top)
    if unknown:
        raise MergeConfigError(
            f"unknown top-level key {unknown[0]!r}{_suggest(unknown[0], top)} (mergekit would silently ignore it)"
        )
    for field, info in MergeConfiguration.model_fields.items():
        if field in raw and field != "parameters":
            _check_keys(raw[field], info.annotation, field)


def _model_key(model: Any) -> Any:
    """A model as mergekit identifies it, with local paths resolved (``./a`` and ``a`` are one model)."""
    if isinstance(model, str):
        path, _, lora = model.partition("+")
        if os.path.exists(os.path.expanduser(path)):
            path = os.path.realpath(os.path.expanduser(path))
        return path, lora
    return repr(model)


def check_model_list(raw: Mapping[str, Any]) -> None:
    """One model listed twice among the inputs of one merge (``models``, or a slice's ``sources``) is
    an error naming it: mergekit fails on it only while merging ("Duplicate tensor input IDs")."""

    def check(entries, where):
        seen = {}
        for index, entry in enumerate(entries or ()):
            if not isinstance(entry, Mapping) or "model" not in entry:
                continue
            key = _model_key(entry["model"])
            if key in seen:
                raise MergeConfigError(
                    f"{where}[{index}]: model {entry['model']!r} is listed twice (also {where}[{seen[key]}]); "
                    "a merge takes each model once: give it a larger 'weight' instead"
                )
            seen[key] = index

    check(raw.get("models"), "models")
    for index, slice_ in enumerate(raw.get("slices") or ()):
        if isinstance(slice_, Mapping):
            check(slice_.get("sources"), f"slices[{index}].sources")


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
    awd = [v for v in _all_values(blocks, "preprocess") if isinstance(v, str) and "awd" in v]
    awd_options = sorted({name for block in blocks for name in block if name.startswith("awd_")})
    if awd_options and not awd:
        logging.getLogger(__name__).warning(
            "%s ignored: no 'preprocess' setting of %r uses awd (preprocess: awd or awd+lwptv turns AWD on)",
            ", ".join(awd_options), method,
        )
    if thresholds and mask_files:
        raise MergeConfigError(f"merge_method {method!r}: give 'lwptv_threshold' or 'lwptv_mask_file', not both")
    for path in mask_files:
        load_mask_file(path)


def check_solver_settings(blocks, method: str) -> None:
    """Options only some solvers read: ``rank`` (``closed_form``, ``spectral``) is an error when no setting
    of ``solver`` picks one of them (the default solver is ``adam``); ``rank_energy`` without ``rank: auto`` and
    ``prior`` without ``solver: decorrelated`` are named in a warning."""
    ranks = [v for v in _all_values(blocks, "rank") if v is not None]
    if any(name == "rank_energy" for block in blocks for name in block) and "auto" not in ranks:
        logging.getLogger(__name__).warning(
            "rank_energy is ignored: it sets the rank only where rank is 'auto', and no 'rank' setting of %r is",
            method,
        )
    solvers = _all_values(blocks, "solver") or ["adam"]
    if any(name == "prior" for block in blocks for name in block) and "decorrelated" not in solvers:
        logging.getLogger(__name__).warning(
            "prior is ignored: it is the isotropic input prior of solver 'decorrelated', and no 'solver' setting "
            "of %r is", method,
        )
    if ranks and not {"closed_form", "spectral"} & set(solvers):
        raise MergeConfigError(
            f"merge_method {method!r}: 'rank' is for solver closed_form or spectral; the solver here is "
            f"{', '.join(map(repr, sorted(set(solvers))))}"
        )


def _setting_for(setting: Any, tensor: str) -> list:
    """The values a raw YAML setting can take for one tensor: the first ``{filter, value}`` entry
    whose filter is in the tensor name (mergekit's rule), every point of a gradient."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
        for entry in setting:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or pattern in tensor:
                return _setting_for(entry.get("value"), tensor)
        return []
    return list(setting) if isinstance(setting, list) else [setting]


def check_tensor_settings(method: str, parameters: Optional[Mapping[str, Any]], shapes: Mapping[str, Tuple[int, ...]]) -> None:
    """The global ``linear``, ``solver`` and ``rank`` settings, resolved for each tensor of the base
    model (``shapes`` from its headers), before anything is read: ``linear: true`` on a tensor that
    is not 2-D, and ``rank`` where the solver is not ``closed_form``/``spectral``, are errors naming
    the tensor (with filters, both can be right for some tensors and wrong for others)."""
    from mergekit_wudi.linear_weights import is_linear_weight

    parameters = parameters or {}
    if not {"linear", "rank"} & set(parameters) or not {"linear", "rank"} <= {p.name for p in _spec(method).parameters}:
        return
    for tensor, shape in shapes.items():
        linear = [v for v in _setting_for(parameters.get("linear"), tensor) if v is not None]
        if len(shape) != 2 and any(v is True for v in linear):
            raise MergeConfigError(
                f"parameters.linear is true for tensor {tensor!r} of shape {list(shape)}, but WUDI solves 2-D "
                "weights only: restrict it with a filter, e.g. linear: [{filter: proj, value: true}]"
            )
        if not any(is_linear_weight(tensor, shape, None, v) for v in (linear or [None])):
            continue
        ranks = [v for v in _setting_for(parameters.get("rank"), tensor) if v is not None]
        solvers = _setting_for(parameters["solver"], tensor) if "solver" in parameters else ["adam"]
        wrong = sorted({str(v) for v in solvers} - {"closed_form", "spectral"})
        if ranks and wrong:
            raise MergeConfigError(
                f"parameters.rank is {ranks[0]!r} for tensor {tensor!r}, where the solver is {wrong[0]!r}: rank "
                "works with solver closed_form or spectral only; give rank the same filters as solver, e.g. "
                "rank: [{filter: mlp, value: 8}]"
            )


# ---------------------------------------------------------------------------------------------
# Input files (headers only), after the config itself.


def check_model_files(merge_config) -> Optional[Dict[str, Tuple[int, ...]]]:
    """The checks of the input files, for a ``MergeConfiguration``, before any tensor is read:
    :func:`mergekit_wudi.inputs.check_model_shapes` (headers parse, shapes match the base),
    the global ``linear`` / ``rank`` settings per base tensor
    (:func:`check_tensor_settings`), a warning when experts hold the base's very weights
    (:func:`mergekit_wudi.inputs.warn_experts_equal_to_base`), and the LwPTV mask files (they name exactly
    the config's experts and only tensors the base has). Returns the base model's ``{tensor: shape}``
    (None when the base is not a local folder)."""
    files = check_model_shapes(
        merge_config, vocabularies_may_differ=bool(merge_config.tokenizer_source or merge_config.tokenizer))
    base = merge_config.base_model
    reference_files = files.get(base) if base is not None else None
    reference_shapes = None
    if reference_files is not None:
        reference_shapes = {name: shape for name, (shape, _) in reference_files.items()}
        dumped = merge_config.model_dump(mode="json", exclude_none=True)
        check_tensor_settings(merge_config.merge_method, dumped.get("parameters"), reference_shapes)
        warn_experts_equal_to_base(merge_config, files)
    _check_mask_files(merge_config, reference_shapes)
    return reference_shapes


def _check_mask_files(merge_config, base_shapes: Optional[Dict[str, Tuple[int, ...]]]) -> None:
    from mergekit_wudi.lwptv_masks import load_mask_file

    settings = [merge_config.parameters or {}] + [m.parameters or {} for m in merge_config.models or ()]
    paths = {s["lwptv_mask_file"] for s in settings if isinstance(s.get("lwptv_mask_file"), str)}
    experts = {str(m.model) for m in merge_config.models or () if m.model != merge_config.base_model}
    for path in paths:
        content = load_mask_file(path)
        missing = sorted(experts - set(content["drop"]))
        if missing:
            raise ModelFileError(
                f"lwptv_mask_file {path!r} has no entry for model(s) {missing} (it names {sorted(content['drop'])}); "
                "build it from this config with python -m mergekit_wudi.lwptv_masks"
            )
        strangers = sorted(set(content["drop"]) - experts)
        if strangers:
            raise ModelFileError(f"lwptv_mask_file {path!r} names model(s) {strangers} that this config does not merge")
        if base_shapes is not None:
            unknown = sorted(content["tensors"] - set(base_shapes))
            if unknown:
                raise ModelFileError(f"lwptv_mask_file {path!r} names tensors the base model lacks: {unknown[:5]}")
