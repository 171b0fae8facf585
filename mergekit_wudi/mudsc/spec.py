"""What tracing a model for MuDSC (arXiv 2403.01753) yields: unit groups and the tensor axes they own.

A *group* is a set of units that must be permuted together (the outputs of a layer, a residual
stream, the heads of an attention layer). Every tensor axis that holds a group's units is a
:class:`Member` of it; :class:`MergeSpec` is the whole table, built by :func:`.graph.build_spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch.fx as fx

__all__ = ["FIXED", "OUT", "IN", "UnsupportedModuleError", "Member", "ParamAxis", "FeaturePoint", "Group",
           "MergeSpec", "NodeUnits"]

FIXED = 0  # group id of the units that never move: model inputs, outputs and everything joined to them
OUT = "out"  # the tensor produces or scales the units (rows of a Linear, biases, norm parameters)
IN = "in"  # the tensor consumes the units (columns of the next layer)


class UnsupportedModuleError(NotImplementedError):
    """A permuted tensor flows into a module or function MuDSC cannot merge."""


@dataclass(frozen=True)
class Member:
    """Axis ``axis`` of tensor ``param`` belongs to a group. ``role``: :data:`OUT` or :data:`IN`.
    ``tile``: the axis holds ``tile`` stacked copies (packed QKV). The axis may be ``rep`` times longer
    than ``tile * n`` (a flattened conv map); each unit then owns a contiguous run of ``rep`` entries."""

    param: str
    axis: int
    role: str
    tile: int = 1


class ParamAxis(NamedTuple):
    """One permuted axis of a tensor (a :class:`Member` seen from the tensor): group ``gid``."""

    axis: int
    gid: int
    role: str
    tile: int


class FeaturePoint(NamedTuple):
    """An activation that measures a group's units; the highest ``priority`` points of a group are used."""

    priority: int
    key: str


@dataclass
class Group:
    gid: int
    size: int
    block: int = 1  # units move in contiguous blocks of this size (heads, GroupNorm groups)
    within: bool = True  # may units be permuted inside a block (GroupNorm: yes; heads: no)
    members: list[Member] = field(default_factory=list)
    features: list[FeaturePoint] = field(default_factory=list)
    name: str = ""


@dataclass
class MergeSpec:
    groups: list[Group]  # permutable groups only, in graph order
    param_axes: dict[str, list[ParamAxis]]  # tensor name -> its permuted axes
    feature_keys: dict[int, list[str]]  # gid -> keys of the activations that measure its units
    extractors: dict[str, list]  # node name -> features recorded there (see .features)
    graph_module: fx.GraphModule

    def group(self, gid: int) -> Group:
        for g in self.groups:
            if g.gid == gid:
                return g
        raise KeyError(gid)


@dataclass(frozen=True)
class NodeUnits:
    """The units a tensor-valued node of the traced graph carries: group ``gid`` on dim ``unit_dim``
    (1: channels of a conv map, -1: the last dim). ``flattened``: a conv map flattened to
    ``[batch, units x positions]``, where every unit owns a contiguous run of entries."""

    gid: int
    unit_dim: int = -1
    flattened: bool = False
