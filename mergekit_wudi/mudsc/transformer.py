"""``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` in the MuDSC merge graph.

The residual stream of the encoder is the group of its input. Every layer adds two groups: its
attention heads (MuDSC, arXiv 2403.01753: heads are matched as whole blocks of ``head_dim`` units, units
never move inside a head; one head permutation applies to Q, K, V and the out-projection's columns) and
its feed-forward hidden units. Their activations are recomputed from the layer's inputs
(:func:`encoder_layer_internals`), since a leaf module hides them from ``torch.fx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .features import P_ACT, P_BLOCK, UnitFeature
from .groups import OpCall, UnitGroups
from .spec import IN, OUT, NodeUnits, UnsupportedModuleError

__all__ = ["encoder_layer_internals", "EncoderFeature", "encoder_layer", "encoder"]

# (tensor under the layer, axis, role, tile); absent tensors (bias=False) are skipped
_RESIDUAL_MEMBERS = (("self_attn.in_proj_weight", 1, IN, 1), ("self_attn.out_proj.weight", 0, OUT, 1),
                     ("self_attn.out_proj.bias", 0, OUT, 1), ("linear1.weight", 1, IN, 1),
                     ("linear2.weight", 0, OUT, 1), ("linear2.bias", 0, OUT, 1), ("norm1.weight", 0, OUT, 1),
                     ("norm1.bias", 0, OUT, 1), ("norm2.weight", 0, OUT, 1), ("norm2.bias", 0, OUT, 1))
_HEAD_MEMBERS = (("self_attn.in_proj_weight", 0, OUT, 3), ("self_attn.in_proj_bias", 0, OUT, 3),
                 ("self_attn.out_proj.weight", 1, IN, 1))
_FFN_MEMBERS = (("linear1.weight", 0, OUT, 1), ("linear1.bias", 0, OUT, 1), ("linear2.weight", 1, IN, 1))
_FINAL_NORM_MEMBERS = (("norm.weight", 0, OUT, 1), ("norm.bias", 0, OUT, 1))
_HEADS, _FFN = 0, 1


def encoder_layer_internals(layer: nn.TransformerEncoderLayer, x: torch.Tensor,
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


@dataclass(frozen=True)
class EncoderFeature:
    """Per-head attention outputs (``part=0``) or feed-forward hidden units (``part=1``) of the layer
    ``layer``; ``layer_index``: None when the node is that layer, ``i`` for layer i of an encoder node."""

    key: str
    layer: str
    where: str
    layer_index: Optional[int]
    part: int

    def extract(self, out: Any, args: tuple, kwargs: dict, module: nn.Module, cache: dict) -> torch.Tensor:
        if "layers" not in cache:  # one re-run of the node serves the features of all its layers
            cache["layers"] = self._rerun(module, args, kwargs)
        return cache["layers"][self.layer_index or 0][self.part]

    def _rerun(self, module: nn.Module, args: tuple, kwargs: dict) -> list:
        x = args[0]
        kpm = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
        if kwargs.get("mask", kwargs.get("src_mask")) is not None or (len(args) > 1 and args[1] is not None):
            raise UnsupportedModuleError(f"{self.where}: attention masks (src_mask) are not supported by MuDSC features")
        layers = [module] if self.layer_index is None else list(module.layers)
        internals = []
        for layer in layers:
            heads, hidden, x = encoder_layer_internals(layer, x, kpm)
            internals.append((heads, hidden))
        return internals


def _check_layer(layer: nn.Module, where: str) -> None:
    if not isinstance(layer, nn.TransformerEncoderLayer):
        raise UnsupportedModuleError(f"{where}: only nn.TransformerEncoderLayer layers are supported")
    attn = layer.self_attn
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise UnsupportedModuleError(f"{where}: only packed-QKV self-attention without bias_k/add_zero_attn")
    act = layer.activation
    if not (act in (F.relu, F.gelu) or isinstance(act, (nn.ReLU, nn.GELU)) or act in ("relu", "gelu")):
        raise UnsupportedModuleError(f"{where}: activation {act!r} (relu/gelu only)")


def _add_layer(b: UnitGroups, node: fx.Node, name: str, layer: nn.Module, gid: int,
               index: Optional[int] = None) -> None:
    """The groups of one encoder layer: residual stream ``gid`` (shared), heads, feed-forward."""
    where = f"module {name} ({type(layer).__name__})"
    _check_layer(layer, where)
    attn = layer.self_attn
    b.add_members(gid, layer, name, _RESIDUAL_MEMBERS)
    heads = b.new_group(attn.embed_dim, name + ".heads", block=attn.embed_dim // attn.num_heads, within=False)
    b.add_members(heads, layer, name, _HEAD_MEMBERS)
    ffn = b.new_group(layer.linear1.out_features, name + ".ffn")
    b.add_members(ffn, layer, name, _FFN_MEMBERS)
    key = f"{node.name}:{index}"
    b.add_feature(heads, node, P_ACT, EncoderFeature(key + ":heads", name, where, index, _HEADS))
    b.add_feature(ffn, node, P_ACT, EncoderFeature(key + ":ffn", name, where, index, _FFN))


def _residual_output(b: UnitGroups, call: OpCall, gid: int) -> None:
    node = call.node
    b.set_units(node, NodeUnits(gid))
    b.add_feature(gid, node, P_BLOCK, UnitFeature(node.name + ":out", node.target, -1))


def encoder_layer(b: UnitGroups, call: OpCall) -> None:
    gid = b.units(call.source).gid
    _add_layer(b, call.node, call.node.target, call.module, gid)
    _residual_output(b, call, gid)


def encoder(b: UnitGroups, call: OpCall) -> None:
    mod, name = call.module, call.node.target
    gid = b.units(call.source).gid
    for i, layer in enumerate(mod.layers):
        _add_layer(b, call.node, f"{name}.layers.{i}", layer, gid, index=i)
    if mod.norm is not None:
        if not isinstance(mod.norm, nn.LayerNorm):
            raise UnsupportedModuleError(f"{call.where}: final norm {type(mod.norm).__name__}")
        b.add_members(gid, mod, name, _FINAL_NORM_MEMBERS)
    _residual_output(b, call, gid)
