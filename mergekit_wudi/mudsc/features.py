"""Activations that measure the units of a group, and the interpreter that records them.

MuDSC's ``S_act`` (arXiv 2403.01753, Sec. 3) is the Pearson correlation of unit activations; every
group of a :class:`~.spec.MergeSpec` names the graph nodes whose outputs carry its units. Post-activation
outputs are preferred (as in ZipIt / MuDSC), then residual sums, norm outputs and plain layer outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .checks import require_finite
from .spec import MergeSpec

__all__ = ["P_ACT", "P_BLOCK", "P_NORM", "P_LIN", "units_matrix", "UnitFeature", "FeatureRecorder"]

# feature-point priorities: post-activation features are preferred (ZipIt / MuDSC use them)
P_ACT, P_BLOCK, P_NORM, P_LIN = 3, 2, 1, 0


def units_matrix(out: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """``[samples, units]`` view of an activation whose units lie on dim 1 (conv maps) or the last dim."""
    if unit_dim == 1:
        if out.dim() == 2:
            return out
        return out.transpose(1, -1).reshape(-1, out.shape[1])
    return out.reshape(-1, out.shape[-1])


@dataclass(frozen=True)
class UnitFeature:
    """The output of a node, its units on ``unit_dim``; ``layer`` names it in messages."""

    key: str
    layer: str
    unit_dim: int

    def extract(self, out: Any, args: tuple, kwargs: dict, module: Optional[nn.Module], cache: dict) -> torch.Tensor:
        return units_matrix(out, self.unit_dim)


class FeatureRecorder(fx.Interpreter):
    """Runs a traced model and records, per feature key of ``spec``, a ``[samples, units]`` matrix.

    A recorded activation with NaN or Inf is an error naming ``name`` (the model) and the layer."""

    def __init__(self, model: nn.Module, spec: MergeSpec, name: str = "the model"):
        gm = fx.GraphModule(model, spec.graph_module.graph)
        super().__init__(gm)
        self.spec = spec
        self.name = name
        self.features: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = getattr(self, n.op)(n.target, args, kwargs)
        features = self.spec.extractors.get(n.name)
        if features:
            module = self.module.get_submodule(n.target) if n.op == "call_module" else None
            cache: dict = {}  # shared by the features of one node (one encoder re-run for all its layers)
            for feature in features:
                value = feature.extract(out, args, kwargs, module, cache)
                require_finite(value, f"the activations of {self.name} at layer {feature.layer!r}",
                               "check the model's weights and the merge data")
                self.features[feature.key] = value
        return out

    def record(self, *inputs) -> dict[str, torch.Tensor]:
        self.features = {}
        self.run(*inputs)
        return self.features
