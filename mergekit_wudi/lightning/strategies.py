"""Merge strategies: how the callback turns experts into one set of weights.

A strategy is a small object with :meth:`MergeStrategy.check` (called in ``setup``, before any
training) and :meth:`MergeStrategy.merge`. :class:`RegistryMerge` runs any method of mergekit's
registry (``wudi`` -- WUDI-Merging, arXiv 2503.08099 --, ``task_arithmetic``, ``ties``, ...) through
``mergekit.merge_methods.merge_state_dicts``; :class:`MudscMerge` runs MuDSC (arXiv 2403.01753) for
experts that share no base. To merge another way, subclass :class:`MergeStrategy` and return it
from :meth:`WUDIMergeCallback.build_strategy <mergekit_wudi.lightning.WUDIMergeCallback.build_strategy>`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from lightning.pytorch import Trainer
from torch import nn

from mergekit_wudi.lightning.checks import MergeInputError, StateDict
from mergekit_wudi.lightning.distributed import (
    broadcast,
    distributed_world,
    gather_results,
    is_global_zero,
    shard_names,
)
from mergekit_wudi.lightning.module_state import tensor_names
from mergekit_wudi.lightning.storage import expert_id
from mergekit_wudi.linear_weights import is_linear_weight

BASE_ID = "base"
WHERE = "WUDIMergeCallback(parameters=...)"
# Inputs (base + experts) moved to the merge device per merge_state_dicts call, at most.
CHUNK_BYTES = 1 << 30

Experts = Sequence[Tuple[str, StateDict]]


class MergeStrategy:
    """How experts become one set of weights (see the module docstring)."""

    name: str = "custom"
    needs_base: bool = True  # the merge uses the pretrained weights
    requires_change: bool = True  # an expert equal to the base is an error (it was never trained)

    def check(self) -> None:
        """Validate the strategy's settings; raise naming the one at fault. Called in ``setup``."""

    def check_experts(self, count: Optional[int]) -> None:
        """Validate per-expert settings against the number of experts (``None``: not known yet, in
        sequential mode without ``num_tasks``). Called in ``setup`` and again before the merge."""

    def check_kept_out(self, kept_out: Sequence[str]) -> None:
        """Validate that tensors ``kept_out`` (per-task heads: outside ``include`` or inside ``exclude``)
        can be kept out of this merge. Called in ``setup`` (the module's names) and before the merge."""

    def describe(self) -> str:
        """Method and parameters, for logs and error messages."""
        return repr(self.name)

    def merge(
        self,
        trainer: Optional[Trainer],
        pl_module: Optional[nn.Module],
        base: Optional[StateDict],
        experts: Experts,
        names: List[str],
    ) -> Tuple[StateDict, List[StateDict]]:
        """Merge tensors ``names``; return the merged tensors and, per expert, the state its kept-out
        tensors (heads) are taken from. Every rank calls it; every rank gets the same result."""
        raise NotImplementedError


def expert_ids(count: int, with_base: bool = False) -> List[str]:
    """The input ids of a merge of ``count`` experts (``base`` first when it is an input)."""
    return ([BASE_ID] if with_base else []) + [expert_id(i) for i in range(count)]


def _is_expert_key(key: Any, with_base: bool) -> bool:
    if with_base and key == BASE_ID:
        return True
    return isinstance(key, str) and re.fullmatch(r"task_(0|[1-9][0-9]*)", key) is not None


def check_expert_keys(values: Mapping[Any, Any], count: Optional[int], where: str, with_base: bool = False) -> None:
    """A per-expert mapping is keyed by exactly the experts' ids (``task_<i>``; ``base`` when it is an
    input); with ``count`` unknown (sequential mode without ``num_tasks``) every key must be such an id."""
    ids = expert_ids(count if count is not None else max(2, len(values)), with_base)
    listed = ", ".join(ids) if count is not None else ", ".join(ids[:2]) + ", ..."
    for key in values:
        if not _is_expert_key(key, with_base) or (count is not None and key not in ids):
            close = difflib.get_close_matches(str(key), ids, n=1)
            raise MergeInputError(
                f"{where}: key {key!r} is not an expert of this merge (they are {listed}, in the order of the "
                f"fits or of experts=){f'; did you mean {close[0]!r}?' if close else ''}"
            )
    missing = [i for i in ids if i not in values] if count is not None else []
    if missing:
        raise MergeInputError(f"{where}: no value for {', '.join(missing)} (one per input: {listed})")


