"""`merge_method: wudi` through mergekit: YAML subprocess, Python API, registry, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from mergekit.merge_methods import PerGroupValues
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
from safetensors.torch import load_file, save_file

from mergekit_wudi.solvers import wudi as W
from mergekit_wudi.toy import mergekit_yaml_executable

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


def test_registry_is_idempotent_and_plain_python_sees_wudi():
    import mergekit_wudi
    from mergekit_wudi import _startup

    before = len(merge_methods.registered_methods())
    mergekit_wudi.register_methods()
    mergekit_wudi.register_methods()
    _startup.install()
    assert len(merge_methods.registered_methods()) == before
    assert merge_methods.get("wudi").spec.pretty_name == "WUDI-Merging"
    probe = (
        "import sys; from mergekit import merge_methods; merge_methods.get('wudi'); "
        "print('mergekit_wudi.methods' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # the start-up hook itself imports neither torch nor mergekit
    light = subprocess.run(
        [sys.executable, "-c", "import sys; print('torch' in sys.modules, 'mergekit' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert light.stdout.split() == ["False", "False"]


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


@pytest.mark.parametrize(
    "parameters,needle",
    [
        ({"solver": "sgd"}, "wudi parameter 'solver' must be one of adam, closed_form, spectral, lowrank"),
        ({"iterations": -1}, "wudi parameter 'iterations' must be >= 0"),
        ({"learning_rate": 0}, "wudi parameter 'learning_rate' must be > 0"),
        ({"non_linear": "max"}, "wudi parameter 'non_linear' must be one of base, mean, sum"),
        ({"keep_fraction": 1.5}, "wudi parameter 'keep_fraction'"),
    ],
)
def test_bad_parameters_fail_at_planning_before_any_tensor_is_read(llama_family, tmp_path, monkeypatch, parameters, needle):
    from mergekit.io import tasks

    loaded = []
    original = tasks.GatherTensors.execute
    monkeypatch.setattr(tasks.GatherTensors, "execute", lambda self, **kw: loaded.append(1) or original(self, **kw))
    with pytest.raises(Exception, match=needle.replace("(", r"\(")):
        run_merge(
            MergeConfiguration.model_validate(yaml_config(llama_family, **parameters)),
            str(tmp_path / "out"),
            MergeOptions(copy_tokenizer=False, quiet=True),
        )
    assert loaded == []
    assert not (tmp_path / "out").exists()


def test_missing_base_model_is_a_clear_error(llama_family, tmp_path):
    config = yaml_config(llama_family)
    del config["base_model"]
    result = run_yaml(config, tmp_path / "out")
    assert result.returncode != 0
    assert "requires a base input" in result.stderr
    assert not (tmp_path / "out").exists()


def test_non_finite_input_names_tensor_and_model_and_leaves_no_output(llama_family, tmp_path):
    bad = tmp_path / "bad_expert"
    bad.mkdir()
    for f in Path(llama_family[1]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load(bad)
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    config = yaml_config([llama_family[0], llama_family[1], bad], iterations=5)
    out = tmp_path / "out"
    result = run_yaml(config, out)
    assert result.returncode != 0
    assert "non-finite values (NaN or Inf) in tensor 'model.layers.1.mlp.down_proj.weight'" in result.stderr
    assert str(bad) in result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_failed_merge_keeps_previous_output(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    config = yaml_config(llama_family, solver="closed_form")
    config["models"][0]["parameters"] = {"weight": float("nan")}
    result = run_yaml(config, out)
    assert result.returncode != 0
    assert "parameter 'weight' must be a finite number" in result.stderr
    assert (out / "keep.txt").read_text() == "previous"
    ok = run_yaml(yaml_config(llama_family, solver="closed_form"), out)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "previous" and (out / "model.safetensors").exists()


def test_expert_equal_to_base_is_skipped_per_tensor(llama_family, tmp_path):
    config = yaml_config([llama_family[0], llama_family[0], llama_family[1]], solver="closed_form")
    config["models"][0]["model"] = str(llama_family[0])
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "o"), MergeOptions(copy_tokenizer=False, quiet=True))
    merged = load(tmp_path / "o")
    base, expert = load(llama_family[0]), load(llama_family[1])
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.isfinite(merged[name]).all()
    assert torch.allclose(merged[name], W.wudi(base[name], [expert[name]], solver="closed_form"), atol=1e-7)


def test_non_finite_weight_or_scaling_is_named(llama_family, tmp_path):
    config = yaml_config(llama_family, scaling=float("inf"))
    with pytest.raises(Exception, match="parameter 'scaling' must be a finite number"):
        run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "o"), MergeOptions(copy_tokenizer=False, quiet=True))
    config = yaml_config(llama_family)
    config["models"][1]["parameters"] = {"weight": float("nan")}
    with pytest.raises(Exception, match="parameter 'weight' must be a finite number"):
        run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "o"), MergeOptions(copy_tokenizer=False, quiet=True))


def test_importing_the_kernel_module_first_registers_everything():
    probe = "import mergekit_wudi.methods; from mergekit import merge_methods as m; print(m.get('wudi').spec.name)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "wudi", done.stderr
