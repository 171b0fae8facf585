"""Command line and main loop of the quality benchmark (``python benchmarks/quality.py``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from ..common import DEFAULT_CACHE, RESULTS, MissingDependency, make_logger, output_stem, require
from .tasks import DEFAULT_SOURCE, load_tasks, select_tasks

REQUIRED = [("torch", "torch"), ("lightning", "lightning"), ("transformers", "transformers"),
            ("safetensors", "safetensors"), ("mergekit", "mergekit"), ("mergekit_wudi", "mergekit-wudi"),
            ("matplotlib", "matplotlib")]
DATA_SEED = 1234  # the seed the task source builds its splits with
LORA_KEYS = ("lora", "lora_shared_init", "lora_callback")  # results keys of the LoRA regimes (lora.lora_results_key)


def parse_args(argv, doc=None):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 tasks, 1 seed, fewer steps (~5 min); writes "
                                                        "quality_quick.* unless --name is given")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--tasks-from", default=DEFAULT_SOURCE, metavar="MODULE:FUNCTION",
                   help="task source: 'module:function' or 'path/to/file.py:function' returning the tasks "
                        "(format: benchmarks/qualitybench/tasks.py); default: the built-in offline text tasks")
    p.add_argument("--tasks", nargs="+", default=None, help="names of the source's tasks to use (default: all)")
    p.add_argument("--model", default="all-MiniLM-L6-v2",
                   help="base encoder: a local Hugging Face folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--subsets", type=int, nargs="+", default=None, help="numbers of tasks merged (default 2 4 all)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine: 2 threads thrash under load)")
    p.add_argument("--train-only", action="store_true", help="only fine-tune / cache the experts")
    p.add_argument("--no-lowrank", action="store_true")
    p.add_argument("--name", default=None, help="output file stem under --results-dir")
    p.add_argument("--results-dir", default=str(RESULTS), help="where <name>.json/.md/.png go")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="experts, tokenised data and logs")
    p.add_argument("--resume", action="store_true",
                   help="keep the (seed, subset) results already in <name>.json, every seed of it included")
    p.add_argument("--preprocess-subsets", type=int, nargs="*", default=None,
                   help="subset sizes that get the AWD / LwPTV rows (default 4; quick: none)")
    p.add_argument("--preprocess-only", action="store_true",
                   help="only the AWD / LwPTV rows (to run beside the main runs; --combine merges them in)")
    p.add_argument("--preprocess-variants", nargs="+", default=["awd", "lwptv"], choices=["awd", "lwptv"])
    p.add_argument("--refresh", nargs="+", choices=["closed_form", "spectral", "rank", "decorrelated", "subspace"],
                   default=None,
                   help="with --resume: recompute only these rows of the subsets already in <name>.json "
                        "(e.g. after a solver default changed), keeping the experts and every other row")
    p.add_argument("--test-limit", type=int, default=None,
                   help="test texts per task (evenly spaced subsample; default: the whole test split)")
    p.add_argument("--lora", action="store_true",
                   help="the LoRA rows (issue #14): one PEFT LoRA expert per task, merged by task arithmetic, TIES "
                        "and WUDI (results under 'lora'; default name quality_lora[_quick])")
    p.add_argument("--lora-init", choices=["independent", "shared", "callback"], default="independent",
                   help="with --lora: each adapter's A drawn from its own seed (default; results under 'lora'), every "
                        "adapter of a seed from the same A ('lora_shared_init'), or one PEFT encoder trained task "
                        "after task through WUDIMergeCallback ('lora_callback')")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="merge per-seed result files (from parallel --seeds N runs) into --name")
    p.add_argument("--claims-from", nargs="+", default=(), metavar="JSON",
                   help="with --combine: other results files whose rows may decide summary.claims (each claim on "
                        "the file that measures it on the most seeds; every file's numbers are kept in the claim)")
    return p.parse_args(argv)


def build_config(args, task_names: list[str], quick_tasks: list[str]) -> dict:
    quick = args.quick
    cfg = {
        "quick": quick, "seeds": args.seeds or ([0] if quick else [0, 1, 2]),
        "tasks_from": args.tasks_from, "model": args.model,
        "tasks": args.tasks or (quick_tasks if quick else list(task_names)),
        "steps": args.steps or 50, "batch_size": 16, "lr_encoder": 1e-4, "lr_head": 1e-3, "max_length": 32,
        "data_seed": DATA_SEED, "threads": args.threads,
        "ta_grid": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0], "ties_grid": [0.5, 1.0, 1.5, 2.0, 3.0], "ties_density": 0.2,
        "wudi_scale_grid": [0.5, 0.75, 1.0, 1.25, 1.5], "flow_times": [0.5, 2.0, 8.0, 32.0],
        "ridges": [1e-6, 1e-4, 1e-2], "refresh": args.refresh or [], "lowrank": not args.no_lowrank,
        # eval caps per task (evenly spaced over each length-sorted split), set by the shared 2-core CPU budget
        "val_limit": 100, "test_limit": args.test_limit, "ood_limit": 150,
        "lowrank_seeds": None, "preprocess_subsets": [4],  # None: every seed
        # the rank fast path (issues #12, #22): fixed ranks; on validation, the cap on rank "auto" ("none": the
        # uncapped rule of #12) and the rank_energy grid of rank "auto" (spectral)
        "ranks": [8, 32], "rank_caps": [8, 16, 32, "none"], "rank_energies": [0.5, 0.9],
        # mergekit / reference baselines run at the largest subset; these family representatives at every subset
        "baselines_every_subset": ["dare_ties", "breadcrumbs_ties", "model_stock", "tsv_merge", "iso_c", "iso_cts"],
        "preprocess_methods": ["preprocessed_task_arithmetic"],  # + "preprocessed_ties" if time allows
        "preprocess_variants": [{"name": v, "params": {"preprocess": v}} for v in ("awd", "lwptv")
                                if v in args.preprocess_variants],
        "lwptv_drop_fraction": 0.3, "preprocess_only": args.preprocess_only,
        "lora_init": getattr(args, "lora_init", "independent"),
    }
    n = len(cfg["tasks"])
    cfg["subsets"] = sorted(set(args.subsets or ([n] if quick else [2, 4, n])))
    cfg["lowrank_subsets"] = [max(cfg["subsets"])]
    cfg["rank_subsets"] = list(cfg["subsets"])
    if quick:  # AWD (300 SGD steps per tensor) alone would take longer than the whole quick budget
        cfg["preprocess_subsets"] = []
    if args.preprocess_subsets is not None:
        cfg["preprocess_subsets"] = args.preprocess_subsets
    return cfg


def combine(files: list[str]) -> dict:
    """One results dict from per-seed result files (the first file's config; seeds and rows united)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    results = json.loads(json.dumps(parts[0]))
    results["command"] = " && ".join(sorted({p["command"] for p in parts}))
    results["config"]["seeds"] = sorted({int(s) for p in parts for s in p["seeds"]})
    # a part that is itself a combination keeps its parts' times
    results["wall_seconds_per_part"] = [w for p in parts for w in p.get("wall_seconds_per_part", [p.get("wall_seconds")])]
    results["seeds"] = {}
    for key in LORA_KEYS:
        results.pop(key, None)
    for part in parts:
        merge_seed_records(results["seeds"], part["seeds"])
        for key in LORA_KEYS:
            if part.get(key):  # the LoRA rows (--lora) of a part
                lora = results.setdefault(key, {"config": part[key]["config"], "seeds": {}})
                merge_seed_records(lora["seeds"], part[key]["seeds"])
    return results


def merge_seed_records(into: dict, other: dict) -> dict:
    """Add ``other``'s seeds to ``into``: unknown seeds whole; for known ones, unknown subsets whole and the
    rows a known subset lacks. Nothing already in ``into`` is replaced."""
    for seed, rec in other.items():
        if seed not in into:
            into[seed] = rec
            continue
        for k, sub in rec["subsets"].items():
            target = into[seed]["subsets"].setdefault(k, sub)
            if target is not sub:
                target["methods"].update({m: v for m, v in sub["methods"].items() if m not in target["methods"]})
    return into


def start_results(cfg, tasks, argv, previous: dict | None) -> dict:
    """The results skeleton; with ``--resume``, every seed of the previous file is kept (and listed in the
    config) so that a run over some seeds never drops the others."""
    import torch

    results = {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/quality.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "mergekit_wudi": __import__("mergekit_wudi").__version__, "cpu_threads": cfg["threads"],
                        "machine": f"{os.cpu_count()} CPU cores (shared)"},
        "tasks": {t: {"labels": list(tasks[t]["labels"]),
                      **{s: len(tasks[t][s]) for s in ("train", "validation", "test")}} for t in tasks},
        "seeds": {},
    }
    if previous:
        results["seeds"] = {s: r for s, r in previous.get("seeds", {}).items() if str(s) not in map(str, cfg["seeds"])}
        results["config"] = {**cfg, "seeds": sorted({int(s) for s in previous.get("seeds", {})} | set(cfg["seeds"]))}
    return results