def linear_flags(module: Optional[nn.Module], reference: StateDict, names: Sequence[str]) -> List[bool]:
    """Which of ``names`` WUDI solves for (:mod:`mergekit_wudi.linear_weights`), from the module types.

    The weight of an ``nn.Linear`` (in a PEFT LoRA module: the base layer a LoRA layer wraps) is
    linear unless it is tied to an ``nn.Embedding`` (the same Parameter) or its name is a
    vocabulary name (an LM head); ``nn.Embedding`` weights and all other tensors are not. Without
    a module the name-and-shape rule decides.
    """
    if module is None:
        return [is_linear_weight(n, reference[n].shape) for n in names]
    embedding_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    merge_name = tensor_names(module)  # a PEFT module's keys -> the base names the merge sees
    linear = {
        merge_name.get(key, key)
        for key in (
            f"{prefix}.weight" if prefix else "weight"
            for prefix, m in module.named_modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in embedding_weights
        )
    }
    return [n in linear and is_linear_weight(n, reference[n].shape) for n in names]


def byte_chunks(names: Sequence[str], sizes: Sequence[int], budget: int) -> List[List[str]]:
    """Consecutive runs of ``names`` whose ``sizes`` add up to at most ``budget`` (at least one name each)."""
    chunks: List[List[str]] = []
    used = budget
    for name, size in zip(names, sizes):
        if used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


