"""AWD and LwPTV: the framework-free math, and the kernels on single tensors (no model files)."""

import json
import math

import pytest
import torch

import mergekit_wudi  # noqa: F401  (registers the methods)
from mergekit.merge_methods.api import merge_tensors
from mergekit_wudi import lwptv_masks
from mergekit_wudi.solvers import awd, lwptv


def _family(T=4, shape=(24, 16), shared=1.0, scale=0.01, seed=0):
    """Task vectors with a shared component (as fine-tuning from one base gives) and a base."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(*shape, generator=g)
    tvs = torch.stack([shared * common + torch.randn(*shape, generator=g) for _ in range(T)]) * scale
    base = torch.randn(*shape, generator=g)
    return base, tvs


# ---------------------------------------------------------------------------------------------- AWD


@pytest.mark.parametrize("scope", ["tensor", "row"])
def test_awd_lowers_mean_abs_cosine_and_bounds_delta(scope):
    _, tvs = _family()
    alpha = 0.1
    before = float(awd.mean_abs_cosine(tvs, scope=scope))
    delta = awd.redundant_vector(tvs, alpha=alpha, steps=100, scope=scope)
    after = float(awd.mean_abs_cosine(tvs - delta, scope=scope))
    assert before > 0.3
    assert after < 0.5 * before
    # best iterate kept: L_orth(v) + alpha ||delta|| / s <= L_orth(tau)  =>  ||delta|| <= s * L_orth(tau) / alpha
    s = float(tvs.flatten(1).norm(dim=1).mean())
    assert float(delta.norm()) <= s * before / alpha + 1e-6
    assert float(delta.norm()) < float(tvs.flatten(1).norm(dim=1).max())
    torch.testing.assert_close(awd.disentangle(tvs, alpha=alpha, steps=100, scope=scope), tvs - delta)


@pytest.mark.parametrize("alpha", [1e6, math.inf])
@pytest.mark.parametrize("scope", ["tensor", "row"])
def test_awd_alpha_to_infinity_is_a_no_op(alpha, scope):
    _, tvs = _family()
    delta = awd.redundant_vector(tvs, alpha=alpha, steps=50, scope=scope)
    assert not bool(delta.any())
    assert torch.equal(awd.disentangle(tvs, alpha=alpha, steps=50, scope=scope), tvs)


def test_awd_larger_alpha_gives_smaller_delta():
    _, tvs = _family()
    norms = [float(awd.redundant_vector(tvs, alpha=a, steps=100).norm()) for a in (0.0, 0.3, 0.6, 1e3)]
    assert norms[0] >= norms[1] - 1e-6 and norms[1] >= norms[2] - 1e-6 and norms[3] == 0


def test_awd_relative_scale_invariance():
    _, tvs = _family()
    d1 = awd.redundant_vector(tvs, alpha=0.1, steps=50)
    d2 = awd.redundant_vector(tvs * 1000, alpha=0.1, steps=50)
    torch.testing.assert_close(d2, d1 * 1000, rtol=1e-3, atol=1e-5)


def test_awd_zero_task_vectors_stay_zero_and_no_nan():
    _, tvs = _family(T=3)
    tvs[1] = 0
    out = awd.disentangle(tvs, alpha=0.05, steps=50)
    assert torch.isfinite(out).all()
    assert not bool(out[1].any())
    assert bool((out[0] != tvs[0]).any())
    zeros = torch.zeros(3, 5, 4)
    assert torch.equal(awd.disentangle(zeros), zeros)
    single = tvs[:1]
    assert torch.equal(awd.disentangle(single), single)
    assert float(awd.mean_abs_cosine(zeros)) == 0.0


def test_awd_one_dimensional_row_scope_falls_back_to_tensor():
    _, tvs = _family(shape=(32,))
    a = awd.redundant_vector(tvs, alpha=0.1, steps=20, scope="row")
    b = awd.redundant_vector(tvs, alpha=0.1, steps=20, scope="tensor")
    assert torch.equal(a, b)


def test_awd_rejects_bad_input():
    _, tvs = _family()
    bad = tvs.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        awd.disentangle(bad)
    with pytest.raises(ValueError, match="scope"):
        awd.disentangle(tvs, scope="model")
    with pytest.raises(ValueError, match="alpha"):
        awd.disentangle(tvs, alpha=-1)


# -------------------------------------------------------------------------------------------- LwPTV


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


# ------------------------------------------------------------------------------- kernels, one tensor


def _tensors(dtype=torch.float32):
    base, tvs = _family(T=3, scale=0.05)
    return [base.to(dtype)] + [(base + tv).to(dtype) for tv in tvs]


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {"weight": 0.7, "lambda": 0.9}),
        ("ties", {"weight": 1.0, "density": 0.4}),
        ("ties", {"weight": [0.5, 1.0, 0.3], "density": 0.7, "normalize": False, "int8_mask": True}),
    ],
)
def test_wrappers_with_preprocess_none_equal_the_builtin(method, params):
    tensors = _tensors(torch.bfloat16)
    expected = merge_tensors(tensors, method, base_index=0, parameters=params)
    got = merge_tensors(tensors, f"preprocessed_{method}", base_index=0, parameters=params)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    got0 = merge_tensors(
        tensors, f"preprocessed_{method}", base_index=0, parameters={**params, "preprocess": "lwptv", "lwptv_threshold": 0}
    )
    assert torch.equal(got0, expected)


@pytest.mark.parametrize("method", ["wudi", "preprocessed_task_arithmetic", "preprocessed_ties"])
def test_kernels_full_mask_is_pretrained_and_awd_changes_result(method):
    tensors = _tensors()
    params = {"weight": 1.0}
    full = merge_tensors(tensors, method, base_index=0, parameters={**params, "preprocess": "lwptv", "lwptv_threshold": 1e9})
    assert torch.equal(full, tensors[0])
    plain = merge_tensors(tensors, method, base_index=0, parameters=params)
    processed = merge_tensors(
        tensors, method, base_index=0, parameters={**params, "preprocess": "awd", "awd_steps": 30, "awd_alpha": 0.01}
    )
    assert torch.isfinite(processed).all() and not torch.equal(plain, processed)
    noop = merge_tensors(tensors, method, base_index=0, parameters={**params, "preprocess": "awd", "awd_alpha": 1e9})
    torch.testing.assert_close(noop, plain)


def test_wudi_defaults_unchanged_by_preprocess_none():
    tensors = _tensors()
    a = merge_tensors(tensors, "wudi", base_index=0, parameters={"solver": "closed_form"})
    b = merge_tensors(tensors, "wudi", base_index=0, parameters={"solver": "closed_form", "preprocess": "none"})
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"preprocess": "awd+ties"}, "'preprocess'"),
        ({"preprocess": "awd", "awd_alpha": -1}, "'awd_alpha'"),
        ({"preprocess": "awd", "awd_lr": 0}, "'awd_lr'"),
        ({"preprocess": "awd", "awd_steps": -3}, "'awd_steps'"),
        ({"preprocess": "awd", "awd_scope": "model"}, "'awd_scope'"),
        ({"preprocess": "lwptv", "lwptv_threshold": -0.1}, "'lwptv_threshold'"),
        ({"preprocess": "lwptv"}, "lwptv_threshold"),
        ({"preprocess": "lwptv", "lwptv_threshold": 0.1, "lwptv_mask_file": "m.json"}, "not both"),
    ],
)
@pytest.mark.parametrize("method", ["wudi", "preprocessed_ties"])
def test_bad_preprocessing_parameters_are_named(method, params, match):
    with pytest.raises(Exception, match=match):
        merge_tensors(_tensors(), method, base_index=0, parameters={"weight": 1.0, **params})


def test_mask_file_lookup_and_errors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "masks.json"
    lwptv_masks.write_mask_file(path, {1: ["w"], 2: [], 3: ["w"]}, ["w"], ratio=0.5)
    params = {"weight": 1.0, "preprocess": "lwptv", "lwptv_mask_file": str(path)}
    ids = [0, 1, 2, 3]
    got = merge_tensors(tensors, "preprocessed_task_arithmetic", base_index=0, ids=ids, name="w", parameters=params)
    expected = merge_tensors([tensors[0], tensors[0], tensors[2], tensors[0]], "task_arithmetic", base_index=0,
                             parameters={"weight": 1.0})
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="no entry for tensor 'other'"):
        merge_tensors(tensors, "wudi", base_index=0, ids=ids, name="other", parameters=params)
    with pytest.raises(ValueError, match="no model '7'"):
        merge_tensors(tensors, "wudi", base_index=0, ids=[0, 1, 2, 7], name="w", parameters=params)
    with pytest.raises(FileNotFoundError, match="lwptv_mask_file not found"):
        merge_tensors(tensors, "wudi", base_index=0, ids=ids, name="w",
                      parameters={**params, "lwptv_mask_file": str(tmp_path / "nope.json")})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"drop": {}}))
    with pytest.raises(ValueError, match="not a mergekit-wudi/lwptv-mask file"):
        merge_tensors(tensors, "wudi", base_index=0, ids=ids, name="w", parameters={**params, "lwptv_mask_file": str(bad)})
    with pytest.raises(ValueError, match="unknown tensors"):
        lwptv_masks.write_mask_file(tmp_path / "x.json", {1: ["zzz"]}, ["w"])


def test_in_memory_merge_with_mask_file_like_the_lightning_callback(tmp_path):
    """merge_state_dicts (the callback's door) passes the preprocessing parameters through."""
    from mergekit.merge_methods.api import merge_state_dicts

    g = torch.Generator().manual_seed(3)
    base = {"layers.0.w": torch.randn(6, 5, generator=g), "layers.1.w": torch.randn(6, 5, generator=g)}
    experts = {
        f"task_{i}": {n: t + (0.5 if n.startswith(f"layers.{i}") else 1e-3) * torch.randn(6, 5, generator=g)
                      for n, t in base.items()}
        for i in range(2)
    }
    path = tmp_path / "m.json"
    content = lwptv_masks.build_mask_file_from_state_dicts(base, experts, path, ratio=0.5)
    assert content["drop"] == {"task_0": ["layers.1.w"], "task_1": ["layers.0.w"]}
    merged = merge_state_dicts(
        {"base": base, **experts}, "preprocessed_task_arithmetic", base="base",
        parameters={"weight": 1.0, "preprocess": "lwptv", "lwptv_mask_file": str(path)},
    )
    torch.testing.assert_close(merged["layers.0.w"], experts["task_0"]["layers.0.w"])
    torch.testing.assert_close(merged["layers.1.w"], experts["task_1"]["layers.1.w"])
