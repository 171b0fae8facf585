"""Which tensors permute together: the merge graph of a model, discovered with ``torch.fx``.

MuDSC (arXiv 2403.01753) matches *units*; a unit lives in several tensors at once (the rows of the
layer that produces it, its bias and norm parameters, the columns of every layer that consumes it).
This module traces the model with ``torch.fx`` and propagates *permutation groups* through the graph:

- ``Linear`` / ``Conv1d`` / ``Conv2d`` (``groups=1``) / ``Embedding`` start a new group (their outputs);
  the group of their input owns their input axis;
- ``BatchNorm1d/2d``, ``LayerNorm`` (last dim), ``GroupNorm`` (groups matched as blocks), element-wise
  activations, dropout, pooling, ``flatten`` (``x.view(B, -1)``) keep the group of their input;
- residual additions (``+``) merge the groups of their operands into one (the residual stream is one
  shared permutation, as in the paper);
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (self-attention with packed QKV): the
  residual stream is the group of the input; every layer adds an attention-head group (heads are
  matched as whole blocks, units never move inside a head, the same head permutation applies to Q, K,
  V and the out-projection's columns) and a feed-forward group;
- the model's inputs and outputs are fixed (never permuted), and so is every group joined to them.

Anything else that a *permuted* tensor flows into raises :class:`UnsupportedModuleError` naming the
module or function: MuDSC never silently merges a graph it does not understand. Operations that only
touch fixed tensors (input preprocessing, concatenating output heads) are allowed.

What each module / function does to the groups is a table in :mod:`.ops`; this module walks the graph
(:class:`GraphBuilder`, a :class:`~.groups.UnitGroups`: a union-find over groups) and turns the result into a :class:`MergeSpec`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .features import FeatureRecorder
from .groups import OpCall, UnitGroups
from .ops import FUNCTION_OPS, METHOD_OPS, MODULE_OPS, SHAPE_QUERIES, SUPPORTED_MODULES
from .spec import FIXED, OUT, Group, Member, MergeSpec, NodeUnits, ParamAxis, UnsupportedModuleError

__all__ = ["UnsupportedModuleError", "Member", "Group", "MergeSpec", "build_spec", "FeatureRecorder",
           "SUPPORTED_MODULES", "GraphBuilder"]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModuleError(
            f"MuDSC could not trace {type(model).__name__}.forward with torch.fx ({type(exc).__name__}: {exc}). "
            f"Supported: {', '.join(SUPPORTED_MODULES)} in a traceable forward.") from exc
    return fx.GraphModule(model, graph)


def _describe(node: fx.Node) -> str:
    return f"{node.op} {getattr(node.target, '__name__', node.target)} (node {node.name})"


class GraphBuilder(UnitGroups):
    """Walks a traced graph once, node by node, and unions the unit groups the ops tie together."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.params = dict(gm.named_parameters())
        self.params.update(dict(gm.named_buffers()))

    # --- the walk: one method per fx node kind ----------------------------------------------
    def placeholder(self, node: fx.Node) -> None:
        self.set_units(node, NodeUnits(FIXED))

    def output(self, node: fx.Node) -> None:
        for n in self.tensor_inputs(node):
            self.fix(n, "model output")

    def get_attr(self, node: fx.Node) -> None:
        """A parameter used directly in ``forward`` (e.g. a positional embedding): its last dim is a group."""
        t = self.params.get(node.target)
        if t is None:
            t = getattr(self.gm, node.target, None)
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            self.set_units(node, None)
            return
        gid = self.new_group(t.shape[-1], node.target)
        self.add_member(gid, node.target, t.dim() - 1, OUT)
        self.set_units(node, NodeUnits(gid))

    def call_module(self, node: fx.Node) -> None:
        mod = self.modules[node.target]
        call, permuted = self._call(node, mod, f"module {node.target} ({type(mod).__name__})")
        op = next((op for op in MODULE_OPS if isinstance(mod, op.types)), None)
        if op is not None and op.starts_group:
            op.handle(self, call)
            return
        if not permuted:  # nothing permuted flows in (e.g. input normalisation): fixed
            self.set_units(node, NodeUnits(FIXED))
            return
        if self.units(call.source).flattened and not (op is not None and op.on_flattened):
            raise UnsupportedModuleError(f"{call.where}: applied to a flattened feature map")
        if op is None:
            raise UnsupportedModuleError(f"MuDSC cannot merge {call.where}: a matched unit flows into it. "
                                         f"Supported: {', '.join(SUPPORTED_MODULES)}")
        op.handle(self, call)

    def call_function(self, node: fx.Node) -> None:
        self._call_function_or_method(node, FUNCTION_OPS)

    def call_method(self, node: fx.Node) -> None:
        self._call_function_or_method(node, METHOD_OPS)

    def _call_function_or_method(self, node: fx.Node, table: dict) -> None:
        call, permuted = self._call(node, None, _describe(node))
        if node.target in SHAPE_QUERIES[node.op]:
            self.set_units(node, None)
            return
        if not permuted:  # only fixed tensors flow in: whatever the op does, nothing is permuted through it
            self.set_units(node, NodeUnits(FIXED))
            return
        handle = table.get(node.target)
        if handle is None:
            raise UnsupportedModuleError(f"MuDSC cannot merge through {call.where}: a matched unit flows into "
                                         f"it. Supported: {', '.join(SUPPORTED_MODULES)}")
        handle(self, call)

    def _call(self, node: fx.Node, module: Optional[nn.Module], where: str) -> tuple[OpCall, bool]:
        """The call's tensor inputs (refusing consumers of a concatenation) and whether any is permuted."""
        ins = self.tensor_inputs(node)
        cats = [n for n in ins if n.name in self.concatenations]
        if cats:
            raise UnsupportedModuleError(
                f"{_describe(node)} consumes torch.cat of matched units (node {cats[0].name}); concatenation is "
                "only supported for the model's outputs")
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else (ins[0] if ins else None)
        permuted = any(u.flattened or self.find(u.gid) != FIXED for u in map(self.units, ins))
        return OpCall(node, ins, source, where, module), permuted

    # --- result -----------------------------------------------------------------------------
    def run(self) -> MergeSpec:
        for node in self.gm.graph.nodes:
            getattr(self, node.op)(node)
        groups = [self.groups[gid] for gid in sorted(self.groups)]
        for g in groups:
            if g.size % g.block:
                raise UnsupportedModuleError(f"group {g.name}: {g.size} units not divisible in blocks of {g.block}")
        feature_keys = _feature_keys(groups)
        used = {k for keys in feature_keys.values() for k in keys}
        extractors = {n: [f for f in fs if f.key in used] for n, fs in self.extractors.items()}
        extractors = {n: fs for n, fs in extractors.items() if fs}
        return MergeSpec(groups, _param_axes(groups), feature_keys, extractors, self.gm)


