"""Merge PEFT LoRA adapters of one base model with the ordinary ``mergekit-yaml`` and ``merge_method: wudi``.

    python examples/merge_lora_adapters.py [--workdir lora-demo]

Builds, offline, a tiny Llama base and two LoRA adapters of it (PEFT, different ranks; random "trained" factors),
then writes and runs this config:

    merge_method: wudi
    base_model: <workdir>/base
    models:
      - model: <workdir>/base+<workdir>/adapter_math     # mergekit's base+adapter: W0 + (alpha/r) B A
      - model: <workdir>/base+<workdir>/adapter_code
    parameters:
      solver: decorrelated   # the data-free configuration recommended for LoRA experts (docs/lora.md)
    dtype: float32           # float32 keeps the updates exactly low rank: each is decomposed from a small sketch

    mergekit-yaml merge.yml <workdir>/merged --lora-merge-cache <workdir>/lora_cache --no-copy-tokenizer

mergekit 0.1.5 needs ``--lora-merge-cache`` for ``base+adapter`` models (it materialises each adapter into a full
model there). The merged model is an ordinary full model (no PEFT needed to load it). Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
from pathlib import Path

import torch
import yaml

ADAPTERS = {"adapter_math": (4, 8), "adapter_code": (8, 16)}  # name -> (r, lora_alpha)
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def build(workdir: Path) -> dict:
    """A tiny base and one PEFT LoRA adapter per entry of ADAPTERS; returns the mergekit config."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(workdir / "base")
    for seed, (name, (r, alpha)) in enumerate(ADAPTERS.items()):
        expert = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                                 task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # stands in for training: PEFT initialises lora_B to zero
            for param_name, param in expert.named_parameters():
                if "lora_" in param_name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        expert.save_pretrained(workdir / name)
    return {
        "merge_method": "wudi",
        "base_model": str(workdir / "base"),
        "models": [{"model": f"{workdir / 'base'}+{workdir / name}"} for name in ADAPTERS],
        "parameters": {"solver": "decorrelated"},
        "dtype": "float32",
    }


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="lora-demo", help="where the models, the config and the merge go")
    args = ap.parse_args(argv)
    from mergekit_wudi.toy import mergekit_yaml_executable

    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    config = build(workdir)
    (workdir / "merge.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    command = [mergekit_yaml_executable(), str(workdir / "merge.yml"), str(workdir / "merged"),
               "--lora-merge-cache", str(workdir / "lora_cache"), "--no-copy-tokenizer", "--quiet"]
    print("Running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    from safetensors.torch import load_file

    merged = load_file(str(workdir / "merged" / "model.safetensors"))
    base = load_file(str(workdir / "base" / "model.safetensors"))
    moved = sorted(n for n in merged if not torch.equal(merged[n], base[n]))
    print(f"merged -> {workdir / 'merged'}: {len(moved)} of {len(merged)} tensors moved from the base "
          f"(the LoRA-targeted {', '.join(TARGETS)} weights)")
    return workdir / "merged"


if __name__ == "__main__":
    main()
