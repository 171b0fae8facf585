"""PEFT LoRA experts: merge what the adapters mean (their updates), not their factors.

A LoRA expert's task vector for a wrapped weight is its update ``tau_i = s_i B_i A_i`` (``B_i`` [out, r],
``A_i`` [r, in], PEFT's own ``scaling`` s: alpha / r, or alpha / sqrt(r) with rsLoRA). WUDI's premise (Eq. 1
of arXiv 2503.08099: a task vector's rows span its layer's inputs) holds for that update, not for ``A`` and
``B`` taken as weights. So experts are merged as full weights in the BASE model's naming
(:func:`effective_state_dict`) by the existing solvers / mergekit's ``merge_state_dicts``; nothing here merges.
Output forms: the merged full weights (loadable without PEFT; :func:`load_merged_into` puts them into the
PEFT-wrapped module), or a merged LoRA adapter of rank <= sum of the ranks
(:mod:`mergekit_wudi.lora_adapter`), exact for ``closed_form`` / ``spectral`` only. Anything whose update is not
``s B A`` on a weight (DoRA and the other LoRA variants, ``lora_bias``, merged-in adapters, several active
adapters, other PEFT methods) raises :class:`UnsupportedLoraError` naming the layer. ``peft`` is imported lazily.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from mergekit_wudi.solvers.numerics import check_finite

__all__ = [
    "EXACT_SOLVERS", "UnsupportedLoraError", "AdapterNotExactError", "LoraFactors", "is_peft_model", "base_state_dict",
    "effective_state_dict", "lora_factors", "state_keys", "load_merged_into",
]

StateDict = Dict[str, torch.Tensor]
# WUDI solvers whose solution lies in the row space of the experts' task vectors (see merged_adapter_factors);
# ``decorrelated``: the polar factor of the stacked right singular vectors spans the same rows.
EXACT_SOLVERS = ("closed_form", "spectral", "decorrelated")


class UnsupportedLoraError(ValueError):
    """A PEFT module (or layer, named in the message) whose expert update this module cannot merge exactly."""


class AdapterNotExactError(UnsupportedLoraError):
    """The merged weights are not ``B_m A_m`` with ``A_m`` in the experts' ``A`` row space (e.g. the
    ``adam`` solver): no exact merged adapter exists; use the full-weights output instead."""


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA-wrapped weight of one expert: PEFT's ``lora_A`` [r, in] and ``lora_B`` [out, r] weights
    (detached copies) and its ``scaling``. ``fan_in_fan_out``: the stored weight is [in, out]
    (``transformers`` ``Conv1D``, GPT-2), so its update is ``(scaling * B A)^T``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The update of the stored weight, in float32 (float64 stays float64), as PEFT merges it."""
        dtype = torch.float64 if self.A.dtype == torch.float64 else torch.float32
        product = self.B.to(dtype) @ self.A.to(dtype)
        return (product.T if self.fan_in_fan_out else product) * self.scaling

    @property
    def row_factor(self) -> torch.Tensor:
        """Rows spanning the row space of the stored update: ``A``, or ``B^T`` for fan_in_fan_out."""
        return self.B.T if self.fan_in_fan_out else self.A


def _peft():
    import peft
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.lora import layer as lora_layers
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    return dict(
        PeftModel=peft.PeftModel, LoraLayer=LoraLayer, LoraModel=LoraModel, Linear=lora_layers.Linear,
        Plain=(lora_layers.Linear, lora_layers.Embedding, lora_layers._ConvNd),
        BaseTuner=BaseTuner, BaseTunerLayer=BaseTunerLayer, Aux=AuxiliaryTrainingWrapper, MTS=ModulesToSaveWrapper,
    )


def is_peft_model(module: nn.Module) -> bool:
    """True if ``module`` is, or contains, anything PEFT built (``PeftModel``, tuner layers such as
    ``LoraLayer``, ``modules_to_save`` wrappers). Never imports ``peft``: without it no PEFT object exists."""
    if "peft" not in sys.modules:
        return False
    p = _peft()
    kinds = (p["PeftModel"], p["BaseTuner"], p["BaseTunerLayer"], p["Aux"])
    return any(isinstance(m, kinds) for m in module.modules())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class _Layout:
    """How a PEFT-wrapped module's state dict maps onto the base model's names, for one adapter."""

    adapter: str
    expert: Dict[str, str] = field(default_factory=dict)  # base name -> key whose tensor forward uses
    base: Dict[str, str] = field(default_factory=dict)  # base name -> key of the pretrained tensor
    lora: Dict[str, Tuple[str, nn.Module]] = field(default_factory=dict)  # base weight name -> (layer name, layer)
    heads: Dict[str, str] = field(default_factory=dict)  # base name -> its modules_to_save wrapper's base name


