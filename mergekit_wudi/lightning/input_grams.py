"""The callback's input-Gram mode (``WUDIMergeCallback(input_grams=InputGrams(...))``, issue 21).

During each task's fit, forward pre-hooks on every merged ``nn.Linear`` (for a PEFT LoRA layer: its
``base_layer``, whose input is the layer's input) add ``X^T X`` of the layer's inputs (float32,
tokens flattened) over the task's last ``last_batches`` training batches; at the end of the fit the
sums are all-reduced over DDP ranks and written next to the expert snapshot
(``<output>/grams/task_<i>.safetensors``, before the expert, so an expert on disk always has its
Grams and resume works). The merge then solves Eq. 1 with these Grams in place of WUDI's
task-vector proxy (:mod:`mergekit_wudi.solvers.input_grams`) for every layer that has them; the
other tensors go through the configured method.

Memory: ``in x in`` float32 per hooked layer, held on the layer's device during the window only
(one task at a time), announced in ``setup`` and refused above ``max_memory``. With ``sketch_rank=k``
the widest layers are sketched (``in x (k + 1)`` floats plus a shared ``in x k`` test matrix: a
streaming Nystrom sketch, see :class:`~mergekit_wudi.solvers.input_grams.GramSketch`) until the total
fits; what cannot fit even then is refused, naming the largest layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from mergekit_wudi.lightning.checks import MergeInputError, StateDict
from mergekit_wudi.lightning.distributed import distributed_world, gather_results, shard_names
from mergekit_wudi.lightning.module_state import tensor_names
from mergekit_wudi.lightning.strategies import Experts, MergeStrategy, linear_flags
from mergekit_wudi.lightning.storage import SnapshotStore
from mergekit_wudi.input_grams import gram_names, gram_tensors, load_grams
from mergekit_wudi.solvers import input_grams as gram_solvers
from mergekit_wudi.solvers.wudi import FLOW_TIME, RIDGE

FLOAT_BYTES = 4
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: Union[int, str], what: str = "max_memory") -> int:
    """``2_000_000_000``, ``"2GB"``, ``"1.5GiB"``, ``"512MB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a byte count or a size like '2GB', got {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(f"{what} must be a byte count or a size like '2GB' / '512MiB', got {value!r}")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return size


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


@dataclasses.dataclass
class InputGrams:
    """Options of the callback's input-Gram mode (see the module docstring).

    Args:
        last_batches: Grams cover each task's last ``last_batches`` training batches (per rank; summed
            over ranks). The fit's planned length (``max_steps`` x ``accumulate_grad_batches``, or
            ``max_epochs`` x batches per epoch) must be known.
        max_memory: budget for one task's Grams on device (bytes or ``"2GB"``); refused above it.
        sketch_rank: if given, layers are sketched at this rank, widest first, until the total fits
            ``max_memory`` (None: exact Grams only).
        solver: ``closed_form`` (exact minimiser) or ``spectral`` (gradient flow for ``flow_time``).
        ridge: ``rho = ridge * trace(C) / in`` (relative to the mean eigenvalue).
        shrink: RegMean's ``alpha``: off-diagonals of each Gram times ``shrink`` (1: none).
        normalize: ``"trace"`` (``w_i = 1 / trace(G_i)``) or ``"none"`` (``w_i = 1``, RegMean's sums).
        flow_time: ``spectral`` only.
        seed: the sketch's test matrix (the same on every rank).
    """

    last_batches: int = 32
    max_memory: Union[int, str] = "2GB"
    sketch_rank: Optional[int] = None
    solver: str = "closed_form"
    ridge: float = RIDGE
    shrink: float = gram_solvers.SHRINK
    normalize: str = "trace"
    flow_time: float = FLOW_TIME
    seed: int = 0

    def check(self) -> None:
        where = "WUDIMergeCallback(input_grams=...)"
        if isinstance(self.last_batches, bool) or not isinstance(self.last_batches, int) or self.last_batches < 1:
            raise ValueError(f"{where}: last_batches must be an integer >= 1, got {self.last_batches!r}")
        parse_bytes(self.max_memory, f"{where}: max_memory")
        if self.sketch_rank is not None and (isinstance(self.sketch_rank, bool) or not isinstance(
                self.sketch_rank, int) or self.sketch_rank < 1):
            raise ValueError(f"{where}: sketch_rank must be None or an integer >= 1, got {self.sketch_rank!r}")
        if self.solver not in gram_solvers.GRAM_SOLVERS:
            raise ValueError(f"{where}: solver must be one of {', '.join(gram_solvers.GRAM_SOLVERS)}, "
                             f"got {self.solver!r}")
        if self.normalize not in gram_solvers.NORMALIZATIONS:
            raise ValueError(f"{where}: normalize must be one of {', '.join(gram_solvers.NORMALIZATIONS)}, "
                             f"got {self.normalize!r}")
        if not 0 <= self.shrink <= 1:
            raise ValueError(f"{where}: shrink must be in [0, 1], got {self.shrink!r}")
        for name in ("ridge", "flow_time"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value != float("inf")):
                raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")

    def solver_options(self) -> Dict[str, Any]:
        return dict(solver=self.solver, ridge=self.ridge, time=self.flow_time, normalize=self.normalize,
                    shrink=self.shrink)


