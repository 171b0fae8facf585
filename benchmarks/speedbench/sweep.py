"""Size sweep of the speed benchmark (issue #12, part 3): Qwen2.5-shaped models from 0.5B to 7B, each method
merged by a real ``mergekit-yaml`` in its own process; wall, CPU and peak memory split into anonymous and
file-backed (mmap'd shards) from ``/proc/<pid>/status``; the compute floor per size; a log-log plot.

    python benchmarks/speed.py --sweep --sizes 0.5B 1.5B        # appends to results/speed_sweep.json
    python benchmarks/speed.py --sweep --sizes tiny --name t    # seconds; what the tests run

Models get random bf16 weights written shard by shard (never a whole model in memory); each expert is the base
plus, per 2-D weight, a rank-8 delta and small dense noise (``--expert-kind lora``, the default) or a
full-fine-tune-like task vector following the measured spectrum profile (``--expert-kind fullft``; results
default to ``speed_sweep_fullft.*``), see ``models.py``; generated per tensor from seeds that depend only on
the tensor's name, so a size can be rebuilt identically. A size's models are deleted after its
merges. Results are saved after every merge; a (size, method) already in the JSON is skipped (the sweep always resumes; delete the JSON to start over).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from .models import LOWRANK_STD, NOISE_STD, QWEN, RANK, linear_shapes, tensor_shapes, write_model

_QWEN_COMMON = {k: QWEN[k] for k in ("vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps")}
SIZES = {  # Qwen2.5 configs (hidden, intermediate, layers, heads, kv heads, tied embeddings)
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, **{**_QWEN_COMMON, "vocab_size": 512}),
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, **_QWEN_COMMON),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True, **_QWEN_COMMON),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True, **_QWEN_COMMON),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False, **_QWEN_COMMON),
}
# name -> (merge_method, wudi parameters); the fast path at the package's default rank_energy
METHODS = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "closed_form": ("wudi", {"solver": "closed_form"}),
    "spectral": ("wudi", {"solver": "spectral"}),
    "closed_form_rank_auto": ("wudi", {"solver": "closed_form", "rank": "auto"}),
    "spectral_rank_auto": ("wudi", {"solver": "spectral", "rank": "auto"}),
}


def _shapes(size: str) -> dict:
    cfg = SIZES[size]
    return tensor_shapes(cfg["num_hidden_layers"], cfg)


def parameter_count(size: str) -> int:
    return sum(math.prod(s) for s in _shapes(size).values())


def build_size(cache: Path, size: str, experts: int, profile: dict | None = None) -> Path:
    """The base and ``experts`` experts of ``size`` (kind ``fullft`` with a spectrum ``profile``)."""
    root = cache / (f"sweep_{size}_E{experts}" + ("_fullft" if profile is not None else ""))
    if (root / "DONE").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    for m in range(experts + 1):
        write_model(root / ("base" if m == 0 else f"expert_{m - 1}"), SIZES[size], m, profile=profile)
    (root / "DONE").write_text(f"{time.perf_counter() - t0:.1f} s\n")
    print(f"[build] {size}: {time.perf_counter() - t0:.1f} s", flush=True)
    return root


# --------------------------------------------------------------------------------------------- measuring

def _status_kib(pid: int, fields=("RssAnon", "RssFile")) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in fields:
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return found


def run_polled(cmd: list[str], log: Path, env=None, interval: float = 0.05) -> dict:
    """Run ``cmd`` (output to ``log``); poll RssAnon / RssFile of it and its descendants every ``interval`` s;
    wall time, CPU (user + sys of the process and its reaped children, from ``wait4``) and the peaks."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_anon = peak_file = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree = [_status_kib(p) for p in _descendants(proc.pid)]
            peak_anon = max(peak_anon, sum(t.get("RssAnon", 0) for t in tree))
            peak_file = max(peak_file, sum(t.get("RssFile", 0) for t in tree))
            time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_anon_mib": peak_anon / 1024, "peak_rss_file_mib": peak_file / 1024,
            "peak_rss_hwm_mib": usage.ru_maxrss / 1024}


