"""Checks of a merge's input files that need only their headers: run before any tensor is read.

For every model of a mergekit config that is a local folder: its weight files exist and their
safetensors headers parse and cover the file (a truncated download is caught here, naming the
file); every tensor it shares with the base has the base's shape (a model of another size is
caught here, naming the model and the tensor). Models given by hub name are left to mergekit.
:func:`mergekit_wudi.validation.check_model_files` runs these with the config's other file checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple


class ModelFileError(ValueError):
    """An input model or file that cannot be merged; the message names it."""


def tensor_files_of(path: Path, owner: str) -> Dict[str, Tuple[Tuple[int, ...], Path]]:
    """``{tensor name: (shape, path)}`` of one safetensors file, errors naming ``owner`` and the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: (tuple(handle.get_slice(name).get_shape()), path) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{owner}: cannot read {path}: {error} (truncated or corrupt file?)") from None


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


def tensor_files(folder: Path, model: str) -> Dict[str, Tuple[Tuple[int, ...], Path]]:
    """``{tensor name: (shape, file)}`` from the safetensors headers of a model folder (no tensor is read)."""
    found: Dict[str, Tuple[Tuple[int, ...], Path]] = {}
    for path in _weight_files(folder):
        found.update(tensor_files_of(path, f"model {model}"))
    return found


def tensor_shapes(folder: Path, model: str) -> Dict[str, Tuple[int, ...]]:
    """``{tensor name: shape}`` from the safetensors headers of a model folder (no tensor is read)."""
    return {name: shape for name, (shape, _) in tensor_files(folder, model).items()}


def _local_folder(reference) -> Optional[Path]:
    path = Path(os.path.expanduser(reference.model.path))
    if path.is_dir():
        return path
    if path.exists() or os.path.isabs(reference.model.path) or reference.model.path.startswith("."):
        raise ModelFileError(f"model {reference}: {path} is not a model folder")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ModelFileError(f"model {reference}: no folder {path} here, and HF_HUB_OFFLINE is set")
    return None  # a hub name: mergekit downloads it


def check_model_shapes(merge_config, *, vocabularies_may_differ: bool = False) -> Dict:
    """Every local model's weight files readable, every tensor shared with the base of the base's
    shape, every LoRA adapter fitting its model. Returns ``{model reference: {tensor: (shape, file)}}``.
    ``vocabularies_may_differ``: embedding / LM-head tensors may differ in their vocabulary size
    (mergekit aligns them when the config sets ``tokenizer_source`` or ``tokenizer``)."""
    from mergekit_wudi.linear_weights import is_vocabulary_name

    files = {}
    for reference in merge_config.referenced_models():
        folder = _local_folder(reference)
        if folder is None:
            continue
        model_files = tensor_files(folder, str(reference))
        if reference.lora is not None:
            _check_adapter_fits(reference, {name: shape for name, (shape, _) in model_files.items()})
        else:
            files[reference] = model_files
    base = merge_config.base_model
    reference_files = files.get(base) if base is not None else None
    if reference_files is not None:
        for model, model_files in files.items():
            for name, (shape, path) in model_files.items():
                expected = reference_files.get(name, (None,))[0]
                if expected is None or expected == shape:
                    continue
                one_axis = len(shape) == len(expected) and sum(a != b for a, b in zip(shape, expected)) == 1
                if vocabularies_may_differ and one_axis and is_vocabulary_name(name):
                    continue
                hint = ("; models with different vocabularies need 'tokenizer_source' (mergekit then aligns "
                        "embeddings and LM heads)" if one_axis and is_vocabulary_name(name) else "")
                raise ModelFileError(
                    f"model {model}: tensor {name!r} has shape {list(shape)} in {path}, but the base model {base} has "
                    f"{list(expected)}; the models must share one architecture and size{hint}"
                )
    return files


