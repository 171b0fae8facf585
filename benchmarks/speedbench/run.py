"""Command line of the speed benchmark (``python benchmarks/speed.py``); see ``benchmarks/speed.py``."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import torch

from mergekit_wudi.solvers import wudi as S

from ..common import DEFAULT_CACHE, RESULTS, machine_info, output_stem, report_cache
from .measure import gram_floor, layer_flops_ratio, merge_config, microbench, run_merge
from .models import LOWRANK_STD, NOISE_STD, QWEN, RANK, build_models
from .report import render_md

QUICK_MICRO = [(1024, 1024, 3, 10), (4864, 896, 3, 3), (896, 4864, 3, 5)]
FULL_MICRO = [(1024, 1024, 3, 300), (1024, 1024, 8, 20), (4864, 896, 3, 10), (896, 4864, 3, 20), (896, 4864, 8, 10)]


def parse_args(argv, doc):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, short microbenchmark, adam/lowrank 30 iterations "
                                                         "(writes speed_quick.json/.md, never speed.json/.md)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the model for the fast methods (default 24)")
    ap.add_argument("--subset-layers", type=int, default=1, help="layers of the model adam/lowrank run on (default 1)")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml; microbenchmark on GPU")
    ap.add_argument("--skip-merges", action="store_true")
    ap.add_argument("--skip-subset", action="store_true", help="skip adam/lowrank merges")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--methods", default="task_arithmetic,ties,closed_form,spectral")
    ap.add_argument("--sweep", action="store_true",
                    help="the size sweep (issue #12): --sizes, every method of speedbench/sweep.py; writes "
                         "speed_sweep.json/.md/.png and skips (size, method) pairs already there")
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B", "3B", "7B"],
                    help="sweep sizes: tiny 0.5B 1.5B 3B 7B")
    ap.add_argument("--sweep-methods", nargs="+", default=None, help="sweep methods (default: all)")
    ap.add_argument("--expert-kind", choices=["lora", "fullft"], default="lora",
                    help="sweep experts: lora (rank-8 + noise deltas) or fullft (the measured spectrum profile, "
                         "see --spectrum-profile; results default to speed_sweep_fullft.*)")
    ap.add_argument("--profile", default=None,
                    help="spectrum profile JSON for --expert-kind fullft (default: <out>/spectrum_profile.json)")
    ap.add_argument("--spectrum-profile", metavar="QUALITY_CACHE", default=None,
                    help="only write <out>/spectrum_profile.json: the singular-value decay of the linear task "
                         "vectors of the quality benchmark's experts cached under QUALITY_CACHE (its --cache-dir)")
    ap.add_argument("--tensor-bench", action="store_true",
                    help="only time one 8960x1536 weight (2 experts, --threads) of both expert kinds: exact "
                         "solvers vs rank: auto; writes <out>/speed_tensor.json")
    ap.add_argument("--threads", type=int, default=1, help="threads per sweep merge (OMP/MKL)")
    ap.add_argument("--keep-models", action="store_true",
                    help="keep the sweep's generated models (e.g. to rerun a size with other --threads)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the results files")
    ap.add_argument("--name", default=None, help="results file stem (default speed, or speed_quick with --quick)")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                    help="where the generated models (GBs for 24 layers), merge logs and scratch outputs go")
    ap.add_argument("--clean-cache", action="store_true",
                    help="delete --cache-dir at the end (otherwise its size and path are printed)")
    return ap.parse_args(argv)


def new_result(args, layers, device, argv) -> dict:
    result = {"issue": 3, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "mode": "quick" if args.quick else "full",
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "machine": machine_info(device), "model": {"config": QWEN, "layers": layers, "experts": args.experts,
              "expert_delta": f"rank-{RANK} (entry std {LOWRANK_STD}) + dense noise (std {NOISE_STD}), bf16"},
              "merges": {}, "subset": None, "floor": None, "micro": None, "notes": []}
    if args.cuda:
        result["notes"].append("--cuda: mergekit-yaml ran with --cuda; microbenchmark and floor on the GPU")
    return result


def add_ratios(rows: dict, ta: dict) -> None:
    """Wall-time and peak-RSS ratios of every row to the task_arithmetic row ``ta``."""
    for r in rows.values():
        r["wall_ratio_vs_task_arithmetic"] = r["wall_s"] / ta["wall_s"]
        r["rss_ratio_vs_task_arithmetic"] = r["peak_rss_mib"] / ta["peak_rss_mib"]


def whole_model_merges(args, layers, run, save) -> dict:
    """The fast methods on the whole model, each in its own ``mergekit-yaml`` process."""
    root = build_models(Path(args.cache_dir), layers, args.experts)
    merges = {}
    for m in args.methods.split(","):
        if m in ("task_arithmetic", "ties"):
            cfg = merge_config(m, root, args.experts)
        else:
            cfg = merge_config("wudi", root, args.experts, solver=m)
        merges[m] = run(f"L{layers}_{m}", cfg)
        save(merges=merges)
    ta = merges.get("task_arithmetic")
    if ta and ta["ok"]:
        add_ratios(merges, ta)
    return merges


def subset_merges(args, layers, iterations, ta_full, run) -> dict:
    """adam / lowrank on a small model next to task_arithmetic; the full-model time is EXTRAPOLATED."""
    sub = args.subset_layers
    root1 = build_models(Path(args.cache_dir), sub, args.experts)
    srows = {"task_arithmetic": run(f"L{sub}_task_arithmetic", merge_config("task_arithmetic", root1, args.experts)),
             "closed_form": run(f"L{sub}_closed_form",
                                merge_config("wudi", root1, args.experts, solver="closed_form"))}
    for m in ("adam", "lowrank"):
        srows[m] = run(f"L{sub}_{m}", merge_config("wudi", root1, args.experts, solver=m, iterations=iterations))
    ta1 = srows["task_arithmetic"]["wall_s"]
    add_ratios(srows, srows["task_arithmetic"])
    for m, r in srows.items():
        r["per_layer_s"] = (r["wall_s"] - ta1) / sub
        if ta_full and m != "task_arithmetic":
            # EXTRAPOLATION: the full model's task_arithmetic time plus this solver's per-layer extra time.
            r["extrapolated_full_model_s"] = ta_full + layers * r["per_layer_s"]
            r["extrapolated_ratio_vs_task_arithmetic"] = r["extrapolated_full_model_s"] / ta_full
    return {"layers": sub, "iterations": iterations, "rows": srows,
            "note": f"adam/lowrank measured on a {sub}-layer model built the same way; the full "
                    f"{layers}-layer figure is an EXTRAPOLATION: t_TA(full) + {layers} x "
                    f"(t(solver) - t_TA) on the {sub}-layer model."}


def main(argv=None, doc=None) -> int:
    args = parse_args(argv, doc)
    if args.spectrum_profile:
        from .spectrum import write_profile

        write_profile(Path(args.spectrum_profile), Path(args.out))
        return 0
    if args.tensor_bench:
        from .tensor import tensor_bench

        profile_path = Path(args.profile) if args.profile else Path(args.out) / "spectrum_profile.json"
        tensor_bench(Path(args.out), json.loads(profile_path.read_text()), threads=args.threads)
        return 0
    if args.sweep:
        from .sweep import METHODS, sweep

        fullft = args.expert_kind == "fullft"
        stem = args.name or ("speed_sweep_fullft" if fullft else "speed_sweep")
        cache, out = Path(args.cache_dir), Path(args.out)
        profile, compare = None, None
        if fullft:
            profile_path = Path(args.profile) if args.profile else out / "spectrum_profile.json"
            if not profile_path.exists():
                print(f"no spectrum profile at {profile_path}: write it with --spectrum-profile QUALITY_CACHE",
                      file=sys.stderr)
                return 2
            profile = json.loads(profile_path.read_text())
            compare = out / "speed_sweep_fastpath.json"  # the LoRA-like kind, drawn in the same plot
        r = sweep(args.sizes, args.sweep_methods or list(METHODS), args.experts, cache, out, stem,
                  args.threads, resume=True, keep_models=args.keep_models, profile=profile, compare=compare)
        print(f"wrote {Path(args.out) / stem}.json/.md/.png")
        report_cache(cache, args.clean_cache, "the sweep's models (deleted after each size) and merge logs")
        return 0 if all(row.get("ok") for e in r["sizes"].values() for row in e["rows"].values()) else 1
    layers = args.layers or (2 if args.quick else 24)
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.cuda and not torch.cuda.is_available():
        print("--cuda given but torch sees no CUDA device", file=sys.stderr)
        return 2
    out_dir, cache = Path(args.out), Path(args.cache_dir)
    stem = output_stem("speed", args.quick, args.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = cache / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result = new_result(args, layers, device, argv)

    def save(**updates):
        result.update(updates)
        result["total_benchmark_s"] = time.perf_counter() - t_start
        result["machine"]["loadavg_end"] = os.getloadavg()
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out_dir / f"{stem}.md").write_text(render_md(result))

    def run(label, cfg):
        return run_merge(label, cfg, args.cuda, log_dir, cache)

    if not args.skip_merges:
        save(merges=whole_model_merges(args, layers, run, save))
    print("[floor] Gram products ...", flush=True)
    save(floor={**gram_floor(layers, args.experts, device), "layers": layers})
    if not args.skip_merges and not args.skip_subset:
        ta_full = result["merges"].get("task_arithmetic", {}).get("wall_s")
        save(subset=subset_merges(args, layers, 30 if args.quick else S.ITERATIONS, ta_full, run))
    if not args.skip_micro:
        save(micro={"rows": microbench(QUICK_MICRO if args.quick else FULL_MICRO, device),
                    "layer_macs_per_iteration": layer_flops_ratio(args.experts)})
    save()
    print(render_md(result))
    print(f"wrote {out_dir / stem}.json and {out_dir / stem}.md")
    report_cache(cache, args.clean_cache, "the generated base/expert models, merge logs and scratch outputs")
    return 0