def as_input_grams(value: Union[None, InputGrams, Mapping[str, Any]]) -> Optional[InputGrams]:
    if value is None or isinstance(value, InputGrams):
        options = value
    elif isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(InputGrams)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"WUDIMergeCallback(input_grams=...): unknown option(s) {unknown}; known: {sorted(known)}")
        options = InputGrams(**value)
    else:
        raise TypeError(f"input_grams must be an InputGrams, a mapping of its options, or None; got {type(value)}")
    if options is not None:
        options.check()
    return options


# ---------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class HookedLayer:
    """One merged ``nn.Linear``: the weight's merge name, the module whose input is hooked, and
    the sketch rank (None: exact Gram)."""

    name: str
    module: nn.Module
    n_in: int
    sketch_rank: Optional[int] = None

    @property
    def nbytes(self) -> int:
        if self.sketch_rank is None:
            return self.n_in * self.n_in * FLOAT_BYTES
        return self.n_in * (self.sketch_rank + 1) * FLOAT_BYTES


def hooked_layers(pl_module: nn.Module, names: Sequence[str], reference: StateDict) -> List[HookedLayer]:
    """The ``nn.Linear`` modules whose weight is merged as a linear weight (:func:`linear_flags`)."""
    flags = dict(zip(names, linear_flags(pl_module, reference, names)))
    merge_name = tensor_names(pl_module)
    layers = []
    for prefix, module in pl_module.named_modules():
        if isinstance(module, nn.Linear):
            key = f"{prefix}.weight" if prefix else "weight"
            name = merge_name.get(key, key)
            if flags.get(name, False):
                layers.append(HookedLayer(name, module, module.in_features))
    return layers


def _test_matrix_bytes(layers: Sequence[HookedLayer]) -> int:
    return sum(n * k * FLOAT_BYTES for n, k in {(l.n_in, l.sketch_rank) for l in layers if l.sketch_rank})


def total_bytes(layers: Sequence[HookedLayer]) -> int:
    """One task's Grams (and the sketches' test matrices) on device."""
    return sum(l.nbytes for l in layers) + _test_matrix_bytes(layers)


def plan_memory(layers: List[HookedLayer], options: InputGrams) -> List[HookedLayer]:
    """Exact Grams if they fit ``max_memory``; else, with ``sketch_rank``, sketch the widest layers
    first until they fit; else :class:`MergeInputError` naming the largest layers."""
    budget = parse_bytes(options.max_memory)
    if options.sketch_rank is not None and total_bytes(layers) > budget:
        for layer in sorted(layers, key=lambda l: -l.n_in):
            if total_bytes(layers) <= budget:
                break
            if options.sketch_rank < layer.n_in:
                layer.sketch_rank = options.sketch_rank
    total = total_bytes(layers)
    if total > budget:
        largest = sorted(layers, key=lambda l: -l.nbytes)[:3]
        shown = ", ".join(f"{l.name} (in={l.n_in}: {format_bytes(l.nbytes)}"
                          + (f", sketched at rank {l.sketch_rank})" if l.sketch_rank else ")") for l in largest)
        hint = ("a lower sketch_rank" if options.sketch_rank is not None else
                "sketch_rank=<k> to sketch the widest layers")
        raise MergeInputError(
            f"input_grams: one task's input Grams need {format_bytes(total)} for {len(layers)} layers, above "
            f"max_memory={options.max_memory!r}; largest: {shown}. Raise max_memory, set {hint}, or exclude "
            "layers from the merge"
        )
    return layers