def _active_adapter(module: nn.Module, p) -> str:
    active = set()
    for m in module.modules():
        if isinstance(m, (p["LoraLayer"], p["MTS"])):
            active.update(m.active_adapters)
    if len(active) != 1:
        what = f"several active adapters {sorted(active)}" if active else "no active adapter"
        raise UnsupportedLoraError(f"the PEFT module has {what}: pass adapter_name= to pick the expert's adapter")
    return active.pop()


def _check_layer(name: str, layer: nn.Module, adapter: str) -> None:
    p = _peft()
    base_weight = getattr(layer.get_base_layer(), "weight", None)
    if not isinstance(layer, p["Plain"]) or not isinstance(base_weight, torch.Tensor) or not (
        base_weight.is_floating_point()
    ):
        raise UnsupportedLoraError(
            f"LoRA layer {name!r} is a {type(layer).__name__} on {type(layer.get_base_layer()).__name__}: "
            "supported are PEFT's lora Linear, Embedding and Conv layers on floating-point weights"
        )
    variant = layer.lora_variant.get(adapter)
    if variant is not None or layer.use_dora.get(adapter, False) or layer.lora_bias.get(adapter, False):
        kind = "DoRA (use_dora=True)" if layer.use_dora.get(adapter, False) else type(variant).__name__
        raise UnsupportedLoraError(
            f"LoRA layer {name!r} (adapter {adapter!r}) uses "
            + (f"the variant {kind}" if variant is not None else "lora_bias=True (a trained bias)")
            + ": its update is not scaling * B A on the weight. Merge plain LoRA adapters, or merge_and_unload() "
            "each expert and merge the full models."
        )
    if layer.merged:
        raise UnsupportedLoraError(
            f"LoRA layer {name!r} has adapters {layer.merged_adapters} merged into its base weight: "
            "call unmerge_adapter() first (the pretrained weight is needed)"
        )


def _layout(module: nn.Module, adapter_name: Optional[str]) -> _Layout:
    """Walk ``module``: PEFT wrappers become transparent, adapter parameters are set aside."""
    p = _peft()
    for key, mod in module.named_modules():
        if isinstance(mod, p["BaseTunerLayer"]) and not isinstance(mod, p["LoraLayer"]) or (
            isinstance(mod, p["Aux"]) and not isinstance(mod, p["MTS"])
        ) or (isinstance(mod, p["BaseTuner"]) and not isinstance(mod, p["LoraModel"])):
            raise UnsupportedLoraError(f"module {key!r} is a {type(mod).__name__}: only PEFT LoRA is supported")
    layout = _Layout(adapter_name or _active_adapter(module, p))
    modules: Dict[str, Tuple[str, str, str]] = {}  # module key -> (base name, role, head wrapper name)
    stack = [(module, "", "", "model", "")]
    while stack:
        mod, key, base, role, head = stack.pop()
        modules[key] = (base, role, head)
        if role == "drop":  # adapter parameters and other adapters' head copies
            stack.extend((c, _join(key, n), "", "drop", "") for n, c in mod._modules.items() if c is not None)
            continue
        for child_name, child in reversed(mod._modules.items()):  # (popped in module order)
            if child is None:
                continue
            child_key, child_base = _join(key, child_name), _join(base, child_name)
            if isinstance(mod, p["PeftModel"]) and child_name == "base_model" or (
                isinstance(mod, p["BaseTuner"]) and child_name == "model"
            ):
                stack.append((child, child_key, base, role, head))
            elif isinstance(mod, p["LoraLayer"]):
                stack.append((child, child_key, base, role, head) if child_name == "base_layer" else (child, child_key, "", "drop", ""))
                if child_name == "base_layer" and layout.adapter in mod.lora_A.keys() | mod.lora_embedding_A.keys():
                    _check_layer(key, mod, layout.adapter)
                    layout.lora[_join(base, "weight")] = (key, mod)
            elif isinstance(mod, p["MTS"]) and child_name == "original_module":
                stack.append((child, child_key, base, "head_original", base))
            elif isinstance(mod, p["MTS"]) and child_name == "modules_to_save":
                modules[child_key] = ("", "drop", "")
                for copy_name, copy in child._modules.items():
                    keep = copy_name == layout.adapter
                    stack.append((copy, _join(child_key, copy_name), base if keep else "", "head" if keep else "drop", base))
            else:
                stack.append((child, child_key, child_base, role, head))
    for key in module.state_dict(keep_vars=True):
        owner, _, leaf = key.rpartition(".")
        base, role, head = modules[owner]
        if role == "drop":
            continue
        name = _join(base, leaf)
        if role in ("model", "head"):
            layout.expert[name] = key
        if role in ("model", "head_original"):
            layout.base[name] = key
        if head:
            layout.heads[name] = head
    for name in layout.heads:  # a head the adapter does not train: its original is what forward uses
        layout.expert.setdefault(name, layout.base[name])
    return layout


def state_keys(module: nn.Module, adapter_name: Optional[str] = None) -> Dict[str, str]:
    """``{base-model name: key in module.state_dict()}`` of the tensors forward uses (for a
    LoRA-wrapped weight, its ``...base_layer.weight``; for a head, the adapter's copy)."""
    return dict(_layout(module, adapter_name).expert)


