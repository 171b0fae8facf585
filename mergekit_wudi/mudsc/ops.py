"""What every supported module and function does to the unit groups of the MuDSC merge graph.

Three tables drive :class:`~.graph.GraphBuilder`: :data:`MODULE_OPS` (module type -> handler, first
``isinstance`` match wins), :data:`FUNCTION_OPS` (``call_function`` target -> handler) and
:data:`METHOD_OPS` (tensor method name -> handler). A handler gets the groups being built
(:class:`~.groups.UnitGroups`) and the :class:`~.groups.OpCall`, and sets the units of the call's output. Anything not in a table that a permuted tensor flows into is
refused by the builder (:class:`~.spec.UnsupportedModuleError`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .features import P_ACT, P_BLOCK, P_LIN, P_NORM, UnitFeature
from .spec import FIXED, OUT, IN, NodeUnits, UnsupportedModuleError
from .groups import OpCall, UnitGroups
from .transformer import encoder, encoder_layer

__all__ = ["OpCall", "ModuleOp", "MODULE_OPS", "FUNCTION_OPS", "METHOD_OPS", "SHAPE_QUERIES", "SUPPORTED_MODULES"]

SUPPORTED_MODULES = ("Linear", "Conv1d", "Conv2d (groups=1)", "Embedding", "BatchNorm1d", "BatchNorm2d",
                     "GroupNorm", "LayerNorm (last dim)", "TransformerEncoderLayer", "TransformerEncoder",
                     "element-wise activations", "Dropout", "pooling", "Flatten", "Identity", "Sequential",
                     "residual +")

_WEIGHT_AND_BIAS = (("weight", 0, OUT, 1), ("bias", 0, OUT, 1))
_BATCHNORM_TENSORS = _WEIGHT_AND_BIAS + (("running_mean", 0, OUT, 1), ("running_var", 0, OUT, 1))


Handler = Callable[[UnitGroups, OpCall], None]


@dataclass(frozen=True)
class ModuleOp:
    types: tuple[type, ...]
    handle: Handler
    starts_group: bool = False  # handled even when only fixed tensors flow in (its outputs are new units)
    on_flattened: bool = False  # may consume a flattened conv map


def _layer(node: fx.Node) -> str:
    """How a feature's layer is named in messages: the module's name, or the function and its node."""
    if node.op == "call_module":
        return node.target
    return f"{getattr(node.target, '__name__', node.target)} (node {node.name})"


def _set_output(b: UnitGroups, node: fx.Node, gid: int, unit_dim: int, priority: int) -> None:
    """The call's output carries group ``gid`` and measures it with priority ``priority``."""
    b.set_units(node, NodeUnits(gid, unit_dim))
    b.add_feature(gid, node, priority, UnitFeature(node.name, _layer(node), unit_dim))


def _keep_units(b: UnitGroups, node: fx.Node, src: fx.Node, priority: Optional[int]) -> None:
    """The output carries the units of ``src`` unchanged (element-wise ops, pooling, reductions)."""
    units = b.units(src)
    b.set_units(node, units)
    if priority is not None and not units.flattened:
        b.add_feature(units.gid, node, priority, UnitFeature(node.name, _layer(node), units.unit_dim))


def _flatten(b: UnitGroups, node: fx.Node, src: fx.Node) -> None:
    b.set_units(node, NodeUnits(b.units(src).gid, -1, flattened=True))


# ---------------------------------------------------------------- modules
def _linear(b: UnitGroups, call: OpCall) -> None:
    name = call.node.target
    b.add_member(b.units(call.source).gid, name + ".weight", 1, IN)
    gid = b.new_group(call.module.out_features, name)
    b.add_members(gid, call.module, name, _WEIGHT_AND_BIAS)
    _set_output(b, call.node, gid, -1, P_LIN)