@dataclasses.dataclass
class RegistryMerge(MergeStrategy):
    """A method of mergekit's registry, through ``merge_state_dicts`` on whole groups of tensors.

    Under multi-process DDP (``shard``) every rank merges a share of the tensors and the shares are
    gathered; per-tensor parameters travel with their tensors: the user's ``PerGroupValues`` (one
    value per merged tensor, in the order of the reference state: the base, else the first expert;
    safetensors files list names sorted) and the ``linear`` flags of :func:`linear_flags`.
    """

    name: str = "wudi"
    parameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
    shard: bool = True
    merge_device: Optional[str] = None
    progress: bool = True

    def _method(self):
        import mergekit_wudi  # noqa: F401  (registers our methods)
        from mergekit import merge_methods

        try:
            return merge_methods.get(self.name)
        except Exception as error:
            known = sorted(m.spec.name for m in merge_methods.registered_methods())
            raise ValueError(f"unknown merge method {self.name!r}; registered: {', '.join(known)}") from error

    def check(self) -> None:
        from mergekit_wudi.validation import check_parameters

        self._method()
        check_parameters(self.name, self.parameters, where=WHERE)
        self._refuse_per_expert_globals()

    def _refuse_per_expert_globals(self) -> None:
        """A list or mapping given for a global parameter (one value for the whole merge, e.g. ``ridge``,
        ``prior``) would only fail inside mergekit after training: refused here, naming it."""
        from mergekit.merge_methods.base import ParameterScope, PerGroupValues

        spec = self._method().spec
        per_input = [p.name for p in spec.parameters if p.scope != ParameterScope.SHARED]
        for parameter in spec.parameters:
            value = self.parameters.get(parameter.name)
            if parameter.scope == ParameterScope.SHARED and isinstance(value, (list, tuple, Mapping)) and not isinstance(
                    value, PerGroupValues):
                raise MergeInputError(
                    f"{WHERE}: parameter {parameter.name!r} of method {self.name!r} takes one value for the whole "
                    f"merge, got {value!r}; per-expert values are for {', '.join(per_input) or 'no parameter'}"
                )

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        from mergekit.merge_methods.base import BasePolicy

        return self._method().spec.contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)

    def check_experts(self, count: Optional[int]) -> None:
        """Per-expert values (a list in task order, or a mapping keyed ``task_0``, ``task_1``, ...)
        match the experts, and an LwPTV mask file names them: a wrong length or a mistyped key is an
        error naming the parameter and the key, not a late error of mergekit's."""
        from mergekit.merge_methods.base import ParameterScope, PerGroupValues

        for parameter in self._method().spec.input_parameters:
            value = self.parameters.get(parameter.name)
            if value is None or isinstance(value, PerGroupValues):
                continue
            with_base = parameter.scope == ParameterScope.INPUT and self.needs_base
            if isinstance(value, Mapping):
                check_expert_keys(value, count, f"{WHERE}: parameter {parameter.name!r}", with_base)
            elif isinstance(value, (list, tuple)) and count is not None:
                ids = expert_ids(count, with_base)
                if len(value) != len(ids):
                    raise MergeInputError(
                        f"{WHERE}: parameter {parameter.name!r} has {len(value)} values, but there are {len(ids)} "
                        f"inputs ({', '.join(ids)}): one value per input, in that order"
                    )
        mask_file = self.parameters.get("lwptv_mask_file")
        preprocess = self.parameters.get("preprocess")
        if mask_file is not None and isinstance(preprocess, str) and "lwptv" in preprocess:
            from mergekit_wudi.lwptv_masks import load_mask_file

            models = load_mask_file(mask_file)["drop"]
            missing = [i for i in expert_ids(count if count is not None else 1) if i not in models]
            if missing:
                raise MergeInputError(
                    f"{WHERE}: lwptv_mask_file {str(mask_file)!r} has no model {missing[0]!r} (models there: "
                    f"{', '.join(sorted(models)) or 'none'}); the callback's experts are task_0, task_1, ... in "
                    "the order of the fits (or of experts=): key the mask by these ids "
                    "(mergekit_wudi.lwptv_masks.build_mask_file_from_state_dicts)"
                )

    def describe(self) -> str:
        return f"method {self.name!r} with parameters {self.parameters}"

    def per_tensor_values(self, pl_module, reference: StateDict, names: List[str]) -> Dict[str, Dict[str, Any]]:
        """``{parameter: {tensor name: value}}`` for the per-tensor parameters: the user's
        ``PerGroupValues`` (one value per merged tensor) and, unless given, ``linear``."""
        from mergekit.merge_methods.base import PerGroupValues

        values = {}
        for key, value in self.parameters.items():
            if isinstance(value, PerGroupValues):
                if len(value.values) != len(names):
                    raise ValueError(
                        f"parameter {key!r}: PerGroupValues needs {len(names)} values (one per merged tensor)"
                    )
                values[key] = dict(zip(names, value.values))
        declared = {p.name for p in self._method().spec.parameters}
        if "linear" in declared and "linear" not in self.parameters:
            values["linear"] = dict(zip(names, linear_flags(pl_module, reference, names)))
        return values

    def merge(self, trainer, pl_module, base, experts, names):
        inputs: Dict[str, StateDict] = {}
        if base is not None and self.needs_base:
            inputs[BASE_ID] = base
        for i, (_, state) in enumerate(experts):
            inputs[expert_id(i)] = state
        reference = inputs.get(BASE_ID, experts[0][1])
        # Non-floating buffers (e.g. BatchNorm's step count) differ between experts: not merged, taken as is.
        floating = [n for n in names if reference[n].is_floating_point()]
        copied = {n: reference[n].clone() for n in names if not reference[n].is_floating_point()}
        per_tensor = self.per_tensor_values(pl_module, reference, names)

        world_size, rank = distributed_world(trainer)
        if self.shard:
            shares = shard_names(floating, [reference[n].numel() for n in floating], world_size)
        else:  # computed once, on rank 0, then gathered like the shards
            shares = [list(floating)] + [[] for _ in range(world_size - 1)]
        mine = sorted(shares[rank], key=floating.index)
        device = torch.device(self.merge_device) if self.merge_device else (
            trainer.strategy.root_device if trainer is not None else torch.device("cpu"))

        def compute() -> StateDict:
            return self._merge_share(inputs, mine, per_tensor, device, trainer, world_size)

        merged = gather_results(compute, trainer, f"WUDIMergeCallback: merge with {self.name!r}")
        merged.update(copied)
        return {n: merged[n] for n in names}, [state for _, state in experts]

    def _merge_share(self, inputs, names, per_tensor, device, trainer, world_size) -> StateDict:
        """One ``merge_state_dicts`` call per chunk of this rank's share (one chunk unless the
        share's inputs exceed :data:`CHUNK_BYTES`)."""
        from mergekit.merge_methods import merge_state_dicts
        from mergekit.merge_methods.base import PerGroupValues

        sizes = [sum(s[n].numel() * s[n].element_size() for s in inputs.values()) for n in names]
        bar = self._progress_bar(trainer, len(names), world_size)
        results: StateDict = {}
        for chunk in byte_chunks(names, sizes, CHUNK_BYTES):
            parameters = {k: v for k, v in self.parameters.items() if k not in per_tensor}
            parameters.update({k: PerGroupValues([v[n] for n in chunk]) for k, v in per_tensor.items()})
            tensors = {i: {n: s[n].to(device) for n in chunk} for i, s in inputs.items()}
            with torch.no_grad():
                base_id = BASE_ID if BASE_ID in inputs else None
                out = merge_state_dicts(tensors, self.name, parameters=parameters, base=base_id)
            results.update({n: out[n].detach().cpu() for n in chunk})
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return results

    def _progress_bar(self, trainer, total: int, world_size: int):
        if not self.progress or not total or (trainer is not None and (
                trainer.progress_bar_callback is None or not trainer.is_global_zero)):
            return None
        from tqdm import tqdm

        share = f" (rank 0's share of {world_size})" if world_size > 1 else ""
        return tqdm(total=total, desc=f"Merging ({self.name}){share}", unit="tensor", leave=False, dynamic_ncols=True)


