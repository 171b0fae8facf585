"""A Lightning callback that merges fine-tuned task experts through mergekit's registry.

:class:`WUDIMergeCallback` is an adapter, like Lightning's ``WeightAveraging``: it collects the
pretrained weights and one set of weights per task, then hands them to mergekit's in-memory
``merge_state_dicts`` with the registered method (``wudi`` -- WUDI-Merging, arXiv 2503.08099 --
by default; ``task_arithmetic``, ``ties``, ... work the same). It never computes a merge itself.

Data path: module state -> ``<output>/base.safetensors`` and ``<output>/experts/task_<i>.safetensors``
-> ``merge_state_dicts`` (one call per tensor, spread over DDP ranks) -> ``<output>/merged.safetensors``
(+ ``<output>/heads/task_<i>.safetensors`` for parameters kept out of the merge) -> the module.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mergekit_wudi.io import atomic_file, load_state_dict, save_safetensors_atomic

__all__ = ["WUDIMergeCallback", "MergeInputError"]

StateDict = Dict[str, torch.Tensor]
BASE_ID = "base"
MANIFEST_NAME = "merge_state.json"
MERGED_NAME = "merged.safetensors"


class MergeInputError(ValueError):
    """Experts or base that cannot be merged; the message names the expert and the tensor."""


def expert_id(index: int) -> str:
    """The id of the ``index``-th expert in mergekit's per-model parameters (``weight: {task_0: 1.0}``)."""
    return f"task_{index}"


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """``fnmatch`` glob match; a pattern without wildcards also matches as a module prefix."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return True
        if not any(c in pattern for c in "*?[") and name.startswith(pattern.rstrip(".") + "."):
            return True
    return False


def linear_weight_names(module: torch.nn.Module) -> set:
    """State-dict names of the ``weight`` of every ``nn.Linear`` (WUDI's "linear weights")."""
    return {
        f"{name}.weight" if name else "weight"
        for name, sub in module.named_modules()
        if isinstance(sub, torch.nn.Linear)
    }


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
    equal to the base was never trained; the wudi kernel would silently drop it).
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
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise MergeInputError(f"tensor {name!r} of {label} has non-finite values (NaN or Inf)")
    if base is not None and require_change:
        floating = [n for n in names if base[n].is_floating_point()]
        for label, state in experts:
            if floating and all(torch.equal(state[n], base[n]) for n in floating):
                raise MergeInputError(
                    f"{label} is identical to the base on all {len(floating)} merged tensors: "
                    "it was not trained (or the wrong file was given)"
                )


def shard_names(names: Sequence[str], sizes: Sequence[int], world_size: int) -> List[List[str]]:
    """Deterministic greedy split of tensors over ranks, largest first, balancing element counts."""
    loads = [0] * world_size
    shares: List[List[str]] = [[] for _ in range(world_size)]
    for size, name in sorted(zip(sizes, names), key=lambda t: -t[0]):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += size
    return shares


