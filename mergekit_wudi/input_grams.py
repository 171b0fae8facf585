"""Merging with the inputs the experts saw, from Python: :func:`merge_with_input_grams`.

The Lightning callback's ``input_grams`` mode writes one Grams file per expert
(``<output>/grams/task_<i>.safetensors``); any other code can build the same per-expert
``{weight name: X^T X}`` mapping itself. Linear weights that have a Gram from every expert are merged
by Eq. 1 with those Grams (RegMean's objective on task vectors:
:mod:`mergekit_wudi.solvers.input_grams`, the kernel the callback uses); every other tensor goes
through a mergekit method (``merge_state_dicts``), ``wudi`` by default.

File format: safetensors, key ``<weight name>.gram`` for an exact ``[in, in]`` Gram, or
``<weight name>.gram_factor`` (``[in, k]``) + ``<weight name>.gram_diagonal`` (``[in]``) for a
sketch (:class:`~mergekit_wudi.solvers.input_grams.GramSketch`); metadata ``batches``, ``tokens``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from mergekit_wudi.solvers.input_grams import FLOW_TIME, RIDGE, SHRINK, Gram, GramSketch, merge_with_grams

StateDict = Dict[str, torch.Tensor]
GramsLike = Union[str, os.PathLike, Mapping[str, Gram]]
EXACT, FACTOR, DIAGONAL = ".gram", ".gram_factor", ".gram_diagonal"


def gram_tensors(grams: Mapping[str, Gram]) -> StateDict:
    """``{weight name: Gram}`` as the tensors of a Grams file."""
    tensors: StateDict = {}
    for name, gram in grams.items():
        if isinstance(gram, GramSketch):
            tensors[name + FACTOR], tensors[name + DIAGONAL] = gram.factor, gram.diagonal
        else:
            tensors[name + EXACT] = gram
    return tensors


def grams_from_tensors(tensors: Mapping[str, torch.Tensor]) -> Dict[str, Gram]:
    """The inverse of :func:`gram_tensors`."""
    grams: Dict[str, Gram] = {}
    for key, tensor in tensors.items():
        if key.endswith(EXACT):
            grams[key[: -len(EXACT)]] = tensor
        elif key.endswith(FACTOR):
            name = key[: -len(FACTOR)]
            grams[name] = GramSketch(tensor, tensors[name + DIAGONAL])
    return grams


def load_grams(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Gram], Dict[str, str]]:
    """``({weight name: Gram tensor or GramSketch}, metadata)`` of a Grams file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return grams_from_tensors(tensors), metadata


def _as_grams(grams: GramsLike, index: int) -> Mapping[str, Gram]:
    if isinstance(grams, (str, os.PathLike)):
        if not os.path.isfile(grams):
            raise FileNotFoundError(f"input Grams of expert {index}: no such file {grams}")
        return load_grams(grams)[0]
    return grams


def gram_names(names: Sequence[str], grams: Sequence[Mapping[str, Gram]]) -> list:
    """The names with a Gram from every expert; an error if some experts have one and others not."""
    common = [n for n in names if all(n in g for g in grams)]
    partial = sorted({n for g in grams for n in g if n in set(names)} - set(common))
    if partial:
        raise ValueError(f"input Grams of {partial[:3]} exist for some experts only: give every expert the same layers")
    return common


def merge_with_input_grams(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    grams: Sequence[GramsLike],
    *,
    method: str = "wudi",
    parameters: Optional[Mapping[str, Any]] = None,
    solver: str = "closed_form",
    ridge: float = RIDGE,
    shrink: float = SHRINK,
    normalize: str = "trace",
    flow_time: float = FLOW_TIME,
    scaling: float = 1.0,
) -> StateDict:
    """Merge state dicts, using each expert's input Grams where they exist.

    ``grams[i]``: expert ``i``'s ``{weight name: Gram}`` (an ``[in, in]`` tensor ``X^T X`` or a
    :class:`GramSketch`) or the path of a Grams file. Weights with a Gram from every expert:
    ``W0 + scaling * tau*`` with ``tau* = (sum_i w_i tau_i G_i')(sum_i w_i G_i' + rho I)^{-1}``
    (``solver``, ``ridge``, ``shrink``, ``normalize``, ``flow_time``: see
    :mod:`mergekit_wudi.solvers.input_grams`). Every other tensor of ``base``: mergekit's
    ``merge_state_dicts`` with ``method`` and ``parameters``. Returns every tensor of ``base``.
    """
    if len(grams) != len(experts):
        raise ValueError(f"got {len(grams)} Gram sets for {len(experts)} experts")
    loaded = [_as_grams(g, i) for i, g in enumerate(grams)]
    names = list(base)
    for i, expert in enumerate(experts):
        absent = [n for n in names if n not in expert]
        if absent:
            raise ValueError(f"expert {i} lacks tensors of the base, e.g. {absent[:3]}")
    with_grams = gram_names(names, loaded)
    merged: StateDict = {}
    for name in with_grams:
        with torch.no_grad():
            merged[name] = merge_with_grams(
                base[name], [e[name] for e in experts], [g[name] for g in loaded], scaling=scaling, solver=solver,
                ridge=ridge, time=flow_time, normalize=normalize, shrink=shrink,
            )
    rest = [n for n in names if n not in merged]
    if rest:
        from mergekit.merge_methods import merge_state_dicts

        from mergekit_wudi.registration import register_methods

        register_methods()

        inputs = {"base": {n: base[n] for n in rest}}
        inputs.update({f"task_{i}": {n: e[n] for n in rest} for i, e in enumerate(experts)})
        merged.update(merge_state_dicts(inputs, method, parameters=dict(parameters or {}), base="base"))
    return {n: merged[n] for n in names}