def describe_plan(layers: Sequence[HookedLayer], options: InputGrams, num_tasks: Optional[int]) -> str:
    sketched = [l for l in layers if l.sketch_rank]
    total = total_bytes(layers)
    on_disk = "" if num_tasks is None else f", {format_bytes(total * num_tasks)} on disk for {num_tasks} tasks"
    sketch = (f"; {len(sketched)} widest layers sketched at rank {options.sketch_rank}" if sketched else "")
    return (f"WUDIMergeCallback: input_grams on {len(layers)} linear layers over each task's last "
            f"{options.last_batches} batches: {format_bytes(total)} per task on device (float32){on_disk}"
            f" (budget {options.max_memory}){sketch}")


# ---------------------------------------------------------------------------------------------- collection


def planned_batches(trainer: Trainer) -> float:
    """Training batches this fit will run per rank (``inf`` if unbounded)."""
    bounds = []
    if trainer.max_steps is not None and trainer.max_steps != -1:
        bounds.append(trainer.max_steps * trainer.accumulate_grad_batches)
    if trainer.max_epochs is not None and trainer.max_epochs != -1:
        bounds.append(trainer.num_training_batches * max(trainer.max_epochs, 1))
    return min(bounds) if bounds else float("inf")


def all_reduce_sum_(tensors: Sequence[torch.Tensor], trainer: Optional[Trainer]) -> None:
    """Sum ``tensors`` in place over the ranks of the process group (nothing in a single process)."""
    world_size, _ = distributed_world(trainer)
    if world_size == 1:
        return
    for tensor in tensors:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


