"""LwPTV's two-pass flow: a pre-pass writes a JSON mask file that a merge YAML names.

    python -m mergekit_wudi.lwptv_masks merge.yml masks.json --ratio 0.2 [--unit block|tensor]
    python -m mergekit_wudi.lwptv_masks merge.yml masks.json --threshold 0.01

reads the base and expert models of ``merge.yml`` (``base_model`` + ``models``), scores every
layer of every expert (:mod:`mergekit_wudi.solvers.lwptv`) and writes which tensors each expert
drops. The merge then names the file: ``lwptv_mask_file: masks.json``. Mask file format::

    {"format": "mergekit-wudi/lwptv-mask", "version": 1, "score": "relative_norm",
     "unit": "block", "ratio": 0.2, "threshold": null,
     "tensors": [every tensor name scored],
     "drop": {"<model as written in the YAML>": [dropped tensor names], ...}}

For in-memory merges (the Lightning callback) build the same file with :func:`write_mask_file`
from :func:`mergekit_wudi.solvers.lwptv.layer_masks`, keyed by the ids the merge uses.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

FORMAT = "mergekit-wudi/lwptv-mask"
VERSION = 1


def write_mask_file(
    path: Union[str, os.PathLike],
    drop: Mapping[Any, Sequence[str]],
    tensors: Iterable[str],
    *,
    ratio: Optional[float] = None,
    threshold: Optional[float] = None,
    unit: str = "block",
) -> Dict[str, Any]:
    """Write (atomically) and return a mask file; ``drop`` maps model keys to dropped tensor names."""
    from mergekit_wudi.io import atomic_file
    from mergekit_wudi.solvers.lwptv import SCORE

    tensors = list(tensors)
    known = set(tensors)
    content = {
        "format": FORMAT,
        "version": VERSION,
        "score": SCORE,
        "unit": unit,
        "ratio": ratio,
        "threshold": threshold,
        "tensors": tensors,
        "drop": {str(key): sorted(names) for key, names in drop.items()},
    }
    for key, names in content["drop"].items():
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"LwPTV mask for model {key!r} drops unknown tensors: {unknown[:5]}")
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(content, indent=1))
    return content


@functools.lru_cache(maxsize=16)
def _load(path: str, _mtime_ns: int, _size: int) -> Dict[str, Any]:
    try:
        content = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"lwptv_mask_file {path!r} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ValueError(f"lwptv_mask_file {path!r} is not a {FORMAT} file (missing or wrong 'format')")
    if content.get("version") != VERSION:
        raise ValueError(f"lwptv_mask_file {path!r}: unsupported version {content.get('version')!r}")
    tensors, drop = content.get("tensors"), content.get("drop")
    if not isinstance(tensors, list) or not isinstance(drop, dict):
        raise ValueError(f"lwptv_mask_file {path!r}: 'tensors' must be a list and 'drop' a mapping")
    if not all(isinstance(name, str) for name in tensors):
        raise ValueError(f"lwptv_mask_file {path!r}: 'tensors' must list tensor names (strings)")
    for model, names in drop.items():
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"lwptv_mask_file {path!r}: 'drop' of model {model!r} must be a list of tensor names")
        unknown = sorted(set(names) - set(tensors))
        if unknown:
            raise ValueError(f"lwptv_mask_file {path!r}: 'drop' of model {model!r} names unknown tensors {unknown[:5]}")
    return {"tensors": frozenset(tensors), "drop": {k: frozenset(v) for k, v in drop.items()}}


def load_mask_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a mask file, cached per process (keyed by path, modification time and size)."""
    resolved = Path(path).expanduser().absolute()
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"lwptv_mask_file not found: {str(path)!r} (resolved to {resolved})") from None
    if resolved.is_dir():
        raise ValueError(f"lwptv_mask_file {str(path)!r} is a folder, not a mask file (the JSON file that "
                         "python -m mergekit_wudi.lwptv_masks writes)")
    return _load(str(resolved), stat.st_mtime_ns, stat.st_size)


def drop_mask(path: Union[str, os.PathLike], tensor_name: str, model_keys: Sequence[Any]) -> List[bool]:
    """For one tensor, whether each model (by ``str(key)``) drops its task vector; clear errors
    for a tensor or a model the file does not know."""
    content = load_mask_file(path)
    if tensor_name not in content["tensors"]:
        raise ValueError(
            f"lwptv_mask_file {str(path)!r} has no entry for tensor {tensor_name!r}; "
            "was it built from the same models (python -m mergekit_wudi.lwptv_masks)?"
        )
    result = []
    for key in model_keys:
        dropped = content["drop"].get(str(key))
        if dropped is None:
            known = ", ".join(sorted(content["drop"])) or "none"
            raise ValueError(f"lwptv_mask_file {str(path)!r} has no model {str(key)!r} (models there: {known})")
        result.append(tensor_name in dropped)
    return result