def _param_axes(groups: list[Group]) -> dict[str, list[ParamAxis]]:
    param_axes: dict[str, list[ParamAxis]] = {}
    for g in groups:
        for m in g.members:
            param_axes.setdefault(m.param, []).append(ParamAxis(m.axis, g.gid, m.role, m.tile))
    for p, axes in param_axes.items():
        if len({a.axis for a in axes}) != len(axes):
            raise UnsupportedModuleError(f"tensor {p} has one axis in two different unit groups")
        if sum(a.role == OUT for a in axes) > 1:
            raise UnsupportedModuleError(f"tensor {p} produces units on two axes")
    return param_axes


def _feature_keys(groups: list[Group]) -> dict[int, list[str]]:
    """Per group, the keys of its highest-priority activations."""
    feature_keys = {}
    for g in groups:
        if not g.features:
            raise UnsupportedModuleError(f"group {g.name}: no activation to measure")
        best = max(p for p, _ in g.features)
        feature_keys[g.gid] = sorted({k for p, k in g.features if p == best})
    return feature_keys


def build_spec(model: nn.Module, example_inputs: Optional[tuple] = None) -> MergeSpec:
    """Trace ``model`` and return its :class:`MergeSpec` (raises :class:`UnsupportedModuleError`).

    ``example_inputs`` (a tuple of positional inputs) lets reductions such as ``x.mean(1)`` be checked
    against tensor ranks (shape propagation); without it only spatial reductions of conv maps pass."""
    gm = _trace(model)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        was = model.training
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
        gm.train(was)
    return GraphBuilder(gm).run()
