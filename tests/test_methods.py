"""`merge_method: wudi` through mergekit: YAML subprocess, Python API, registry, bad input."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from mergekit.merge_methods import PerGroupValues
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
from safetensors.torch import load_file

from mergekit_wudi.solvers import wudi as W
from mergekit_wudi.toy import mergekit_yaml_executable
from _data import kernel_tensors as _tensors

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(path):
    return load_file(str(Path(path) / "model.safetensors"))


def yaml_config(family, **parameters):
    base, *experts = family
    return {
        "merge_method": "wudi",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": parameters,
        "dtype": "float32",
    }


def run_yaml(config, out, *extra):
    cfg = Path(out).parent / f"{Path(out).name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [mergekit_yaml_executable(), str(cfg), str(out), "--no-copy-tokenizer", "--quiet", *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_mergekit_yaml_subprocess_matches_solver(llama_family, tmp_path):
    """A plain `mergekit-yaml` (fresh interpreter, no import by the user) runs WUDI exactly."""
    out = tmp_path / "merged"
    result = run_yaml(yaml_config(llama_family, iterations=40), out)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load(out)
    base, *experts = [load(p) for p in llama_family]
    checked_linear = 0
    for name, tensor in merged.items():
        if any(k in name for k in LINEAR_NAMES):
            expected = W.wudi(base[name], [e[name] for e in experts], iterations=40)
            assert torch.allclose(tensor, expected, rtol=1e-5, atol=1e-7), name
            assert not torch.equal(tensor, base[name])
            checked_linear += 1
        else:  # embeddings, lm_head, norms stay at the base (the authors' choice)
            assert torch.equal(tensor, base[name]), name
    assert checked_linear == 14
    card = (out / "README.md").read_text()
    assert "[WUDI-Merging](https://arxiv.org/abs/2503.08099)" in card


def test_run_merge_api_with_filters_and_non_linear(llama_family, tmp_path):
    config = yaml_config(
        llama_family,
        solver=[{"filter": "mlp", "value": "closed_form"}, {"value": "spectral"}],
        non_linear="mean",
        scaling=0.5,
    )
    config["models"][0]["parameters"] = {"weight": 2.0}
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, quiet=True))
    merged = load(tmp_path / "out")
    base, *experts = [load(p) for p in llama_family]
    weights = [2.0, 1.0, 1.0]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        solver = "closed_form" if "mlp" in name else "spectral"
        expected = W.wudi(base[name], [e[name] for e in experts], solver=solver, scaling=0.5, weights=weights)
        assert torch.allclose(merged[name], expected, rtol=1e-5, atol=1e-7), name
    norm = "model.layers.0.input_layernorm.weight"
    mean_tv = sum(w * (e[norm] - base[norm]) for w, e in zip(weights, experts)) / 3
    assert torch.allclose(merged[norm], base[norm] + 0.5 * mean_tv, atol=1e-7)


def test_merge_state_dicts_and_merge_tensors():
    g = torch.Generator().manual_seed(0)
    base = {"lin.weight": torch.randn(6, 5, generator=g), "lin.bias": torch.randn(6, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    merged = merge_state_dicts(
        {"base": base, "a": experts[0], "b": experts[1]},
        "wudi",
        base="base",
        parameters={"iterations": 25, "non_linear": "sum"},
    )
    expected = W.wudi(base["lin.weight"], [e["lin.weight"] for e in experts], iterations=25)
    assert torch.allclose(merged["lin.weight"], expected)
    assert torch.allclose(merged["lin.bias"], experts[0]["lin.bias"] + experts[1]["lin.bias"] - base["lin.bias"])
    # per-tensor `linear` override: the weight treated as non-linear follows non_linear
    merged = merge_state_dicts(
        [base, *experts], "wudi", base=0, parameters={"linear": PerGroupValues([False, None]), "non_linear": "base"}
    )
    assert torch.equal(merged["lin.weight"], base["lin.weight"])
    single = merge_tensors([base["lin.weight"], experts[0]["lin.weight"]], "wudi", base_index=0, parameters={"solver": "closed_form"})
    assert torch.allclose(single, W.wudi(base["lin.weight"], [experts[0]["lin.weight"]], solver="closed_form"))


def test_bf16_inputs_are_solved_in_float32(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 10, generator=g)
    experts = [base + 0.05 * torch.randn(12, 10, generator=g) for _ in range(3)]
    tensors = [t.to(torch.bfloat16) for t in (base, *experts)]
    merged = merge_tensors(tensors, "wudi", base_index=0, parameters={"iterations": 20})
    assert merged.dtype == torch.bfloat16
    expected = W.wudi(tensors[0], tensors[1:], iterations=20)
    assert torch.equal(merged, expected)


# --- bad input ---------------------------------------------------------------------------------


def test_expert_equal_to_base_is_skipped_per_tensor(llama_family, tmp_path):
    config = yaml_config([llama_family[0], llama_family[0], llama_family[1]], solver="closed_form")
    config["models"][0]["model"] = str(llama_family[0])
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "o"), MergeOptions(copy_tokenizer=False, quiet=True))
    merged = load(tmp_path / "o")
    base, expert = load(llama_family[0]), load(llama_family[1])
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.isfinite(merged[name]).all()
    assert torch.allclose(merged[name], W.wudi(base[name], [expert[name]], solver="closed_form"), atol=1e-7)


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


def test_rank_fast_path_from_yaml(llama_family, tmp_path):
    """`rank` reaches the solver: a rank at least the matrix size is the exact solver, bit for bit;
    `auto` stays close to exact on these rank-2-plus-noise experts (spectral keeps the unseen init)."""
    base, *experts = (load(p) for p in llama_family)
    exact = {}
    for solver in ("closed_form", "spectral"):
        run_merge(MergeConfiguration.model_validate(yaml_config(llama_family, solver=solver)),
                  str(tmp_path / solver), MergeOptions(copy_tokenizer=False, quiet=True))
        exact[solver] = load(tmp_path / solver)
    name = "model.layers.0.mlp.up_proj.weight"
    for solver, rank, tol in (("closed_form", 10_000, 0.0), ("spectral", "auto", 0.05)):
        out = tmp_path / f"{solver}-{rank}"
        run_merge(MergeConfiguration.model_validate(yaml_config(llama_family, solver=solver, rank=rank)),
                  str(out), MergeOptions(copy_tokenizer=False, quiet=True))
        fast = load(out)
        moved = exact[solver][name] - base[name]
        assert float((fast[name] - exact[solver][name]).norm() / moved.norm()) <= tol
        assert torch.equal(fast["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # per-tensor, as every parameter: rank 1 on up_proj only, exact (rank >= size) elsewhere
    filtered = [{"filter": "up_proj", "value": 1}, {"value": 10_000}]
    out = tmp_path / "filtered"
    run_merge(MergeConfiguration.model_validate(yaml_config(llama_family, solver="closed_form", rank=filtered)),
              str(out), MergeOptions(copy_tokenizer=False, quiet=True))
    fast = load(out)
    assert not torch.allclose(fast[name], exact["closed_form"][name], atol=1e-6)
    other = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(fast[other], exact["closed_form"][other])


def test_prior_from_yaml_reaches_the_solver(llama_family, tmp_path):
    """`prior` / `prior_scale` in a YAML give the solver's Eq. 3 merge of every linear weight; prior 0 is
    today's closed_form bit for bit; embeddings stay at the base."""
    base, *experts = (load(p) for p in llama_family)
    outs = {}
    for tag, params in (("plain", {"solver": "closed_form"}),
                        ("zero", {"solver": "closed_form", "prior": 0.0}),
                        ("prior", {**W.RECOMMENDED}),
                        ("dim", {"solver": "closed_form", "prior": 3.0, "prior_scale": "dim"})):
        run_merge(MergeConfiguration.model_validate(yaml_config(llama_family, **params)),
                  str(tmp_path / tag), MergeOptions(copy_tokenizer=False, quiet=True))
        outs[tag] = load(tmp_path / tag)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs["zero"][name], outs["plain"][name])
    for tag, opts in (("prior", {k: v for k, v in W.RECOMMENDED.items() if k != "solver"}),
                      ("dim", {"prior": 3.0, "prior_scale": "dim"})):
        expected = W.wudi(base[name], [e[name] for e in experts], solver="closed_form", **opts)
        assert torch.allclose(outs[tag][name], expected, atol=1e-6)
        assert not torch.allclose(outs[tag][name], outs["plain"][name], atol=1e-6)
        assert torch.equal(outs[tag]["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