@dataclasses.dataclass
class MudscMerge(MergeStrategy):
    """MuDSC (``mergekit_wudi.mudsc.mudsc_merge``) for experts from different inits: no base.

    Each kept-out head is taken from its expert permuted into the merged unit order (function-
    preserving, ``mode="align"``), not from the raw expert.
    """

    parameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
    dataloader: Optional[Any] = None
    name = "mudsc"
    needs_base = False
    requires_change = False

    @staticmethod
    def _mudsc_merge():
        return MudscMerge._mudsc().mudsc_merge

    @staticmethod
    def _mudsc():
        try:
            mudsc = importlib.import_module("mergekit_wudi.mudsc")
        except ImportError as error:
            raise ImportError(
                f"method='mudsc' needs mergekit_wudi.mudsc.mudsc_merge, which could not be imported: {error}"
            ) from error
        return mudsc

    def check(self) -> None:
        self._mudsc().check_parameters(self.parameters)

    def check_experts(self, count: Optional[int]) -> None:
        if count is not None:
            self._mudsc().check_parameters(self.parameters, n_models=count)

    def check_kept_out(self, kept_out: Sequence[str]) -> None:
        mode = self.parameters.get("mode", "align")
        if kept_out and mode != "align":
            raise MergeInputError(
                f"method='mudsc' with mode={mode!r} cannot keep per-task tensors out of the merge (include/"
                f"exclude leave out {list(kept_out)[:5]}): zip merges units within a model, so no expert's own "
                "head fits the merged body. Use mode='align', or merge the heads too"
            )

    def describe(self) -> str:
        return f"method 'mudsc' with parameters {self.parameters}"

    def merge(self, trainer, pl_module, base, experts, names):
        mudsc_merge = self._mudsc_merge()
        if pl_module is None:
            raise ValueError("method='mudsc' needs the module (merge(trainer, pl_module)) to build the experts")
        dataloader = self.dataloader if self.dataloader is not None else getattr(trainer, "train_dataloader", None)
        if dataloader is None:
            raise ValueError("method='mudsc' needs data: pass dataloader= or merge inside a fit")
        kept_out = [n for n in experts[0][1] if n not in set(names)]
        self.check_kept_out(kept_out)
        keeps_heads = bool(kept_out)
        merged: Optional[StateDict] = None
        aligned: Optional[List[StateDict]] = None
        if is_global_zero(trainer):
            models = [_module_with(pl_module, state) for _, state in experts]
            parameters = {**self.parameters, "return_info": keeps_heads or self.parameters.get("return_info", False)}
            result = mudsc_merge(models, dataloader, **parameters)
            result, info = result if isinstance(result, tuple) else (result, None)
            full = result.state_dict()
            merged = {n: full[n].detach().cpu().clone() for n in names}
            if keeps_heads:
                aligned = [{n: t.detach().cpu() for n, t in state.items()} for state in info["aligned_states"]]
        if trainer is not None and trainer.world_size > 1:
            merged, aligned = broadcast(trainer, (merged, aligned))
        return merged, (aligned if aligned is not None else [state for _, state in experts])


def _module_with(pl_module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A CPU deep copy of ``pl_module`` (without its trainer) holding ``state``."""
    attached = getattr(pl_module, "_trainer", None)
    pl_module._trainer = None  # deep-copy the module, not the trainer it points to
    try:
        model = copy.deepcopy(pl_module).cpu()
    finally:
        pl_module._trainer = attached
    model.load_state_dict(state, strict=False)
    return model
