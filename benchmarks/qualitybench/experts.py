"""Fine-tuned experts of the quality benchmark: trained through ``WUDIMergeCallback`` (sequential mode),
cached on disk under ``<cache>/experts`` keyed by the task's content and the training config."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..common import stable_hash
from .model import expert_module_class, load_encoder
from .tasks import task_fingerprint

TRAINING_KEYS = ("steps", "batch_size", "lr_encoder", "lr_head", "max_length", "model")


def training_seed(seed: int, position: int) -> int:
    """The seed of one expert's fine-tuning: the run's seed and the task's position in its source."""
    return seed * 1000 + position


def expert_key(cfg: dict, task: dict, seed: int, position: int) -> str:
    """Changes whenever the task's content (labels, training texts), the training config, the base model
    or the seeds change; the task's NAME is not part of it."""
    d = {k: cfg[k] for k in TRAINING_KEYS}
    d.update(content=task_fingerprint(task, splits=("train",)), seed=seed,
             training_seed=training_seed(seed, position), v=3)
    return stable_hash(d)


def expert_path(cfg: dict, cache: Path, task: dict, seed: int, position: int) -> Path:
    """``<cache>/experts/s<seed>-<key>.safetensors``; the task's name is only in the ``.json`` beside it."""
    return cache / "experts" / f"s{seed}-{expert_key(cfg, task, seed, position)}.safetensors"


def load_expert(path: Path):
    from safetensors.torch import load_file

    sd = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    return enc, head, meta


def fit_one(cfg, data, task_name, num_labels, seed, position, callbacks, encoder=None):
    """One ``trainer.fit`` of a fresh module (``encoder``, default the pretrained one, + a new head); returns
    (seconds, the trained module)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(training_seed(seed, position), verbose=False)
    ids, mask, y = data[task_name]["train"]
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(ids, mask, y), batch_size=cfg["batch_size"], shuffle=True,
                        generator=g, drop_last=True)
    encoder = encoder if encoder is not None else load_encoder(cfg["model"])
    module = expert_module_class()(encoder, num_labels, cfg["steps"], cfg["lr_encoder"], cfg["lr_head"])
    module.train()  # from_pretrained returns eval mode; fine-tune with dropout on
    trainer = L.Trainer(max_steps=cfg["steps"], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, max_epochs=-1, callbacks=list(callbacks))
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - t0, module


def train_missing(cfg, cache: Path, data, tasks, positions, seed, log) -> None:
    """Fine-tune the experts of this seed that are not cached yet, through ONE ``WUDIMergeCallback``:
    one ``trainer.fit`` per task, ``exclude=["head"]`` keeps the heads out of the merge; the callback
    snapshots the pretrained weights at the first fit, saves every expert at the end of its fit and
    merges them (closed form) after the last one. Only its public properties are read."""
    from mergekit_wudi.io import atomic_file, load_state_dict, save_safetensors_atomic
    from mergekit_wudi.lightning import WUDIMergeCallback

    paths = {t: expert_path(cfg, cache, tasks[t], seed, positions[t]) for t in tasks}
    missing = [t for t in tasks if not paths[t].exists()]
    if not missing:
        return
    out_dir = cache / "callback" / f"seed{seed}-{stable_hash([paths[t].name for t in missing], 10)}"
    shutil.rmtree(out_dir, ignore_errors=True)
    callback = WUDIMergeCallback(method="wudi", parameters={"solver": "closed_form"}, exclude=["head"],
                                 output=str(out_dir), num_tasks=len(missing), load_merged=False, progress=False)
    seconds = {}
    for task in missing:
        seconds[task], _ = fit_one(cfg, data, task, len(tasks[task]["labels"]), seed, positions[task], [callback])
        log(f"  trained expert {task} seed {seed}: {seconds[task]:.0f}s (WUDIMergeCallback, sequential)")
    heads = callback.task_heads  # read once, after every fit has saved its head
    merged = callback.merged_path
    for i, task in enumerate(missing):
        sd = {**load_state_dict(callback.expert_paths[i]), **heads[i]}
        # atomic, the .json first: a cached .safetensors is always complete and has its .json
        with atomic_file(paths[task].with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(
                {"task": task, "seed": seed, "train_seconds": seconds[task], "via": "WUDIMergeCallback (sequential)",
                 "callback_output": str(out_dir), "callback_merged": merged, "callback_tasks": missing, **cfg}))
        save_safetensors_atomic(sd, paths[task])


def seed_experts(cfg, cache: Path, data, tasks, positions, seed, log):
    """(encoders, heads, train seconds, how trained, path of the callback's merge of exactly these tasks
    or None), training the missing experts first."""
    train_missing(cfg, cache, data, tasks, positions, seed, log)
    experts, heads, secs, via, merged = {}, {}, {}, {}, set()
    for task in tasks:
        experts[task], heads[task], meta = load_expert(expert_path(cfg, cache, tasks[task], seed, positions[task]))
        secs[task], via[task] = meta["train_seconds"], meta.get("via", "own loop")
        if not heads[task]:
            raise RuntimeError(f"no head saved for task {task!r} (seed {seed})")
        same_run = sorted(meta.get("callback_tasks") or []) == sorted(tasks)
        merged.add(meta.get("callback_merged") if same_run else None)
    path = merged.pop() if len(merged) == 1 else None
    return experts, heads, secs, via, (path if path and Path(path).exists() else None)
