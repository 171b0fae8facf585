#!/usr/bin/env python
"""Training-time overhead of the callback's ``input_grams`` hooks (issue 21, part 2). Writes JSON.

A tiny Llama-shaped causal LM in plain torch (RMSNorm, q/k/v/o, gate/up/down; sizes below) is fitted
with ``lightning.Trainer`` for ``--steps`` batches of random tokens under ``WUDIMergeCallback``:

- ``off``: the callback without ``input_grams`` (the baseline);
- ``exact_all``: ``input_grams`` with ``last_batches = steps``: every batch hooked (exact Grams): the
  cost of one hooked batch;
- ``sketch_all``: the same with the widest layers (``down``: in = ff) sketched at ``--sketch-rank``;
- ``exact_window``: ``last_batches = --window`` (the recommended use: a few dozen batches at the end).

Time per training batch = on_train_batch_start -> on_train_batch_end (wall), summed; the fit-end cost
(the all-reduce and the write of the Grams file) is timed separately as the whole ``on_train_end`` of
the callback. Configurations alternate, ``--repeats`` times, medians reported. The per-batch overhead of
a hooked batch, times the share of hooked batches, is the overhead of a fit.

    python benchmarks/input_grams_overhead.py                       # CPU, 1 thread, ~3-6 min
    python benchmarks/input_grams_overhead.py --device cuda --hidden 1024 --ff 2816 --layers 4 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from mergekit_wudi.lightning import InputGrams, WUDIMergeCallback  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, d, ff, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), nn.Linear(ff, d, bias=False)

    def forward(self, x):
        B, L, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, d))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class TinyLM(LightningModule):
    def __init__(self, vocab, d, ff, layers, heads):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, ff, heads) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        x = self.embed(tokens[:, :-1])
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class BatchTimer(Callback):
    """Per training batch: wall seconds and this process's CPU seconds (on a shared CPU machine the
    CPU time is the stable measure: other processes slow the wall clock, not the work done)."""

    def __init__(self, sync):
        self.sync, self.times, self.cpu_times, self._start = sync, [], [], (0.0, 0.0)

    def on_train_batch_start(self, *args):
        self.sync()
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, *args):
        self.sync()
        self.times.append(time.perf_counter() - self._start[0])
        self.cpu_times.append(time.process_time() - self._start[1])


class TimedMerge(WUDIMergeCallback):
    """The callback with its on_train_end (fit-end Gram reduce + writes + expert snapshot) timed."""

    def on_train_end(self, trainer, pl_module):
        start = time.perf_counter()
        super().on_train_end(trainer, pl_module)
        self.train_end_seconds = time.perf_counter() - start


def run(config, args, root):
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.steps * args.batch, args.seq + 1), generator=g)
    model = TinyLM(args.vocab, args.hidden, args.ff, args.layers, args.heads)
    options = {
        "off": None,
        "exact_all": InputGrams(last_batches=args.steps, max_memory="64GB"),
        "sketch_all": InputGrams(last_batches=args.steps, max_memory=args.sketch_budget, sketch_rank=args.sketch_rank),
        "exact_window": InputGrams(last_batches=args.window, max_memory="64GB"),
    }[config]
    callback = TimedMerge(exclude=["lm_head", "embed"], output=str(root / config), input_grams=options,
                          progress=False)
    timer = BatchTimer(sync)
    trainer = Trainer(accelerator=args.device, devices=1, max_steps=args.steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(root), callbacks=[callback, timer])
    start = time.perf_counter()
    trainer.fit(model, DataLoader(TensorDataset(data), batch_size=args.batch))
    fit_seconds = time.perf_counter() - start
    hooked = args.steps if config != "exact_window" else args.window
    return {"batch_seconds_median": statistics.median(timer.times[args.warmup:]),
            "batch_cpu_seconds_median": statistics.median(timer.cpu_times[args.warmup:]),
            "batch_seconds_sum": sum(timer.times), "batch_cpu_seconds_sum": sum(timer.cpu_times),
            "train_end_seconds": callback.train_end_seconds, "fit_seconds": fit_seconds, "hooked_batches": hooked}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ff", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--sketch-rank", type=int, default=64)
    parser.add_argument("--sketch-budget", default="3MB", help="max_memory of sketch_all (forces the down layers to a sketch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "input_grams_overhead.json"))
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    configs = ("off", "exact_all", "sketch_all", "exact_window")
    raw = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for config in configs:
                raw[config].append(run(config, args, Path(tmp) / f"{repeat}"))
                print(config, raw[config][-1], flush=True)
    med = {c: {k: statistics.median(r[k] for r in raw[c]) for k in raw[c][0]} for c in configs}
    clock = "batch_seconds" if args.device == "cuda" else "batch_cpu_seconds"
    base = med["off"][f"{clock}_median"]
    summary = {
        "clock": "wall (cuda synchronised)" if args.device == "cuda" else "process CPU time (shared CPU machine)",
        "hooked_batch_overhead_exact": med["exact_all"][f"{clock}_median"] / base - 1,
        "hooked_batch_overhead_sketch": med["sketch_all"][f"{clock}_median"] / base - 1,
        "fit_overhead_window": (med["exact_window"][f"{clock}_sum"] - med["off"][f"{clock}_sum"])
        / med["off"][f"{clock}_sum"],
        "window_share": args.window / args.steps,
        "train_end_extra_seconds_exact": med["exact_all"]["train_end_seconds"] - med["off"]["train_end_seconds"],
        "note": ("overhead of a fit = share of hooked batches x hooked_batch_overhead (+ train_end_extra once); "
                 "e.g. last_batches=32 of 1000 steps: 0.032 x hooked_batch_overhead"),
    }
    result = {"args": vars(args), "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                                              "cuda": torch.cuda.get_device_name() if args.device == "cuda" else None},
              "medians": med, "summary": summary, "raw": raw}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
