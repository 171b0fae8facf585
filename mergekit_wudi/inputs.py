"""Checks of a merge's input files that need only their headers: run before any tensor is read.

For every model of a mergekit config that is a local folder: its weight files exist and their
safetensors headers parse and cover the file (a truncated download is caught here, naming the
file); every tensor it shares with the base has the base's shape (a model of another size is
caught here, naming the model and the tensor); an LwPTV mask file names exactly the config's
experts and only tensors the base has. Models given by hub name are left to mergekit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple


class ModelFileError(ValueError):
    """An input model or file that cannot be merged; the message names it."""


def _weight_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as error:
            raise ModelFileError(f"{index}: not a valid safetensors index ({error})") from None
        missing = [name for name in shards if not (folder / name).exists()]
        if missing:
            raise ModelFileError(f"{index} names shards that do not exist: {missing}")
        return [folder / name for name in shards]
    return sorted(folder.glob("*.safetensors"))


def tensor_shapes(folder: Path, model: str) -> Dict[str, Tuple[int, ...]]:
    """``{tensor name: shape}`` from the safetensors headers of a model folder (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    shapes: Dict[str, Tuple[int, ...]] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as error:
            raise ModelFileError(f"model {model}: cannot read {path}: {error} (truncated or corrupt file?)") from None
    return shapes


def _local_folder(reference) -> Optional[Path]:
    path = Path(os.path.expanduser(reference.model.path))
    if path.is_dir():
        return path
    if path.exists() or os.path.isabs(reference.model.path) or reference.model.path.startswith("."):
        raise ModelFileError(f"model {reference}: {path} is not a model folder")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ModelFileError(f"model {reference}: no folder {path} here, and HF_HUB_OFFLINE is set")
    return None  # a hub name: mergekit downloads it


def check_model_files(merge_config) -> Optional[Dict[str, Tuple[int, ...]]]:
    """The checks of this module's docstring, for a ``MergeConfiguration``; returns the base model's
    ``{tensor name: shape}`` (None when the base is not a local folder)."""
    shapes = {}
    for reference in merge_config.referenced_models():
        folder = _local_folder(reference)
        if folder is not None and reference.lora is None:
            shapes[reference] = tensor_shapes(folder, str(reference))
    base = merge_config.base_model
    reference_shapes = shapes.get(base) if base is not None else None
    if reference_shapes is not None:
        for model, model_shapes in shapes.items():
            for name, shape in model_shapes.items():
                expected = reference_shapes.get(name)
                if expected is not None and expected != shape:
                    raise ModelFileError(
                        f"model {model}: tensor {name!r} has shape {list(shape)} but the base model {base} has "
                        f"{list(expected)}; the models must share one architecture and size"
                    )
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
