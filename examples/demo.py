"""The main job: build a tiny base model and three experts, merge them with a real `mergekit-yaml`
run using `merge_method: wudi`, and print what changed.

    python examples/demo.py [--workdir demo-output] [--solver adam]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mergekit_wudi.toy import make_llama_family, mergekit_yaml_executable


def interference(tau: torch.Tensor, task_vectors: torch.Tensor) -> float:
    """Eq. 1 of the paper at ``tau``: sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2."""
    sq_norms = task_vectors.flatten(1).norm(dim=1).square()
    products = (tau - task_vectors) @ task_vectors.transpose(1, 2)
    return float((products.square().sum((1, 2)) / sq_norms).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-output")
    parser.add_argument("--solver", default="adam", choices=["adam", "closed_form", "spectral", "lowrank"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir).absolute()
    shutil.rmtree(work, ignore_errors=True)

    print(f"1. Building a tiny Llama base and 3 experts under {work}/ ...")
    base_path, *expert_paths = make_llama_family(work / "models", num_experts=3)
    config = {
        "merge_method": "wudi",
        "base_model": str(base_path),
        "models": [{"model": str(p)} for p in expert_paths],
        "parameters": {"solver": args.solver},
        "dtype": "float32",
    }
    config_path = work / "wudi.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = work / "merged"
    command = [mergekit_yaml_executable(), str(config_path), str(out), "--no-copy-tokenizer", "--quiet"]
    print("2. Running: mergekit-yaml", " ".join(command[1:]))
    print("   with", config_path.name + ":\n     " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n     "))
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"   merged in {time.perf_counter() - start:.1f} s -> {out}")

    base = load_file(str(base_path / "model.safetensors"))
    experts = [load_file(str(p / "model.safetensors")) for p in expert_paths]
    merged = load_file(str(out / "model.safetensors"))
    print("3. What changed (relative to the base; interference = Eq. 1 of arXiv 2503.08099):")
    print(f"   {'tensor':<44} {'|merged-base|/|base|':>21} {'interference: sum of TVs -> WUDI':>34}")
    unchanged = 0
    for name in sorted(merged):
        delta = float((merged[name] - base[name]).norm() / base[name].norm())
        if delta == 0:
            unchanged += 1
            continue
        tvs = torch.stack([e[name] - base[name] for e in experts])
        before = interference(tvs.sum(0), tvs)
        after = interference(merged[name] - base[name], tvs)
        print(f"   {name:<44} {delta:>21.4f} {before:>16.4g} -> {after:<15.4g}")
    print(f"   {unchanged} tensors (embeddings, lm_head, norms) kept at the base, as the WUDI authors do.")
    print(f"4. Model card: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
