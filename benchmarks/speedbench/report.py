"""Markdown report of the speed benchmark (README tables)."""

from __future__ import annotations

import math

def _f(x, fmt="{:.1f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _merge_table(merges: dict) -> list:
    """Markdown rows of whole-model merges: wall, CPU, peak RSS and their ratios to task_arithmetic."""
    rows = ["| method | wall s | x task_arithmetic | CPU s (user+sys) | peak RSS MiB | x task_arithmetic |",
            "|---|---|---|---|---|---|"]
    for k, v in merges.items():
        name = k if k in ("task_arithmetic", "ties") else f"wudi `{k}`"
        rows.append(f"| {name} | {_f(v['wall_s'])} | {_f(v.get('wall_ratio_vs_task_arithmetic'), '{:.2f}')} | "
                    f"{_f(v.get('user_s', 0) + v.get('sys_s', 0))} | "
                    f"{_f(v['peak_rss_mib'], '{:.0f}')} | {_f(v.get('rss_ratio_vs_task_arithmetic'), '{:.2f}')} |"
                    + ("" if v.get("ok") else " FAILED"))
    return rows + [""]


def render_md(r: dict) -> str:
    m = r["machine"]
    lines = [f"### Speed benchmark ({r['mode']}, `{r['command']}`, {r['date']})", "",
             f"Machine: {m['cpu_model']}, {m['nproc']} CPU cores (shared with other jobs: load average "
             f"{m['loadavg_start'][0]:.1f} at start), {m.get('mem_total_gib')} GiB RAM, torch {m['torch']}"
             f" ({m['torch_threads']} threads), mergekit {m.get('mergekit', '?')}, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else " (no GPU was available: no --cuda row)") + ".",
             "Absolute times are noisy on this shared machine; the ratios compare runs of the same invocation.", ""]
    if r["merges"]:
        md = r["model"]
        lines += [f"Whole-model `mergekit-yaml` merge: Qwen2.5-0.5B-shaped, {md['layers']} layers, {md['experts']} "
                  f"experts ({md['expert_delta']}), bf16 output.", "",
                  *_merge_table(r["merges"])]
    for extra in r.get("extra_runs", []):
        lines += [f"{extra['label']}", "", *_merge_table(extra["merges"])]
    if r.get("floor"):
        f = r["floor"]
        lines += [f"Floor ({f['layers']} layers' linear weights, float32, cheaper space): Gram products alone "
                  f"{f['gram_total_s']:.1f} s; Gram + Cholesky {f['gram_plus_cholesky_total_s']:.1f} s.", ""]
    if r.get("subset"):
        lines += _subset_table(r["subset"])
    if r.get("micro"):
        lines += _micro_table(r["micro"])
    if r.get("micro_note"):
        lines += [r["micro_note"], ""]
    if r.get("targets"):
        lines += ["Targets (issue 3):", ""] + [f"- {t}" for t in r["targets"]] + [""]
    for n in r.get("notes", []):
        lines.append(f"- {n}")
    lines.append(f"\nBenchmark total: {r.get('total_benchmark_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"



def _subset_table(s: dict) -> list:
    """adam / lowrank on the small model, with the EXTRAPOLATED full-model time."""
    lines = [f"`adam` / `lowrank` ({s['iterations']} iterations) on a {s['layers']}-layer model "
              f"(same construction). {s['note']}", "",
              "| method | wall s | x task_arithmetic | per layer s | full model s (EXTRAPOLATED) | x TA (extrap.) | peak RSS MiB |",
              "|---|---|---|---|---|---|---|"]
    for k, v in s["rows"].items():
        name = k if k == "task_arithmetic" else f"wudi `{k}`"
        lines.append(f"| {name} | {_f(v['wall_s'])} | {_f(v.get('wall_ratio_vs_task_arithmetic'), '{:.2f}')} | "
                     f"{_f(v.get('per_layer_s')) if k != 'task_arithmetic' else '-'} | "
                     f"{_f(v.get('extrapolated_full_model_s'), '{:.0f}')} | "
                     f"{_f(v.get('extrapolated_ratio_vs_task_arithmetic'), '{:.1f}')} | {_f(v['peak_rss_mib'], '{:.0f}')} |")
    lines.append("")
    return lines


def _micro_table(mi: dict) -> list:
    """Per-weight microbenchmark rows and the per-layer multiply-add count."""
    lines = ["Per-weight microbenchmark (float32; naive = the authors' autograd loop, tests/reference_wudi.py; "
              "adam/naive timed over the same number of iterations; rel diff = max|adam - naive| / max|naive|, "
              "and relative to the largest update max|naive - init|):", "",
              "| weight [out, in] | experts | iterations | naive s | adam s | adam speed-up | adam space | max rel diff | rel diff of update | closed_form s | spectral s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in mi["rows"]:
        lines.append(f"| {row['shape'][0]}x{row['shape'][1]} | {row['experts']} | {row['iterations']} | "
                     f"{row['naive_s']:.2f} | {row['adam_s']:.2f} | {row['adam_speedup_vs_naive']:.1f}x | "
                     f"{row['adam_space']} | {row['adam_max_rel_diff']:.1e} | {row['adam_max_rel_diff_of_update']:.1e} | "
                     f"{row['closed_form_s']:.3f} | {row['spectral_s']:.3f} |")
    lm = mi["layer_macs_per_iteration"]
    lines += ["", f"Per Adam iteration, one whole Qwen2.5-0.5B-shaped layer (q,k,v,o,gate,up,down; 3 experts) "
                  f"costs {lm['naive_macs'] / 1e9:.0f} G multiply-adds in the naive loop vs {lm['adam_macs'] / 1e9:.0f} G "
                  f"in the C/D (or dual) form: {lm['ratio']:.1f}x fewer.", ""]
    if mi.get("layer_composite"):
        lc = mi["layer_composite"]
        lines += [f"Measured per-layer composite ({lc['how']}): naive {lc['naive_per_iter_s']:.2f} s vs adam "
                  f"{lc['adam_per_iter_s']:.2f} s per iteration: {lc['speedup']:.1f}x.", ""]
    return lines


def render_sweep_md(r: dict) -> str:
    """The size sweep (issue #12): one table per size, every ratio to task_arithmetic of the same run."""
    runs = r.get("runs", [])
    m = runs[-1]["machine"] if runs else {}
    lines = ["### Size sweep: Qwen2.5-shaped models, real `mergekit-yaml`, one process per merge", "",
             f"{r['experts']} experts ({r['expert_delta']}); each merge limited to {r['threads_per_merge']} thread(s) "
             f"(OMP/MKL); machine: {m.get('cpu_model', '?')}, {m.get('nproc', '?')} cores, torch {m.get('torch', '?')}. "
             "RssAnon / RssFile: peaks of the merge process's anonymous and file-backed (mmap'd shards) resident "
             "memory, polled from /proc every 50 ms. Ratios are to task_arithmetic in the same run. "
             "Floor: float32 Gram products + Cholesky (closed_form) or + eigh (spectral) of every linear weight, "
             "no I/O. Solver: the exact closed_form solver itself on in-memory float32 task vectors (Gram, "
             "right-hand side, Cholesky, solve), no I/O.", ""]
    lines += sweep_tables(r)
    return "\n".join(lines)


def sweep_tables(r: dict) -> list:
    """One markdown table per size of a size-sweep result (``speed_sweep*.json``), smallest size first: wall, CPU,
    anonymous and file-backed memory with their ratios to task_arithmetic of the same run (docs/benchmarks.md)."""
    lines = []
    with_floor = any("ratio_vs_io_plus_floor" in row for e in r["sizes"].values() for row in e["rows"].values())
    for size, e in sorted(r["sizes"].items(), key=lambda kv: kv[1]["parameters"]):
        lines += [f"**{size}** ({e['parameters'] / 1e9:.2f} B parameters)", "",
                  "| method | wall s | x TA | CPU s | x TA | RssAnon MiB | x TA | RssFile MiB | x TA |"
                  + (" / (TA + floor) | / (TA + solver) |" if with_floor else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_floor else "")]
        for name, row in e["rows"].items():
            lines.append(
                f"| {name} | {_f(row['wall_s'])} | {_f(row.get('wall_s_ratio_vs_ta'), '{:.2f}')} | "
                f"{_f(row['cpu_s'])} | {_f(row.get('cpu_s_ratio_vs_ta'), '{:.2f}')} | "
                f"{_f(row['peak_rss_anon_mib'], '{:.0f}')} | {_f(row.get('peak_rss_anon_mib_ratio_vs_ta'), '{:.2f}')} | "
                f"{_f(row['peak_rss_file_mib'], '{:.0f}')} | {_f(row.get('peak_rss_file_mib_ratio_vs_ta'), '{:.2f}')} |"
                + (f" {_f(row.get('ratio_vs_io_plus_floor'), '{:.2f}')} | "
                   f"{_f(row.get('ratio_vs_io_plus_solver'), '{:.2f}')} |" if with_floor else "")
                + ("" if row.get("ok") else " FAILED"))
        loads = [f"{name} {row['loadavg_start'][0]:.1f}" for name, row in e["rows"].items() if row.get("loadavg_start")]
        if loads:
            lines += ["", "Load average (1 min, as `uptime` shows) at each merge's start, on this machine's "
                          "cores shared with other jobs: " + ", ".join(loads) + "."]
        f = e.get("floor")
        if f:
            lines += ["", f"Floor: Gram {f['gram_total_s']:.1f} s, + Cholesky {f['gram_plus_cholesky_total_s']:.1f} s, "
                          f"+ eigh {f.get('gram_plus_eigh_total_s', float('nan')):.1f} s; closed_form solver "
                          f"{f.get('closed_form_solver_total_s', float('nan')):.1f} s."]
        lines.append("")
    return lines


def sweep_wall_ratios(*sweeps: dict) -> dict:
    """{method: {size: wall time / task_arithmetic's of the same run}} over several size-sweep results; a later
    result's (size, method) replaces an earlier one's (pass the older run first)."""
    ratios: dict = {}
    for r in sweeps:
        for size, e in r["sizes"].items():
            for name, row in e["rows"].items():
                if row.get("ok") and row.get("wall_s_ratio_vs_ta") is not None:
                    ratios.setdefault(name, {})[size] = row["wall_s_ratio_vs_ta"]
    return ratios


def whole_model_table(r: dict) -> list:
    """The whole-model merge table of ``speed.json`` (wall, CPU, peak RSS, ratios to task_arithmetic)."""
    return _merge_table(r["merges"])


def micro_table(r: dict) -> list:
    """The per-weight table of ``speed.json``: the ``adam`` solver against the authors' literal loop."""
    return _micro_table(r["micro"]) if r.get("micro") else []