class GramCollector:
    """Forward pre-hooks adding ``X^T X`` (or the sketch ``X^T X Omega`` and ``diag``) of each hooked
    layer's input while :attr:`active`. ``mask`` (from the batch's ``attention_mask``, when its shape
    is the input's leading shape) drops padding tokens."""

    def __init__(self, layers: Sequence[HookedLayer], options: InputGrams) -> None:
        self.layers = list(layers)
        self.options = options
        self.active = False
        self.mask: Optional[torch.Tensor] = None
        self.batches = 0
        self.tokens = torch.zeros((), dtype=torch.float64)
        self._sums: Dict[str, Tuple[torch.Tensor, ...]] = {}
        self._tests: Dict[Tuple[int, int, Any], torch.Tensor] = {}
        self._handles: List[Any] = []
        # Layers fed the same tensor (q/k/v, gate/up projections): its Gram is computed once per batch.
        self._shared: Optional[Tuple[torch.Tensor, int, torch.Tensor]] = None

    def start(self) -> None:
        """Register the hooks (once)."""
        if self._handles:
            return
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_pre_hook(self._hook(layer, count_tokens=i == 0)))

    def _test_matrix(self, layer: HookedLayer, device) -> torch.Tensor:
        key = (layer.n_in, layer.sketch_rank, device)
        if key not in self._tests:
            self._tests[key] = gram_solvers.sketch_test_matrix(layer.n_in, layer.sketch_rank, seed=self.options.seed,
                                                               device=device)
        return self._tests[key]

    def _hook(self, layer: HookedLayer, count_tokens: bool):
        def hook(module, args):
            if not self.active or not args:
                return
            x = args[0].detach()
            mask = self.mask
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                x = x[mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).float()
            if count_tokens:
                self.tokens += x.shape[0]
            sums = self._sums.get(layer.name)
            if layer.sketch_rank is None:
                if sums is None:
                    sums = self._sums[layer.name] = (torch.zeros(layer.n_in, layer.n_in, device=x.device),)
                shared = self._shared
                if shared is not None and shared[0] is args[0] and shared[1] == args[0]._version:
                    sums[0].add_(shared[2])
                else:
                    gram = x.T @ x
                    sums[0].add_(gram)
                    # holding the input keeps its memory from being reused by another tensor while cached
                    self._shared = (args[0], args[0]._version, gram)
            else:
                if sums is None:
                    sums = self._sums[layer.name] = (torch.zeros(layer.n_in, layer.sketch_rank, device=x.device),
                                                     torch.zeros(layer.n_in, device=x.device))
                sums[0].addmm_(x.T, x @ self._test_matrix(layer, x.device))
                sums[1].add_(x.square().sum(dim=0))

        return hook

    def end_batch(self) -> None:
        """After a training batch: stop collecting, free the shared-input cache."""
        if self.active:
            self.batches += 1
        self.active, self.mask, self._shared = False, None, None

    def finish(self, trainer: Optional[Trainer]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """Remove the hooks, sum over ranks (every rank calls it), and return the tensors and
        metadata of the Grams file (sketches turned into factors); the sums are freed."""
        self.close()
        device = next((s[0].device for s in self._sums.values()), torch.device("cpu"))
        counts = torch.tensor([float(self.batches), float(self.tokens)], dtype=torch.float64, device=device)
        ordered = []
        for layer in self.layers:  # every rank must reduce the same tensors in the same order
            sums = self._sums.get(layer.name)
            if sums is None:
                shape = [(layer.n_in, layer.n_in)] if layer.sketch_rank is None else [
                    (layer.n_in, layer.sketch_rank), (layer.n_in,)]
                sums = self._sums[layer.name] = tuple(torch.zeros(s, device=device) for s in shape)
            ordered.extend(sums)
        all_reduce_sum_(ordered + [counts], trainer)
        grams: Dict[str, gram_solvers.Gram] = {}
        for layer in self.layers:
            sums = self._sums.pop(layer.name)
            if layer.sketch_rank is None:
                grams[layer.name] = sums[0].cpu()
            else:
                sketch = gram_solvers.nystrom_sketch(sums[0], self._test_matrix(layer, sums[0].device), sums[1])
                grams[layer.name] = gram_solvers.GramSketch(sketch.factor.cpu(), sketch.diagonal.cpu())
        self._tests.clear()
        metadata = {"batches": str(int(counts[0])), "tokens": str(int(counts[1])),
                    "last_batches": str(self.options.last_batches),
                    "sketched": json.dumps({l.name: l.sketch_rank for l in self.layers if l.sketch_rank})}
        return gram_tensors(grams), metadata

    def close(self) -> None:
        self.active, self.mask, self._shared = False, None, None
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attention_mask_of(batch: Any) -> Optional[torch.Tensor]:
    """A batch's ``attention_mask`` (a mapping's key or attribute, as Hugging Face batches have), as bool."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else getattr(batch, "attention_mask", None)
    return mask.bool() if isinstance(mask, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------- the merge


def _check_gram(gram: gram_solvers.Gram, n_in: int, what: str) -> None:
    """A Gram read from a file, before any solve: float, finite, of the weight's input size."""
    parts = {"factor": gram.factor, "diagonal": gram.diagonal} if isinstance(gram, gram_solvers.GramSketch) else {
        "Gram": gram}
    expected = {"factor": (n_in, None), "diagonal": (n_in,), "Gram": (n_in, n_in)}
    for part, tensor in parts.items():
        shape = tuple(tensor.shape)
        if len(shape) != len(expected[part]) or any(e is not None and d != e for d, e in zip(shape, expected[part])):
            raise MergeInputError(f"{what}: {part} of shape {shape}, expected {expected[part]} (None: any) for a "
                                  f"weight with {n_in} inputs")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise MergeInputError(f"{what}: its {part} is not finite floating point ({tensor.dtype})")


def _gram_trace(gram) -> float:
    return float(gram.diagonal.sum() if isinstance(gram, gram_solvers.GramSketch) else gram.diagonal().sum())


# The Grams files' ``source`` when they hold each LoRA layer's A update, not measured inputs (``lora_a_updates``).
LORA_A_UPDATES = "lora_a_updates"


@dataclasses.dataclass
class InputGramMerge(MergeStrategy):
    """Linear weights with input Grams from every expert: Eq. 1 with those Grams
    (:func:`mergekit_wudi.solvers.input_grams.merge_with_grams`); every other tensor: ``inner``.
    ``source``: ``"input_grams"`` (measured) or :data:`LORA_A_UPDATES` (the LoRA A-update proxy)."""

    inner: MergeStrategy = None  # type: ignore[assignment]
    options: InputGrams = dataclasses.field(default_factory=InputGrams)
    store: Optional[SnapshotStore] = None
    source: str = "input_grams"
    name = "input_grams"

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        return True

    @property
    def requires_change(self) -> bool:  # type: ignore[override]
        return self.inner.requires_change

    def check(self) -> None:
        self.options.check()
        if self.inner.name == "mudsc":
            raise MergeInputError(f"{self.source} needs experts fine-tuned from one base; method='mudsc' has none")
        self.inner.check()
        from mergekit.merge_methods.base import PerGroupValues

        per_group = [k for k, v in getattr(self.inner, "parameters", {}).items() if isinstance(v, PerGroupValues)]
        if per_group:
            raise MergeInputError(f"input_grams: per-tensor parameters (PerGroupValues: {per_group}) are not supported "
                                  "with input_grams; give one value for every tensor")

    def _load(self, index: int, label: str) -> Dict[str, gram_solvers.Gram]:
        """Expert ``index``'s Grams file, written by this run; any other file is an error naming it."""
        path = self.store.gram_path(index)
        if not os.path.isfile(path):
            raise MergeInputError(f"{label} has no {self.what} ({path} is missing): it was trained without "
                                  f"{self.source}; train every task with the same callback settings")
        try:
            grams, metadata = load_grams(path)
        except Exception as error:  # noqa: BLE001  (truncated file, a factor without its diagonal, ...)
            raise MergeInputError(f"{label}: its {self.what} file {path} cannot be read "
                                  f"({type(error).__name__}: {error})") from error
        if metadata.get("run_id") != self.store.run_id:
            raise MergeInputError(f"{label}: {path} was not written by this run; its {self.what} cannot be used")
        return grams

    @property
    def what(self) -> str:
        return "LoRA A-update Grams" if self.source == LORA_A_UPDATES else "input Grams"

    def describe(self) -> str:
        return f"{self.what} ({self.options.solver_options()}), else {self.inner.describe()}"

    def merge(self, trainer, pl_module, base, experts: Experts, names):
        grams = [self._load(i, label) for i, (label, _) in enumerate(experts)]
        try:
            with_grams = gram_names(names, grams)
        except ValueError as error:
            raise MergeInputError(f"{error} (train every task with the same {self.source} settings)") from None
        for i, task_grams in enumerate(grams):
            for name in with_grams:
                _check_gram(task_grams[name], base[name].shape[-1], f"{self.what} of {name!r} in {self.store.gram_path(i)}")
        if self.source == LORA_A_UPDATES:
            # an A that did not move (frozen, or one step from B = 0) says nothing of the inputs, and a zero Gram
            # would drop that task's update: such layers go to the inner method
            still = [n for n in with_grams if any(_gram_trace(g[n]) <= 0 for g in grams)]
            if still:
                rank_zero_warn(f"WUDIMergeCallback: the LoRA A of {still[:3]}{' ...' if len(still) > 3 else ''} did "
                               f"not change in some task's fit; these layers are merged with {self.inner.describe()}")
                with_grams = [n for n in with_grams if n not in set(still)]
        rest = [n for n in names if n not in set(with_grams)]
        if rest:
            merged, states = self.inner.merge(trainer, pl_module, base, experts, rest)
        else:
            merged, states = {}, [state for _, state in experts]
        world_size, rank = distributed_world(trainer)
        shares = shard_names(with_grams, [base[n].numel() for n in with_grams], world_size)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        options = self.options.solver_options()

        def compute() -> StateDict:
            out = {}
            for n in shares[rank]:
                layer_grams = [g[n] for g in grams]
                layer_grams = [gram_solvers.GramSketch(g.factor.to(device), g.diagonal.to(device))
                               if isinstance(g, gram_solvers.GramSketch) else g.to(device) for g in layer_grams]
                try:
                    with torch.no_grad():
                        out[n] = gram_solvers.merge_with_grams(
                            base[n].to(device), [state[n].to(device) for _, state in experts], layer_grams, **options,
                        ).cpu()
                except ValueError as error:  # the solver's checks (non-finite products, ...) name the task only
                    raise MergeInputError(f"{self.what} of {n!r}: {error}") from error
            return out

        merged.update(gather_results(compute, trainer, "WUDIMergeCallback: merge with input Grams"))
        del grams
        rank_zero_info(f"WUDIMergeCallback: {len(with_grams)} linear weights merged with {self.what}"
                       + (f", {len(rest)} other tensors with {self.inner.describe()}" if rest else ""))
        return {n: merged[n] for n in names}, states
