"""How the callback reads and writes the module's weights.

A plain module is read through Lightning's strategy (``lightning_module_state_dict``: full weights on
rank 0 even under FSDP) and written with ``load_state_dict``. A module holding PEFT LoRA layers
(issue #14) is read as what its adapter means: the pretrained weights and, per task, the effective
full weights ``W0 + scaling * B_i A_i`` in the base model's naming (:mod:`mergekit_wudi.lora`), so
WUDI merges the updates, not the factors; it is written back with the LoRA merged into the base
weights (:func:`mergekit_wudi.lora.load_merged_into`).
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Mapping

import torch
from lightning.pytorch import Trainer
from torch import nn

from mergekit_wudi import lora
from mergekit_wudi.lightning.checks import MergeInputError, StateDict


def pretrained_weights(trainer: Trainer, pl_module: nn.Module) -> StateDict:
    """The weights at the start of the first fit (the base); a collective under FSDP."""
    if lora.is_peft_model(pl_module):
        return {k: v.clone() for k, v in lora.base_state_dict(pl_module).items()}
    return trainer.strategy.lightning_module_state_dict()


def trained_weights(trainer: Trainer, pl_module: nn.Module) -> StateDict:
    """This task's weights at the end of its fit (an expert); a collective under FSDP."""
    if lora.is_peft_model(pl_module):
        return lora.effective_state_dict(pl_module)
    return trainer.strategy.lightning_module_state_dict()


def merge_view(pl_module: nn.Module) -> StateDict:
    """The module's tensors under the names the merge sees (base naming for a PEFT module)."""
    return lora.base_state_dict(pl_module)


def tensor_names(pl_module: nn.Module) -> Dict[str, str]:
    """``{module state key: merge name}``: identity for a plain module; for a PEFT module the key of
    each tensor forward uses (``...fc1.base_layer.weight``) maps to its base name (``...fc1.weight``)."""
    if not lora.is_peft_model(pl_module):
        return {key: key for key in pl_module.state_dict(keep_vars=True)}
    return {key: name for name, key in lora.state_keys(pl_module).items()}


def load_weights(pl_module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put ``tensors`` (merge names) where forward reads them; a PEFT module gets them in its base
    layers with ``lora_B`` zeroed (LoRA merged into the weights) and heads in its ``modules_to_save``."""
    if lora.is_peft_model(pl_module):
        lora.load_merged_into(pl_module, tensors)
        return
    result = pl_module.load_state_dict(dict(tensors), strict=False)
    if result.unexpected_keys:
        warnings.warn(f"merged tensors not in the module: {result.unexpected_keys[:5]}")


def reset_weights(pl_module: nn.Module, base: StateDict, names: List[str]) -> None:
    """Load the base into tensors ``names`` of the module (for a PEFT module: its LoRA update becomes 0)."""
    current = merge_view(pl_module)
    for name in names:
        if name in current and current[name].shape != base[name].shape:
            raise MergeInputError(
                f"cannot reset tensor {name!r} to the base: module shape {tuple(current[name].shape)}, "
                f"base shape {tuple(base[name].shape)}"
            )
    load_weights(pl_module, {n: base[n] for n in names})


def check_module(pl_module: nn.Module, sharded: bool) -> None:
    """A PEFT module must be one this callback can read exactly, and not FSDP-sharded."""
    if not lora.is_peft_model(pl_module):
        return
    if sharded:
        raise MergeInputError("a PEFT LoRA module under FSDP is not supported: use DDP (the adapters are small)")
    try:
        lora.base_state_dict(pl_module)  # walks every LoRA layer, refusing variants (DoRA, ...) by name
    except lora.UnsupportedLoraError as error:
        raise MergeInputError(f"the module's PEFT adapter cannot be merged: {error}") from error