def _comparison_order(item) -> tuple:
    """Small linear weights first: a fine-tuned (even LoRA-tuned) expert differs there at once."""
    from mergekit_wudi.linear_weights import is_linear_weight

    name, (shape, _) = item
    count = 1
    for size in shape:
        count *= size
    return (not is_linear_weight(name, shape), count, name)


def _same_weights(files: Dict, base_files: Dict) -> bool:
    """True when a model holds exactly the base's tensors with equal values; reads tensor by tensor
    and stops at the first difference (for a fine-tuned expert, after one small tensor)."""
    import torch
    from safetensors import safe_open

    if files.keys() != base_files.keys() or any(files[n][0] != base_files[n][0] for n in files):
        return False
    with contextlib.ExitStack() as stack:
        handles = {}
        for name, (_, path) in sorted(files.items(), key=_comparison_order):
            base_path = base_files[name][1]
            for file in (path, base_path):
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            tensor, base_tensor = handles[path].get_tensor(name), handles[base_path].get_tensor(name)
            if tensor.dtype != base_tensor.dtype or not torch.equal(tensor, base_tensor):
                return False
    return True


def warn_experts_equal_to_base(merge_config, files: Dict) -> None:
    """A warning naming the experts whose weights equal the base's (their task vectors are zero: they
    add nothing), and saying so when that is every expert (the merge is a copy of the base)."""
    import logging

    base = merge_config.base_model
    experts = [m.model for m in merge_config.models or () if m.model != base]
    if not experts or any(e not in files for e in experts):
        return
    equal = [str(e) for e in experts if _same_weights(files[e], files[base])]
    if not equal:
        return
    if len(equal) == len(experts):
        logging.getLogger(__name__).warning(
            "every expert (%s) holds the same weights as the base model %s: the merge is a copy of the base. "
            "Check the model paths", ", ".join(equal), base)
    else:
        logging.getLogger(__name__).warning(
            "model(s) %s hold the same weights as the base model %s: their task vectors are zero, they add "
            "nothing to the merge", ", ".join(equal), base)


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:embedding_)?(?P<factor>[AB])(?:\.[^.]+)?(?:\.weight)?$")


def _check_adapter_fits(reference, base_shapes: Dict[str, Tuple[int, ...]]) -> None:
    """A LoRA adapter (``model: base+adapter``) whose factors do not fit the model's weights is an
    error naming the adapter, the module and both shapes (PEFT fails later without naming it)."""
    folder = Path(os.path.expanduser(reference.lora.path))
    if not folder.is_dir():
        if os.path.isabs(reference.lora.path) or reference.lora.path.startswith(".") or folder.exists():
            raise ModelFileError(f"model {reference}: LoRA adapter {folder} is not an adapter folder")
        return  # a hub name
    adapter_files = sorted(folder.glob("adapter_model*.safetensors"))
    if not adapter_files:
        return  # a .bin adapter: left to PEFT
    factors: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    for path in adapter_files:
        for name, (shape, _) in tensor_files_of(path, f"LoRA adapter {folder}").items():
            match = _LORA_KEY.match(name)
            if match:
                factors.setdefault(match["module"], {})[match["factor"]] = shape
    for module, pair in sorted(factors.items()):
        weight = base_shapes.get(f"{module}.weight")
        if weight is None:
            raise ModelFileError(
                f"LoRA adapter {folder} (model {reference}) targets {module!r}, which the model {reference.model} "
                "does not have: the adapter was trained for another model")
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or len(a) < 2 or len(b) < 2 or len(weight) < 2:
            continue
        fits = (b[0], a[1]) in ((weight[0], weight[1]), (weight[1], weight[0]))  # [out, in] or fan_in_fan_out
        if not fits:
            raise ModelFileError(
                f"LoRA adapter {folder} (model {reference}) does not fit the model {reference.model}: for "
                f"{module!r} its factors are A {list(a)} and B {list(b)}, the weight is {list(weight)}; the "
                "adapter was trained for a model of another size")
