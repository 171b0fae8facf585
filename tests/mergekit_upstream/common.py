"""Test helpers expected by mergekit 0.1.5's own test suite (``tests.common``).

The mergekit 0.1.5 sdist ships its tests without ``tests/common.py``; ``run.sh`` copies this
file into the extracted sdist as ``tests/common.py``. Helpers:

- ``make_picollama`` / ``make_gpt2size`` / ``make_picogranite`` / ``make_picoLlaVa``: save a tiny,
  randomly initialised model (float32, one unsharded ``model.safetensors``) to ``path`` and
  return the path as a string.
- ``run_and_check_merge``: run ``mergekit.merge.run_merge`` into a temporary directory and
  sanity-check the output (weights present, config loadable, no NaNs), then call ``validate``.

This file is not collected by our own pytest run (see ``conftest.py`` next to it).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Optional, Union

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

from mergekit.architecture import arch_info_for_config
from mergekit.config import MergeConfiguration
from mergekit.io import LazyTensorLoader
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

PathLike = Union[str, os.PathLike]


def _save(model: PreTrainedModel, path: PathLike) -> str:
    path = str(path)
    os.makedirs(path, exist_ok=True)
    model = model.to(torch.float32)
    # One unsharded safetensors file: some tests edit ``<path>/model.safetensors`` directly.
    model.save_pretrained(path, safe_serialization=True, max_shard_size="10GB")
    return path


def _tiny_llama_config(vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def make_picollama(path: PathLike, vocab_size: int = 64) -> str:
    return _save(LlamaForCausalLM(_tiny_llama_config(vocab_size)), path)


def make_gpt2size(path: PathLike) -> str:
    # Tiny dimensions but GPT-2's layer count: tests stack layer_range [0, 12].
    cfg = GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=32,
        n_layer=12,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(GPT2LMHeadModel(cfg), path)


def make_picogranite(path: PathLike) -> str:
    cfg = GraniteConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return _save(GraniteForCausalLM(cfg), path)


def make_picoLlaVa(path: PathLike) -> str:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=_tiny_llama_config(64),
        image_token_index=63,
    )
    return _save(LlavaForConditionalGeneration(cfg), path)


def _output_tensor_names(out_path: str, index_json_name: Optional[str]) -> set:
    if index_json_name is not None:
        index_path = os.path.join(out_path, index_json_name)
        assert os.path.exists(index_path), f"missing {index_json_name} in merge output"
        with open(index_path, encoding="utf-8") as f:
            return set(json.load(f)["weight_map"])
    loader = LazyTensorLoader.from_disk(out_path)
    return set(loader.index.tensor_paths)


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
    options: Optional[MergeOptions] = None,
) -> None:
    """Merge ``config`` into a temporary directory and sanity-check the result.

    ``auto_arch=True`` is for models with no JSON architecture definition in mergekit (e.g.
    LLaVA): mergekit infers the layout from the checkpoints by itself, so only the generic
    checks apply. Otherwise every required weight of the output's known architecture must be
    present in the output.
    """
    if options is None:
        options = MergeOptions(copy_tokenizer=True, write_model_card=True, quiet=True)
    with tempfile.TemporaryDirectory() as out_path:
        run_merge(config, out_path=out_path, options=options)

        assert os.path.exists(os.path.join(out_path, "config.json")), "no config.json"
        out_config = AutoConfig.from_pretrained(out_path)

        if check_tensors:
            names = _output_tensor_names(out_path, index_json_name)
            assert names, "merge output contains no tensors"
            if not auto_arch:
                arch = arch_info_for_config(out_config)
                assert arch is not None, (
                    f"no known architecture for {out_config.architectures}"
                )
                for weight in arch.all_weights(out_config):
                    if weight.optional:
                        continue
                    candidates = (
                        (weight.name,)
                        + tuple(weight.aliases or ())
                        + tuple(weight.tied_names or ())
                    )
                    assert any(c in names for c in candidates), (
                        f"weight {weight.name} missing from merge output"
                    )

        if check_nan:
            loader = LazyTensorLoader.from_disk(out_path)
            for name in loader.index.tensor_paths:
                tensor = loader.get_tensor(name)
                if tensor.is_floating_point():
                    assert not tensor.isnan().any(), f"NaN in merged tensor {name}"

        if validate is not None:
            validate(out_path)
