"""The callback: hooks in the order Lightning fires them, and a tiny checkpointable state.

:class:`WUDIMergeCallback` is an adapter, like Lightning's ``WeightAveraging``: it collects the
pretrained weights and one set of weights per task, then hands them to a merge strategy
(:mod:`~mergekit_wudi.lightning.strategies`; by default mergekit's registry with ``wudi`` --
WUDI-Merging, arXiv 2503.08099). It never computes a merge itself.

Data path: module state -> ``<output>/base.safetensors`` and ``<output>/experts/task_<i>.safetensors``
(:mod:`~mergekit_wudi.lightning.storage`) -> ``merge_state_dicts`` on each rank's share of the
tensors (:mod:`~mergekit_wudi.lightning.distributed`) -> ``<output>/merged.safetensors``
(+ ``<output>/heads/task_<i>.safetensors`` for tensors kept out of the merge) -> the module.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from mergekit_wudi import lora
from mergekit_wudi.io import load_state_dict, tensor_shapes
from mergekit_wudi.lightning.checks import (
    MergeInputError,
    StateDict,
    check_expert_paths,
    check_finite_results,
    check_num_tasks,
    check_patterns,
    select_names,
    validate_merge_inputs,
)
from mergekit_wudi.lightning import lora_adapters, module_state
from mergekit_wudi.lightning.distributed import broadcast, distributed_world, is_sharded_module
from mergekit_wudi.lightning import input_grams as gram_mode
from mergekit_wudi.input_grams import gram_tensors
from mergekit_wudi.lightning.storage import SnapshotStore, expert_id, run_id_of
from mergekit_wudi.solvers import input_grams as gram_solvers
from mergekit_wudi.lightning.strategies import MergeStrategy, MudscMerge, RegistryMerge


# The callback's default WUDI parameters per expert kind, measured on the quality benchmark (docs/benchmarks.md,
# issue 21): full fine-tunes -> the spectral flow of Eq. 1 on each task vector's top singular directions (README's
# first YAML; the exact minimiser is best on short fine-tunes and falls behind on longer ones); LoRA experts, whose
# task vectors' row spaces (their A factors) say little about the inputs -> Eq. 1 with an isotropic input prior
# on TSV-decorrelated task vectors.
# In sequential mode the callback also knows each LoRA adapter's A when its fit starts: the LoRA layers are then
# merged with Eq. 1 whose input Grams are the A updates (``lora_a_updates``), the other tensors as above.
RECOMMENDED_WUDI: Dict[str, Dict[str, Any]] = {"full": {"solver": "spectral", "rank": "auto"},
                                               "lora": {"solver": "decorrelated"}}


class WUDIMergeCallback(Callback):
    """Merge task experts fine-tuned from one pretrained model, at the end of training.

    WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099) by default; any method in mergekit's
    registry via ``method``. Two modes:

    - sequential (``experts=None``): the first ``trainer.fit`` snapshots the pretrained weights (or
      uses ``base``); the end of every fit saves that task's expert; after ``num_tasks`` experts (or
      an explicit :meth:`merge` call) the experts are merged.
    - explicit (``experts=[paths]``): Lightning ``.ckpt`` files or safetensors, merged at the end of
      the fit; ``base`` is then required for methods that need one.

    ``nn.Linear`` weights go to ``wudi`` as linear weights (not embeddings, LM heads, or a Linear
    tied to an embedding: :func:`~mergekit_wudi.lightning.strategies.linear_flags`). Tensors outside
    ``include`` or inside ``exclude`` (per-task heads) are kept per task in ``<output>/heads`` and
    :attr:`task_heads`. Everything the user wrote is checked in ``setup``, before the first
    training step. To merge another way, override :meth:`build_strategy`.

    Args:
        method: a registered mergekit merge method (``wudi``, ``task_arithmetic``, ``ties``, ...),
            or ``"mudsc"`` for experts from different inits (``mergekit_wudi.mudsc.mudsc_merge``).
        parameters: the method's parameters, as in a mergekit YAML (``{"solver": "closed_form"}``);
            per-expert values as a list in task order or a mapping keyed ``task_0``, ``task_1``, ...
            Default (``None``) for ``wudi``: the recommended data-free configuration for the experts'
            kind, :data:`RECOMMENDED_WUDI` (``solver: decorrelated`` for a PEFT LoRA module, whose LoRA
            layers also get ``lora_a_updates`` in sequential mode; ``solver: spectral, rank: auto`` otherwise,
            docs/lightning.md); ``{}`` is the authors' algorithm (``adam``).
        experts: explicit mode: paths of the experts (a single path is one expert).
        base: the pretrained weights (path or state dict); default: the module at the first fit.
        include: name patterns (glob; a plain name matches as a prefix) of tensors to merge.
        exclude: name patterns of tensors to keep out of the merge (e.g. ``["heads"]``).
        output: folder for snapshots and results; default ``<trainer.default_root_dir>/merge`` (``merge-v1``, ...
            when an earlier run's files are there). A given folder holding files this run would replace
            (another run's snapshots or merge) is refused before the first training step.
        load_merged: copy the merged weights into the module after the merge.
        num_tasks: sequential mode: merge automatically once this many experts are saved.
        progress: show a progress bar over tensors (also off when the trainer's bar is off).
        shard: under multi-process DDP, spread the merge over the ranks and gather
            (else rank 0 computes all of it and the others receive it).
        merge_device: where the merge computes (default: the strategy's root device).
        dataloader: ``method="mudsc"`` only: data for activation statistics (default: the
            trainer's train dataloader).
        reset_to_base: sequential mode: at the start of every fit after the first, load the base
            into the merged tensors of the module, so each task is fine-tuned from the pretrained
            weights even when the same module object is fitted again (not on resume; for a PEFT
            module: its LoRA ``B`` factors are zeroed).
        lora_output: for a module with PEFT LoRA layers, whose snapshots are the effective full
            weights (WUDI merges the updates ``scaling * B_i A_i``): ``"full"`` writes the merged full
            model (loadable without PEFT); ``"adapter"`` also writes one merged PEFT adapter per task
            (:attr:`adapter_paths`; exact for ``closed_form`` / ``spectral``, refused for ``adam`` /
            ``lowrank``).
        input_grams: sequential mode, opt-in: an :class:`~mergekit_wudi.lightning.input_grams.InputGrams`
            (or a dict of its options). Each fit accumulates the input Gram ``X^T X`` of every merged
            ``nn.Linear`` over its last ``last_batches`` batches (saved next to the expert), and the merge
            solves Eq. 1 with these Grams instead of the task-vector proxy (RegMean's objective on task
            vectors, :mod:`mergekit_wudi.solvers.input_grams`); other tensors use ``method``. The memory it
            needs is announced in ``setup`` and refused above ``max_memory``.
        lora_a_updates: sequential mode, PEFT LoRA module: merge its LoRA layers with Eq. 1 whose input Gram
            for task ``i`` is ``dA_i^T dA_i``, the change of that layer's ``A`` over the task's fit (it lies in
            the span of the inputs the layer saw; :func:`mergekit_wudi.solvers.input_grams.lora_update_gram`);
            other tensors use ``method``. Costs ``r x in`` floats per layer on disk, no hooks. ``None``
            (default): on with the recommended parameters (``parameters=None``) unless ``input_grams`` or
            ``lora_output="adapter"`` is set (its merge leaves the span of the experts' ``A`` rows).
    """

    def __init__(
        self,
        method: str = "wudi",
        parameters: Optional[Dict[str, Any]] = None,
        experts: Optional[Union[str, List[str]]] = None,
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
        lora_output: str = "full",
        input_grams: Optional[Union[gram_mode.InputGrams, Dict[str, Any]]] = None,
        lora_a_updates: Optional[bool] = None,
    ) -> None:
        super().__init__()
        experts = check_expert_paths(experts)
        check_num_tasks(num_tasks)
        self.method = method
        # parameters=None with method "wudi": the recommended data-free configuration for the experts' kind,
        # resolved in setup (a PEFT LoRA module gets RECOMMENDED_WUDI["lora"]); {} is the authors' algorithm.
        self._recommended = parameters is None and method == "wudi"
        self.parameters = dict(RECOMMENDED_WUDI["full"]) if self._recommended else dict(parameters or {})
        self.experts = experts
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
        self.lora_output = lora_output
        self.input_grams = gram_mode.as_input_grams(input_grams)
        if self.input_grams is not None and experts is not None:
            raise ValueError("input_grams needs sequential mode (the callback sees each task's fit): "
                             "it cannot be used with experts=[...]")
        if self.input_grams is not None and lora_output == "adapter":
            raise ValueError("input_grams with lora_output='adapter': the Gram merge leaves the span of the experts' "
                             "LoRA A rows, so no exact adapter exists; use lora_output='full'")
        if lora_a_updates is not None and not isinstance(lora_a_updates, bool):
            raise TypeError(f"lora_a_updates must be None, True or False, got {lora_a_updates!r}")
        if lora_a_updates:
            clash = ("experts=[...] (it needs sequential mode, to see each task's fit start)" if experts is not None
                     else "input_grams (the measured Grams replace the proxy)" if self.input_grams is not None
                     else "lora_output='adapter' (the merge leaves the span of the experts' A rows, so no exact "
                          "adapter exists)" if lora_output == "adapter" else None)
            if clash:
                raise ValueError(f"lora_a_updates=True cannot be combined with {clash}")
        self.lora_a_updates = lora_a_updates
        self._a_updates = False  # resolved against the module (_resolve_recommended)
        self._resolved = False  # the defaults above were resolved against the run's module (kept in the state)
        self._a_start: Optional[StateDict] = None  # not state: this fit's A factors (on disk for a resume)
        self._gram_layers: Optional[List[gram_mode.HookedLayer]] = None
        self._gram_collector: Optional[gram_mode.GramCollector] = None
        self._gram_window_start = 0.0
        # Checkpointable state: paths (and the resolved defaults, see state_dict).
        self._run_id = uuid.uuid4().hex
        self._output_dir: Optional[str] = None
        self._base_path: Optional[str] = None
        self._expert_paths: List[str] = []
        self._head_paths: List[str] = []
        self._merged_path: Optional[str] = None
        self._task_heads: Optional[List[StateDict]] = None
        self._saved_this_fit = False  # not state: per fit (see on_fit_end)
        self._versioned_from: Optional[str] = None  # not state: the default folder, when setup moved past it
        self._checked_settings: Optional[str] = None  # not state: the settings already checked

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, output=self.output)

    def build_strategy(self) -> MergeStrategy:
        """The merge strategy for ``method``; override to merge another way."""
        if self.method == MudscMerge.name:
            strategy: MergeStrategy = MudscMerge(parameters=self.parameters, dataloader=self.dataloader)
        else:
            strategy = RegistryMerge(
                name=self.method, parameters=self.parameters, shard=self.shard,
                merge_device=self.merge_device, progress=self.progress,
            )
        if self.input_grams is not None:
            strategy = gram_mode.InputGramMerge(inner=strategy, options=self.input_grams, store=self._store())
        elif self._a_updates:
            strategy = gram_mode.InputGramMerge(inner=strategy, store=self._store(), source=gram_mode.LORA_A_UPDATES)
        return strategy

    # ------------------------------------------------------------------ public, read-only state

    @property
    def sequential(self) -> bool:
        return self.experts is None

    @property
    def output_dir(self) -> Optional[str]:
        """The resolved output folder (absolute), once ``setup`` or :meth:`merge` has run."""
        return self._output_dir

    @property
    def expert_paths(self) -> List[str]:
        """Experts to merge: the saved snapshots (sequential) or the given paths (explicit)."""
        return list(self._expert_paths) if self.sequential else list(self.experts)

    @property
    def merged_path(self) -> Optional[str]:
        """``<output>/merged.safetensors`` once a merge has finished, else None."""
        return self._merged_path

    @property
    def adapter_paths(self) -> List[str]:
        """``lora_output="adapter"``: the merged PEFT adapter folder of each task, once merged."""
        if self.lora_output != "adapter" or self._merged_path is None:
            return []
        return [lora_adapters.adapter_path(self._store(), i) for i in range(len(self.expert_paths))]

    @property
    def task_heads(self) -> List[StateDict]:
        """Per-task tensors kept out of the merge (``include``/``exclude``), one dict per task
        (read from ``<output>/heads`` at first use after a merge)."""
        if self._task_heads is None or len(self._task_heads) != len(self._head_paths):
            self._task_heads = [load_state_dict(p) for p in self._head_paths]
        return self._task_heads

    def load_task_head(self, pl_module: torch.nn.Module, task: int) -> None:
        """Put task ``task``'s kept-out tensors (its head) into ``pl_module``."""
        module_state.load_weights(pl_module, self.task_heads[task])

    # ------------------------------------------------------------------ hooks, in firing order

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Agree on the run across ranks, then check everything the user wrote, before training."""
        if stage != "fit":
            return
        self._run_id, self._output_dir = broadcast(trainer, (self._run_id, self._resolve_output(trainer)))
        self._refuse_inputs_in_output()
        self._recover()
        strategy = self.build_strategy()
        self._check_settings(strategy)
        strategy.check_experts(self.num_tasks if self.sequential else len(self.experts))
        if not is_overridden("configure_model", pl_module):  # else its layers exist only in on_fit_start
            self._check_module(trainer, pl_module)
        if not self.sequential and self.base is None and strategy.needs_base:
            raise MergeInputError(
                f"experts=... given without base=: method {self.method!r} needs the pretrained weights"
            )
        if not self.sequential:
            self._check_expert_files(strategy)
        elif isinstance(self.base, str):
            self._read_shapes(self.base, "base")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sequential mode, first fit: snapshot the pretrained weights as the base (all ranks call).

        A fit after the round is finished is refused here, before its first step: the checkpoint a
        resumed fit starts from has been restored by now (except under FSDP & co.), so the state
        checked is the one the fit runs with."""
        self._claim_output(trainer)
        if is_overridden("configure_model", pl_module):
            self._check_module(trainer, pl_module)
        if not self.sequential:
            return
        self._saved_this_fit = False
        if trainer.ckpt_path is None or not trainer.strategy.restore_checkpoint_after_setup:
            self._refuse_fit_after_round()
        if self._base_path is not None:
            if self.reset_to_base and self._expert_paths and trainer.ckpt_path is None:
                self._reset_to_base(trainer, pl_module)
            return
        if self.base is not None:
            self._base_path = self.base if isinstance(self.base, str) else self._store().save(
                trainer, self.base, self._store().base_path)
            return
        if trainer.ckpt_path is not None:
            if trainer.strategy.restore_checkpoint_after_setup:
                return  # FSDP & co. restore our state after this hook; on_train_end checks it arrived
            # A checkpoint without our state holds trained, not pretrained, weights.
            raise MergeInputError(
                f"resuming from {trainer.ckpt_path} whose checkpoint has no {type(self).__name__} state: "
                "the pretrained weights are unknown; pass base=<path of the pretrained weights>"
            )
        state = module_state.pretrained_weights(trainer, pl_module)  # a collective under FSDP
        self._base_path = self._store().save(trainer, state, self._store().base_path)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``input_grams``: prepare this task's Gram window (the last ``last_batches`` planned batches).
        ``lora_a_updates``: note the LoRA ``A`` factors this task starts from (a resumed fit reads them back)."""
        if not self.sequential or self._merged_path is not None or self._all_experts_saved():
            return
        if self._a_updates and is_sharded_module(trainer):  # FSDP & co.: A is sharded in place
            if self.lora_a_updates:
                raise MergeInputError("lora_a_updates=True is not supported on an FSDP-sharded module")
            rank_zero_warn(f"{type(self).__name__}: lora_a_updates is off on an FSDP-sharded module; its LoRA "
                           f"layers are merged with {self.parameters}")
            self._a_updates = False
        if self._a_updates:
            self._refuse_experts_without_a_updates()
            self._a_start = self._lora_a_start(trainer, pl_module)
        if self.input_grams is None:
            return
        planned = gram_mode.planned_batches(trainer)
        if planned == float("inf"):
            raise MergeInputError("input_grams needs a fit of known length to find its last batches: "
                                  "set max_steps or max_epochs")
        self._gram_window_start = planned - self.input_grams.last_batches
        self._gram_collector = gram_mode.GramCollector(self._gram_layers or [], self.input_grams)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        collector = self._gram_collector
        if collector is not None and trainer.fit_loop.epoch_loop.total_batch_idx >= self._gram_window_start:
            collector.start()
            collector.mask = gram_mode.attention_mask_of(batch)
            collector.active = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._gram_collector is not None:
            self._gram_collector.end_batch()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """``input_grams``: a failed fit leaves no hooks on the module and no Grams on device."""
        self._close_input_grams()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sequential mode: save this task's expert (the last hook with the model still on device)."""
        if not self.sequential:
            return
        if self._merged_path is not None or self._all_experts_saved():
            rank_zero_warn(f"{type(self).__name__}: all experts are collected; this fit's weights are not saved")
            self._close_input_grams()
            return
        if self._base_path is None:
            raise MergeInputError("no base snapshot: the callback did not see the start of this fit")
        self._save_expert(trainer, pl_module)

    def _save_expert(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate the module's weights against the base and save them as the next expert."""
        index = len(self._expert_paths)
        state = module_state.trained_weights(trainer, pl_module)  # full on rank 0 only, under FSDP
        problem = None
        if trainer.is_global_zero:
            base = load_state_dict(self._base_path)
            try:
                validate_merge_inputs(base, [(f"expert {expert_id(index)} (this fit)", state)], self._merge_names(base))
            except MergeInputError as error:
                problem = str(error)
        problem = broadcast(trainer, problem)
        if problem is not None:
            raise MergeInputError(problem)
        self._save_input_grams(trainer, index)  # before the expert: an expert on disk has its Grams
        self._save_a_update_grams(trainer, pl_module, index)
        path = self._store().save(trainer, state, self._store().expert_path(index))
        if self.lora_output == "adapter":
            lora_adapters.save_factors(self._store(), trainer, pl_module, path)
        self._expert_paths.append(path)
        self._saved_this_fit = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Merge when all experts are known (explicit mode, or ``num_tasks`` reached).

        Sequential mode first catches up with a crashed run: a resumed fit whose checkpoint was saved
        at its last step runs no step (Lightning then skips ``on_train_end``), so the expert that run
        saved after its checkpoint is found on disk (labelled with the run id), or, if the crash came
        before it was written, saved now from the restored weights."""
        if self._merged_path is not None:
            return
        if self.sequential:
            known = len(self._expert_paths)
            self._recover()
            if not self._saved_this_fit and len(self._expert_paths) == known and not self._all_experts_saved():
                self._save_expert_without_training(trainer, pl_module)
            if not self._all_experts_saved():
                return
        self.merge(trainer, pl_module)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "run_id": self._run_id,
            "output": self._output_dir,
            "base": self._base_path,
            "experts": list(self._expert_paths),
            "heads": list(self._head_paths),
            "merged": self._merged_path,
            # the defaults as resolved against the run's module, for a merge() without it (a restored callback)
            **({"recommended": {"parameters": dict(self.parameters), "lora_a_updates": self._a_updates}}
               if self._resolved else {}),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._run_id = state_dict["run_id"]
        self._output_dir = state_dict["output"]
        self._base_path = state_dict["base"]
        self._expert_paths = list(state_dict["experts"])
        self._head_paths = list(state_dict["heads"])
        self._merged_path = state_dict["merged"]
        self._task_heads = None
        recommended = state_dict.get("recommended")
        if recommended is not None:
            if self._recommended:
                self.parameters = dict(recommended["parameters"])
            if self.lora_a_updates is None:
                self._a_updates = recommended["lora_a_updates"]
            self._resolved = True

    # ------------------------------------------------------------------ the merge

    def merge(self, trainer: Optional[Trainer] = None, pl_module: Optional[LightningModule] = None) -> StateDict:
        """Merge the experts now; write ``merged.safetensors`` (+ heads); load into ``pl_module``.

        Every rank must call it under DDP. Returns the merged tensors (identical on every rank).
        Nothing is written if any input is invalid, the method fails or its result is not finite.
        """
        self._output_dir = broadcast(trainer, self._resolve_output(trainer))
        if pl_module is not None and not self._resolved:  # the run's module decided them; another one does not
            self._resolve_recommended(pl_module)
        self._refuse_inputs_in_output()
        self._refuse_other_runs_output()
        strategy = self.build_strategy()
        self._check_settings(strategy)
        self._recover()
        expert_paths = self.expert_paths
        if not expert_paths:
            if self.sequential and self._base_path is None and self.output is None:
                self._output_dir = None  # nothing ran: a later fit still picks its folder under default_root_dir
            raise MergeInputError("no experts to merge: no fit has finished yet and experts= was not given")
        strategy.check_experts(len(expert_paths))
        experts = [(self._expert_label(i, p), self._read(load_state_dict, p, "expert"))
                   for i, p in enumerate(expert_paths)]
        base = self._load_base(strategy)
        names = self._check_inputs(strategy, base, experts, require_change=strategy.requires_change)

        merged, expert_states = strategy.merge(trainer, pl_module, base, experts, names)
        check_finite_results(merged, strategy.describe())
        self._write_results(trainer, pl_module, base, merged, expert_states, expert_paths)
        if self.load_merged and pl_module is not None:
            if is_sharded_module(trainer):
                rank_zero_warn(
                    f"{type(self).__name__}: load_merged is not applied to an FSDP-sharded module; "
                    f"load {self._merged_path} into an unsharded model"
                )
            else:
                module_state.load_weights(pl_module, merged)
        world_size, _ = distributed_world(trainer)
        where = f", sharded over {world_size} ranks" if world_size > 1 and getattr(strategy, "shard", False) else ""
        rank_zero_info(f"{type(self).__name__}: merged {len(experts)} experts with {self.method!r} "
                       f"{self.parameters}{where} -> {self._merged_path}")
        return merged

    def _write_results(self, trainer, pl_module, base, merged: StateDict, expert_states: List[StateDict],
                       expert_paths) -> None:
        """Heads and adapters first, ``merged.safetensors`` last: its presence means the whole merge is on disk."""
        store = self._store()
        heads = [{n: t for n, t in state.items() if n not in merged} for state in expert_states]
        if self.lora_output == "adapter":
            head_names = sorted({n for head in heads for n in head})
            factors = lora_adapters.adapter_factors(merged, base, expert_paths, head_names, self.method,
                                                    self.parameters)
            lora_adapters.save_adapters(store, trainer, pl_module, factors, heads)
        kept = any(heads)
        self._head_paths = [store.save(trainer, h, store.head_path(i)) for i, h in enumerate(heads)] if kept else []
        self._task_heads = heads if kept else []
        metadata = {"method": self.method, "parameters": json.dumps(self.parameters, default=str),
                    "experts": json.dumps(expert_paths), "base": str(self._base_path)}
        self._merged_path = store.save(trainer, merged, store.merged_path, metadata=metadata)

    # ------------------------------------------------------------------ helpers

    def _all_experts_saved(self) -> bool:
        return self.num_tasks is not None and len(self._expert_paths) >= self.num_tasks

    def _refuse_fit_after_round(self) -> None:
        """Another fit after the merge (or after the last expert) would train from the base and its
        weights would be dropped: an error before it starts, saying how to go on."""
        name = type(self).__name__
        if self._merged_path is not None:
            raise MergeInputError(
                f"{name}: this callback already merged its {len(self._expert_paths)} experts into "
                f"{self._merged_path}; a further fit with it would train weights that are never merged (and with "
                "reset_to_base it would first put the base weights back into the module). To fine-tune the merged "
                f"model, fit without this callback; to merge a new set of tasks, use a new {name} (with another "
                "output= to keep this round's files)"
            )
        if self._all_experts_saved():
            raise MergeInputError(
                f"{name}: all {self.num_tasks} experts are saved but not merged (did the merge at the end of the "
                "last fit fail?); a further fit would not be used. Call callback.merge(trainer, model) to merge "
                "them, or resume the interrupted fit with fit(..., ckpt_path=<its last checkpoint>)"
            )

    def _save_expert_without_training(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """This fit saved no expert because it ran no training step. Resumed from a checkpoint taken at
        the end of training, the module holds this task's trained weights: save them. Otherwise
        (``limit_train_batches=0``, ``max_steps`` already reached) there is nothing to save: warn."""
        task = expert_id(len(self._expert_paths))
        if trainer.ckpt_path is None:
            rank_zero_warn(f"{type(self).__name__}: this fit ran no training step; no expert saved for {task}")
            return
        if is_sharded_module(trainer):
            raise MergeInputError(
                f"resumed from {trainer.ckpt_path} at the end of training, but {task}'s expert was not saved "
                "before the crash and an FSDP-sharded module cannot be snapshotted after the fit: resume from "
                "an earlier checkpoint (the fit then saves it at its end)"
            )
        self._save_expert(trainer, pl_module)

    def _merge_names(self, reference) -> List[str]:
        return select_names(list(reference), self.include, self.exclude)

    @staticmethod
    def _expert_label(index: int, path: str) -> str:
        return f"expert {expert_id(index)} ({path})"

    @staticmethod
    def _read(read, path: str, role: str):
        """``read(path)``, with a missing or unreadable file an error naming it and its role."""
        try:
            return read(path)
        except FileNotFoundError:
            raise MergeInputError(f"{role} file not found: {path}") from None
        except ValueError as error:
            raise MergeInputError(f"{role} file {error}") from error

    def _read_shapes(self, path: str, role: str) -> StateDict:
        """A file's tensors as meta tensors of their shapes: its header (safetensors) or a memory map."""
        shapes = self._read(tensor_shapes, path, role)
        return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}

    def _check_inputs(self, strategy: MergeStrategy, base: Optional[StateDict], experts, *,
                      require_change: bool) -> List[str]:
        """The tensors to merge, after checking the experts against the reference (the base, else the
        first expert): patterns, names, shapes, values (unless meta tensors), heads and LoRA factors."""
        reference = base if base is not None else experts[0][1]
        self._check_patterns(reference, "the experts" if base is None else "the base")
        names = self._merge_names(reference)
        validate_merge_inputs(base, experts, names, require_change=require_change)
        lora_adapters.refuse_factor_states(experts)
        merged = set(names)
        strategy.check_kept_out([n for n in reference if n not in merged])
        return names

    def _refuse_inputs_in_output(self) -> None:
        """An expert or base file given by path must not lie where this callback writes (e.g. last
        round's ``merged.safetensors`` merged again into the same ``output``): it would be overwritten."""
        store = self._store()
        given = [] if self.sequential else [(f"experts[{i}]", p) for i, p in enumerate(self.experts)]
        given += [("base", self.base)] if isinstance(self.base, str) else []
        for where, path in given:
            if store.writes(path):
                raise MergeInputError(
                    f"{where} {path!r} lies where this callback writes its results (output={str(store.folder)!r}: "
                    "base.safetensors, merged.safetensors, experts/, grams/, heads/, adapters/), so the merge would "
                    "overwrite it; give another output= or copy the file elsewhere first"
                )

    def _check_expert_files(self, strategy: MergeStrategy) -> None:
        """Explicit mode, in ``setup``: every expert (and the base) is readable and fits the others,
        checked from file headers / memory maps, so a bad file is named before any training."""
        base = None
        if strategy.needs_base:
            base = self._read_shapes(self.base, "base") if isinstance(self.base, str) else {
                name: torch.empty(t.shape, device="meta") for name, t in self.base.items()}
        experts = [(self._expert_label(i, p), self._read_shapes(p, "expert")) for i, p in enumerate(self.experts)]
        self._check_inputs(strategy, base, experts, require_change=False)

    def _check_settings(self, strategy: MergeStrategy) -> None:
        """``strategy.check()`` once per setting, so that its warnings (an option that is ignored) are said
        once, not again at every fit and at the merge."""
        settings = repr((self.method, self.parameters, self.input_grams, self._a_updates))
        if settings != self._checked_settings:
            strategy.check()
            self._checked_settings = settings

    def _check_patterns(self, state, where: str) -> None:
        check_patterns(list(state), self.include, self.exclude, where)

    def _resolve_recommended(self, pl_module: LightningModule) -> None:
        """``parameters=None``: :data:`RECOMMENDED_WUDI` for the module's kind (a PEFT LoRA model or not);
        whether ``lora_a_updates`` applies."""
        peft = lora.is_peft_model(pl_module)
        if self._recommended:
            self.parameters = dict(RECOMMENDED_WUDI["lora" if peft else "full"])
        if self.lora_a_updates is None:
            self._a_updates = (self._recommended and peft and self.sequential and self.input_grams is None
                               and self.lora_output != "adapter")
        elif self.lora_a_updates and not peft:
            raise MergeInputError("lora_a_updates=True needs a module with PEFT LoRA layers; this one has none")
        else:
            self._a_updates = self.lora_a_updates
        self._resolved = True

    def _lora_a_factors(self, pl_module: LightningModule) -> StateDict:
        """``{weight name: A}`` of the merged LoRA layers (not ``fan_in_fan_out`` ones, whose inputs are the other side)."""
        merged = set(self._merge_names(list(module_state.merge_view(pl_module))))
        return {name: f.A.detach().cpu().clone() for name, f in lora.lora_factors(pl_module, linear_only=True).items()
                if name in merged and not f.fan_in_fan_out}

    def _refuse_experts_without_a_updates(self) -> None:
        """Every expert saved before this fit needs its A-update Grams (a resume with ``lora_a_updates`` switched
        on after some tasks were trained without it would fail only at the merge)."""
        for index in range(len(self._expert_paths)):
            path = Path(self._store().gram_path(index))
            if run_id_of(path) != self._run_id:
                raise MergeInputError(f"lora_a_updates: {expert_id(index)} was trained without it ({path} is missing); "
                                      "resume with the settings its fit had (lora_a_updates=False)")

    def _saved_a_start(self, index: int, current: StateDict) -> Optional[StateDict]:
        """The A factors task ``index`` started from, as this run saved them (None: not on disk), checked against
        the module's ``current`` ones (names, shapes, float, finite)."""
        path = self._store().a_start_path(index)
        if run_id_of(Path(path)) != self._run_id:
            return None
        label = f"the LoRA A start file {path}"
        saved = self._read(load_state_dict, path, "LoRA A start")
        validate_merge_inputs(current, [(label, saved)], list(current), require_change=False)
        not_float = [name for name in current if not saved[name].is_floating_point()]
        if not_float:
            raise MergeInputError(f"{label} holds non-float tensors, e.g. {not_float[:3]}")
        return saved

    def _lora_a_start(self, trainer: Trainer, pl_module: LightningModule) -> StateDict:
        index = len(self._expert_paths)
        if trainer.ckpt_path is not None:
            saved = self._saved_a_start(index, self._lora_a_factors(pl_module))
            if saved is not None:
                return saved  # a resumed fit: A has moved since this task started
            rank_zero_warn(f"{type(self).__name__}: resuming {expert_id(index)}'s fit without the LoRA A it started "
                           f"from ({self._store().a_start_path(index)}): its A update counts from the resumed step only")
        state = self._lora_a_factors(pl_module)
        self._store().save(trainer, state, self._store().a_start_path(index))
        return state

    def _save_a_update_grams(self, trainer: Trainer, pl_module: LightningModule, index: int) -> None:
        """``lora_a_updates``: this fit's ``dA^T dA`` per LoRA layer (as rank-r factors) next to its expert."""
        start, self._a_start = self._a_start, None
        if not self._a_updates:
            return
        end = self._lora_a_factors(pl_module)
        start = start if start is not None else self._saved_a_start(index, end)
        if start is None:
            raise MergeInputError("lora_a_updates: the callback did not see the start of this fit's training, "
                                  f"so {expert_id(index)}'s A update is unknown")
        grams = {name: gram_solvers.lora_update_gram(start[name], end[name]) for name in end}
        self._store().save(trainer, gram_tensors(grams), self._store().gram_path(index),
                           metadata={"source": gram_mode.LORA_A_UPDATES})

    def _check_module(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The patterns and ``lora_output`` against the module (PEFT modules: in base naming)."""
        module_state.check_module(pl_module, is_sharded_module(trainer))
        names = list(module_state.merge_view(pl_module))
        self._check_patterns(names, "the module")
        merged = set(self._merge_names(names))
        self.build_strategy().check_kept_out([n for n in names if n not in merged])
        self._resolve_recommended(pl_module)
        self._check_settings(self.build_strategy())  # again, now that the module decided the strategy
        lora_adapters.check_lora_output(self.lora_output, pl_module, self.method, self.parameters, sorted(merged))
        self._plan_input_grams(pl_module)

    def _plan_input_grams(self, pl_module: LightningModule) -> None:
        """``input_grams``: which layers get hooks and what their Grams cost; announced, refused above
        ``max_memory`` (before the first training step)."""
        if self.input_grams is None:
            return
        view = module_state.merge_view(pl_module)
        layers = gram_mode.hooked_layers(pl_module, self._merge_names(view), view)
        if not layers:
            raise MergeInputError("input_grams: no merged nn.Linear in the module (check include/exclude)")
        self._gram_layers = gram_mode.plan_memory(layers, self.input_grams)
        rank_zero_info(gram_mode.describe_plan(self._gram_layers, self.input_grams, self.num_tasks))

    def _save_input_grams(self, trainer: Trainer, index: int) -> None:
        """Sum this fit's Grams over the ranks and write them (rank 0); free them."""
        collector, self._gram_collector = self._gram_collector, None
        if self.input_grams is None:
            return
        if collector is None:
            raise MergeInputError("input_grams: the callback did not see the start of this fit's training")
        tensors, metadata = collector.finish(trainer)
        if int(metadata["batches"]) == 0:
            raise MergeInputError(
                f"input_grams: expert {expert_id(index)}'s fit ended before its Gram window (the last "
                f"{self.input_grams.last_batches} of the planned batches) began (early stopping?); lower last_batches")
        if int(metadata["batches"]) < self.input_grams.last_batches * distributed_world(trainer)[0]:
            rank_zero_warn(f"{type(self).__name__}: input Grams of {expert_id(index)} cover {metadata['batches']} "
                           f"batches (over all ranks), fewer than last_batches={self.input_grams.last_batches} per rank")
        self._store().save(trainer, tensors, self._store().gram_path(index), metadata=metadata)

    def _close_input_grams(self) -> None:
        if self._gram_collector is not None:
            self._gram_collector.close()
            self._gram_collector = None

    def _load_base(self, strategy: MergeStrategy) -> Optional[StateDict]:
        if self._base_path is None and isinstance(self.base, dict):
            return {k: v.detach().cpu() for k, v in self.base.items()}
        self._base_path = self._base_path or self.base
        if self._base_path is None:
            if strategy.needs_base:
                raise MergeInputError(f"method {self.method!r} needs a base, and none was given or snapshotted")
            return None
        return self._read(load_state_dict, self._base_path, "base")

    def _reset_to_base(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_sharded_module(trainer):
            rank_zero_warn(f"{type(self).__name__}: reset_to_base is not applied to an FSDP-sharded module")
            return
        base = load_state_dict(self._base_path)
        module_state.reset_weights(pl_module, base, self._merge_names(base))

    def _resolve_output(self, trainer: Optional[Trainer]) -> str:
        """``output``, else ``<default_root_dir>/merge``, or ``merge-v1``, ``merge-v2``, ... when an earlier run's
        files are there (as ModelCheckpoint versions a file name rather than replace another run's checkpoint).
        Decided once, in ``setup`` (or by a :meth:`merge` without a fit); a resumed fit's state brings its own."""
        if self._output_dir is None:
            if self.output is not None:
                self._output_dir = str(Path(self.output).absolute())
            else:
                root = Path(trainer.default_root_dir if trainer is not None else ".").absolute()
                folder, version = root / "merge", 0
                while SnapshotStore(str(folder), self._run_id).other_runs_files():
                    version += 1
                    folder = root / f"merge-v{version}"
                self._versioned_from = str(root / "merge") if version else None
                self._output_dir = str(folder)
        return self._output_dir

    def _claim_output(self, trainer: Trainer) -> None:
        """``on_fit_start``, once a resumed fit's state (whose run id labels its files) is back: the output folder
        must not hold another run's files, which this fit would replace or mix with its own."""
        if trainer.ckpt_path is not None and trainer.strategy.restore_checkpoint_after_setup:
            return  # FSDP & co.: the state (run id) comes back after this hook
        if self._versioned_from is not None and trainer.ckpt_path is None:
            rank_zero_info(f"{type(self).__name__}: {self._versioned_from} holds an earlier run's files; this run "
                           f"writes to {self._output_dir}")
        self._versioned_from = None
        self._refuse_other_runs_output()

    def _refuse_other_runs_output(self) -> None:
        found = self._store().other_runs_files()
        if found:
            names = ", ".join(str(p.relative_to(self._store().folder)) for p in found[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise MergeInputError(
                f"output={self._output_dir!r} already holds another run's results ({names}{more}), which this run "
                "would replace or mix with its own; give another output=, move them away, or leave output unset "
                "(a fresh merge-v<N> folder under default_root_dir is then used)"
            )

    def _store(self) -> SnapshotStore:
        return SnapshotStore(self._resolve_output(None), self._run_id)

    def _recover(self) -> None:
        """Catch up with what a pickled copy of this callback saved (``ddp_spawn``), see
        :meth:`SnapshotStore.recover`."""
        if self._output_dir is None or not Path(self._output_dir).is_dir():
            return
        found = self._store().recover(self._expert_paths if self.sequential else [])
        if self._base_path is None and "base" in found:
            self._base_path = found["base"]
        if self.sequential:
            self._expert_paths = found["experts"]
        if self._merged_path is None and "merged" in found:
            self._merged_path, self._head_paths, self._task_heads = found["merged"], found["heads"], None
