#!/usr/bin/env python
"""Issue 21 screen, validation split: an input proxy for LoRA adapters trained through the callback.

The callback's sequential LoRA path (``benchmarks/qualitybench/lora.py``, ``--lora-init callback``: ONE PEFT
encoder fitted task after task through ``WUDIMergeCallback``, which zeroes ``lora_B`` at each fit start and leaves
``lora_A`` where the previous fit left it) is retrained here with every LoRA layer's ``A`` recorded at the start
and end of each fit, and ``B`` at the end (cached in ``<cache>/a_updates_screen/seed<N>.safetensors``; the experts
are bit-identical to the quality benchmark's). Rows, per seed and subset (7 and 4 tasks, the benchmark's
subsets), mean validation accuracy over the subset's tasks (``val_limit`` texts per task):

- ``decorrelated``: ``solver: decorrelated`` (the data-free default for LoRA experts);
- ``ta @lambda``: task arithmetic at 0.2 / 0.3 / 0.5 (what validation picks for it on these experts);
- ``proxy dA ridge r``: Eq. 1 with input Grams ``dA_i^T dA_i`` (``dA_i`` = the change of ``A`` over task i's
  fit), :func:`mergekit_wudi.merge_with_input_grams` at ridge ``r`` (1e-2: its default), other tensors
  ``decorrelated``;
- ``proxy BdA ridge r``: the same with ``(s B_i dA_i)^T (s B_i dA_i)``, WUDI's own proxy on the part of the
  update that ``dA_i`` carries.

The winner (``proxy dA`` at the kernel's defaults: no new parameter) is what ``WUDIMergeCallback`` does by
default for PEFT modules (``lora_a_updates``); its test rows come from ``benchmarks/quality_variants.py --kind
lora_callback`` (docs/lora.md).

    HF_HUB_OFFLINE=1 python benchmarks/lora_a_updates_screen.py --cache-dir /work/cache-quality --seeds 0 1 2 3 4 \\
        --output benchmarks/results/issue21/screen_lora_callback_a_updates.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROWS_RIDGES = (1e-2, 1e-1)
TA_LAMBDAS = (0.2, 0.3, 0.5)


def lora_layer_factors(peft) -> dict:
    """``{encoder weight name: (A, B)}`` of a PEFT encoder's LoRA layers (detached copies)."""
    out = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.replace("base_model.model.", "", 1) + ".weight"
            out[key] = (module.lora_A["default"].weight.detach().clone(),
                        module.lora_B["default"].weight.detach().clone())
    return out


