"""The unit groups of the MuDSC merge graph while it is being built, and the call a handler gets.

:class:`UnitGroups` is a union-find over permutation groups plus the units of every traced node;
:class:`OpCall` describes one traced call. The handlers of :mod:`.ops` and :mod:`.transformer` change the
groups through this interface only, and :class:`~.graph.GraphBuilder` (which walks the ``torch.fx`` graph
and dispatches to those handlers) is a :class:`UnitGroups`, so the three modules import in one direction:
``groups <- transformer <- ops <- graph``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx
import torch.nn as nn

from .spec import FIXED, FeaturePoint, Group, Member, NodeUnits, UnsupportedModuleError

__all__ = ["OpCall", "UnitGroups"]


@dataclass
class OpCall:
    """One traced call: its tensor inputs, the tensor it transforms (its first argument), how errors
    name it, and the module for ``call_module``."""

    node: fx.Node
    inputs: list[fx.Node]
    source: Optional[fx.Node]
    where: str
    module: Optional[nn.Module] = None


class UnitGroups:
    """The groups found so far (root gid -> :class:`~.spec.Group`; ``FIXED`` has none) and each node's units."""

    def __init__(self):
        self.parent = {FIXED: FIXED}
        self.groups: dict[int, Group] = {}  # root gid -> group (FIXED has none)
        self.node_units: dict[str, Optional[NodeUnits]] = {}  # node name -> its units (None: not a tensor)
        self.extractors: dict[str, list] = {}
        self.concatenations: set[str] = set()
        self.next_id = 1

    # --- union-find over groups -----------------------------------------------------------
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED in (ra, rb):
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
        dropped = self.groups.pop(drop, None)
        if keep != FIXED:
            self.groups[keep].members += dropped.members
            self.groups[keep].features += dropped.features
        return keep

    def root_group(self, gid: int) -> Optional[Group]:
        """The group ``gid`` now belongs to, or None when it is fixed."""
        return self.groups.get(self.find(gid))

    def new_group(self, size: int, name: str, block: int = 1, within: bool = True) -> int:
        gid = self.next_id
        self.next_id += 1
        self.parent[gid] = gid
        self.groups[gid] = Group(gid=gid, size=size, block=block, within=within, name=name)
        return gid

    def add_member(self, gid: int, param: str, axis: int, role: str, tile: int = 1) -> None:
        group = self.root_group(gid)
        if group is not None:
            group.members.append(Member(param, axis, role, tile))

    def add_members(self, gid: int, module: nn.Module, prefix: str, entries: tuple) -> None:
        """``entries``: ``(tensor path under module, axis, role, tile)``; absent tensors (None) are skipped."""
        for path, axis, role, tile in entries:
            if functools.reduce(getattr, path.split("."), module) is not None:
                self.add_member(gid, f"{prefix}.{path}", axis, role, tile)

    def add_feature(self, gid: int, node: fx.Node, priority: int, feature) -> None:
        group = self.root_group(gid)
        if group is not None:
            group.features.append(FeaturePoint(priority, feature.key))
            self.extractors.setdefault(node.name, []).append(feature)

    # --- node states ------------------------------------------------------------------------
    def units(self, node: fx.Node) -> Optional[NodeUnits]:
        return self.node_units[node.name]

    def set_units(self, node: fx.Node, units: Optional[NodeUnits]) -> None:
        self.node_units[node.name] = units

    def fix(self, node: fx.Node, where: str) -> None:
        self.union(self.units(node).gid, FIXED, where)

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return [n for n in found if self.node_units.get(n.name) is not None]