def base_state_dict(module: nn.Module, adapter_name: Optional[str] = None) -> StateDict:
    """The pretrained weights of a PEFT-wrapped ``module`` in base naming: LoRA ignored, heads from
    ``original_module``. Tensors share storage with the module (like ``state_dict()``)."""
    state = module.state_dict()
    if not is_peft_model(module):
        return {k: v.detach() for k, v in state.items()}
    return {name: state[key].detach() for name, key in _layout(module, adapter_name).base.items()}


def effective_state_dict(module: nn.Module, adapter_name: Optional[str] = None) -> StateDict:
    """The expert's full weights in base naming (as ``merge_and_unload().state_dict()`` names and
    computes them), without modifying ``module``: ``W0 + delta`` for LoRA-wrapped weights (PEFT's own
    ``get_delta_weight``: ``scaling * B A`` for linear layers, its Embedding/Conv forms otherwise), the
    adapter's ``modules_to_save`` copies under the original names, every other tensor as is (sharing
    storage). ``adapter_name=None``: the one active adapter. A plain module gives its own state dict."""
    if not is_peft_model(module):
        return {k: v.detach() for k, v in module.state_dict().items()}
    layout = _layout(module, adapter_name)
    state = module.state_dict()
    out = {name: state[key].detach() for name, key in layout.expert.items()}
    with torch.no_grad():
        for name, (layer_name, layer) in layout.lora.items():
            weight = out[name]
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            if isinstance(layer, _peft()["Linear"]):  # the same products, in the same order, as PEFT's merge
                delta = _factors(layer_name, layer, layout.adapter).delta()
            else:
                delta = layer.get_delta_weight(layout.adapter)
            check_finite(delta, f"the LoRA update of layer {layer_name!r}")
            out[name] = (weight.to(dtype) + delta.to(dtype)).to(weight.dtype)
    return out


def _factors(layer_name: str, layer: nn.Module, adapter: str) -> LoraFactors:
    if not isinstance(layer, _peft()["Linear"]):
        raise UnsupportedLoraError(
            f"LoRA layer {layer_name!r} is a {type(layer).__name__} on {type(layer.get_base_layer()).__name__}: "
            "LoRA factors (and a merged adapter) are supported for linear layers only; use the full-weights output"
        )
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return LoraFactors(A.detach().clone(), B.detach().clone(), float(layer.scaling[adapter]), bool(layer.fan_in_fan_out))


def lora_factors(module: nn.Module, adapter_name: Optional[str] = None, *,
                 linear_only: bool = False) -> Dict[str, LoraFactors]:
    """``{base weight name: LoraFactors}`` for every LoRA-wrapped linear weight of the adapter
    (``None``: the one active adapter); ``scaling`` is read from the layer (alpha / r, or alpha / sqrt(r)
    with rsLoRA, times any ``set_scale``). Raises :class:`UnsupportedLoraError` for LoRA on other layer
    types (Embedding, Conv, ...) and for the variants listed in the module docstring, unless
    ``linear_only``, which leaves those layers out."""
    if not is_peft_model(module):
        return {}
    layout, linear = _layout(module, adapter_name), _peft()["Linear"]
    return {name: _factors(layer_name, layer, layout.adapter) for name, (layer_name, layer) in layout.lora.items()
            if not linear_only or isinstance(layer, linear)}


def load_merged_into(module: nn.Module, merged: Mapping[str, torch.Tensor], adapter_name: Optional[str] = None) -> None:
    """Make a PEFT-wrapped ``module`` compute the merged model: each tensor of ``merged`` (base naming,
    e.g. from ``merge_state_dicts``) goes where forward reads it: LoRA-wrapped weights into the base
    layer, with the adapter's ``lora_B`` zeroed (its update becomes 0, as at PEFT's init: training can go
    on from the merge); heads into the adapter's ``modules_to_save`` copy (``original_module`` keeps the
    pretrained head); the rest as is. Names the module does not have raise ``KeyError``; tensors not in
    ``merged`` are left alone (so a per-task head can be loaded on its own). A plain module gets
    ``load_state_dict(merged, strict=False)`` with the same check."""
    if not is_peft_model(module):
        unexpected = module.load_state_dict(dict(merged), strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"tensors not in the module: {unexpected[:5]}")
        return
    layout = _layout(module, adapter_name)
    unknown = [n for n in merged if n not in layout.expert]
    if unknown:
        raise KeyError(f"tensors not in the module (base naming expected): {unknown[:5]}")
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in merged.items():
            state[layout.expert[name]].copy_(tensor)
            if name in layout.lora:
                layer = layout.lora[name][1]
                zero = layer.lora_B[layout.adapter].weight if layout.adapter in layer.lora_B else (
                    layer.lora_embedding_B[layout.adapter]
                )
                zero.zero_()