def build_mask_file(
    config: Union[str, os.PathLike, Mapping[str, Any], Any],
    out_path: Union[str, os.PathLike],
    *,
    ratio: Optional[float] = None,
    threshold: Optional[float] = None,
    unit: str = "block",
) -> Dict[str, Any]:
    """The pre-pass: score the models of a mergekit config (file, dict or MergeConfiguration)."""
    import yaml
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration

    from mergekit_wudi.inputs import check_model_shapes
    from mergekit_wudi.solvers import lwptv

    check_rule(ratio, threshold)
    if isinstance(config, (str, os.PathLike)):
        config = yaml.safe_load(Path(config).read_text())
    if not isinstance(config, MergeConfiguration):
        config = MergeConfiguration.model_validate(config)
    if config.base_model is None or not config.models:
        raise ValueError("LwPTV masks need a config with base_model and models (slices are not supported)")
    base_ref: ModelReference = config.base_model
    expert_refs = [m.model for m in config.models if m.model != base_ref]
    check_model_shapes(config)  # unreadable files and models of another size, named, before any tensor
    loaders = {ref: ref.lazy_loader() for ref in [base_ref, *expert_refs]}
    names = [n for n in loaders[base_ref].index.tensor_paths]
    for ref in expert_refs:
        missing = [n for n in names if n not in loaders[ref].index.tensor_paths]
        if missing:
            raise ValueError(f"model {str(ref)!r} lacks tensors of the base: {missing[:5]}")
    drop = lwptv.layer_masks(
        functools.partial(_get, loaders[base_ref], base_ref),
        {str(ref): functools.partial(_get, loaders[ref], ref) for ref in expert_refs},
        names,
        threshold=threshold,
        ratio=ratio,
        unit=unit,
    )
    return write_mask_file(out_path, drop, names, ratio=ratio, threshold=threshold, unit=unit)


def build_mask_file_from_state_dicts(
    base: Mapping[str, Any],
    experts: Mapping[Any, Mapping[str, Any]],
    out_path: Union[str, os.PathLike],
    *,
    ratio: Optional[float] = None,
    threshold: Optional[float] = None,
    unit: str = "block",
) -> Dict[str, Any]:
    """The pre-pass for in-memory merges (``merge_state_dicts``, the Lightning callback): experts
    keyed by the ids the merge uses (the callback's are ``task_0``, ``task_1``, ...)."""
    from mergekit_wudi.solvers import lwptv

    check_rule(ratio, threshold)
    names = [n for n, t in base.items() if t.is_floating_point()]
    drop = lwptv.layer_masks(
        base.__getitem__,
        {key: sd.__getitem__ for key, sd in experts.items()},
        names,
        threshold=threshold,
        ratio=ratio,
        unit=unit,
    )
    return write_mask_file(out_path, drop, names, ratio=ratio, threshold=threshold, unit=unit)


def check_rule(ratio: Optional[float], threshold: Optional[float]) -> None:
    """Exactly one rule, in range: ``0 <= ratio <= 1`` or a finite ``threshold >= 0`` (before any tensor is read)."""
    if (ratio is None) == (threshold is None):
        raise ValueError("LwPTV masks need exactly one of ratio or threshold")
    if ratio is not None and not 0 <= ratio <= 1:
        raise ValueError(f"LwPTV ratio must be between 0 and 1, got {ratio!r}")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"LwPTV threshold must be a finite number >= 0, got {threshold!r}")


def _get(loader, model, name):
    """One tensor of a model, checked finite: a NaN/Inf is an error naming the tensor, model and file."""
    from mergekit_wudi.solvers.numerics import check_finite

    tensor = loader.get_tensor(name)
    check_finite(tensor, f"tensor {name!r} of model {model} (file {loader.index.tensor_paths.get(name)})")
    return tensor


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergekit_wudi.lwptv_masks",
        description="LwPTV pre-pass: write the mask file a merge YAML names with lwptv_mask_file.",
    )
    parser.add_argument("config", help="mergekit YAML with base_model and models")
    parser.add_argument("out", help="mask file (JSON) to write")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--ratio", type=float, help="per expert, drop this fraction of its least salient layers")
    rule.add_argument("--threshold", type=float, help="drop layers whose saliency ||tau||/||W0|| is below this")
    parser.add_argument("--unit", choices=("block", "tensor"), default="block", help="what a 'layer' is")
    args = parser.parse_args(argv)
    try:
        check_rule(args.ratio, args.threshold)
    except ValueError as error:
        parser.error(str(error))
    try:
        content = build_mask_file(args.config, args.out, ratio=args.ratio, threshold=args.threshold, unit=args.unit)
    except (ValueError, OSError) as error:  # every such error names its model / file / tensor
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    total = len(content["tensors"])
    for model, names in content["drop"].items():
        print(f"{model}: drops {len(names)} of {total} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
