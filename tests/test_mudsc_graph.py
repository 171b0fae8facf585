"""MuDSC merge graph (``mergekit_wudi.mudsc.graph`` / ``.ops``): flattened conv maps through functions and modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergekit_wudi.mudsc import UnsupportedModuleError, build_spec, mudsc_merge
from mergekit_wudi.mudsc.spec import ParamAxis
from tests.test_mudsc import _one_thread, permuted_copy  # noqa: F401  (_one_thread: autouse fixture)


class FlattenThenFunctions(nn.Module):
    """A conv map flattened, then element-wise functions, then a Linear (its columns own runs of 16)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(F.relu(torch.flatten(self.c(x), 1)) * 2.0)))


class FlattenThenModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)
        self.drop, self.act = nn.Dropout(0.1), nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.act(self.drop(self.c(x).view(x.shape[0], -1))))


@pytest.mark.parametrize("arch", [FlattenThenFunctions, FlattenThenModules])
def test_flattened_conv_map_keeps_its_group_through_element_wise_ops(arch):
    torch.manual_seed(0)
    model = arch().eval()
    x = torch.randn(4, 1, 6, 6)
    spec = build_spec(model, (x,))
    conv = next(g for g in spec.groups if g.name == "c")
    fc = "fc.weight"
    assert ParamAxis(1, conv.gid, "in", 1) in spec.param_axes[fc]  # the Linear's columns follow the conv channels
    twin = permuted_copy(model, (x,))
    assert not torch.equal(twin.c.weight, model.c.weight)
    merged = mudsc_merge([model, twin], [(x,)], reset_bn=False).eval()
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)


class AddsFlattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        h = torch.flatten(self.c(x), 1)
        return self.fc(h) + h


def test_adding_a_flattened_map_is_refused_by_name():
    with pytest.raises(UnsupportedModuleError, match=r"call_function add \(node add\): adds a flattened feature map"):
        build_spec(AddsFlattened(), (torch.randn(2, 1, 6, 6),))


class EncoderPlainFinalNorm(nn.Module):
    """A TransformerEncoder whose final LayerNorm has no affine tensors (was a KeyError on 'enc.norm.weight')."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(5, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, norm=nn.LayerNorm(16, elementwise_affine=False),
                                         enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def test_encoder_final_norm_without_affine_tensors():
    torch.manual_seed(0)
    model = EncoderPlainFinalNorm().eval()
    x = torch.randn(4, 6, 5)
    spec = build_spec(model, (x,))
    assert "enc.norm.weight" not in spec.param_axes and "enc.layers.0.norm2.weight" in spec.param_axes
    twin = permuted_copy(model, (x,))
    merged = mudsc_merge([model, twin], [(x,)], reset_bn=False).eval()
    torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)