class WUDIMergeCallback(Callback):
    """Merge task experts fine-tuned from one pretrained model, at the end of training.

    WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099) by default; any method in mergekit's
    registry via ``method``. Two modes:

    - sequential (``experts=None``): the first ``trainer.fit`` snapshots the pretrained weights (or
      uses ``base``); the end of every fit saves that task's expert; after ``num_tasks`` experts (or
      an explicit :meth:`merge` call) the experts are merged.
    - explicit (``experts=[paths]``): Lightning ``.ckpt`` files or safetensors, merged at the end of
      the fit; ``base`` is then required for methods that need one.

    Weights of ``nn.Linear`` modules are passed to ``wudi`` as linear weights (``linear`` per
    tensor); other floating tensors follow its ``non_linear`` rule. Tensors that do not match
    ``include`` or that match ``exclude`` (per-task heads) stay out of the merge and are kept per
    task in ``<output>/heads/task_<i>.safetensors`` and :attr:`task_heads`.

    Args:
        method: a registered mergekit merge method (``wudi``, ``task_arithmetic``, ``ties``, ...),
            or ``"mudsc"`` for experts from different inits (``mergekit_wudi.mudsc.mudsc_merge``).
        parameters: the method's parameters, as in a mergekit YAML (``{"solver": "closed_form"}``);
            per-expert values as a list in task order or a mapping keyed ``task_0``, ``task_1``, ...
        experts: explicit mode: paths of the experts.
        base: the pretrained weights (path or state dict); default: the module at the first fit.
        include: name patterns (glob; a plain name matches as a prefix) of tensors to merge.
        exclude: name patterns of tensors to keep out of the merge (e.g. ``["heads"]``).
        output: folder for snapshots and results; default ``<trainer.default_root_dir>/merge``.
        load_merged: copy the merged weights into the module after the merge.
        num_tasks: sequential mode: merge automatically once this many experts are saved.
        progress: show a progress bar over tensors (also off when the trainer's bar is off).
        shard: under multi-process DDP, spread the per-tensor merges over the ranks and gather
            (else rank 0 computes all of them and the others receive them).
        merge_device: where the merge computes (default: the strategy's root device).
        dataloader: ``method="mudsc"`` only: data for activation statistics (default: the
            trainer's train dataloader).
        reset_to_base: sequential mode: at the start of every fit after the first, load the base
            into the merged tensors of the module, so each task is fine-tuned from the pretrained
            weights even when the same module object is fitted again (not on resume).
    """

    def __init__(
        self,
        method: str = "wudi",
        parameters: Optional[Dict[str, Any]] = None,
        experts: Optional[List[str]] = None,
        base: Optional[Union[str, Dict[str, torch.Tensor]]] = None,
        include: Optional[List[str]] = None,
        exclude: Optional[List[str]] = None,
        output: Optional[str] = None,
        load_merged: bool = True,
        num_tasks: Optional[int] = None,
        progress: bool = True,
        shard: bool = True,
        merge_device: Optional[str] = None,
        dataloader: Optional[Any] = None,
        reset_to_base: bool = True,
    ) -> None:
        super().__init__()
        if experts is not None and len(experts) == 0:
            raise ValueError("experts=[] given: pass at least one expert path, or None for sequential mode")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.method = method
        self.parameters = dict(parameters or {})
        self.experts = [str(p) for p in experts] if experts is not None else None
        self.base = str(base) if isinstance(base, (str, os.PathLike)) else base
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.output = str(output) if output is not None else None
        self.load_merged = load_merged
        self.num_tasks = num_tasks
        self.progress = progress
        self.shard = shard
        self.merge_device = merge_device
        self.dataloader = dataloader
        self.reset_to_base = reset_to_base
        # Checkpointable state: paths only (see state_dict).
        self._run_id = uuid.uuid4().hex
        self._output_dir: Optional[str] = None
        self._base_path: Optional[str] = None
        self._expert_paths: List[str] = []
        self._head_paths: List[str] = []
        self._merged_path: Optional[str] = None
        self._task_heads: Optional[List[StateDict]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, output=self.output)

    # ------------------------------------------------------------------ public state

    @property
    def sequential(self) -> bool:
        return self.experts is None

    @property
    def expert_paths(self) -> List[str]:
        """Experts to merge: the saved snapshots (sequential) or the given paths (explicit)."""
        return list(self._expert_paths) if self.sequential else list(self.experts)

    @property
    def merged_path(self) -> Optional[str]:
        """``<output>/merged.safetensors`` once a merge has finished, else None."""
        return self._merged_path

    @property
    def task_heads(self) -> List[StateDict]:
        """Per-task tensors kept out of the merge (``include``/``exclude``), one dict per task."""
        if self._task_heads is None:
            self._task_heads = [load_state_dict(p) for p in self._head_paths]
        return self._task_heads

    def load_task_head(self, pl_module: torch.nn.Module, task: int) -> None:
        """Put task ``task``'s kept-out tensors (its head) into ``pl_module``."""
        pl_module.load_state_dict(self.task_heads[task], strict=False)

    # ------------------------------------------------------------------ hooks, in firing order

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve ``output``, check the method and its parameter names early (before training)."""
        if stage != "fit":
            return
        self._resolve_output(trainer)
        self._check_method()
        self._sync_from_manifest()
        if not self.sequential:
            for path in self.experts:
                if not Path(path).exists():
                    raise MergeInputError(f"expert file not found: {path}")
            if self.base is None and self._method_needs_base():
                raise MergeInputError(
                    f"experts=... given without base=: method {self.method!r} needs the pretrained weights"
                )
        if isinstance(self.base, str) and not Path(self.base).exists():
            raise MergeInputError(f"base file not found: {self.base}")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sequential mode, first fit: snapshot the pretrained weights as the base (all ranks call)."""
        if not self.sequential:
            return
        if self._base_path is not None:
            if self.reset_to_base and self._expert_paths and trainer.ckpt_path is None:
                self._reset_to_base(trainer, pl_module)
            return
        if self.base is not None:
            if isinstance(self.base, str):
                self._base_path = self.base
            else:
                self._base_path = self._save_on_rank_zero(trainer, self.base, self._output_path("base.safetensors"))
            return
        if trainer.ckpt_path is not None:
            if trainer.strategy.restore_checkpoint_after_setup:
                return  # FSDP & co. restore our state after this hook; on_train_end checks it arrived
            # A checkpoint without our state holds trained, not pretrained, weights.
            raise MergeInputError(
                f"resuming from {trainer.ckpt_path} whose checkpoint has no {type(self).__name__} state: "
                "the pretrained weights are unknown; pass base=<path of the pretrained weights>"
            )
        state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP
        self._base_path = self._save_on_rank_zero(trainer, state, self._output_path("base.safetensors"))

    def _reset_to_base(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fsdp" in type(trainer.strategy).__name__.lower():
            rank_zero_warn(f"{type(self).__name__}: reset_to_base is not applied to an FSDP-sharded module")
            return
        base = load_state_dict(self._base_path)
        names = self._merge_names(base)
        current = pl_module.state_dict()
        for name in names:
            if name in current and current[name].shape != base[name].shape:
                raise MergeInputError(
                    f"cannot reset tensor {name!r} to the base: module shape {tuple(current[name].shape)}, "
                    f"base shape {tuple(base[name].shape)}"
                )
        pl_module.load_state_dict({n: base[n] for n in names}, strict=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sequential mode: save this task's expert (the last hook with the model still on device)."""
        if not self.sequential:
            return
        if self._merged_path is not None or (self.num_tasks is not None and len(self._expert_paths) >= self.num_tasks):
            rank_zero_warn(f"{type(self).__name__}: all experts are already collected; this fit's weights are not saved")
            return
        if self._base_path is None:
            raise MergeInputError("no base snapshot: the callback did not see the start of this fit")
        index = len(self._expert_paths)
        state = trainer.strategy.lightning_module_state_dict()  # full on rank 0 only, under FSDP
        problem = None
        if trainer.is_global_zero:
            base = load_state_dict(self._base_path)
            try:
                validate_merge_inputs(base, [(f"expert {expert_id(index)} (this fit)", state)], self._merge_names(base))
            except MergeInputError as error:
                problem = str(error)
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise MergeInputError(problem)
        path = self._save_on_rank_zero(trainer, state, self._output_path("experts", f"{expert_id(index)}.safetensors"))
        self._expert_paths.append(path)
        self._write_manifest(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Merge when all experts are known (explicit mode, or ``num_tasks`` reached)."""
        if self._merged_path is not None:
            return
        if not self.sequential or (self.num_tasks is not None and len(self._expert_paths) >= self.num_tasks):
            self.merge(trainer, pl_module)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "run_id": self._run_id,
            "output": self._output_dir,
            "base": self._base_path,
            "experts": list(self._expert_paths),
            "heads": list(self._head_paths),
            "merged": self._merged_path,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._run_id = state_dict["run_id"]
        self._output_dir = state_dict["output"]
        self._base_path = state_dict["base"]
        self._expert_paths = list(state_dict["experts"])
        self._head_paths = list(state_dict["heads"])
        self._merged_path = state_dict["merged"]
        self._task_heads = None

    # ------------------------------------------------------------------ the merge

    def merge(self, trainer: Optional[Trainer] = None, pl_module: Optional[LightningModule] = None) -> StateDict:
        """Merge the experts now; write ``merged.safetensors`` (+ heads); load into ``pl_module``.

        Every rank must call it under DDP. Returns the merged tensors (identical on every rank).
        Nothing is written if any input is invalid or the method fails.
        """
        if trainer is not None:
            self._resolve_output(trainer)
        self._check_method()
        self._sync_from_manifest()
        expert_paths = self.expert_paths
        if not expert_paths:
            raise MergeInputError("no experts to merge: no fit has finished yet and experts= was not given")
        experts = [(f"expert {expert_id(i)} ({p})", load_state_dict(p)) for i, p in enumerate(expert_paths)]
        base = self._load_base()
        reference = base if base is not None else experts[0][1]
        names = self._merge_names(reference)
        validate_merge_inputs(base, experts, names, require_change=self.method != "mudsc")

        merged_set = set(names)
        expert_states = [state for _, state in experts]
        if self.method == "mudsc":
            # MuDSC permutes units: each kept-out head must come from its expert permuted into the
            # merged unit order (function-preserving), not from the raw expert.
            merged, expert_states = self._merge_mudsc(trainer, pl_module, experts, names)
        else:
            merged = self._merge_registered(trainer, pl_module, base, experts, names)

        heads = [{n: t for n, t in state.items() if n not in merged_set} for state in expert_states]
        head_names = sorted({n for head in heads for n in head})
        head_paths = [self._output_path("heads", f"{expert_id(i)}.safetensors") for i in range(len(experts))]
        merged_path = self._output_path(MERGED_NAME)
        if trainer is None or trainer.is_global_zero:
            if head_names:
                for head, path in zip(heads, head_paths):
                    save_safetensors_atomic(head, path)
            # merged.safetensors last: its presence means the whole merge is on disk.
            metadata = {"method": self.method, "experts": json.dumps(expert_paths), "base": str(self._base_path)}
            save_safetensors_atomic(merged, merged_path, metadata=metadata)
        self._barrier(trainer)
        self._head_paths = head_paths if head_names else []
        self._task_heads = heads if head_names else []
        self._merged_path = merged_path
        self._write_manifest(trainer)

        if self.load_merged and pl_module is not None:
            if trainer is not None and "fsdp" in type(trainer.strategy).__name__.lower():
                rank_zero_warn(
                    f"{type(self).__name__}: load_merged is not applied to an FSDP-sharded module; "
                    f"load {merged_path} into an unsharded model"
                )
            else:
                self._load_into(pl_module, merged)
        world_size, _ = self._distributed_world(trainer)
        where = f", sharded over {world_size} ranks" if world_size > 1 and self.shard and self.method != "mudsc" else ""
        rank_zero_info(
            f"{type(self).__name__}: merged {len(experts)} experts with {self.method!r}{where} -> {merged_path}"
        )
        return merged

    def _merge_registered(self, trainer, pl_module, base, experts, names) -> StateDict:
        from mergekit.merge_methods import api, get
        from mergekit.merge_methods.base import PerGroupValues

        method = get(self.method)
        inputs: Dict[str, StateDict] = {}
        if base is not None and self._method_needs_base(method):
            inputs[BASE_ID] = base
        for i, (_, state) in enumerate(experts):
            inputs[expert_id(i)] = state
        base_id = BASE_ID if BASE_ID in inputs else None

        # Non-floating buffers (e.g. BatchNorm's step count) differ between experts: not merged, taken as is.
        reference = inputs[base_id] if base_id else experts[0][1]
        floating = [n for n in names if reference[n].is_floating_point()]
        copied = {n: reference[n].clone() for n in names if not reference[n].is_floating_point()}

        per_tensor = {k: v for k, v in self.parameters.items() if isinstance(v, PerGroupValues)}
        for key, value in per_tensor.items():
            if len(value.values) != len(names):
                raise ValueError(f"parameter {key!r}: PerGroupValues needs {len(names)} values (one per merged tensor)")
        per_tensor = {k: dict(zip(names, v.values)) for k, v in per_tensor.items()}
        declared = {p.name for p in method.spec.parameters}
        if "linear" in declared and "linear" not in self.parameters and pl_module is not None:
            linear = linear_weight_names(pl_module)
            per_tensor["linear"] = {n: n in linear for n in names}
        shared = {k: v for k, v in self.parameters.items() if k not in per_tensor}

        world_size, rank = self._distributed_world(trainer)
        if self.shard:
            shares = shard_names(floating, [reference[n].numel() for n in floating], world_size)
        else:  # computed once, on rank 0, then gathered like the shards
            shares = [list(floating)] + [[] for _ in range(world_size - 1)]
        my_names = sorted(shares[rank], key=floating.index)
        device = self._merge_device(trainer)
        outcome: Tuple[str, Any]
        try:
            results: StateDict = {}
            for name in self._progress(trainer, my_names, world_size):
                params = dict(shared)
                params.update({k: PerGroupValues([v[name]]) for k, v in per_tensor.items()})
                tensors = {i: {name: s[name].to(device)} for i, s in inputs.items()}
                with torch.no_grad():
                    out = api.merge_state_dicts(tensors, method, parameters=params, base=base_id)
                results[name] = out[name].detach().cpu()
            outcome = ("ok", results)
        except Exception as error:  # noqa: BLE001  (re-raised on every rank below)
            if world_size == 1:
                raise
            outcome = ("error", f"rank {rank}: {type(error).__name__}: {error}")
        if world_size > 1:
            gathered: List[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, outcome)
        else:
            gathered = [outcome]
        errors = [payload for kind, payload in gathered if kind == "error"]
        if errors:
            raise RuntimeError(f"{type(self).__name__}: merge with {self.method!r} failed: " + "; ".join(errors))
        merged_parts: StateDict = dict(copied)
        for _, payload in gathered:
            merged_parts.update(payload)
        return {n: merged_parts[n] for n in names}

    def _merge_mudsc(self, trainer, pl_module, experts, names) -> StateDict:
        try:
            from mergekit_wudi.mudsc import mudsc_merge
        except ImportError as error:
            raise ImportError(
                f"method='mudsc' needs mergekit_wudi.mudsc.mudsc_merge, which could not be imported: {error}"
            ) from error
        if pl_module is None:
            raise ValueError("method='mudsc' needs the module (merge(trainer, pl_module)) to build the experts")
        dataloader = self.dataloader
        if dataloader is None and trainer is not None:
            dataloader = trainer.train_dataloader
        if dataloader is None:
            raise ValueError("method='mudsc' needs data: pass dataloader= or merge inside a fit")
        keeps_heads = any(n not in set(names) for n in experts[0][1])
        mode = self.parameters.get("mode", "align")
        if keeps_heads and mode != "align":
            raise ValueError(
                f"method='mudsc' with mode={mode!r} cannot keep per-task tensors out of the merge (include/"
                "exclude): zip merges units within a model, so no expert's own head fits the merged body. "
                "Use mode='align', or merge the heads too"
            )
        merged: Optional[StateDict] = None
        aligned: Optional[List[StateDict]] = None
        if trainer is None or trainer.is_global_zero:
            models = []
            attached = getattr(pl_module, "_trainer", None)
            pl_module._trainer = None  # deep-copy the module, not the trainer it points to
            try:
                for _, state in experts:
                    model = copy.deepcopy(pl_module).cpu()
                    model.load_state_dict(state, strict=False)
                    models.append(model)
            finally:
                pl_module._trainer = attached
            parameters = {**self.parameters, "return_info": keeps_heads or self.parameters.get("return_info", False)}
            result = mudsc_merge(models, dataloader, **parameters)
            info = None
            if isinstance(result, tuple):
                result, info = result
            full = result.state_dict()
            merged = {n: full[n].detach().cpu().clone() for n in names}
            if keeps_heads:
                aligned = [{n: t.detach().cpu() for n, t in state.items()} for state in info["aligned_states"]]
        if trainer is not None and trainer.world_size > 1:
            merged, aligned = trainer.strategy.broadcast((merged, aligned))
        return merged, (aligned if aligned is not None else [state for _, state in experts])

    # ------------------------------------------------------------------ helpers

    def _merge_names(self, reference: Mapping[str, torch.Tensor]) -> List[str]:
        names = [n for n in reference if self.include is None or matches_any(n, self.include)]
        return [n for n in names if not matches_any(n, self.exclude)]

    def _check_method(self) -> None:
        if self.method == "mudsc":
            return
        import mergekit_wudi  # noqa: F401  (registers our methods)
        from mergekit import merge_methods

        try:
            method = merge_methods.get(self.method)
        except Exception as error:
            known = sorted(m.spec.name for m in merge_methods.registered_methods())
            raise ValueError(f"unknown merge method {self.method!r}; registered: {', '.join(known)}") from error
        declared = {p.name for p in method.spec.parameters}
        unknown = sorted(set(self.parameters) - declared)
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for merge method {self.method!r}; it takes {sorted(declared)}"
            )

    def _method_needs_base(self, method=None) -> bool:
        if self.method == "mudsc":
            return False
        from mergekit.merge_methods import get
        from mergekit.merge_methods.base import BasePolicy

        method = method or get(self.method)
        return method.spec.contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)

    def _load_base(self) -> Optional[StateDict]:
        if self._base_path is None and self.base is not None:
            if isinstance(self.base, str):
                self._base_path = self.base
            else:
                return {k: v.detach().cpu() for k, v in self.base.items()}
        if self._base_path is None:
            if self._method_needs_base():
                raise MergeInputError(f"method {self.method!r} needs a base, and none was given or snapshotted")
            return None
        if not Path(self._base_path).exists():
            raise MergeInputError(f"base file not found: {self._base_path}")
        return load_state_dict(self._base_path)

    def _resolve_output(self, trainer: Trainer) -> None:
        if self._output_dir is None:
            self._output_dir = str(Path(self.output or os.path.join(trainer.default_root_dir, "merge")).absolute())

    def _output_path(self, *parts: str) -> str:
        if self._output_dir is None:
            self._output_dir = str(Path(self.output or "merge").absolute())
        return str(Path(self._output_dir, *parts))

    def _save_on_rank_zero(self, trainer: Trainer, state: Mapping[str, torch.Tensor], path: str) -> str:
        if trainer.is_global_zero:
            save_safetensors_atomic(dict(state), path)
        self._barrier(trainer)
        return path

    @staticmethod
    def _barrier(trainer: Optional[Trainer]) -> None:
        if trainer is not None:
            trainer.strategy.barrier()

    def _write_manifest(self, trainer: Optional[Trainer]) -> None:
        """Mirror the state to ``<output>/merge_state.json`` so ddp_spawn's parent process can catch up."""
        if trainer is None or trainer.is_global_zero:
            with atomic_file(self._output_path(MANIFEST_NAME)) as tmp:
                Path(tmp).write_text(json.dumps(self.state_dict(), indent=1))
        self._barrier(trainer)

    def _sync_from_manifest(self) -> None:
        # Under ddp_spawn the workers update a pickled copy of this callback; the manifest (same run id only)
        # tells the parent's next fit what they did.
        if self._output_dir is None:
            return
        path = Path(self._output_dir, MANIFEST_NAME)
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if saved.get("run_id") == self._run_id and len(saved.get("experts", [])) > len(self._expert_paths):
            self.load_state_dict(saved)

    @staticmethod
    def _distributed_world(trainer: Optional[Trainer]) -> Tuple[int, int]:
        if trainer is None or trainer.world_size <= 1:
            return 1, 0
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1, 0
        return torch.distributed.get_world_size(), torch.distributed.get_rank()

    def _merge_device(self, trainer: Optional[Trainer]) -> torch.device:
        if self.merge_device is not None:
            return torch.device(self.merge_device)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _progress(self, trainer: Optional[Trainer], names: List[str], world_size: int):
        disabled = (
            not self.progress
            or (trainer is not None and (trainer.progress_bar_callback is None or not trainer.is_global_zero))
        )
        if disabled or not names:
            return names
        from tqdm import tqdm

        share = f" (rank 0's share of {world_size})" if world_size > 1 else ""
        return tqdm(names, desc=f"Merging ({self.method}){share}", unit="tensor", leave=False, dynamic_ncols=True)

    def _load_into(self, pl_module: torch.nn.Module, merged: StateDict) -> None:
        result = pl_module.load_state_dict(merged, strict=False)
        if result.unexpected_keys:
            warnings.warn(f"merged tensors not in the module: {result.unexpected_keys[:5]}")
