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
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UnsupportedModuleError", "Member", "Group", "MergeSpec", "build_spec", "FeatureRecorder",
           "SUPPORTED_MODULES"]

FIXED = 0


class UnsupportedModuleError(NotImplementedError):
    """A permuted tensor flows into a module or function MuDSC cannot merge."""


@dataclass(frozen=True)
class Member:
    """Axis ``axis`` of tensor ``param`` belongs to a group. ``role='out'``: the tensor produces or
    scales the units (rows of a Linear, biases, norm parameters); ``'in'``: it consumes them (columns).
    ``tile``: the axis holds ``tile`` stacked copies (packed QKV). The axis may be ``rep`` times longer
    than ``tile * n`` (a flattened conv map); each unit then owns a contiguous run of ``rep`` entries."""

    param: str
    axis: int
    role: str
    tile: int = 1


@dataclass
class Group:
    gid: int
    size: int
    block: int = 1          # units move in contiguous blocks of this size (heads, GN groups)
    within: bool = True     # may units be permuted inside a block (GN: yes; heads: no)
    members: list = field(default_factory=list)
    features: list = field(default_factory=list)  # (priority, key) feature points
    name: str = ""


@dataclass
class MergeSpec:
    groups: list                     # list[Group], permutable groups only, in graph order
    param_axes: dict                 # param -> list[(axis, gid, role, tile)]
    feature_keys: dict               # gid -> list of keys produced by the recorder
    extractors: dict                 # node name -> list[(key, fn(out, args, kwargs) -> [S, n])]
    graph_module: fx.GraphModule

    def group(self, gid: int) -> Group:
        for g in self.groups:
            if g.gid == gid:
                return g
        raise KeyError(gid)


_ACT_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
                nn.Hardswish, nn.ReLU6, nn.Hardtanh)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d)
_ACT_FUNCS = {F.relu, torch.relu, F.gelu, torch.tanh, torch.sigmoid, F.silu, F.leaky_relu, F.elu, F.softplus,
              F.mish, F.hardswish, F.relu6, torch.nn.functional.hardtanh}