def train_separately_recording(lcfg, cache: Path, data, tasks, positions, seed: int) -> dict:
    """``--lora-init independent`` / ``shared``: one fresh PEFT encoder per task, seeded as
    ``benchmarks.qualitybench.lora.train_lora_expert`` seeds it (the same experts), A / B recorded as below."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from benchmarks.qualitybench.experts import fit_one, training_seed
    from benchmarks.qualitybench.lora import SHARED_INIT_POSITION
    from benchmarks.qualitybench.model import load_encoder

    folder = cache / "a_updates_screen"
    path = folder / f"{lcfg['lora_init']}-seed{seed}.safetensors"
    if path.exists():
        return load_file(str(path))
    folder.mkdir(parents=True, exist_ok=True)
    store = {}
    for task in tasks:
        shared = lcfg["lora_init"] == "shared"
        torch.manual_seed(training_seed(seed, SHARED_INIT_POSITION if shared else positions[task]))
        encoder = get_peft_model(load_encoder(lcfg["model"]), LoraConfig(**lcfg["lora"]))
        start = lora_layer_factors(encoder)
        seconds, module = fit_one(lcfg, data, task, len(tasks[task]["labels"]), seed, positions[task], [],
                                  encoder=encoder)
        print(f"seed {seed}: trained {task} in {seconds:.0f}s", flush=True)
        for key, (a, b) in lora_layer_factors(encoder).items():
            store[f"{task}|A0|{key}"], store[f"{task}|A|{key}"], store[f"{task}|B|{key}"] = start[key][0], a, b
        store.update({f"{task}|head|{k}": v.detach().clone() for k, v in module.head.state_dict().items()})
        store.update({f"{task}|expert|{k}": v.detach().clone()
                      for k, v in module.encoder.merge_and_unload().state_dict().items()})
    save_file({k: v.contiguous() for k, v in store.items()}, str(path))
    return store


def train_recording(lcfg, cache: Path, data, tasks, positions, seed: int) -> dict:
    """The callback path's experts of one seed, with A at the start / end and B at the end of every fit."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from benchmarks.qualitybench.experts import fit_one, training_seed
    from benchmarks.qualitybench.lora import SHARED_INIT_POSITION
    from benchmarks.qualitybench.model import load_encoder
    from mergekit_wudi.io import load_state_dict
    from mergekit_wudi.lightning import WUDIMergeCallback

    folder = cache / "a_updates_screen"
    path = folder / f"seed{seed}.safetensors"
    if path.exists():
        return load_file(str(path))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(training_seed(seed, SHARED_INIT_POSITION))  # as train_lora_callback_experts
    encoder = get_peft_model(load_encoder(lcfg["model"]), LoraConfig(**lcfg["lora"]))
    out_dir = folder / f"callback-seed{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    callback = WUDIMergeCallback(method="wudi", parameters={"solver": "closed_form"}, exclude=["head"],
                                 output=str(out_dir), num_tasks=len(tasks), load_merged=False, progress=False)
    store = {}
    for task in tasks:
        start = lora_layer_factors(encoder)
        seconds, module = fit_one(lcfg, data, task, len(tasks[task]["labels"]), seed, positions[task], [callback],
                                  encoder=encoder)
        print(f"seed {seed}: trained {task} in {seconds:.0f}s", flush=True)
        for key, (a, b) in lora_layer_factors(encoder).items():
            store[f"{task}|A0|{key}"], store[f"{task}|A|{key}"], store[f"{task}|B|{key}"] = start[key][0], a, b
        store.update({f"{task}|head|{k}": v.detach().clone() for k, v in module.head.state_dict().items()})
    for i, task in enumerate(tasks):
        store.update({f"{task}|expert|{k[len('encoder.'):]}": v
                      for k, v in load_state_dict(callback.expert_paths[i]).items() if k.startswith("encoder.")})
    save_file({k: v.contiguous() for k, v in store.items()}, str(path))
    return store


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--subsets", type=int, nargs="+", default=[7, 4])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora-init", choices=["callback", "independent", "shared"], default="callback",
                   help="which LoRA experts (the quality benchmark's regimes); independent / shared: each adapter "
                        "trained on its own from its seeded init (what the callback sees if a script re-creates "
                        "the adapter before every fit)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import mergekit_wudi
    from benchmarks.common import mean
    from benchmarks.qualitybench import run as qrun
    from benchmarks.qualitybench.evaluate import Evaluator
    from benchmarks.qualitybench.lora import lora_config
    from benchmarks.qualitybench.methods import linear_flags, merge
    from benchmarks.qualitybench.model import load_encoder, tokenised
    from benchmarks.qualitybench.subset import first_tasks, task_order
    from benchmarks.qualitybench.tasks import load_tasks
    from mergekit_wudi.io import atomic_file

    cache = Path(args.cache_dir)
    all_tasks, quick = load_tasks(qrun.DEFAULT_SOURCE, qrun.DATA_SEED)
    cfg = qrun.build_config(qrun.parse_args(["--seeds", *map(str, args.seeds)]), list(all_tasks), quick)
    positions = {t: list(all_tasks).index(t) for t in all_tasks}
    data = tokenised(all_tasks, cfg["max_length"], cache, cfg["model"])
    ev = Evaluator(data, cfg["model"])
    sd0 = {k: v.detach().clone() for k, v in load_encoder(cfg["model"]).state_dict().items()}
    lin, _ = linear_flags(sd0)
    lcfg = lora_config({**cfg, "lora_init": args.lora_init})
    scaling = lcfg["lora"]["lora_alpha"] / lcfg["lora"]["r"]
    out_path = Path(args.output)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out.update(command="HF_HUB_OFFLINE=1 python benchmarks/lora_a_updates_screen.py " + " ".join(argv or sys.argv[1:]),
               split="validation", val_limit=cfg["val_limit"], lora=lcfg["lora"], lora_init=args.lora_init)
    results = out.setdefault("seeds", {})

    for seed in args.seeds:
        train = train_recording if args.lora_init == "callback" else train_separately_recording
        store = train(lcfg, cache, data, all_tasks, positions, seed)
        part = lambda task, kind: {k.split("|", 2)[2]: v for k, v in store.items()  # noqa: E731
                                   if k.startswith(f"{task}|{kind}|")}
        experts = {t: part(t, "expert") for t in all_tasks}
        heads = {t: part(t, "head") for t in all_tasks}
        order = task_order(cfg["tasks"], seed)
        for k in args.subsets:
            subset = first_tasks(order, k, positions)
            res = results.setdefault(str(seed), {}).setdefault(str(k), {})
            exps = [experts[t] for t in subset]

            def row(name, build):
                t0 = time.perf_counter()
                sd = build()
                seconds = time.perf_counter() - t0
                res[name] = mean(ev.accuracy(sd, {t: heads[t] for t in subset}, "validation", cfg["val_limit"]).values())
                res[f"_{name} seconds"] = seconds
                print(f"seed {seed} k {k} {name}: {res[name]:.4f} ({seconds:.1f}s)", flush=True)
                with atomic_file(out_path) as tmp:
                    Path(tmp).write_text(json.dumps(out, indent=1))

            def grams(kind):
                out_grams = []
                for t in subset:
                    a0, a, b = part(t, "A0"), part(t, "A"), part(t, "B")
                    factors = {key: (a[key] - a0[key]) if kind == "dA" else scaling * b[key] @ (a[key] - a0[key])
                               for key in a}
                    out_grams.append({key: (f.T @ f).float() for key, f in factors.items()})
                return out_grams

            models = {"base": sd0, **{t: experts[t] for t in subset}}
            row("decorrelated", lambda: merge(models, "wudi", {"solver": "decorrelated", "linear": lin})[0])
            for lam in TA_LAMBDAS:
                row(f"ta @{lam:g}", lambda: {n: w0 + lam * sum(e[n] - w0 for e in exps) if w0.is_floating_point()
                                             else w0 for n, w0 in sd0.items()})
            for kind in ("dA", "BdA"):
                for ridge in ROWS_RIDGES:
                    row(f"proxy {kind} ridge {ridge:g}", lambda: mergekit_wudi.merge_with_input_grams(
                        sd0, exps, grams(kind), parameters={"solver": "decorrelated"}, ridge=ridge))
    return 0


if __name__ == "__main__":
    sys.exit(main())
