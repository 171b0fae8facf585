"""The LLM-shaped model the speed benchmark merges: Qwen2.5-0.5B's config with random bf16 base weights
and experts = base + rank-8 delta + small dense noise per 2-D weight, built once into the cache folder."""

from __future__ import annotations

import math
import shutil
import time
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



def build_models(cache: Path, layers: int, experts: int = 3, seed: int = 0) -> Path:
    """base + experts under ``cache``, keyed by config; skipped when already there."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    key = f"qwen2.5-0.5b-shape_L{layers}_E{experts}_r{RANK}_s{seed}"
    root = cache / key
    if (root / "DONE").exists():
        return root
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    names = ["base"] + [f"expert_{k}" for k in range(experts)]
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for name, shape in tensor_shapes(layers).items():
        if len(shape) == 1:
            base = (1.0 + 0.1 * torch.randn(shape, generator=gen)) if "norm" in name else BASE_STD * torch.randn(shape, generator=gen)
        else:
            base = torch.randn(shape, generator=gen).mul_(BASE_STD)
        tensors["base"][name] = base.to(torch.bfloat16)
        for k in range(experts):
            if len(shape) == 1:
                delta = torch.randn(shape, generator=gen).mul_(NOISE_STD * 5)
            else:
                out, inp = shape
                a = torch.randn(out, RANK, generator=gen)
                b = torch.randn(RANK, inp, generator=gen)
                delta = (a @ b).mul_(LOWRANK_STD / math.sqrt(RANK))
                delta.add_(torch.randn(shape, generator=gen), alpha=NOISE_STD)
            tensors[f"expert_{k}"][name] = (base + delta).to(torch.bfloat16)
            del delta
        del base
    cfg = Qwen2Config(num_hidden_layers=layers, **QWEN)
    cfg.architectures = ["Qwen2ForCausalLM"]
    try:
        cfg.dtype = "bfloat16"
    except Exception:  # older transformers
        cfg.torch_dtype = "bfloat16"
    for n in names:
        d = root / n
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        save_file(tensors[n], str(d / "model.safetensors"), metadata={"format": "pt"})
        tensors[n].clear()
    (root / "DONE").write_text(f"built in {time.perf_counter() - t0:.1f} s\n")
    print(f"[build] {key}: {time.perf_counter() - t0:.1f} s", flush=True)
    return root

