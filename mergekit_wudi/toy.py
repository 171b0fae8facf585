"""Tiny offline model families for demos and tests: a base and experts that share it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Union

import torch


def make_llama_family(
    root: Union[str, Path],
    num_experts: int = 3,
    *,
    seed: int = 0,
    rank: int = 2,
    delta_scale: float = 0.004,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 32,
) -> List[Path]:
    """Save a tiny random ``LlamaForCausalLM`` base and ``num_experts`` fine-tuned-like copies.

    Each expert adds a low-rank + small dense delta to every weight (as fine-tuning does).
    Returns ``[base_path, expert_1, ...]``. Needs ``transformers`` (a mergekit dependency).
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3 // 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(dtype)
    paths = [root / "base"]
    base.save_pretrained(paths[0])
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for index in range(num_experts):
        state = {}
        for name, tensor in base_state.items():
            delta = delta_scale * 0.2 * torch.randn(tensor.shape, generator=generator)
            if tensor.ndim == 2:
                left = torch.randn(tensor.shape[0], rank, generator=generator)
                right = torch.randn(rank, tensor.shape[1], generator=generator)
                delta += delta_scale * (left @ right) / rank**0.5
            state[name] = (tensor.float() + delta).to(dtype)
        base.load_state_dict(state)
        path = root / f"expert_{index + 1}"
        base.save_pretrained(path)
        paths.append(path)
    base.load_state_dict(base_state)
    return paths


def mergekit_yaml_executable() -> str:
    """The ``mergekit-yaml`` script of the running interpreter's environment (also when that
    environment is not activated), else whichever one is on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "mergekit-yaml"
    return str(beside) if beside.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")