def _conv(b: UnitGroups, call: OpCall) -> None:
    mod, name = call.module, call.node.target
    if mod.groups != 1:
        raise UnsupportedModuleError(f"module {name} ({type(mod).__name__}, groups={mod.groups}): "
                                     "grouped/depthwise convolutions are not supported")
    if b.units(call.source).flattened:
        raise UnsupportedModuleError(f"module {name}: convolution of a flattened map")
    b.add_member(b.units(call.source).gid, name + ".weight", 1, IN)
    gid = b.new_group(mod.out_channels, name)
    b.add_members(gid, mod, name, _WEIGHT_AND_BIAS)
    _set_output(b, call.node, gid, 1, P_LIN)


def _embedding(b: UnitGroups, call: OpCall) -> None:
    name = call.node.target
    gid = b.new_group(call.module.embedding_dim, name)
    b.add_member(gid, name + ".weight", 1, OUT)
    _set_output(b, call.node, gid, -1, P_LIN)


def _batch_norm(b: UnitGroups, call: OpCall) -> None:
    gid = b.units(call.source).gid
    b.add_members(gid, call.module, call.node.target, _BATCHNORM_TENSORS)
    _set_output(b, call.node, gid, 1, P_NORM)


def _group_norm(b: UnitGroups, call: OpCall) -> None:
    mod, gid = call.module, b.units(call.source).gid
    group = b.root_group(gid)
    if group is not None:
        block = mod.num_channels // mod.num_groups
        if group.block > 1 and group.block != block:
            raise UnsupportedModuleError(f"{call.where}: GroupNorm blocks of {block} meet blocks of {group.block}")
        group.block = block
    b.add_members(gid, mod, call.node.target, _WEIGHT_AND_BIAS)
    _set_output(b, call.node, gid, 1, P_NORM)


def _layer_norm(b: UnitGroups, call: OpCall) -> None:
    if len(call.module.normalized_shape) != 1:
        raise UnsupportedModuleError(f"{call.where}: LayerNorm over more than the last dim")
    gid = b.units(call.source).gid
    b.add_members(gid, call.module, call.node.target, _WEIGHT_AND_BIAS)
    _set_output(b, call.node, gid, -1, P_NORM)


def _flatten_module(b: UnitGroups, call: OpCall) -> None:
    if call.module.start_dim != 1:
        raise UnsupportedModuleError(f"{call.where}: only Flatten(start_dim=1) is supported")
    _flatten(b, call.node, call.source)


def _activation(b: UnitGroups, call: OpCall) -> None:
    _keep_units(b, call.node, call.source, P_ACT)


def _same_units(b: UnitGroups, call: OpCall) -> None:
    _keep_units(b, call.node, call.source, None)


_ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
                       nn.Hardswish, nn.ReLU6, nn.Hardtanh)
_POOLING_MODULES = (nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)

MODULE_OPS: tuple[ModuleOp, ...] = (
    ModuleOp((nn.Linear,), _linear, starts_group=True, on_flattened=True),
    ModuleOp((nn.Conv1d, nn.Conv2d), _conv, starts_group=True),
    ModuleOp((nn.Embedding,), _embedding, starts_group=True),
    ModuleOp((nn.BatchNorm1d, nn.BatchNorm2d), _batch_norm),
    ModuleOp((nn.GroupNorm,), _group_norm),
    ModuleOp((nn.LayerNorm,), _layer_norm),
    ModuleOp(_ACTIVATION_MODULES, _activation, on_flattened=True),
    ModuleOp((nn.Identity, nn.Dropout), _same_units, on_flattened=True),
    ModuleOp(_POOLING_MODULES, _same_units),
    ModuleOp((nn.Flatten,), _flatten_module),
    ModuleOp((nn.TransformerEncoderLayer,), encoder_layer),
    ModuleOp((nn.TransformerEncoder,), encoder),
)


