"""A merged LoRA adapter: the WUDI merge of LoRA experts written back as one PEFT adapter.

For ``closed_form`` and ``spectral`` the merged task vector lies in the row space of the experts' ``A``
factors (``tau* = D (C + rho I)^{-1}`` and the gradient flow from the sum init never leave it; Eq. 1 of
arXiv 2503.08099), so it factors exactly as ``B_m A_m`` with ``A_m`` an orthonormal basis of the stacked
``A_i`` rows (rank <= sum of the ranks): :func:`merged_adapter_factors`. :func:`save_merged_adapter`
writes it with PEFT's own code, loadable by ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import re
import sys
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from mergekit_wudi.solvers.numerics import check_finite
from mergekit_wudi.lora import (
    EXACT_SOLVERS,
    AdapterNotExactError,
    LoraFactors,
    UnsupportedLoraError,
    _layout,
    _peft,
)


def _row_basis(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [n, R] of the row space of ``rows`` [m, n] (R >= 1; float32-level rank cut)."""
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    cut = float(s[0]) * max(rows.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    rank = max(1, int((s > cut).sum()))
    return vh[:rank].T


def merged_adapter_factors(
    merged: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    expert_factors: Sequence[Mapping[str, LoraFactors]],
    *,
    skip: Iterable[str] = (),
    solver: Optional[str] = None,
    rtol: float = 1e-2,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Exact LoRA factors ``{base weight name: (A_m [R, in], B_m [out, R])}`` (PEFT orientation, scaling 1)
    of ``tau_m = merged - base`` for the experts' LoRA-wrapped weights.

    ``closed_form`` (``D (C + rho I)^{-1}``) and ``spectral`` (flow from the sum init) keep the rows of
    ``tau_m`` in the span of the experts' ``A`` rows: with ``Q`` an orthonormal basis of the stacked ``A_i``
    rows (``R <= sum r_i``), ``A_m = Q^T``, ``B_m = tau_m Q`` (float64). Checked: ``||tau_m - B_m A_m||_F <=
    rtol ||tau_m||_F + eps ||merged||_F`` (rounding of the stored weight), else :class:`AdapterNotExactError`.
    The default ``rtol`` allows the float32 closed form's rounding noise outside the span (measured 2e-4
    relative at 256x256, 2e-3 at 2048x2048; ``B_m A_m`` is then ~1000x closer to the float64 solution than
    ``merged``). ``adam`` / ``lowrank`` leave the span (0.14-0.17 measured, but under 1e-2 for large task
    vectors), so pass ``solver``: anything but :data:`EXACT_SOLVERS` is refused up front (the caller falls
    back to full weights). Other tensors must equal ``base`` (an adapter cannot carry them) unless in ``skip``.
    """
    if solver is not None and solver not in EXACT_SOLVERS:
        raise AdapterNotExactError(
            f"solver {solver!r} does not keep the merged update in the span of the experts' LoRA A rows; "
            f"a merged adapter is exact only for {' / '.join(EXACT_SOLVERS)}: use the full-weights output"
        )
    names = list(dict.fromkeys(n for factors in expert_factors for n in factors))
    skip = set(skip)
    for name in merged:
        if name in names or name in skip:
            continue
        if name not in base or not torch.equal(merged[name], base[name]):
            raise AdapterNotExactError(
                f"tensor {name!r} is changed by the merge but is not a LoRA-wrapped weight: a LoRA adapter "
                "cannot carry it (pass it in skip= if it is a per-task head); use the full-weights output"
            )
    out = {}
    for name in names:
        if name not in merged or name not in base:
            raise KeyError(f"LoRA-wrapped weight {name!r} is missing from the {'merged' if name in base else 'base'} state")
        factors = [f[name] for f in expert_factors if name in f]
        transposed = {f.fan_in_fan_out for f in factors}
        if len(transposed) != 1:
            raise UnsupportedLoraError(f"experts disagree on fan_in_fan_out for {name!r}")
        tau = merged[name].double() - base[name].double()
        check_finite(tau, f"the merged weight {name!r}")
        q = _row_basis(torch.cat([f.row_factor.double() for f in factors]))
        dtype = torch.float64 if merged[name].dtype == torch.float64 else torch.float32
        left, right = (tau @ q).to(dtype), q.T.contiguous().to(dtype)  # stored weight = W0 + left @ right
        error = float(torch.linalg.matrix_norm(tau - left.double() @ right.double()))
        floor = torch.finfo(merged[name].dtype).eps * float(torch.linalg.matrix_norm(merged[name].double()))
        allowed = rtol * float(torch.linalg.matrix_norm(tau)) + floor
        if error > allowed:
            raise AdapterNotExactError(
                f"merged update of {name!r} is not in the span of the experts' LoRA A rows (residual {error:.3g} "
                f"> allowed {allowed:.3g}): the solver (adam / lowrank?) broke the low-rank structure; "
                "use closed_form or spectral for an adapter output, or the full-weights output"
            )
        out[name] = (left.T.contiguous(), right.T.contiguous()) if transposed.pop() else (right, left)
    return out


def _find_peft_model(module: nn.Module):
    peft_model = _peft()["PeftModel"] if "peft" in sys.modules else ()
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, peft_model)]
    if len(found) != 1:
        raise UnsupportedLoraError(f"save_merged_adapter needs a module holding one peft.PeftModel, found {len(found)}")
    return found[0]


def _inner_name(name: str, prefix: str) -> str:
    if prefix and not name.startswith(prefix + "."):
        raise KeyError(f"{name!r} is not inside the PeftModel at {prefix!r}")
    return name[len(prefix) + 1:] if prefix else name


def _adapter_config(source, inner: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], heads, fan_in_fan_out: bool):
    """A LoraConfig targeting exactly the modules in ``inner``, each with its own rank and alpha = rank
    (scaling 1), anchored patterns so no other module matches; task type and base path from ``source``."""
    from peft import LoraConfig

    ranks = {f"^{re.escape(m)}$": int(a.shape[0]) for m, (a, _) in inner.items()}
    return LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), rank_pattern=ranks, alpha_pattern=dict(ranks),
        target_modules="|".join(ranks), modules_to_save=heads or None, lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out, task_type=source.task_type, inference_mode=True,
        base_model_name_or_path=source.base_model_name_or_path, revision=source.revision,
    )


def save_merged_adapter(
    path,
    model: nn.Module,
    factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    *,
    heads: Optional[Mapping[str, torch.Tensor]] = None,
    adapter_name: Optional[str] = None,
) -> None:
    """Write ``factors`` (from :func:`merged_adapter_factors`) as a PEFT LoRA adapter folder at ``path``,
    loadable with ``PeftModel.from_pretrained(base_model, path)`` onto the model the ``PeftModel`` inside
    ``model`` wraps. PEFT's own code writes it: a temporary adapter (``rank_pattern``/``alpha_pattern`` so
    every scaling is 1) is added to that ``PeftModel``, filled, saved and deleted again (``model`` is left
    as it was). ``heads`` (base naming, e.g. one task's ``modules_to_save`` tensors) become the adapter's
    ``modules_to_save``. The folder appears atomically; files get the user's umask permissions.
    ``adapter_name`` (default: the active one) is the expert adapter whose task type and base path are kept.
    """
    import os
    import shutil

    from mergekit_wudi.io import umask
    from mergekit_wudi.output import staged_output

    prefix, peft_model = _find_peft_model(model)
    layout = _layout(model, adapter_name)
    heads = dict(heads or {})
    if not factors or any(n not in layout.lora for n in factors) or any(n not in layout.heads for n in heads):
        raise KeyError(
            f"factors must name LoRA-wrapped weights (got {sorted(factors)[:5]}, the module has "
            f"{sorted(layout.lora)[:5]}) and heads modules_to_save tensors (not: {[n for n in heads if n not in layout.heads]})"
        )
    inner = {_inner_name(name, prefix)[: -len(".weight")]: ab for name, ab in factors.items()}
    head_modules = sorted({_inner_name(layout.heads[n], prefix) for n in heads})
    fan_in_fan_out = any(bool(lay.fan_in_fan_out) for _, lay in layout.lora.values())
    config = _adapter_config(peft_model.peft_config[layout.adapter], inner, head_modules, fan_in_fan_out)
    tmp = "wudi_merged"
    requires_grad = {n: t.requires_grad for n, t in peft_model.named_parameters()}
    peft_model.add_adapter(tmp, config)
    try:
        tuned = peft_model.base_model.model
        with torch.no_grad():
            for module_name, (a, b) in inner.items():
                layer = tuned.get_submodule(module_name)
                if abs(layer.scaling[tmp] - 1.0) > 1e-12:
                    raise RuntimeError(f"PEFT gave {module_name!r} scaling {layer.scaling[tmp]}, expected 1")
                layer.lora_A[tmp].weight.copy_(a)
                layer.lora_B[tmp].weight.copy_(b)
            for name, tensor in heads.items():
                wrapper = _inner_name(layout.heads[name], prefix)
                leaf = _inner_name(_inner_name(name, prefix), wrapper)
                tuned.get_submodule(wrapper).modules_to_save[tmp].get_parameter(leaf).copy_(tensor)
        with staged_output(path) as target:  # other files in `path` are kept, as for a mergekit-yaml OUT
            staging = target + ".peft"
            peft_model.save_pretrained(staging, selected_adapters=[tmp])
            os.replace(os.path.join(staging, tmp), target)
            shutil.rmtree(staging)
            mask = umask()  # safetensors writes 0600 files: give the folder the user's usual modes
            for root, _, files in os.walk(target):
                os.chmod(root, 0o777 & ~mask)
                for file in files:
                    os.chmod(os.path.join(root, file), 0o666 & ~mask)
    finally:
        peft_model.delete_adapter(tmp)
        for n, t in peft_model.named_parameters():
            t.requires_grad_(requires_grad.get(n, t.requires_grad))