def main(argv=None, doc=None) -> int:
    args = parse_args(argv, doc)
    name = output_stem("quality_lora" if args.lora else "quality", args.quick, args.name)
    cache, results_dir = Path(args.cache_dir), Path(args.results_dir)
    log = make_logger(cache / f"{name}.log")
    if args.combine:
        from .report import write_report

        write_report(combine(args.combine), name, log, results_dir, claims_from=args.claims_from)
        return 0
    for module, package in REQUIRED:
        require(module, package)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    all_tasks, quick_tasks = load_tasks(args.tasks_from, DATA_SEED)
    cfg = build_config(args, list(all_tasks), quick_tasks)
    tasks = select_tasks(all_tasks, cfg["tasks"])
    cfg["task_positions"] = {t: list(all_tasks).index(t) for t in tasks}
    previous_path = results_dir / f"{name}.json"
    previous = json.loads(previous_path.read_text()) if args.resume and previous_path.exists() else None
    from .loop import run_lora, run_seeds

    if args.lora:
        require("peft", "peft", "the LoRA rows")
        return run_lora(cfg, tasks, start_results(cfg, tasks, argv, None), args, name, cache, results_dir, log) or 0
    run_seeds(cfg, tasks, start_results(cfg, tasks, argv, previous), previous, args, name, cache, results_dir, log)
    return 0


def entry(doc=None) -> int:
    """``benchmarks/quality.py``: a missing optional package stops with a message, not a traceback."""
    try:
        return main(doc=doc)
    except MissingDependency as exc:
        sys.exit(f"error: {exc}")