# ---------------------------------------------------------------- functions and tensor methods
def _residual_add(b: UnitGroups, call: OpCall) -> None:
    """``a + b``: the operands' groups become one (the residual stream is one permutation)."""
    units = [b.units(n) for n in call.inputs]
    if any(u.flattened for u in units):
        raise UnsupportedModuleError(f"{call.where}: adds a flattened feature map")
    gid = units[0].gid
    for u in units[1:]:
        gid = b.union(gid, u.gid, call.where)
    _set_output(b, call.node, gid, units[0].unit_dim, P_BLOCK)


def _concatenate(b: UnitGroups, call: OpCall) -> None:
    """e.g. several task heads concatenated into the output: their units stay unmatched (fixed);
    anything but the model output consuming the result is refused by the builder."""
    for n in call.inputs:
        b.fix(n, call.where)
    b.set_units(call.node, NodeUnits(FIXED))
    b.concatenations.add(call.node.name)


def _scale(b: UnitGroups, call: OpCall) -> None:
    if len(call.inputs) != 1:
        raise UnsupportedModuleError(f"{call.where}: multiplies two unit-carrying tensors")
    _keep_units(b, call.node, call.inputs[0], None)


def _flatten_call(b: UnitGroups, call: OpCall) -> None:
    node = call.node
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if start != 1:
        raise UnsupportedModuleError(f"{call.where}: only flatten(x, 1) is supported")
    _flatten(b, node, call.source)


def _reshape(b: UnitGroups, call: OpCall) -> None:
    node = call.node
    shape = node.args[1:] if node.op == "call_method" else node.args[1]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    if len(shape) != 2 or shape[1] != -1:
        raise UnsupportedModuleError(f"{call.where}: only x.view(batch, -1) reshapes are supported")
    _flatten(b, node, call.source)


def _reduce(b: UnitGroups, call: OpCall) -> None:
    """``x.mean(dims)`` and the like, allowed over dims that hold no units (spatial / sequence)."""
    node, src = call.node, call.source
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    unit_dim = b.units(src).unit_dim
    meta = src.meta.get("tensor_meta")
    ndim = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    ok = bool(dims) and all(isinstance(d, int) for d in dims)
    if ok and unit_dim == 1:
        ok = all(d >= 2 or (ndim is not None and d < 0 and d + ndim >= 2) for d in dims)
    elif ok and unit_dim == -1:
        ok = ndim is not None and all(0 < (d % ndim) < ndim - 1 for d in dims)
    if not ok:
        raise UnsupportedModuleError(
            f"{call.where}: only reductions over non-unit dims (spatial / sequence) are supported")
    _keep_units(b, node, src, None)


def _table(*entries: tuple) -> dict:
    return {target: handler for targets, handler in entries for target in targets}


FUNCTION_OPS: dict[Callable, Handler] = _table(
    ((operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub), _residual_add),
    ((torch.cat, torch.concat, torch.stack), _concatenate),
    ((operator.mul, operator.truediv, operator.imul, torch.mul), _scale),
    ((F.relu, torch.relu, F.gelu, torch.tanh, torch.sigmoid, F.silu, F.leaky_relu, F.elu, F.softplus, F.mish,
      F.hardswish, F.relu6, F.hardtanh), _activation),
    ((F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
      F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d), _same_units),
    ((torch.flatten,), _flatten_call),
    ((torch.reshape,), _reshape),
    ((torch.mean, torch.sum, torch.amax), _reduce),
)
METHOD_OPS: dict[str, Handler] = _table(
    (("add", "add_", "sub", "sub_"), _residual_add),
    (("mul", "div", "mul_", "div_"), _scale),
    (("relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"), _activation),
    (("contiguous", "clone", "float", "detach"), _same_units),
    (("flatten",), _flatten_call),
    (("view", "reshape"), _reshape),
    (("mean", "sum", "amax"), _reduce),
)
# calls whose result is not a tensor (shapes): they carry no units
SHAPE_QUERIES = {"call_function": {getattr}, "call_method": {"size", "dim", "numel"}}
