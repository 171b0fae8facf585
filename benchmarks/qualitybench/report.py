"""Quality benchmark report: per-seed results -> summary (mean +- std over seeds, paired differences against
task arithmetic) -> ``<name>.json``, ``<name>.md`` and ``<name>.png``."""

from __future__ import annotations

import json
from pathlib import Path

from ..common import RESULTS, mean, mean_std

TA_ROW = "task_arithmetic (val lambda)"


def _rows_by_subset(results: dict) -> dict:
    """{k: {method: [record per seed]}} of the scored rows (not the ``_``-prefixed grids / notes)."""
    rows = {}
    for seed_rec in results["seeds"].values():
        for k, sub in seed_rec["subsets"].items():
            for m, r in sub["methods"].items():
                if not m.startswith("_") and isinstance(r, dict):
                    rows.setdefault(k, {}).setdefault(m, []).append(r)
    return rows


def _paired_vs_ta(results: dict) -> dict:
    """{k: {method: [normalized - task arithmetic's normalized, per seed]}}."""
    paired = {}
    for seed_rec in results["seeds"].values():
        for k, sub in seed_rec["subsets"].items():
            ta = sub["methods"].get(TA_ROW)
            if not isinstance(ta, dict):
                continue
            for m, r in sub["methods"].items():
                if isinstance(r, dict) and "normalized" in r:
                    paired.setdefault(k, {}).setdefault(m, []).append(r["normalized"] - ta["normalized"])
    return paired


