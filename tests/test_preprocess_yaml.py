"""AWD / LwPTV pre-processing from mergekit YAML: wudi, preprocessed_task_arithmetic, preprocessed_ties.

Real `mergekit-yaml` runs on the tiny Llama family of conftest.py, plus the LwPTV mask pre-pass CLI.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergekit_wudi  # noqa: F401
from mergekit_wudi.toy import mergekit_yaml_executable


def _config(family, method, parameters, model_parameters=None):
    base, *experts = family
    model_parameters = model_parameters or {}
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": dict(model_parameters)} for e in experts],
        "parameters": parameters,
        "dtype": "float32",
    }


def _weights(folder):
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _run_merge(config, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(copy_tokenizer=False, quiet=True))
    return _weights(out)


def _mergekit_yaml(config, tmp_path, name):
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / name
    done = subprocess.run(
        [mergekit_yaml_executable(), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _weights(out)


def _masks(family, tmp_path, ratio, name="masks.json"):
    cfg = tmp_path / "for_masks.yml"
    cfg.write_text(yaml.safe_dump(_config(family, "task_arithmetic", {}, {"weight": 1.0})))
    out = tmp_path / name
    done = subprocess.run(
        [sys.executable, "-m", "mergekit_wudi.lwptv_masks", str(cfg), str(out), "--ratio", str(ratio)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(out.read_text())


def test_mask_prepass_cli_writes_a_ranked_mask(llama_family, tmp_path):
    path, content = _masks(llama_family, tmp_path, ratio=0.4)
    base = _weights(llama_family[0])
    assert content["format"] == "mergekit-wudi/lwptv-mask" and set(content["tensors"]) == set(base)
    assert set(content["drop"]) == {str(p) for p in llama_family[1:]}
    # 5 layer units (embed, 2 blocks, final norm, lm_head): floor(0.4 * 5) = 2 units dropped per expert
    for names in content["drop"].values():
        units = {n.split(".self_attn")[0].split(".mlp")[0].split(".input_")[0].split(".post_")[0] for n in names}
        assert len(units) == 2


def test_full_mask_from_yaml_gives_the_pretrained_model(llama_family, tmp_path):
    path, content = _masks(llama_family, tmp_path, ratio=1.0)
    base = _weights(llama_family[0])
    for method, extra in [("preprocessed_task_arithmetic", {}), ("preprocessed_ties", {"density": 0.5}),
                          ("wudi", {})]:
        config = _config(llama_family, method, {"preprocess": "lwptv", "lwptv_mask_file": str(path)},
                         {"weight": 1.0, **extra})
        merged = _run_merge(config, tmp_path / f"full_{method}")
        for name, tensor in base.items():
            assert torch.equal(merged[name], tensor), (method, name)


@pytest.mark.parametrize("builtin,extra", [("task_arithmetic", {"lambda": 0.8}), ("ties", {})])
def test_wrappers_with_preprocess_none_equal_builtins_on_a_model(llama_family, tmp_path, builtin, extra):
    model_params = {"weight": 0.6, "density": 0.5} if builtin == "ties" else {"weight": 0.6}
    expected = _run_merge(_config(llama_family, builtin, extra, model_params), tmp_path / builtin)
    got = _run_merge(_config(llama_family, f"preprocessed_{builtin}", {**extra, "preprocess": "none"}, model_params),
                     tmp_path / f"pre_{builtin}")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize(
    "method,parameters,model_parameters",
    [
        ("wudi", {"solver": "closed_form", "preprocess": "awd+lwptv", "awd_steps": 20, "awd_alpha": 0.001,
                  "lwptv_mask_file": "MASKS"}, {}),
        ("preprocessed_task_arithmetic", {"preprocess": "awd", "awd_scope": "row", "awd_steps": 20,
                                          "awd_alpha": 0.001, "lambda": 0.5}, {"weight": 1.0}),
        ("preprocessed_ties", {"preprocess": "lwptv", "lwptv_threshold": 0.05}, {"weight": 1.0, "density": 0.5}),
    ],
)
def test_preprocessing_composes_with_each_method_via_mergekit_yaml(llama_family, tmp_path, method, parameters,
                                                                   model_parameters):
    masks = None
    if parameters.get("lwptv_mask_file") == "MASKS":
        masks, content = _masks(llama_family, tmp_path, ratio=0.4)
        parameters = {**parameters, "lwptv_mask_file": str(masks)}
    merged = _mergekit_yaml(_config(llama_family, method, parameters, model_parameters), tmp_path, "processed")
    plain_parameters = {k: v for k, v in parameters.items() if not k.startswith(("preprocess", "awd_", "lwptv_"))}
    plain = _run_merge(_config(llama_family, method, plain_parameters, model_parameters), tmp_path / "plain")
    base = _weights(llama_family[0])
    assert merged.keys() == plain.keys()
    assert all(torch.isfinite(t).all() for t in merged.values())
    changed = [n for n in merged if not torch.equal(merged[n], plain[n])]
    assert changed, "pre-processing had no effect"
    if masks is not None:
        dropped_by_all = set.intersection(*(set(v) for v in content["drop"].values()))
        for name in dropped_by_all:
            assert torch.equal(merged[name], base[name]), name


def test_mask_file_for_other_models_is_a_clear_error(llama_family, tmp_path):
    from mergekit_wudi.lwptv_masks import write_mask_file

    base = _weights(llama_family[0])
    path = tmp_path / "other.json"
    write_mask_file(path, {"/somewhere/else": []}, list(base))
    config = _config(llama_family, "preprocessed_task_arithmetic",
                     {"preprocess": "lwptv", "lwptv_mask_file": str(path)}, {"weight": 1.0})
    with pytest.raises(ValueError, match="has no entry for model"):
        _run_merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_preprocess_value_fails_at_planning(llama_family, tmp_path):
    config = _config(llama_family, "preprocessed_ties", {"preprocess": "awd", "awd_scope": "model"},
                     {"weight": 1.0, "density": 0.5})
    with pytest.raises(Exception, match="awd_scope"):
        _run_merge(config, tmp_path / "out")
