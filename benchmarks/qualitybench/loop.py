"""The quality benchmark's loop over seeds and subsets of tasks (called by :func:`.run.main`)."""

from __future__ import annotations

import json
import time

from benchmarks.baselines import SUBSPACE_METHODS

from .evaluate import Evaluator
from .experts import seed_experts
from .methods import linear_flags, merge, run_subset
from .model import load_encoder, tokenised
from .report import write_report
from .subset import reference_rows, task_order


def check_callback_merge(rec, merged_path, sd0, experts, log) -> None:
    """The callback's own closed-form merge of all tasks against ``merge_state_dicts`` (max |diff|)."""
    from mergekit_wudi.io import load_state_dict

    cb_sd = {k[len("encoder."):]: v for k, v in load_state_dict(merged_path).items()}
    lin, _ = linear_flags(sd0)
    ref, _ = merge({"base": sd0, **experts}, "wudi", {"solver": "closed_form", "linear": lin})
    rec["callback_merge_max_abs_diff_vs_api"] = max(float((cb_sd[k] - ref[k]).abs().max()) for k in ref)
    log(f"  callback's merge vs merge_state_dicts (closed form): max |diff| "
        f"{rec['callback_merge_max_abs_diff_vs_api']:.2e}")


def row_group(row: str) -> str:
    """The ``--refresh`` group a recorded row (or ``_``-prefixed grid) belongs to."""
    if "(rank " in row or row.endswith(("_rank_energy_val", "_rank_cap_val")):
        return "rank"
    if row.startswith("wudi decorrelated"):
        return "decorrelated"
    if row.split(" (")[0] in SUBSPACE_METHODS:
        return "subspace"
    for g in ("closed_form", "spectral"):
        if row.startswith(f"wudi {g}") or row.startswith(f"_{g}_"):
            return g
    return "others"


def refresh_rows(sub: dict, groups: list) -> dict:
    """The rows of ``sub`` that ``--refresh groups`` does NOT recompute."""
    return {m: r for m, r in sub["methods"].items() if row_group(m) not in groups}


def run_seed_subsets(cfg, ev, sd0, experts, heads, rec, save, log) -> None:
    """Every subset size of one seed: kept (--resume), refreshed (--refresh) or run."""
    seed, positions = cfg["_seed"], cfg["task_positions"]
    for k in cfg["subsets"]:
        sub = rec["subsets"].get(str(k))
        if sub is not None and cfg["refresh"]:
            sub["methods"] = refresh_rows(sub, cfg["refresh"])
            log(f"  seed {seed}, {k} tasks: refreshing {cfg['refresh']}")
            sub["methods"].update(run_subset(cfg, ev, sd0, experts, heads, sub["tasks"], sub["held_out"],
                                             rec["expert_test"], log))
            save()
            continue
        if sub is not None:
            log(f"  seed {seed}, {k} tasks: kept from the previous run (--resume)")
            continue
        subset = sorted(rec["task_order"][:k], key=positions.__getitem__)
        held_out = [t for t in rec["task_order"] if t not in subset]
        log(f"  seed {seed}, {k} tasks merged: {subset}")
        methods = reference_rows(rec, subset, held_out,
                                 lambda: ev.accuracy(sd0, {t: heads[t] for t in held_out}, "test", cfg["ood_limit"]))
        rec["subsets"][str(k)] = {"tasks": subset, "held_out": held_out, "methods": methods}
        methods.update(run_subset(cfg, ev, sd0, experts, heads, subset, held_out, rec["expert_test"], log))
        save()


def setup(cfg, tasks, results, args, name, cache, results_dir, log):
    """(tokenised data, evaluator or None with --train-only, pretrained encoder state, save())."""
    t_start = time.perf_counter()
    data = tokenised(tasks, cfg["max_length"], cache, cfg["model"])
    log(f"config {json.dumps({k: v for k, v in cfg.items() if k not in ('ood_limit',)})}")
    ev = None if args.train_only else Evaluator(data, cfg["model"])
    sd0 = {k: v.detach().clone() for k, v in load_encoder(cfg["model"]).state_dict().items()}

    def save():
        results["wall_seconds"] = time.perf_counter() - t_start
        results["eval_seconds"] = ev.seconds
        write_report(results, name, log, results_dir)

    return data, ev, sd0, save


def run_lora(cfg, tasks, results, args, name, cache, results_dir, log) -> None:
    """``--lora``: the LoRA rows (:mod:`.lora`) instead of the main table."""
    from .lora import run_lora_seeds

    _, ev, sd0, save = setup(cfg, tasks, results, args, name, cache, results_dir, log)
    run_lora_seeds(cfg, tasks, results, ev, sd0, cache, save, log)


def run_seeds(cfg, tasks, results, previous, args, name, cache, results_dir, log) -> None:
    t_start = time.perf_counter()
    data, ev, sd0, save = setup(cfg, tasks, results, args, name, cache, results_dir, log)

    for seed in list(cfg["seeds"]):
        cfg["_seed"] = seed
        log(f"seed {seed}: experts")
        experts, heads, train_secs, via, cb_merged = seed_experts(cfg, cache, data, tasks, cfg["task_positions"],
                                                                  seed, log)
        if args.train_only:
            continue
        rec = {"train_seconds": train_secs, "trained_via": via, "subsets": {}}
        if cb_merged:  # the callback merged exactly these tasks (closed form)
            check_callback_merge(rec, cb_merged, sd0, experts, log)
        rec["expert_test"] = {t: ev.accuracy(experts[t], {t: heads[t]}, "test", cfg["test_limit"])[t] for t in tasks}
        rec["pretrained_test"] = ev.accuracy(sd0, heads, "test", cfg["test_limit"])
        log(f"  experts {rec['expert_test']}")
        log(f"  pretrained encoder {rec['pretrained_test']}")
        order = task_order(cfg["tasks"], seed)
        rec["task_order"] = order
        old = (previous or {}).get("seeds", {}).get(str(seed))
        if old:
            rec["subsets"].update(old["subsets"])
        results["seeds"][str(seed)] = rec
        run_seed_subsets(cfg, ev, sd0, experts, heads, rec, save, log)
    log(f"done in {time.perf_counter() - t_start:.0f}s")
