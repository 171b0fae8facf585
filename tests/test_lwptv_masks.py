"""LwPTV mask files (mergekit_wudi/lwptv_masks.py): writing, reading, lookup errors, the pre-pass CLI."""

import json

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

import mergekit_wudi  # noqa: F401
from mergekit_wudi import lwptv_masks
from _data import kernel_tensors as _tensors


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


def _broken_experts(family, root):
    """An expert of another hidden size, one with a truncated weight file and one holding a NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mergekit_wudi.toy import make_llama_family

    wide = make_llama_family(root / "wide", num_experts=1, hidden_size=48)[1]
    truncated = root / "truncated"
    shutil.copytree(family[1], truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:-1000])
    nan = root / "nan"
    shutil.copytree(family[1], nan)
    state = load_file(str(nan / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    return {
        "hidden-size mismatch": (wide, rf"model {wide}: tensor '.*' has shape \[.*48.*\] in {wide / 'model.safetensors'}, "
                                       "but the base model .* has"),
        "truncated file": (truncated, rf"model {truncated}: cannot read {truncated / 'model.safetensors'}.*truncated"),
        "NaN expert": (nan, rf"non-finite values \(NaN or Inf\) in tensor 'model.layers.1.mlp.up_proj.weight' of model "
                            rf"{nan} \(file .*model.safetensors\)"),
    }


def test_mask_prepass_cli_names_the_model_and_file_of_a_bad_expert(llama_family, tmp_path, capsys):
    """Issue 20: the pre-pass's errors named neither the model nor the file."""
    import re

    import yaml

    for case, (expert, message) in _broken_experts(llama_family, tmp_path).items():
        config = {"merge_method": "wudi", "base_model": str(llama_family[0]),
                  "models": [{"model": str(llama_family[2])}, {"model": str(expert)}]}
        (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
        assert lwptv_masks.main([str(tmp_path / "c.yml"), str(tmp_path / "m.json"), "--ratio", "0.2"]) == 1, case
        error = capsys.readouterr().err
        assert re.search(message, error), (case, error)
        assert not (tmp_path / "m.json").exists(), case
