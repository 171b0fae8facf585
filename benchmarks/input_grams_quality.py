#!/usr/bin/env python
"""Quality of merging with input Grams (issue 21, part 2) on the quality benchmark's full-fine-tune experts.

POST HOC Grams: the cached experts of ``benchmarks/quality.py`` were trained without ``input_grams``, so
each expert's Grams are collected here by running the FINAL expert encoder (eval mode: no dropout) over
its task's last ``--last-batches`` training batches (the fit's own loader and shuffle seed, so the same
batches), with the callback's own hooks (:class:`mergekit_wudi.lightning.input_grams.GramCollector`,
padding masked). In the callback the Grams come from the weights of the moment each batch is seen.

Rows, one subset of ``--tasks-merged`` tasks per seed (the quality benchmark's task order):

- data-free, from the quality benchmark's own method table: ``wudi closed_form`` (default ridge and
  validation-chosen ridge), ``tsv_merge``, ``iso_c``, ``iso_cts`` (validation-tuned), task arithmetic;
- ``input grams (default)``: :func:`mergekit_wudi.merge_with_input_grams` with its defaults
  (``w_i = 1/trace(G_i)``, ridge 1e-2, no shrink); other tensors as ``wudi`` (kept at base);
- ``input grams (val grid)``: ridge x shrink chosen on the validation split;
- ``regmean (whole weights)``: ``normalize="none"``, ridge 0, RegMean's off-diagonal ``alpha`` chosen
  on validation; other tensors averaged (RegMean's rule).

    HF_HUB_OFFLINE=1 python benchmarks/input_grams_quality.py --cache-dir /work/cache-quality --seeds 0 1 2
    HF_HUB_OFFLINE=1 python benchmarks/input_grams_quality.py --cache-dir /work/cache-quality --lora \
        --data-free-rows task_arithmetic ties "wudi closed_form" "wudi val scaling" --output .../input_grams_quality_lora.json

The 5-seed files behind README's "what to use" rows and ``summary.claims`` (default rows only: ``--gram-rows default``
skips the validation grids and RegMean):

    HF_HUB_OFFLINE=1 python benchmarks/input_grams_quality.py --cache-dir /work/cache-quality --seeds 0 1 2 3 4 \
        --data-free-rows task_arithmetic "wudi closed_form" --gram-rows default \
        --output benchmarks/results/input_grams_quality_full.json
    HF_HUB_OFFLINE=1 python benchmarks/input_grams_quality.py --cache-dir /work/cache-quality --lora --seeds 0 1 2 3 4 \
        --data-free-rows task_arithmetic ties "wudi decorrelated" --gram-rows default \
        --output benchmarks/results/input_grams_quality_lora_s04.json

    HF_HUB_OFFLINE=1 python benchmarks/input_grams_quality.py --cache-dir /work/cache-quality --lora --lora-init callback \
        --seeds 0 1 2 3 4 --data-free-rows task_arithmetic ties "wudi decorrelated" "wudi callback default" --gram-rows default \
        --output benchmarks/results/input_grams_quality_lora_callback.json

The full fine-tunes trained 6x longer (``quality.py --train-only --steps 300``), with README's first YAML beside:

    HF_HUB_OFFLINE=1 python benchmarks/input_grams_quality.py --cache-dir /work/cache-quality --steps 300 \
        --seeds 0 1 2 3 4 --data-free-rows task_arithmetic "wudi closed_form" "wudi spectral rank auto" \
        --gram-rows default --output benchmarks/results/input_grams_quality_full300.json

``--lora-init shared / callback`` scores the LoRA experts of the other init regimes (``callback``: trained one after
another through ``WUDIMergeCallback``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DATA_FREE_ROWS = ("task_arithmetic", "wudi closed_form", "tsv_merge", "iso_c", "iso_cts",
                  "ties", "wudi val scaling", "wudi decorrelated")  # the last three: rows of the LoRA table (--lora)
RANK_AUTO_ROW = "wudi spectral rank auto"  # README's first YAML, the callback's default for full fine-tunes
A_UPDATES_ROW = "wudi callback default"  # --lora-init callback: the callback's LoRA A-update merge, nothing tuned
GRAM_ROWS = ("default", "val-grid", "regmean")


def post_hoc_grams(cfg, data, task, seed, expert_sd, last_batches):
    """The expert's input Grams over the last ``last_batches`` batches of its fit (see module doc)."""
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.qualitybench.model import load_encoder
    from mergekit_wudi.input_grams import grams_from_tensors
    from mergekit_wudi.lightning.input_grams import GramCollector, InputGrams, hooked_layers

    encoder = load_encoder(cfg["model"])
    encoder.load_state_dict(expert_sd)
    encoder.eval()
    ids, mask, y = data[task]["train"]
    g = torch.Generator().manual_seed(seed)  # the fit's loader (benchmarks/qualitybench/experts.py:fit_one)
    loader = DataLoader(TensorDataset(ids, mask, y), batch_size=cfg["batch_size"], shuffle=True, generator=g,
                        drop_last=True)
    steps, seen, window = cfg["steps"], 0, []
    while seen < steps:
        for batch in loader:
            if seen >= steps:
                break
            if seen >= steps - last_batches:
                window.append(batch)
            seen += 1
    reference = encoder.state_dict()
    collector = GramCollector(hooked_layers(encoder, list(reference), reference), InputGrams(last_batches=last_batches))
    collector.start()
    with torch.no_grad():
        for b_ids, b_mask, _ in window:
            collector.mask, collector.active = b_mask.bool(), True
            encoder(input_ids=b_ids.long(), attention_mask=b_mask.long())
            collector.end_batch()
    tensors, metadata = collector.finish(None)
    return grams_from_tensors(tensors), metadata


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks-merged", type=int, default=7)
    parser.add_argument("--last-batches", type=int, default=16)
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-4, 1e-2, 1e-1])
    parser.add_argument("--shrinks", type=float, nargs="+", default=[1.0, 0.9, 0.6])
    parser.add_argument("--data-free-rows", nargs="*", default=list(DATA_FREE_ROWS),
                        help="rows of the quality table to run beside (default: %(default)s), "
                             f"{RANK_AUTO_ROW!r} (README's first YAML) and, for --lora-init callback, "
                             f"{A_UPDATES_ROW!r} (the callback's default: its LoRA A-update Grams)")
    parser.add_argument("--lora", action="store_true",
                        help="the LoRA experts of `quality.py --lora` (cached as effective weights; Grams of the "
                             "merged layer's input = the LoRA base layer's input) and the LoRA table's rows")
    parser.add_argument("--lora-init", choices=["independent", "shared", "callback"], default="independent",
                        help="with --lora: which LoRA experts (the quality benchmark's --lora-init regimes)")
    parser.add_argument("--gram-rows", nargs="*", choices=GRAM_ROWS, default=list(GRAM_ROWS),
                        help="which input-Gram rows to score (default: all; 'default' alone skips the validation grids)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps of the full experts (default: the quality benchmark's 50)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "input_grams_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import mergekit_wudi
    from benchmarks.common import mean
    from benchmarks.qualitybench.evaluate import Evaluator
    from benchmarks.qualitybench import report
    from benchmarks.qualitybench.experts import seed_experts
    from benchmarks.qualitybench.methods import method_specs
    from benchmarks.qualitybench.model import load_encoder, tokenised
    from benchmarks.qualitybench.run import DATA_SEED, build_config, parse_args
    from benchmarks.qualitybench.subset import SubsetContext, first_tasks, task_order
    from benchmarks.qualitybench.tasks import DEFAULT_SOURCE, load_tasks, select_tasks

    qargs = parse_args((["--cache-dir", args.cache_dir] if args.cache_dir else []) + ["--lora-init", args.lora_init]
                       + (["--steps", str(args.steps)] if args.steps else []))
    all_tasks, quick = load_tasks(DEFAULT_SOURCE, DATA_SEED)
    cfg = build_config(qargs, list(all_tasks), quick)
    tasks = select_tasks(all_tasks, cfg["tasks"])
    positions = {t: list(all_tasks).index(t) for t in tasks}
    cfg["task_positions"] = positions
    cache = Path(qargs.cache_dir)
    log = lambda msg: print(time.strftime("[%H:%M:%S] ") + msg, flush=True)  # noqa: E731
    data = tokenised(tasks, cfg["max_length"], cache, cfg["model"])
    ev = Evaluator(data, cfg["model"])
    sd0 = {k: v.detach().clone() for k, v in load_encoder(cfg["model"]).state_dict().items()}
    out = {"command": "HF_HUB_OFFLINE=1 python benchmarks/input_grams_quality.py " + " ".join(sys.argv[1:]),
           "grams": f"post hoc: final expert weights, eval mode, the last {args.last_batches} of its {cfg['steps']} "
                    "training batches", "steps": cfg["steps"], "seeds": {}}
    specs = method_specs()
    if args.lora:
        from benchmarks.qualitybench.lora import LORA_SPECS, lora_config, lora_experts

        cfg, specs = lora_config(cfg), LORA_SPECS
        out["lora"] = {**cfg["lora"], "init": cfg["lora_init"]}
    def save(seed, subset, expert_acc, rows):
        out["seeds"].setdefault(str(seed), {}).update(subset=subset, expert_test=expert_acc, rows=rows)
        names = sorted({r for s in out["seeds"].values() for r in s["rows"] if not r.startswith("_")})
        out["summary"] = {r: {"normalized_mean": mean([s["rows"][r]["normalized"] for s in out["seeds"].values()
                                                       if r in s["rows"]]),
                              "seeds": [k for k, s in out["seeds"].items() if r in s["rows"]]} for r in names}
        Path(args.output).write_text(json.dumps(out, indent=2, default=str))

    for seed in args.seeds:
        cfg["_seed"] = seed
        if args.lora:
            experts, heads, _ = lora_experts(cfg, cache, data, tasks, positions, seed, log)
        else:
            experts, heads, *_ = seed_experts(cfg, cache, data, tasks, positions, seed, log)
        order = task_order(cfg["tasks"], seed)
        subset = first_tasks(order, args.tasks_merged, positions)
        held_out = [t for t in order if t not in subset]
        expert_acc = {t: ev.accuracy(experts[t], {t: heads[t]}, "test", cfg["test_limit"])[t] for t in subset}
        log(f"seed {seed}: {subset}; experts {expert_acc}")
        ctx = SubsetContext(cfg, ev, sd0, experts, heads, subset, held_out, expert_acc, log)
        record = ctx.record

        def record_and_save(*a, **k):  # every row on disk as soon as it is scored (long runs get cut)
            record(*a, **k)
            save(seed, subset, expert_acc, ctx.res)

        ctx.record = record_and_save
        for spec in specs:
            if spec.name in args.data_free_rows:
                spec.run(ctx)
        if RANK_AUTO_ROW in args.data_free_rows:  # the recommended full fine-tune row, nothing tuned
            sd, secs = ctx.merge("wudi", {"solver": "spectral", "rank": "auto", "linear": ctx.lin})
            ctx.record(report.FULL_ROW, sd, secs, {"solver": "spectral", "rank": "auto"})
        if A_UPDATES_ROW in args.data_free_rows and args.lora and args.lora_init == "callback":
            from benchmarks.qualitybench.lora import a_update_grams, callback_default_merge
            from benchmarks.qualitybench.methods import A_UPDATES_ROW as row

            a_grams = a_update_grams(cfg, cache, tasks, positions, seed)
            sd, secs = callback_default_merge(sd0, [experts[t] for t in subset], [a_grams[t] for t in subset])
            ctx.record(row, sd, secs, {"lora_a_updates": True})
        t0 = time.perf_counter()
        grams, meta = {}, {}
        for t in subset:
            grams[t], meta[t] = post_hoc_grams(cfg, data, t, seed, experts[t], args.last_batches)
        gram_seconds = time.perf_counter() - t0
        base, expert_list, gram_list = sd0, [experts[t] for t in subset], [grams[t] for t in subset]

        def gram_merge(**options):
            start = time.perf_counter()
            sd = mergekit_wudi.merge_with_input_grams(base, expert_list, gram_list, **options)
            return sd, time.perf_counter() - start

        if "default" in args.gram_rows:
            sd, secs = gram_merge(parameters={"solver": "closed_form"})
            ctx.record("input grams (default, post hoc)", sd, secs, {"ridge": 1e-2, "shrink": 1.0})
        grid, best = {}, None
        for ridge in args.ridges if "val-grid" in args.gram_rows else []:
            for shrink in args.shrinks:
                sd, secs = gram_merge(parameters={"solver": "closed_form"}, ridge=ridge, shrink=shrink)
                score = mean(ctx.val(sd).values())
                grid[f"ridge={ridge:g},shrink={shrink:g}"] = score
                if best is None or score > best[0]:
                    best = (score, {"ridge": ridge, "shrink": shrink}, sd, secs)
        if best:
            log("    [input grams val] " + " ".join(f"{k}:{v:.3f}" for k, v in grid.items()))
            ctx.record("input grams (val grid, post hoc)", best[2], best[3], best[1], grid)
        mean_rest = {"weight": 1.0, "lambda": 1.0 / len(subset)}  # the average of the experts
        grid, best = {}, None
        for shrink in args.shrinks if "regmean" in args.gram_rows else []:
            sd, secs = gram_merge(method="task_arithmetic", parameters=mean_rest, normalize="none", ridge=0.0,
                                  shrink=shrink)
            score = mean(ctx.val(sd).values())
            grid[f"alpha={shrink:g}"] = score
            if best is None or score > best[0]:
                best = (score, {"alpha": shrink}, sd, secs)
        if best:
            log("    [regmean val] " + " ".join(f"{k}:{v:.3f}" for k, v in grid.items()))
            ctx.record("regmean (whole weights, val alpha, post hoc)", best[2], best[3], best[1], grid)
        out["seeds"][str(seed)].update(gram_seconds=gram_seconds, gram_metadata=meta)
        save(seed, subset, expert_acc, ctx.res)
        for r, v in sorted(out["summary"].items(), key=lambda kv: -kv[1]["normalized_mean"]):
            log(f"  {r:48s} normalized {v['normalized_mean']:.4f} (seeds {v['seeds']})")


if __name__ == "__main__":
    main()
