"""The examples for the two doors run offline in seconds and do what their docstrings say
(README.md, docs/lora.md, docs/lightning.md point to them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mergekit_wudi.io import load_state_dict
from test_lightning_callback import assert_same, direct_merge

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(relative: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(relative).stem}", EXAMPLES / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_lora_adapters_example_equals_wudi_of_the_effective_weights(tmp_path):
    pytest.importorskip("peft")
    from mergekit.merge_methods.api import merge_state_dicts
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from mergekit_wudi.lora import effective_state_dict

    example = load_example("merge_lora_adapters.py")
    merged_dir = example.main(["--workdir", str(tmp_path)])
    merged = load_state_dict(merged_dir / "model.safetensors")
    base_model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    models = {"base": base}
    for name in example.ADAPTERS:
        lora = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / name)
        models[name] = effective_state_dict(lora)
    expected = merge_state_dicts(models, "wudi", parameters={"solver": "decorrelated"}, base="base")
    moved = 0
    for name, tensor in merged.items():
        if any(target in name for target in example.TARGETS):
            # the same solver on the effective weights, up to float32 rounding
            error = float((tensor - expected[name]).norm() / (expected[name] - base[name]).norm())
            assert error < 1e-4, (name, error)
            assert not torch.equal(tensor, base[name]), name
            moved += 1
        else:
            assert torch.equal(tensor, base[name]), name
    assert moved == 2 * len(example.TARGETS)  # two layers


def test_lightning_cli_example_merges_through_the_configured_callback(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (lightning[pytorch-extra])")
    from mergekit_wudi.lightning import WUDIMergeCallback

    monkeypatch.chdir(tmp_path)  # the config's paths are relative
    example = load_example("lightning_cli/train.py")
    cli = example.main(["--config", str(EXAMPLES / "lightning_cli" / "config.yaml")])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, WUDIMergeCallback)]
    out = tmp_path / "runs" / "lightning_cli" / "merge"
    assert callback.merged_path == str(out / "merged.safetensors")
    assert [Path(p).name for p in callback.expert_paths] == [f"task_{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in (out / "heads").iterdir()) == [f"task_{i}.safetensors" for i in range(3)]
    merged = load_state_dict(out / "merged.safetensors")
    assert not any(name.startswith("head") for name in merged)
    expected = direct_merge("wudi", {"solver": "closed_form"}, out / "base.safetensors", callback.expert_paths,
                            cli.model, names=list(merged))
    assert_same(merged, expected)
    state = cli.model.state_dict()  # the merge was loaded into the model
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name
