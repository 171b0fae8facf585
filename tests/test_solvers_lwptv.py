"""LwPTV (mergekit_wudi/solvers/lwptv.py): the framework-free math."""


import pytest
import torch

from mergekit_wudi.solvers import lwptv
from _data import task_vector_family as _family


def test_lwptv_saliency_formula():
    base, tvs = _family(T=3)
    s = lwptv.saliency(base, tvs)
    expected = tvs.flatten(1).norm(dim=1) / base.norm()
    torch.testing.assert_close(s, expected)
    # zero base: absolute norm, no division by zero
    s0 = lwptv.saliency(torch.zeros_like(base), tvs)
    torch.testing.assert_close(s0, tvs.flatten(1).norm(dim=1))


def test_lwptv_threshold_and_ratio_masks():
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.4], [0.0, 0.5, 0.5, 0.1]])
    assert not lwptv.layer_mask(scores, threshold=0.0).any()
    assert lwptv.layer_mask(scores, threshold=0.25).tolist() == [[False, True, True, False], [True, False, False, True]]
    assert not lwptv.layer_mask(scores, ratio=0.0).any()
    assert lwptv.layer_mask(scores, ratio=1.0).all()
    assert lwptv.layer_mask(scores, ratio=0.5).tolist() == [[False, True, True, False], [True, False, False, True]]
    with pytest.raises(ValueError, match="exactly one"):
        lwptv.layer_mask(scores)
    with pytest.raises(ValueError, match="ratio"):
        lwptv.layer_mask(scores, ratio=1.5)


def test_lwptv_apply_mask():
    _, tvs = _family(T=3)
    out = lwptv.apply_mask(tvs, torch.tensor([False, True, False]))
    assert torch.equal(out[0], tvs[0]) and torch.equal(out[2], tvs[2]) and not out[1].any()


def test_lwptv_layer_masks_by_block():
    g = torch.Generator().manual_seed(1)
    names = ["embed.weight", "model.layers.0.q.weight", "model.layers.0.k.weight", "model.layers.1.q.weight"]
    base = {n: torch.randn(4, 4, generator=g) for n in names}
    # expert a: big change in layer 1 only; expert b: big change in layer 0 only
    a = {n: base[n] + (0.5 if "layers.1" in n else 1e-3) * torch.randn(4, 4, generator=g) for n in names}
    b = {n: base[n] + (0.5 if "layers.0" in n else 1e-3) * torch.randn(4, 4, generator=g) for n in names}
    drop = lwptv.layer_masks(base.__getitem__, {"a": a.__getitem__, "b": b.__getitem__}, names, ratio=2 / 3)
    assert sorted(drop["a"]) == ["embed.weight", "model.layers.0.k.weight", "model.layers.0.q.weight"]
    assert sorted(drop["b"]) == ["embed.weight", "model.layers.1.q.weight"]
    per_tensor = lwptv.layer_masks(base.__getitem__, {"a": a.__getitem__}, names, ratio=0.25, unit="tensor")
    assert len(per_tensor["a"]) == 1
    assert lwptv.layer_unit("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
