"""The merged LoRA adapter output of the callback (``lora_output="adapter"``, issue #14).

The merge itself always works on full weights (:mod:`.module_state`); on request the callback also
writes, per task, a PEFT adapter folder ``<output>/adapters/task_<i>`` holding the merged update as
LoRA factors of rank <= the sum of the experts' ranks (:func:`mergekit_wudi.lora_adapter.merged_adapter_factors`)
and that task's ``modules_to_save`` head, loadable with ``PeftModel.from_pretrained``. It is exact
only when the merged update stays in the span of the experts' ``A`` rows: WUDI's ``closed_form`` /
``spectral`` solvers (``adam`` / ``lowrank`` are refused in ``setup``), task arithmetic; other
methods are checked when the adapter is built, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mergekit_wudi import lora, lora_adapter
from mergekit_wudi.lightning import module_state
from mergekit_wudi.lightning.checks import MergeInputError, StateDict
from mergekit_wudi.lightning.distributed import barrier, is_global_zero
from mergekit_wudi.lightning.storage import SnapshotStore, expert_id

LORA_OUTPUTS = ("full", "adapter")
Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def wudi_solver(method: str, parameters: Mapping[str, Any]) -> Optional[str]:
    """The WUDI solver a merge will use (its default when not given); None for other methods."""
    if method != "wudi":
        return None
    from mergekit import merge_methods

    default = {p.name: p.default for p in merge_methods.get("wudi").spec.parameters}["solver"]
    return parameters.get("solver", default)


def check_lora_output(lora_output: str, pl_module: nn.Module, method: str, parameters: Mapping[str, Any],
                      merge_names: Sequence[str]) -> None:
    """``lora_output`` is known; ``"adapter"`` needs a PEFT LoRA module on linear layers, a merge that
    keeps the low-rank structure, and every trained tensor of the merge (``merge_names``) LoRA-wrapped:
    an adapter cannot carry a merged head (``modules_to_save``), so heads must be excluded."""
    if lora_output not in LORA_OUTPUTS:
        raise MergeInputError(f"lora_output must be one of {LORA_OUTPUTS}, got {lora_output!r}")
    if lora_output == "full":
        return
    if not lora.is_peft_model(pl_module):
        raise MergeInputError("lora_output='adapter' needs a module with PEFT LoRA layers (peft.get_peft_model)")
    solver = wudi_solver(method, parameters)
    if solver is not None and solver not in lora.EXACT_SOLVERS:
        raise MergeInputError(
            f"lora_output='adapter' with solver {solver!r}: its merged update leaves the span of the experts' "
            f"LoRA A rows, so no exact adapter exists; use solver {' or '.join(lora.EXACT_SOLVERS)}, "
            "or lora_output='full' (the merged full weights)"
        )
    try:
        wrapped = set(lora.lora_factors(pl_module))
    except lora.UnsupportedLoraError as error:
        raise MergeInputError(f"lora_output='adapter': {error}") from error
    merge_name = module_state.tensor_names(pl_module)
    trained = {merge_name[key] for key, p in pl_module.named_parameters() if p.requires_grad and key in merge_name}
    carried = sorted(n for n in set(merge_names) & trained if n not in wrapped)
    if carried:
        raise MergeInputError(_not_carried(carried, "are trained (requires_grad)"))


def _not_carried(names: Sequence[str], why: str) -> str:
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    return (
        f"lora_output='adapter': tensor(s) {list(names)[:5]} {why} but are not LoRA-wrapped weights, and a "
        f"LoRA adapter cannot carry their merged values: keep them out of the merge with exclude={modules[:5]} "
        "(each task keeps its own, see task_heads), or use lora_output='full'"
    )


def refuse_factor_states(experts: Sequence[Tuple[str, StateDict]]) -> None:
    """Explicit-mode experts saved from a PEFT module hold LoRA factors, not weights: merging them
    as weights would be wrong (issue #14), so they are refused."""
    for label, state in experts:
        factors = [n for n in state if ".lora_A." in n or ".lora_B." in n]
        if factors:
            raise MergeInputError(
                f"{label} holds LoRA factors (e.g. {factors[0]!r}), not weights: train the experts with this "
                "callback in sequential mode (it snapshots their effective weights), or pass merge_and_unload() weights"
            )


def factors_path(expert_path: str) -> str:
    return str(Path(expert_path).with_suffix("")) + ".lora.safetensors"


def adapter_path(store: SnapshotStore, index: int) -> str:
    return str(store.folder / "adapters" / expert_id(index))


def save_factors(store: SnapshotStore, trainer, pl_module: nn.Module, expert_path: str) -> None:
    """Next to an expert snapshot: its LoRA factors (the span a merged adapter is built on)."""
    factors = lora.lora_factors(pl_module)
    tensors = {f"{n}.lora_A": f.A for n, f in factors.items()}
    tensors.update({f"{n}.lora_B": f.B for n, f in factors.items()})
    layers = json.dumps({n: [f.scaling, f.fan_in_fan_out] for n, f in factors.items()})
    store.save(trainer, tensors, factors_path(expert_path), metadata={"lora_layers": layers})


def load_factors(expert_path: str) -> Dict[str, lora.LoraFactors]:
    from safetensors import safe_open

    with safe_open(factors_path(expert_path), framework="pt") as handle:
        layers = json.loads(handle.metadata()["lora_layers"])
        return {
            name: lora.LoraFactors(handle.get_tensor(f"{name}.lora_A"), handle.get_tensor(f"{name}.lora_B"),
                                   float(scaling), bool(fan_in_fan_out))
            for name, (scaling, fan_in_fan_out) in layers.items()
        }


def adapter_factors(merged: StateDict, base: StateDict, expert_paths: Sequence[str], head_names: Sequence[str],
                    method: str, parameters: Mapping[str, Any]) -> Factors:
    """The merged update as exact LoRA factors; raises (before anything is written) if none exist."""
    expert_factors = [load_factors(p) for p in expert_paths]
    kept = {n for factors in expert_factors for n in factors} | set(head_names)
    changed = [n for n in merged if n not in kept and (n not in base or not torch.equal(merged[n], base[n]))]
    if changed:  # e.g. BatchNorm statistics: buffers, so setup's requires_grad check cannot see them
        raise MergeInputError(_not_carried(changed, "are changed by the merge"))
    try:
        return lora_adapter.merged_adapter_factors(
            merged, base, expert_factors, skip=head_names, solver=wudi_solver(method, parameters),
        )
    except lora.UnsupportedLoraError as error:
        raise MergeInputError(f"lora_output='adapter': {error}") from error


def save_adapters(store: SnapshotStore, trainer, pl_module: nn.Module, factors: Factors,
                  heads: List[StateDict]) -> List[str]:
    """One PEFT adapter folder per task: the merged factors and that task's head (rank 0 writes)."""
    paths = [adapter_path(store, i) for i in range(len(heads))]
    if is_global_zero(trainer):
        for path, head in zip(paths, heads):
            lora_adapter.save_merged_adapter(path, pl_module, factors, heads=head or None)
    barrier(trainer)
    return paths