def summarise(results: dict) -> dict:
    """{k: {method: {mean_acc, mean_acc_std, normalized, normalized_std, merge_seconds, n_seeds, ...}}}."""
    paired = _paired_vs_ta(results)
    out = {}
    for k, methods in _rows_by_subset(results).items():
        out[k] = {}
        for m, rs in methods.items():
            a, a_sd = mean_std(r["mean_acc"] for r in rs)
            nrm, n_sd = mean_std(r["normalized"] for r in rs)
            row = out[k][m] = {"mean_acc": a, "mean_acc_std": a_sd, "normalized": nrm, "normalized_std": n_sd,
                               "merge_seconds": mean(r["merge_seconds"] for r in rs), "n_seeds": len(rs)}
            ds = paired.get(k, {}).get(m)
            if ds:
                row["delta_norm_vs_ta"], row["delta_norm_vs_ta_std"] = mean_std(ds)
            oods = [mean(r["ood_test"].values()) for r in rs
                    if r.get("ood_test") and m != "wudi adam (val scaling)"]  # (a copy of the 1.0 row)
            if oods:
                row["ood_mean_acc"] = mean(oods)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _summary_tables(summary: dict) -> list:
    lines = []
    for k, methods in summary.items():
        lines += [f"## {k} tasks merged", "",
                  "| method | mean acc (%) | normalized acc (%) | Δ normalized vs TA, paired (pts) | merge time (s) "
                  "| OOD acc (held-out tasks, %) | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in methods.items():
            ood = f"{100*r['ood_mean_acc']:.1f}" if "ood_mean_acc" in r else ""
            lines.append(f"| {m} | {100*r['mean_acc']:.1f} ± {100*r['mean_acc_std']:.1f} | "
                         f"{100*r['normalized']:.1f} ± {100*r['normalized_std']:.1f} | "
                         + (f"{100*r['delta_norm_vs_ta']:+.1f} ± {100*r['delta_norm_vs_ta_std']:.1f}"
                            if "delta_norm_vs_ta" in r else "")
                         + f" | {r['merge_seconds']:.1f} | {ood} "
                         f"| {r['n_seeds']} |")
        lines.append("")
    return lines


def _per_task_table(results: dict, summary: dict) -> list:
    """Per-task test accuracy of the largest subset, mean over seeds, tasks in the task source's order."""
    lines = ["## Per-task test accuracy (largest subset, mean over seeds)", ""]
    big = max(summary, key=int) if summary else None
    if not big:
        return lines
    per = {}
    for seed_rec in results["seeds"].values():
        sub = seed_rec["subsets"].get(big)
        for m, r in (sub["methods"].items() if sub else ()):
            if isinstance(r, dict) and "test" in r:
                for t, a in r["test"].items():
                    per.setdefault(m, {}).setdefault(t, []).append(a)
    known = list(results.get("tasks", {}))
    tasks = sorted({t for d in per.values() for t in d},
                   key=lambda t: (known.index(t) if t in known else len(known), t))
    lines += ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m, d in per.items():
        lines.append(f"| {m} | " + " | ".join(f"{100*mean(d[t]):.1f}" if t in d else "" for t in tasks) + " |")
    return lines + [""]


def _grid_lines(results: dict, summary: dict) -> list:
    """The solver-option grids scored on validation."""
    lines = []
    for title, key, label in [("WUDI spectral: flow_time", "_spectral_flow_time_val", "t"),
                              ("WUDI closed_form: ridge", "_closed_form_ridge_val", "ridge")]:
        lines += [f"## {title} on the validation split (mean val acc over seeds)", ""]
        for k in summary:
            grids = [s["subsets"][k]["methods"].get(key) for s in results["seeds"].values() if k in s["subsets"]]
            grids = [g for g in grids if g]
            if grids:
                lines.append(f"- {k} tasks: " + ", ".join(f"{label}={v}: {100*mean([g[v] for g in grids]):.1f}"
                                                         for v in grids[0]))
        lines.append("")
    return lines


def write_report(results: dict, name: str, log, results_dir: Path = RESULTS) -> None:
    summary = results["summary"] = summarise(results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    cfg = results["config"]
    lines = [f"# Quality benchmark ({'quick' if cfg['quick'] else 'full'})", "",
             f"Command: `{results['command']}`", "",
             f"Base {cfg.get('model', 'all-MiniLM-L6-v2')}; {len(cfg['seeds'])} expert-training seed(s) "
             f"{cfg['seeds']}; "
             f"{cfg['steps']} steps x batch {cfg['batch_size']} per expert (lr {cfg['lr_encoder']} encoder / "
             f"{cfg['lr_head']} head), max_length {cfg['max_length']}. Each task scored with its own expert's head "
             "on the merged encoder. Mean over tasks, then mean +- std over seeds (each seed also draws which tasks "
             "form the 2- and 4-task subsets). Normalized = merged / expert accuracy, averaged over tasks.", ""]
    lines += _summary_tables(summary) + _per_task_table(results, summary) + _grid_lines(results, summary)
    lines.append("")
    (results_dir / f"{name}.md").write_text("\n".join(lines))
    plot(summary, results_dir / f"{name}.png", cfg.get("model", "all-MiniLM-L6-v2"))
    log(f"wrote {results_dir / name}.json/.md/.png")


def plot(summary, path, model: str = "all-MiniLM-L6-v2"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(summary, key=int)
    methods = []
    for k in ks:
        methods += [m for m in summary[k] if m not in methods]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "mean_acc", "mean absolute accuracy"),
                           (axes[1], "normalized", "normalized accuracy (merged / expert)")):
        for m in methods:
            xs = [int(k) for k in ks if m in summary[k]]
            ys = [summary[k][m][key] for k in ks if m in summary[k]]
            es = [summary[k][m][key + "_std"] for k in ks if m in summary[k]]
            solid = m == "wudi adam (scaling 1.0)" or m.startswith(("task_arith", "ties", "pretrained", "expert"))
            ax.errorbar(xs, ys, yerr=es, fmt="-o" if solid else "--.", capsize=3, label=m)
        ax.set_xlabel("number of tasks merged")
        ax.set_title(title)
        ax.set_xticks([int(k) for k in ks])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{Path(model).name} experts merged (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