_PASS_FUNCS = {F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
               F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
_ACT_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"}
_PASS_METHODS = {"contiguous", "clone", "float", "detach"}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_SCALE = {operator.mul, operator.truediv, operator.imul, torch.mul}

SUPPORTED_MODULES = ("Linear", "Conv1d", "Conv2d (groups=1)", "Embedding", "BatchNorm1d", "BatchNorm2d",
                     "GroupNorm", "LayerNorm (last dim)", "TransformerEncoderLayer", "TransformerEncoder",
                     "element-wise activations", "Dropout", "pooling", "Flatten", "Identity", "Sequential",
                     "residual +")

# feature-point priorities: post-activation features are preferred (ZipIt / MuDSC use them)
_P_ACT, _P_BLOCK, _P_NORM, _P_LIN = 3, 2, 1, 0


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


def _feat_last(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(-1, out.shape[-1])


def _feat_chan1(out: torch.Tensor) -> torch.Tensor:
    if out.dim() == 2:
        return out
    return out.transpose(1, -1).reshape(-1, out.shape[1])


def _encoder_layer_internals(layer: nn.TransformerEncoderLayer, x: torch.Tensor,
                             key_padding_mask: Optional[torch.Tensor] = None):
    """Re-run a TransformerEncoderLayer (eval, no dropout) and return (per-head attention outputs
    [B*L, E] before the out-projection, feed-forward hidden [B*L, F] after the activation, output)."""
    attn = layer.self_attn
    bf = attn.batch_first
    h = x if bf else x.transpose(0, 1)  # [B, L, E]
    B, L, E = h.shape
    H = attn.num_heads
    d = E // H

    def sa(inp):
        qkv = F.linear(inp, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, H, d).transpose(1, 2) for t in (q, k, v))
        mask = None
        if key_padding_mask is not None:
            kpm = key_padding_mask.to(torch.bool)
            mask = (~kpm)[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(B, L, E)
        return o, attn.out_proj(o)

    act = layer.activation
    if isinstance(act, str):
        act = {"relu": F.relu, "gelu": F.gelu}[act]

    def ff(inp):
        hid = act(layer.linear1(inp))
        return hid, layer.linear2(hid)

    if layer.norm_first:
        heads, a = sa(layer.norm1(h))
        h = h + a
        hid, f = ff(layer.norm2(h))
        h = h + f
    else:
        heads, a = sa(h)
        h = layer.norm1(h + a)
        hid, f = ff(h)
        h = layer.norm2(h + f)
    out = h if bf else h.transpose(0, 1)
    return heads.reshape(-1, E), hid.reshape(-1, hid.shape[-1]), out


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.params = dict(gm.named_parameters())
        self.params.update(dict(gm.named_buffers()))
        self.parent = {FIXED: FIXED}
        self.groups: dict[int, Group] = {}
        self.node_group: dict[str, Any] = {}   # node name -> gid | None (non-tensor)
        self.node_chan: dict[str, int] = {}    # node name -> feature dim (1 or -1)
        self.extractors: dict[str, list] = {}
        self.next_id = 1
        self.cat_nodes: set = set()

    # --- union-find -------------------------------------------------------------------------
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra == FIXED or rb == FIXED:
            keep, drop = FIXED, (rb if ra == FIXED else ra)
        else:
            keep, drop = min(ra, rb), max(ra, rb)
            ga, gb = self.groups[keep], self.groups[drop]
            if ga.size != gb.size:
                raise UnsupportedModuleError(f"{where}: adds tensors of {ga.size} and {gb.size} units")
            if ga.block != gb.block and ga.block > 1 and gb.block > 1:
                raise UnsupportedModuleError(f"{where}: incompatible unit blocks {ga.block} vs {gb.block}")
            ga.block = max(ga.block, gb.block)
            ga.within = ga.within and gb.within
        self.parent[drop] = keep
        if keep != FIXED:
            g, d = self.groups[keep], self.groups.pop(drop)
            g.members += d.members
            g.features += d.features
        else:
            self.groups.pop(drop, None)
        return keep

    def new_group(self, size: int, name: str, block: int = 1, within: bool = True) -> int:
        gid = self.next_id
        self.next_id += 1
        self.parent[gid] = gid
        self.groups[gid] = Group(gid=gid, size=size, block=block, within=within, name=name)
        return gid

    def add_member(self, gid: int, param: str, axis: int, role: str, tile: int = 1) -> None:
        r = self.find(gid)
        if r != FIXED:
            self.groups[r].members.append(Member(param, axis, role, tile))

    def add_feature(self, gid: int, node_name: str, prio: int, fn: Callable, key: Optional[str] = None) -> None:
        r = self.find(gid)
        if r == FIXED:
            return
        key = key or node_name
        self.groups[r].features.append((prio, key))
        self.extractors.setdefault(node_name, []).append((key, fn))

    def group_size(self, gid: int) -> int:
        return self.groups[self.find(gid)].size

    # --- graph walk -------------------------------------------------------------------------
    def tensor_inputs(self, node: fx.Node) -> list:
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
        return [n for n in found if self.node_group.get(n.name, None) is not None]

    def set(self, node: fx.Node, gid, chan: int = -1) -> None:
        self.node_group[node.name] = gid
        self.node_chan[node.name] = chan

    def run(self) -> MergeSpec:
        for node in self.gm.graph.nodes:
            self.visit(node)
        # materialise
        groups = []
        for gid in sorted(self.groups):
            g = self.groups[gid]
            if self.find(gid) != gid:
                continue
            if g.size % g.block:
                raise UnsupportedModuleError(f"group {g.name}: {g.size} units not divisible in blocks of {g.block}")
            groups.append(g)
        param_axes: dict[str, list] = {}
        for g in groups:
            for m in g.members:
                param_axes.setdefault(m.param, []).append((m.axis, g.gid, m.role, m.tile))
        for p, axes in param_axes.items():
            if len({a for a, *_ in axes}) != len(axes):
                raise UnsupportedModuleError(f"tensor {p} has one axis in two different unit groups")
            if sum(r == "out" for _, _, r, _ in axes) > 1:
                raise UnsupportedModuleError(f"tensor {p} produces units on two axes")
        feature_keys = {}
        for g in groups:
            if not g.features:
                raise UnsupportedModuleError(f"group {g.name}: no activation to measure")
            best = max(p for p, _ in g.features)
            feature_keys[g.gid] = sorted({k for p, k in g.features if p == best})
        used = {k for ks in feature_keys.values() for k in ks}
        extractors = {n: [(k, f) for k, f in lst if k in used] for n, lst in self.extractors.items()}
        extractors = {n: lst for n, lst in extractors.items() if lst}
        return MergeSpec(groups, param_axes, feature_keys, extractors, self.gm)

    def passthrough(self, node: fx.Node, src: fx.Node, prio: Optional[int]) -> None:
        gid = self.node_group[src.name]
        chan = self.node_chan[src.name]
        self.set(node, gid, chan)
        if prio is not None and gid != "expanded":
            fn = _feat_chan1 if chan == 1 else _feat_last
            self.add_feature(gid, node.name, prio, lambda out, a, k, fn=fn: fn(out))

    def visit(self, node: fx.Node) -> None:
        op = node.op
        if op == "placeholder":
            self.set(node, FIXED)
            return
        if op == "output":
            for n in self.tensor_inputs(node):
                self.fix(n, "model output")
            return
        if op == "get_attr":
            t = self.params.get(node.target)
            if t is None:
                t = getattr(self.gm, node.target, None)
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                self.set(node, None)
                return
            gid = self.new_group(t.shape[-1], node.target)
            self.add_member(gid, node.target, t.dim() - 1, "out")
            self.set(node, gid, -1)
            return
        ins = self.tensor_inputs(node)
        cats = [n for n in ins if n.name in self.cat_nodes]
        if cats:
            raise UnsupportedModuleError(
                f"{op} {getattr(node.target, '__name__', node.target)} (node {node.name}) consumes torch.cat of "
                f"matched units (node {cats[0].name}); concatenation is only supported for the model's outputs")
        ins_groups = [self.node_group[n.name] for n in ins]
        permuted = [g for g in ins_groups if g == "expanded" or self.find(g) != FIXED]
        if op == "call_module":
            self.visit_module(node, self.modules[node.target], ins, permuted)
            return
        if op == "call_method" and node.target in ("size", "dim", "numel") or (
                op == "call_function" and node.target is getattr):
            self.set(node, None)
            return
        if not permuted:
            # only fixed tensors flow in: whatever the op does, nothing is permuted through it
            self.set(node, FIXED)
            return
        tgt = node.target
        where = f"{op} {getattr(tgt, '__name__', tgt)} (node {node.name})"
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else (ins[0] if ins else None)
        if op == "call_function" and tgt in _ADD or op == "call_method" and tgt in ("add", "add_", "sub", "sub_"):
            tins = [n for n in ins if self.node_group[n.name] is not None]
            if any(self.node_group[n.name] == "expanded" for n in tins):
                raise UnsupportedModuleError(f"{where}: adds a flattened feature map")
            gid = self.node_group[tins[0].name]
            for n in tins[1:]:
                gid = self.union(gid, self.node_group[n.name], where)
            self.set(node, gid, self.node_chan[tins[0].name])
            self.add_feature(gid, node.name, _P_BLOCK,
                             lambda out, a, k, fn=(_feat_chan1 if self.node_chan[tins[0].name] == 1 else _feat_last): fn(out))
            return
        if op == "call_function" and tgt in (torch.cat, torch.concat, torch.stack):
            # e.g. several task heads concatenated into the output: their units stay unmatched (fixed);
            # anything but the model output consuming the result is refused (see above)
            for n in ins:
                self.fix(n, where)
            self.set(node, FIXED)
            self.cat_nodes.add(node.name)
            return
        if op == "call_function" and tgt in _SCALE or op == "call_method" and tgt in ("mul", "div", "mul_", "div_"):
            if len(ins) == 1:
                self.passthrough(node, ins[0], None)
                return
            raise UnsupportedModuleError(f"{where}: multiplies two unit-carrying tensors")
        if op == "call_function" and tgt in _ACT_FUNCS or op == "call_method" and tgt in _ACT_METHODS:
            self.passthrough(node, src, _P_ACT)
            return
        if op == "call_function" and tgt in _PASS_FUNCS or op == "call_method" and tgt in _PASS_METHODS:
            self.passthrough(node, src, None)
            return
        if (op == "call_function" and tgt is torch.flatten) or (op == "call_method" and tgt == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0 if op == "call_function" else 0)
            if start != 1:
                raise UnsupportedModuleError(f"{where}: only flatten(x, 1) is supported")
            self.expand(node, src)
            return
        if op == "call_method" and tgt in ("view", "reshape") or op == "call_function" and tgt is torch.reshape:
            shape = node.args[1:] if op == "call_method" else node.args[1]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = shape[0]
            if len(shape) == 2 and shape[1] == -1:
                self.expand(node, src)
                return
            raise UnsupportedModuleError(f"{where}: only x.view(batch, -1) reshapes are supported")
        if op == "call_method" and tgt in ("mean", "sum", "amax") or op == "call_function" and tgt in (torch.mean, torch.sum, torch.amax):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            chan = self.node_chan[src.name]
            meta = src.meta.get("tensor_meta")
            ndim = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            ok = bool(dims) and all(isinstance(d, int) for d in dims)
            if ok and chan == 1:
                ok = all(d >= 2 or (ndim is not None and d < 0 and d + ndim >= 2) for d in dims)
            elif ok and chan == -1:
                ok = ndim is not None and all(0 < (d % ndim) < ndim - 1 for d in dims)
            if ok:
                self.passthrough(node, src, None)
                return
            raise UnsupportedModuleError(f"{where}: only reductions over non-unit dims (spatial / sequence) are supported")
        raise UnsupportedModuleError(
            f"MuDSC cannot merge through {where}: a matched unit flows into it. Supported: {', '.join(SUPPORTED_MODULES)}")

    def expand(self, node: fx.Node, src: fx.Node) -> None:
        gid = self.node_group[src.name]
        self.node_group[node.name] = "expanded"
        self.node_chan[node.name] = -1
        self._expanded_src = getattr(self, "_expanded_src", {})
        self._expanded_src[node.name] = gid

    def base_gid(self, n: fx.Node) -> int:
        g = self.node_group[n.name]
        if g == "expanded":
            return self._expanded_src[n.name]
        return g

    def fix(self, n: fx.Node, where: str) -> None:
        gid = self.base_gid(n)
        self.union(gid, FIXED, where)

    def visit_module(self, node: fx.Node, mod: nn.Module, ins: list, permuted: list) -> None:
        name = node.target
        p = name + "."
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else (ins[0] if ins else None)
        if isinstance(mod, nn.Sequential) and len(mod) == 0:
            self.passthrough(node, src, None)
            return
        if isinstance(mod, nn.Linear):
            gin = self.base_gid(src)
            self.add_member(gin, p + "weight", 1, "in")
            gid = self.new_group(mod.out_features, name)
            self.add_member(gid, p + "weight", 0, "out")
            if mod.bias is not None:
                self.add_member(gid, p + "bias", 0, "out")
            self.set(node, gid, -1)
            self.add_feature(gid, node.name, _P_LIN, lambda out, a, k: _feat_last(out))
            return
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            if mod.groups != 1:
                raise UnsupportedModuleError(f"module {name} ({type(mod).__name__}, groups={mod.groups}): grouped/depthwise convolutions are not supported")
            if self.node_group[src.name] == "expanded":
                raise UnsupportedModuleError(f"module {name}: convolution of a flattened map")
            self.add_member(self.base_gid(src), p + "weight", 1, "in")
            gid = self.new_group(mod.out_channels, name)
            self.add_member(gid, p + "weight", 0, "out")
            if mod.bias is not None:
                self.add_member(gid, p + "bias", 0, "out")
            self.set(node, gid, 1)
            self.add_feature(gid, node.name, _P_LIN, lambda out, a, k: _feat_chan1(out))
            return
        if isinstance(mod, nn.Embedding):
            gid = self.new_group(mod.embedding_dim, name)
            self.add_member(gid, p + "weight", 1, "out")
            self.set(node, gid, -1)
            self.add_feature(gid, node.name, _P_LIN, lambda out, a, k: _feat_last(out))
            return
        if not permuted:
            # nothing permuted flows in (e.g. input normalisation): fixed
            self.set(node, FIXED)
            return
        where = f"module {name} ({type(mod).__name__})"
        if self.node_group[src.name] == "expanded":
            if isinstance(mod, (nn.Dropout, nn.Identity) + _ACT_MODULES):
                self.node_group[node.name] = "expanded"
                self.node_chan[node.name] = -1
                self._expanded_src[node.name] = self._expanded_src[src.name]
                return
            raise UnsupportedModuleError(f"{where}: applied to a flattened feature map")
        gid = self.base_gid(src)
        chan = self.node_chan[src.name]
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for t in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, t, None) is not None:
                    self.add_member(gid, p + t, 0, "out")
            self.set(node, gid, 1)
            self.add_feature(gid, node.name, _P_NORM, lambda out, a, k: _feat_chan1(out))
            return
        if isinstance(mod, nn.GroupNorm):
            g = self.groups[self.find(gid)] if self.find(gid) != FIXED else None
            if g is not None:
                blk = mod.num_channels // mod.num_groups
                if g.block > 1 and g.block != blk:
                    raise UnsupportedModuleError(f"{where}: GroupNorm blocks of {blk} meet blocks of {g.block}")
                g.block = blk
            if mod.affine:
                self.add_member(gid, p + "weight", 0, "out")
                self.add_member(gid, p + "bias", 0, "out")
            self.set(node, gid, 1)
            self.add_feature(gid, node.name, _P_NORM, lambda out, a, k: _feat_chan1(out))
            return
        if isinstance(mod, nn.LayerNorm):
            if len(mod.normalized_shape) != 1:
                raise UnsupportedModuleError(f"{where}: LayerNorm over more than the last dim")
            if mod.elementwise_affine:
                self.add_member(gid, p + "weight", 0, "out")
                if mod.bias is not None:
                    self.add_member(gid, p + "bias", 0, "out")
            self.set(node, gid, -1)
            self.add_feature(gid, node.name, _P_NORM, lambda out, a, k: _feat_last(out))
            return
        if isinstance(mod, _ACT_MODULES):
            self.passthrough(node, src, _P_ACT)
            return
        if isinstance(mod, _PASS_MODULES):
            self.passthrough(node, src, None)
            return
        if isinstance(mod, nn.Flatten):
            if mod.start_dim != 1:
                raise UnsupportedModuleError(f"{where}: only Flatten(start_dim=1) is supported")
            self.expand(node, src)
            return
        if isinstance(mod, nn.TransformerEncoderLayer):
            self.encoder_layer(node, name, mod, gid)
            return
        if isinstance(mod, nn.TransformerEncoder):
            for i, layer in enumerate(mod.layers):
                self.encoder_layer(node, f"{name}.layers.{i}", layer, gid, index=i)
            if mod.norm is not None:
                if not isinstance(mod.norm, nn.LayerNorm):
                    raise UnsupportedModuleError(f"{where}: final norm {type(mod.norm).__name__}")
                self.add_member(gid, p + "norm.weight", 0, "out")
                if mod.norm.bias is not None:
                    self.add_member(gid, p + "norm.bias", 0, "out")
            self.set(node, gid, -1)
            self.add_feature(gid, node.name, _P_BLOCK, lambda out, a, k: _feat_last(out), key=node.name + ":out")
            return
        raise UnsupportedModuleError(
            f"MuDSC cannot merge {where}: a matched unit flows into it. Supported: {', '.join(SUPPORTED_MODULES)}")

    def encoder_layer(self, node: fx.Node, name: str, layer: nn.Module, gid: int, index: Optional[int] = None) -> None:
        where = f"module {name} ({type(layer).__name__})"
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise UnsupportedModuleError(f"{where}: only nn.TransformerEncoderLayer layers are supported")
        attn = layer.self_attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModuleError(f"{where}: only packed-QKV self-attention without bias_k/add_zero_attn")
        act = layer.activation
        if not (act in (F.relu, F.gelu) or isinstance(act, (nn.ReLU, nn.GELU)) or act in ("relu", "gelu")):
            raise UnsupportedModuleError(f"{where}: activation {act!r} (relu/gelu only)")
        p = name + "."
        E, H = attn.embed_dim, attn.num_heads
        # residual stream (shared group)
        self.add_member(gid, p + "self_attn.in_proj_weight", 1, "in")
        self.add_member(gid, p + "self_attn.out_proj.weight", 0, "out")
        if attn.out_proj.bias is not None:
            self.add_member(gid, p + "self_attn.out_proj.bias", 0, "out")
        self.add_member(gid, p + "linear1.weight", 1, "in")
        self.add_member(gid, p + "linear2.weight", 0, "out")
        if layer.linear2.bias is not None:
            self.add_member(gid, p + "linear2.bias", 0, "out")
        for nm in ("norm1", "norm2"):
            ln = getattr(layer, nm)
            if ln.weight is not None:
                self.add_member(gid, p + nm + ".weight", 0, "out")
            if ln.bias is not None:
                self.add_member(gid, p + nm + ".bias", 0, "out")
        # heads: one group, matched as whole blocks of head_dim
        hg = self.new_group(E, name + ".heads", block=E // H, within=False)
        self.add_member(hg, p + "self_attn.in_proj_weight", 0, "out", tile=3)
        if attn.in_proj_bias is not None:
            self.add_member(hg, p + "self_attn.in_proj_bias", 0, "out", tile=3)
        self.add_member(hg, p + "self_attn.out_proj.weight", 1, "in")
        # feed-forward hidden units
        fg = self.new_group(layer.linear1.out_features, name + ".ffn")
        self.add_member(fg, p + "linear1.weight", 0, "out")
        if layer.linear1.bias is not None:
            self.add_member(fg, p + "linear1.bias", 0, "out")
        self.add_member(fg, p + "linear2.weight", 1, "in")

        def internals(out, args, kwargs, mod, _i=index):
            x = args[0]
            kpm = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
            if kwargs.get("mask", kwargs.get("src_mask")) is not None or (len(args) > 1 and args[1] is not None):
                raise UnsupportedModuleError(f"{where}: attention masks (src_mask) are not supported by MuDSC features")
            layers = [mod] if _i is None else list(mod.layers)
            res = {}
            for j, lyr in enumerate(layers):
                heads, hid, x = _encoder_layer_internals(lyr, x, kpm)
                res[j] = (heads, hid)
            return res

        key = f"{node.name}:{index}"
        cache_key = node.name + ":internals"
        self.add_feature(hg, node.name, _P_ACT, ("internals", cache_key, internals, index, 0), key=key + ":heads")
        self.add_feature(fg, node.name, _P_ACT, ("internals", cache_key, internals, index, 1), key=key + ":ffn")
        if index is None:
            self.set(node, gid, -1)
            self.add_feature(gid, node.name, _P_BLOCK, lambda out, a, k: _feat_last(out), key=node.name + ":out")


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
    return _Builder(gm).run()


class FeatureRecorder(fx.Interpreter):
    """Runs a traced model and records, per feature key of ``spec``, a ``[samples, units]`` matrix."""

    def __init__(self, model: nn.Module, spec: MergeSpec):
        gm = fx.GraphModule(model, spec.graph_module.graph)
        super().__init__(gm)
        self.spec = spec
        self.features: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = getattr(self, n.op)(n.target, args, kwargs)
        ex = self.spec.extractors.get(n.name)
        if ex:
            cache = {}
            for key, fn in ex:
                if isinstance(fn, tuple):
                    _, ck, f, index, which = fn
                    if ck not in cache:
                        cache[ck] = f(out, args, kwargs, self.module.get_submodule(n.target))
                    self.features[key] = cache[ck][0 if index is None else index][which]
                else:
                    self.features[key] = fn(out, args, kwargs)
        return out

    def record(self, *inputs) -> dict[str, torch.Tensor]:
        self.features = {}
        self.run(*inputs)
        return self.features
