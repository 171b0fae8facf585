"""The LLM-shaped models the speed benchmark merges: a Qwen2 config with random bf16 base weights and
experts = base + a delta per 2-D weight, streamed shard by shard into the cache folder (the default
benchmark's Qwen2.5-0.5B shape, and the sweep's sizes). Two kinds of delta (issue #22):

- ``lora`` (kind a, LoRA-like): rank-8 delta + small dense noise;
- ``fullft`` (kind b, full-fine-tune-like): on the linear weights, a task vector whose singular values
  follow the decay profile measured on the quality benchmark's real fine-tunes (``spectrum.py``), with
  random orthonormal singular vectors and the same Frobenius norm as kind a's rank-8 part; the
  vocabulary matrices (embeddings, lm_head), which WUDI does not solve, get kind a's delta."""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from pathlib import Path

import torch

QWEN = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
RANK = 8
BASE_STD = 0.02
LOWRANK_STD = 2e-3  # entry std of the rank-8 delta
NOISE_STD = 2e-4  # entry std of the dense noise (about bf16's rounding at 0.02)
SHARD_BYTES = 2 * 1024**3


def tensor_shapes(layers: int, config: dict = QWEN) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2-architecture model with ``config`` and ``layers`` layers (lm_head when untied)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    return shapes


def linear_shapes(layers: int, config: dict = QWEN) -> list[tuple[int, int]]:
    """[out, in] of every weight WUDI solves (2-D, no vocabulary axis)."""
    return [s for n, s in tensor_shapes(layers, config).items()
            if len(s) == 2 and "embed_tokens" not in n and "lm_head" not in n]


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def model_tensor(name: str, shape, model: int, seed: int = 0, profile: dict | None = None) -> torch.Tensor:
    """The tensor ``name`` of the base (``model`` 0) or of expert ``model`` (base + delta), float32, drawn from
    generators keyed by (name, model[, seed]) only: any tensor can be rebuilt alone, in any order. With a
    spectrum ``profile`` the linear weights' deltas are of kind ``fullft`` (module docstring)."""
    salt = (seed,) if seed else ()
    g = _generator(name, 0, *salt)
    if len(shape) == 1:
        base = (1.0 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else BASE_STD * torch.randn(shape, generator=g)
    else:
        base = torch.randn(shape, generator=g).mul_(BASE_STD)
    if model == 0:
        return base
    g = _generator(name, model, *salt)
    if len(shape) == 1:
        return base.add_(torch.randn(shape, generator=g), alpha=NOISE_STD * 5)
    if profile is not None and "embed_tokens" not in name and "lm_head" not in name:
        from .spectrum import layer_task_vector

        frobenius = LOWRANK_STD * math.sqrt(shape[0] * shape[1])
        return base.add_(layer_task_vector(name, shape, profile, frobenius, lambda *key: _generator(*key, *salt), model))
    a, b = torch.randn(shape[0], RANK, generator=g), torch.randn(RANK, shape[1], generator=g)
    base.addmm_(a, b, alpha=LOWRANK_STD / math.sqrt(RANK))
    return base.add_(torch.randn(shape, generator=g), alpha=NOISE_STD)


def write_model(folder: Path, config: dict, model: int, seed: int = 0, profile: dict | None = None) -> None:
    """One model folder (config.json, bf16 shards <= SHARD_BYTES, model.safetensors.index.json) for a Qwen2
    ``config`` (with ``num_hidden_layers``), streamed: never more than one shard in memory. ``profile``:
    experts of kind ``fullft`` (:func:`model_tensor`)."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**config)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(folder)
    shards, current, nbytes = [], {}, 0
    for name, shape in tensor_shapes(config["num_hidden_layers"], config).items():
        t = model_tensor(name, shape, model, seed, profile).to(torch.bfloat16)
        if current and nbytes + t.numel() * 2 > SHARD_BYTES:
            shards.append(current)
            current, nbytes = {}, 0
        current[name] = t
        nbytes += t.numel() * 2
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def build_models(cache: Path, layers: int, experts: int = 3, seed: int = 0) -> Path:
    """Qwen2.5-0.5B-shaped base + experts with ``layers`` layers under ``cache``, keyed by config; skipped when
    already there."""
    key = f"qwen2.5-0.5b-shape_L{layers}_E{experts}_r{RANK}_s{seed}_v2"  # v2: tensors from model_tensor
    root = cache / key
    if (root / "DONE").exists():
        return root
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    for m in range(experts + 1):
        write_model(root / ("base" if m == 0 else f"expert_{m - 1}"), {**QWEN, "num_hidden_layers": layers}, m, seed)
    (root / "DONE").write_text(f"built in {time.perf_counter() - t0:.1f} s\n")
    print(f"[build] {key}: {time.perf_counter() - t0:.1f} s", flush=True)
    return root
