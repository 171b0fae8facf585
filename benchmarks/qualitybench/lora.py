"""The LoRA rows of the quality benchmark (issue #14): one PEFT LoRA expert per task on the same encoder, tasks,
seeds and training schedule as the full experts, merged by task arithmetic, TIES and WUDI.

Every merge sees each expert's EFFECTIVE weights ``W0 + (alpha / r) B A`` (PEFT's ``merge_and_unload``; what
mergekit's ``model: base+path/to/adapter`` syntax materialises), so WUDI merges the updates, not the factors.
The experts are cached under ``<cache>/lora_experts`` keyed like the full experts plus the LoRA config.
``python benchmarks/quality.py --lora`` runs these rows (results under ``results["lora"]``; ``--combine`` joins
them with the main run's file).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..common import stable_hash
from .experts import expert_key, fit_one, load_expert, training_seed
from .methods import BUILTIN_SPECS, MethodSpec, record_val_scaled, run_subset
from .model import load_encoder
from .subset import first_tasks, reference_rows, task_order

# PEFT LoRA on every nn.Linear of the BERT layers (query/key/value and the three `dense` projections)
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"], "lora_dropout": 0.0}
# LoRA's factors start at B = 0: with the full fine-tune's 1e-4 they barely move in 50 steps
LORA_LR = 1e-3
# The ways users get LoRA experts: each task's A from its own seed (the default rows), every task's A from one
# seed ("shared": the same initial A for every adapter of a seed, e.g. one training script run per task with a
# fixed seed), or the callback's own sequential path ("callback": ONE PEFT encoder fitted task after task through
# WUDIMergeCallback, which resets lora_B to 0 at every fit start and leaves lora_A where the previous fit left
# it). Results go under results["lora"], results["lora_shared_init"], results["lora_callback"].
LORA_INITS = ("independent", "shared", "callback")
SHARED_INIT_POSITION = 999  # the task position whose training seed draws the shared A (no task has it)


def lora_results_key(init: str) -> str:
    return {"independent": "lora", "shared": "lora_shared_init", "callback": "lora_callback"}[init]


def lora_config(cfg: dict) -> dict:
    return {"lora_init": "independent", **cfg, "lr_encoder": LORA_LR, "lora": dict(LORA),
            "lora_wudi_scale_grid": [0.2, 0.35, 0.5, 0.75, 1.0]}


def lora_expert_path(lcfg: dict, cache: Path, task: dict, seed: int, position: int) -> Path:
    parts = [expert_key(lcfg, task, seed, position), lcfg["lora"]]
    if lcfg.get("lora_init", "independent") != "independent":  # the independent experts keep their cache keys
        parts.append({"lora_init": lcfg["lora_init"]})
    key = stable_hash(parts)
    return cache / "lora_experts" / f"s{seed}-{key}.safetensors"


def train_lora_expert(lcfg: dict, data, task_name: str, num_labels: int, seed: int, position: int, path: Path):
    """Fine-tune one LoRA expert and cache its effective encoder weights (``merge_and_unload``) and its head."""
    from peft import LoraConfig, get_peft_model

    from mergekit_wudi.io import atomic_file, save_safetensors_atomic

    shared = lcfg.get("lora_init", "independent") == "shared"
    torch.manual_seed(training_seed(seed, SHARED_INIT_POSITION if shared else position))  # the A factors' init
    encoder = get_peft_model(load_encoder(lcfg["model"]), LoraConfig(**lcfg["lora"]))
    seconds, module = fit_one(lcfg, data, task_name, num_labels, seed, position, [], encoder=encoder)
    effective = module.encoder.merge_and_unload()
    sd = {**{f"encoder.{k}": v for k, v in effective.state_dict().items()},
          **{f"head.{k}": v for k, v in module.head.state_dict().items()}}
    with atomic_file(path.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"task": task_name, "seed": seed, "train_seconds": seconds,
                                         "via": "Lightning fit of a PEFT LoRA encoder", **lcfg}))
    save_safetensors_atomic(sd, path)
    return seconds


def train_lora_callback_experts(lcfg: dict, cache: Path, data, tasks, positions, seed: int, paths: dict, log):
    """The callback's own sequential LoRA path: ONE PEFT encoder (A drawn once, from the shared-init seed), one
    ``trainer.fit`` per task (the source's order) through one ``WUDIMergeCallback`` that snapshots each expert's
    effective weights; cached like the other experts (all tasks retrained together: each fit starts where the
    previous one left ``lora_A``)."""
    import shutil

    from peft import LoraConfig, get_peft_model

    from mergekit_wudi.io import atomic_file, load_state_dict, save_safetensors_atomic
    from mergekit_wudi.lightning import WUDIMergeCallback

    torch.manual_seed(training_seed(seed, SHARED_INIT_POSITION))
    encoder = get_peft_model(load_encoder(lcfg["model"]), LoraConfig(**lcfg["lora"]))
    out_dir = cache / "callback" / f"lora-seed{seed}-{stable_hash([p.name for p in paths.values()], 10)}"
    shutil.rmtree(out_dir, ignore_errors=True)
    # The callback's defaults: its LoRA A-update Grams (lora_a_updates) are kept next to each expert
    callback = WUDIMergeCallback(exclude=["head"], output=str(out_dir), num_tasks=len(tasks), load_merged=False,
                                 progress=False)
    seconds = {}
    for task in tasks:
        seconds[task], _ = fit_one(lcfg, data, task, len(tasks[task]["labels"]), seed, positions[task], [callback],
                                   encoder=encoder)
        log(f"  trained LoRA expert {task} seed {seed}: {seconds[task]:.0f}s (WUDIMergeCallback, sequential PEFT)")
    heads = callback.task_heads
    for i, task in enumerate(tasks):
        sd = {**load_state_dict(callback.expert_paths[i]), **heads[i]}
        with atomic_file(paths[task].with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps({"task": task, "seed": seed, "train_seconds": seconds[task],
                                             "via": "WUDIMergeCallback (sequential, PEFT LoRA)", **lcfg}))
        grams = load_state_dict(str(out_dir / "grams" / f"task_{i}.safetensors"))
        save_safetensors_atomic({k[len("encoder."):]: v for k, v in grams.items()}, a_update_grams_path(paths[task]))
        save_safetensors_atomic(sd, paths[task])


def a_update_grams_path(expert: Path) -> Path:
    """Where the callback path's expert keeps its LoRA A-update Grams (``WUDIMergeCallback(lora_a_updates)``)."""
    return expert.with_suffix(".a_updates.safetensors")


def a_update_grams(lcfg: dict, cache: Path, tasks, positions, seed: int) -> dict:
    """``{task: {weight name: GramSketch}}`` of the callback path's experts (encoder naming, as the experts)."""
    from mergekit_wudi.input_grams import load_grams

    return {t: load_grams(a_update_grams_path(lora_expert_path(lcfg, cache, tasks[t], seed, positions[t])))[0]
            for t in tasks}


def callback_default_merge(sd0: dict, experts: list, grams: list):
    """(state dict, seconds): the merge ``WUDIMergeCallback`` makes by default of LoRA experts it trained
    (``lora_a_updates``): Eq. 1 with each expert's A-update Grams (:func:`a_update_grams`), decorrelated elsewhere."""
    import mergekit_wudi

    t0 = time.perf_counter()
    sd = mergekit_wudi.merge_with_input_grams(sd0, experts, grams, parameters={"solver": "decorrelated"})
    return sd, time.perf_counter() - t0


def lora_experts(lcfg, cache: Path, data, tasks, positions, seed, log):
    """({task: effective encoder state dict}, {task: head}, {task: train seconds}), training missing ones."""
    experts, heads, secs = {}, {}, {}
    if lcfg.get("lora_init") == "callback":
        paths = {t: lora_expert_path(lcfg, cache, tasks[t], seed, positions[t]) for t in tasks}
        if not all(p.exists() and a_update_grams_path(p).exists() for p in paths.values()):
            train_lora_callback_experts(lcfg, cache, data, tasks, positions, seed, paths, log)
    for task in tasks:
        path = lora_expert_path(lcfg, cache, tasks[task], seed, positions[task])
        if not path.exists():
            s = train_lora_expert(lcfg, data, task, len(tasks[task]["labels"]), seed, positions[task], path)
            log(f"  trained LoRA expert {task} seed {seed}: {s:.0f}s")
        experts[task], heads[task], meta = load_expert(path)
        secs[task] = meta["train_seconds"]
    return experts, heads, secs


def _wudi_total_rank(ctx):
    """The rank fast path at the subset's total LoRA rank: exact for LoRA experts (issue #12)."""
    k = ctx.cfg["lora"]["r"] * len(ctx.subset)
    for solver in ("closed_form", "spectral"):
        sd, secs = ctx.merge("wudi", {"solver": solver, "rank": k, "linear": ctx.lin})
        ctx.record(f"wudi {solver} (rank {k} = total LoRA rank)", sd, secs, {"rank": k})


def _wudi_val_scaled(ctx):
    """WUDI's merged task vector rescaled on validation, as task arithmetic's lambda is: on LoRA experts WUDI's
    solution stays close to the plain sum (their row spaces barely overlap), which task arithmetic scales down."""
    for solver in ("closed_form", "spectral"):
        sd1, secs = ctx.merge("wudi", {"solver": solver, "linear": ctx.lin})
        record_val_scaled(ctx, solver, sd1, secs, "lora_wudi_scale_grid")


LORA_SPECS = [spec for spec in BUILTIN_SPECS
              if spec.name in ("task_arithmetic", "ties", "wudi closed_form", "wudi spectral", "wudi recommended",
                               "wudi decorrelated")]
# adam (300 Adam steps per weight, 1-2.5 min per merge here) is left out of the LoRA rows to fit the CPU budget
LORA_SPECS.append(MethodSpec("wudi rank = total LoRA rank", _wudi_total_rank, group="rank"))
LORA_SPECS.append(MethodSpec("wudi val scaling", _wudi_val_scaled))


def run_lora_seeds(cfg, tasks, results, ev, sd0, cache, save, log) -> None:
    """The LoRA rows for every seed and subset size, into ``results["lora"]`` (same layout as the main run)."""
    lcfg = lora_config(cfg)
    lora = results.setdefault(lora_results_key(lcfg["lora_init"]),
                              {"config": {"lora": LORA, "lr_encoder": LORA_LR, "lora_init": lcfg["lora_init"]},
                               "seeds": {}})
    t0 = time.perf_counter()
    for seed in cfg["seeds"]:
        lcfg["_seed"] = seed
        log(f"seed {seed}: LoRA experts")
        experts, heads, train_secs = lora_experts(lcfg, cache, ev.data, tasks, cfg["task_positions"], seed, log)
        rec = {"train_seconds": train_secs, "trained_via": "Lightning fit of a PEFT LoRA encoder", "subsets": {}}
        rec["expert_test"] = {t: ev.accuracy(experts[t], {t: heads[t]}, "test", cfg["test_limit"])[t] for t in tasks}
        rec["pretrained_test"] = ev.accuracy(sd0, heads, "test", cfg["test_limit"])
        log(f"  LoRA experts {rec['expert_test']}")
        order = task_order(cfg["tasks"], seed)  # the main run's subsets
        rec["task_order"] = order
        lora["seeds"][str(seed)] = rec
        for k in cfg["subsets"]:
            subset = first_tasks(order, k, cfg["task_positions"])
            held_out = [t for t in order if t not in subset]
            log(f"  seed {seed}, {k} LoRA experts merged: {subset}")
            methods = reference_rows(rec, subset, [], lambda: None)
            methods.update(run_subset(lcfg, ev, sd0, experts, heads, subset, [], rec["expert_test"], log,
                                      specs=LORA_SPECS))  # no held-out (OOD) scoring for the LoRA rows
            rec["subsets"][str(k)] = {"tasks": subset, "held_out": held_out, "methods": methods}
            save()
    log(f"LoRA rows done in {time.perf_counter() - t0:.0f}s")