def run_one(method: str, root: Path, experts: int, work: Path, threads: int) -> dict:
    import yaml

    from mergekit_wudi.toy import mergekit_yaml_executable

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from .measure import merge_config

    merge_method, params = METHODS[method]
    cfg = merge_config(merge_method, root, experts, **params)
    (work / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [mergekit_yaml_executable(), str(work / "config.yml"), str(work / "out"), "--no-copy-tokenizer",
           "--no-write-model-card", "--quiet"]
    print(f"[sweep] {method} ...", flush=True)
    load_start = list(os.getloadavg())
    res = run_polled(cmd, work.parent / f"{work.name}-{method}.log", env=env)
    res["loadavg_start"], res["loadavg_end"] = load_start, list(os.getloadavg())  # 1/5/15-min, as `uptime` shows
    res["ok"] = res["rc"] == 0 and any((work / "out").glob("*.safetensors"))
    print(f"[sweep] {method}: {'ok' if res['ok'] else 'FAILED'} {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, "
          f"RssAnon {res['peak_rss_anon_mib']:.0f} MiB, RssFile {res['peak_rss_file_mib']:.0f} MiB", flush=True)
    if not res["ok"]:
        print((work.parent / f"{work.name}-{method}.log").read_text()[-3000:], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return res


def add_ratios(rows: dict) -> None:
    ta = rows.get("task_arithmetic")
    if not ta or not ta.get("ok"):
        return
    for r in rows.values():
        for key in ("wall_s", "cpu_s", "peak_rss_anon_mib", "peak_rss_file_mib"):
            r[f"{key}_ratio_vs_ta"] = r[key] / ta[key] if ta[key] else float("nan")


def compute_floor(size: str, experts: int, threads: int) -> dict:
    """Gram products + Cholesky / eigh of every linear weight of ``size`` (float32, no I/O)."""
    from .measure import gram_floor

    cfg = SIZES[size]
    torch.set_num_threads(threads)
    return gram_floor(0, experts, torch.device("cpu"), shapes=linear_shapes(cfg["num_hidden_layers"], cfg),
                      with_eigh=True, with_solver=True)


def expert_delta(profile: dict | None) -> str:
    lora = f"rank-{RANK} (entry std {LOWRANK_STD}) + dense noise (std {NOISE_STD})"
    if profile is None:
        return f"per 2-D weight: {lora}, bf16"
    return ("per linear weight: full-fine-tune-like (singular values following the measured spectrum profile "
            f"scaled to the shape, random orthonormal singular vectors, entry RMS {LOWRANK_STD}); embeddings / "
            f"lm_head: {lora}; bf16")


def sweep(sizes, methods, experts: int, cache: Path, out: Path, stem: str, threads: int, resume: bool,
          keep_models: bool = False, profile: dict | None = None, compare: Path | None = None) -> dict:
    """Every (size, method) not yet in ``<out>/<stem>.json``. ``profile``: experts of kind ``fullft``
    (stored in the results); ``compare``: another sweep's JSON drawn dashed in the same plot."""
    from ..common import machine_info

    path = out / f"{stem}.json"
    result = json.loads(path.read_text()) if resume and path.exists() else {
        "issue": 22 if profile is not None else 12, "experts": experts, "threads_per_merge": threads, "sizes": {},
        "expert_kind": "fullft" if profile is not None else "lora", "expert_delta": expert_delta(profile),
        "methods": {m: {"merge_method": METHODS[m][0], **METHODS[m][1]} for m in METHODS}}
    if result["experts"] != experts or result["threads_per_merge"] != threads:
        raise SystemExit(f"{path} holds rows with {result['experts']} experts and {result['threads_per_merge']} "
                         f"thread(s) per merge; resume it with --experts {result['experts']} --threads "
                         f"{result['threads_per_merge']}, or give another --name")
    if profile is not None:
        result["spectrum_profile"] = profile
    result.setdefault("runs", []).append({"date": _dt.datetime.now().isoformat(timespec="seconds"),
                                          "machine": machine_info(torch.device("cpu")), "sizes": list(sizes)})

    def save():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        from .report import render_sweep_md

        (out / f"{stem}.md").write_text(render_sweep_md(result))
        try:
            other = json.loads(compare.read_text()) if compare is not None and compare.exists() else None
            plot_sweep(result, out / f"{stem}.png", other)
        except ImportError:
            print("[sweep] matplotlib missing: no plot", flush=True)

    for size in sizes:
        entry = result["sizes"].setdefault(size, {"parameters": parameter_count(size), "config": SIZES[size],
                                                  "rows": {}})
        todo = [m for m in methods if not entry["rows"].get(m, {}).get("ok")]
        if todo:
            root = build_size(cache, size, experts, profile)
            for m in todo:
                entry["rows"][m] = run_one(m, root, experts, cache / "sweep_work", threads)
                add_ratios(entry["rows"])
                save()
            if not keep_models:
                shutil.rmtree(root, ignore_errors=True)
        exact_rows = any(entry["rows"].get(m, {}).get("ok") for m in ("closed_form", "spectral"))
        if exact_rows and "closed_form_solver_total_s" not in entry.get("floor", {}):  # older runs lack it
            print(f"[sweep] {size}: compute floor ...", flush=True)
            entry["floor"] = compute_floor(size, experts, threads)
        add_floor_distance(entry)
        save()
    return result


def add_floor_distance(entry: dict) -> None:
    """Each exact solver's wall / (task_arithmetic wall + its floor: Gram + Cholesky or Gram + eigh); for
    ``closed_form`` also / (task_arithmetic wall + the solver's own in-memory compute)."""
    rows, floor = entry["rows"], entry.get("floor")
    ta = rows.get("task_arithmetic")
    if not floor or not ta or not ta.get("ok"):
        return
    for m, key in (("closed_form", "gram_plus_cholesky_total_s"), ("spectral", "gram_plus_eigh_total_s")):
        if m in rows and rows[m].get("ok") and key in floor:
            rows[m]["io_plus_floor_s"] = ta["wall_s"] + floor[key]
            rows[m]["ratio_vs_io_plus_floor"] = rows[m]["wall_s"] / rows[m]["io_plus_floor_s"]
    if rows.get("closed_form", {}).get("ok") and "closed_form_solver_total_s" in floor:
        row = rows["closed_form"]
        row["io_plus_solver_s"] = ta["wall_s"] + floor["closed_form_solver_total_s"]
        row["ratio_vs_io_plus_solver"] = row["wall_s"] / row["io_plus_solver_s"]


def plot_sweep(result: dict, path: Path, other: dict | None = None) -> None:
    """Wall time against parameters, log-log; ``other`` (a sweep with the other expert kind) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rx) = plt.subplots(1, 2, figsize=(12, 5))
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for res, style in ((result, "-o"), (other, "--s")):
        if res is None:
            continue
        kind = {"fullft": "full-FT-like", "lora": "LoRA-like"}[res.get("expert_kind", "lora")]
        sizes = sorted(res["sizes"].items(), key=lambda kv: kv[1]["parameters"])
        for m in METHODS:
            rows = [(e["parameters"], e["rows"][m]) for _, e in sizes if e["rows"].get(m, {}).get("ok")]
            if rows:
                label = f"{m} ({kind})" if other else m
                ax.plot([p for p, _ in rows], [r["wall_s"] for _, r in rows], style, color=colours[m], label=label)
                ratios = [(p, r["wall_s_ratio_vs_ta"]) for p, r in rows if "wall_s_ratio_vs_ta" in r]
                if ratios:
                    rx.plot(*zip(*ratios), style, color=colours[m], label=label)
    for a in (ax, rx):
        a.set_xscale("log")
        a.set_xlabel("parameters")
        a.grid(alpha=0.3, which="both")
    ax.set_yscale("log")
    ax.set_ylabel(f"wall time of mergekit-yaml (s, {result['threads_per_merge']} thread)")
    rx.set_ylabel("wall time / task_arithmetic's in the same run")
    rx.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_title(f"Qwen2.5-shaped merges, {result['experts']} experts, bf16, CPU")
    rx.set_title("ratio to task arithmetic (runs differ in machine load)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
