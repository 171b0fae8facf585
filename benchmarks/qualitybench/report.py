"""Quality benchmark report: per-seed results -> summary (mean +- std over seeds; paired differences against
task arithmetic and against WUDI's default, with a 95% t-interval over seeds) -> ``<name>.json``, ``<name>.md``
(a ranking at the largest subset, then one table per subset) and ``<name>.png`` (normalized accuracy against the
number of tasks, one line per method family, and merge time against accuracy)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from ..common import RESULTS, mean, mean_std
from .methods import A_UPDATES_ROW, DECORRELATED_ROW

TA_ROW = "task_arithmetic (val lambda)"
TIES_ROW = "ties (d=0.2, val lambda)"
DEFAULT_ROW = "wudi adam (scaling 1.0)"  # WUDI's default: the authors' solver at their scaling
REFERENCE_ROWS = ("expert (own task, upper bound)", "pretrained encoder")
# Issue 21: the recommended data-free configuration per expert kind (the callback's RECOMMENDED_WUDI), nothing
# tuned on validation: full fine-tunes -> spectral with rank auto (README's first YAML), LoRA experts ->
# decorrelated. CLOSED_FORM_ROW: the exact minimiser, the full fine-tune recommendation before the 300-step experts.
FULL_ROW = "wudi spectral (rank auto <= 8, energy 0.9)"
CLOSED_FORM_ROW = "wudi closed_form (ridge 0.01)"
# The data-free subspace methods the full fine-tune row has to beat, at their validation-tuned best.
SUBSPACE_ROWS = ("iso_c (val grid)", "iso_cts (val grid)", "tsv_merge (val grid)")
# Where each regime's seeds live in the results dict ("seeds": the full fine-tunes).
LORA_REGIMES = {"LoRA, independent init": "lora", "LoRA, shared init": "lora_shared_init",
                "LoRA, callback path": "lora_callback"}
# The full fine-tune regimes, by the experts' fine-tuning steps (a results file's ``config.steps``): the
# benchmark's 50-step experts, and experts trained 6x longer (`quality_variants.py --steps 300`), closer to
# the long fine-tunes users merge. Both live under ``seeds`` of their own results files.
FULL_REGIMES = {"full fine-tunes": 50, "full fine-tunes, 300 steps": 300}
REGIMES = {**{regime: "seeds" for regime in FULL_REGIMES}, **LORA_REGIMES}
# How a claim's paired differences (row - versus, normalized accuracy, per seed) decide it.
# "ahead" as issue 21 defines it (paired difference > 0, interval reported); every claim also says whether its
# interval lies entirely above 0 (``ci95_above_0``), the stricter reading.
CLAIM_RULES = {"ahead": "mean paired difference > 0 (95% interval reported)",
               "at least as good": "mean paired difference >= 0",
               "ahead by 1 point": "mean paired difference >= 1 point (95% interval reported)"}
# Issue 21, part 2: merging with the inputs each expert saw (benchmarks/input_grams_quality.py)
INPUT_GRAMS_ROW = "input grams (default, post hoc)"


@dataclass(frozen=True)
class Claim:
    """A sentence of the README as a check on the rows: ``row`` against ``versus`` at ``tasks`` merged."""

    regime: str  # a key of REGIMES
    tasks: int
    row: str
    versus: str
    rule: str  # a key of CLAIM_RULES

    @property
    def name(self) -> str:
        return f"{self.regime}, {self.tasks} tasks: {self.row} {self.rule} {self.versus}"


def issue21_claims(row: str = FULL_ROW, lora_row: str = DECORRELATED_ROW, callback_row: str = A_UPDATES_ROW) -> list:
    """Part 1 of issue 21, with the recommended configuration per expert kind (main's RECOMMENDED_WUDI):
    ahead of Iso-C / Iso-CTS / TSV-M at 7 tasks, no worse at 2 and 4 (full fine-tunes of 50 and of 300 steps,
    spectral with rank auto);
    at least as good as tuned task arithmetic and TIES at 4 and 7 tasks in every LoRA regime (decorrelated; for
    adapters the callback trained, its default: the LoRA A-update Grams)."""
    claims = [Claim(regime, k, row, versus, "ahead" if k == 7 else "at least as good")
              for regime in FULL_REGIMES for k in (7, 4, 2) for versus in SUBSPACE_ROWS]
    claims += [Claim(regime, k, callback_row if regime == "LoRA, callback path" else lora_row, versus,
                     "at least as good")
               for regime in LORA_REGIMES for k in (4, 7) for versus in (TA_ROW, TIES_ROW)]
    # part 2: the input-Gram merge at least 1 point above the best data-free row, 7 tasks
    # (full fine-tunes: against the best data-free WUDI row of each regime: closed_form on the 50-step experts)
    claims += [Claim("full fine-tunes", 7, INPUT_GRAMS_ROW, CLOSED_FORM_ROW, "ahead by 1 point"),
               Claim("full fine-tunes, 300 steps", 7, INPUT_GRAMS_ROW, row, "ahead by 1 point"),
               Claim("LoRA, independent init", 7, INPUT_GRAMS_ROW, lora_row, "ahead by 1 point"),
               Claim("LoRA, callback path", 7, INPUT_GRAMS_ROW, callback_row, "ahead by 1 point")]
    return claims


def input_grams_as_results(grams: dict) -> dict:
    """``benchmarks/input_grams_quality.py``'s output (one subset of tasks per seed, its rows) in the quality
    benchmark's results layout: full fine-tunes under ``seeds``, LoRA experts under their regime's key."""
    seeds = {seed: {"subsets": {str(len(rec["subset"])): {"methods": rec["rows"]}}}
             for seed, rec in grams["seeds"].items()}
    config = {"test_limit": None, "steps": grams.get("steps", 50)}
    if "lora" not in grams:
        return {"config": config, "seeds": seeds}
    from .lora import lora_results_key

    return {"config": config, "seeds": {}, lora_results_key(grams["lora"].get("init", "independent")): {"seeds": seeds}}


def in_regime(results: dict, regime: str) -> bool:
    """Whether a results file can measure ``regime``: a full fine-tune regime needs experts of its steps."""
    steps = FULL_REGIMES.get(regime)
    return steps is None or results.get("config", {}).get("steps", 50) == steps


def paired_differences(section: dict, tasks: int, row: str, versus: str) -> list:
    """Per seed that has both rows at ``tasks`` merged: normalized(row) - normalized(versus)."""
    out = []
    for seed in sorted((section or {}).get("seeds", {}), key=int):
        methods = section["seeds"][seed]["subsets"].get(str(tasks), {}).get("methods", {})
        a, b = methods.get(row), methods.get(versus)
        if isinstance(a, dict) and isinstance(b, dict) and "normalized" in a and "normalized" in b:
            out.append(a["normalized"] - b["normalized"])
    return out


def evaluate_claims(results: dict, claims: list | None = None, sources: list | None = None) -> list:
    """``summary.claims``: for each claim its measured paired difference (mean over seeds, normalized accuracy
    points as fractions), the 95% t-interval, the number of seeds, and ``status`` met / not met / not measured
    (no seed with both rows; one seed gives an interval of NaN, decided by the mean alone).

    ``sources``: ``[(label, results dict), ...]`` to evaluate each claim on (default: ``results`` alone). A claim
    is decided on the source that measures it on the most seeds (the first of equals); ``source`` names it, with
    its test texts per task, and ``also_measured`` lists what the other sources measured, so that no number is
    chosen silently."""
    out = []
    for claim in issue21_claims() if claims is None else claims:
        measured = []
        for label, res in sources if sources is not None else [(None, results)]:
            if not in_regime(res, claim.regime):
                continue
            section = res if REGIMES[claim.regime] == "seeds" else res.get(REGIMES[claim.regime])
            ds = paired_differences(section, claim.tasks, claim.row, claim.versus)
            if ds:
                d, h = mean(ds), ci95(ds)
                limit = (section or {}).get("config", {}).get("test_limit", res.get("config", {}).get("test_limit", "?"))
                measured.append({"source": label, "test_texts_per_task": "all" if limit is None else limit,
                                 "n_seeds": len(ds), "paired_difference": d,
                                 "ci95": [d - h, d + h] if h == h else None})  # h != h: NaN (one seed)
        rec = {"name": claim.name, "regime": claim.regime, "tasks": claim.tasks, "row": claim.row,
               "versus": claim.versus, "rule": CLAIM_RULES[claim.rule]}
        if not measured:
            out.append({**rec, "n_seeds": 0, "paired_difference": None, "ci95": None, "ci95_above_0": None,
                        "met": None, "status": "not measured"})
            continue
        best = max(measured, key=lambda m: m["n_seeds"])  # max keeps the first of equals
        d, ci = best["paired_difference"], best["ci95"]
        met = {"ahead": d > 0, "at least as good": d >= 0, "ahead by 1 point": d >= 0.01}[claim.rule]
        rec.update(n_seeds=best["n_seeds"], paired_difference=d, ci95=ci, ci95_above_0=ci[0] > 0 if ci else None,
                   met=met, status="met" if met else "not met")
        if sources is not None:
            rec.update(source=best["source"], test_texts_per_task=best["test_texts_per_task"],
                       also_measured=[m for m in measured if m is not best])
        out.append(rec)
    return out


def claims_table(claims: list) -> list:
    """The claims as a markdown table (points of normalized accuracy)."""
    sourced = any("source" in c for c in claims)
    lines = ["## Claims (issue 21): the recommended configuration against its targets", "",
             "| regime | tasks | configuration | versus | rule | paired Δ (pts) [95% CI] | seeds | status |"
             + (" measured in (test texts/task) |" if sourced else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if sourced else "")]
    for c in claims:
        if c["paired_difference"] is None:
            delta = ""
        else:
            delta = f"{100 * c['paired_difference']:+.2f}" + (
                f" [{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]" if c["ci95"] else "")
        where = f" {c['source']} ({c['test_texts_per_task']}) |" if c.get("source") else (" |" if sourced else "")
        lines.append(f"| {c['regime']} | {c['tasks']} | {c['row']} | {c['versus']} | {c['rule']} | {delta} "
                     f"| {c['n_seeds']} | {c['status']} |" + where)
    return lines + [""]


def regime_table(results: dict, rows: tuple, tasks: tuple = (7, 4)) -> list:
    """One line per (regime, tasks, row): normalized accuracy (mean +- std over seeds, %), the paired difference
    from tuned task arithmetic and from tuned TIES (points, 95% t-interval), merge seconds, seeds."""
    lines = ["| regime | tasks | method | normalized acc (%) | Δ vs tuned TA [95% CI] | Δ vs tuned TIES [95% CI] "
             "| merge s | seeds |", "|---|---|---|---|---|---|---|---|"]

    def delta(section, k, row, versus):
        ds = paired_differences(section, k, row, versus)
        if not ds or row == versus:
            return ""
        h = ci95(ds)
        return f"{100 * mean(ds):+.1f}" + (f" [{100 * (mean(ds) - h):+.1f}, {100 * (mean(ds) + h):+.1f}]" if h == h else "")

    for regime, key in REGIMES.items():
        section = results if key == "seeds" else results.get(key)
        if not section or not section.get("seeds") or not in_regime(results, regime):
            continue
        for k in tasks:
            for row in rows:
                recs = [s["subsets"].get(str(k), {}).get("methods", {}).get(row) for s in section["seeds"].values()]
                recs = [r for r in recs if isinstance(r, dict) and "normalized" in r]
                if not recs:
                    continue
                mu, sd = mean_std([100 * r["normalized"] for r in recs])
                lines.append(f"| {regime} | {k} | {row} | {mu:.1f} ± {sd:.1f} | {delta(section, k, row, TA_ROW)} "
                             f"| {delta(section, k, row, TIES_ROW)} | {mean([r['merge_seconds'] for r in recs]):.1f} "
                             f"| {len(recs)} |")
    return lines + [""]


def family(row: str) -> str:
    """The method family of a row, for the ranking table and the plot."""
    if row in REFERENCE_ROWS:
        return "reference"
    if row.startswith("wudi"):
        return "WUDI"
    if row.startswith("preprocessed_"):
        return "task arithmetic + AWD / LwPTV"
    if row.startswith("task_arithmetic"):
        return "task arithmetic"
    if row.startswith("ties"):
        return "sign consensus"
    try:
        from benchmarks.baselines import method_table
    except ImportError:  # pragma: no cover - benchmarks/ is always importable next to qualitybench/
        return "other"
    return {spec.name: spec.family for spec in method_table()}.get(row.split(" (")[0], "other")


def ci95(xs: list) -> float:
    """Half-width of the 95% t-interval of the mean of ``xs`` (NaN for one value)."""
    import math

    from scipy import stats

    if len(xs) < 2:
        return float("nan")
    _, sd = mean_std(xs)
    return float(stats.t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))


def _rows_by_subset(results: dict) -> dict:
    """{k: {method: [record per seed]}} of the scored rows (not the ``_``-prefixed grids / notes)."""
    rows = {}
    for seed_rec in results["seeds"].values():
        for k, sub in seed_rec["subsets"].items():
            for m, r in sub["methods"].items():
                if not m.startswith("_") and isinstance(r, dict):
                    rows.setdefault(k, {}).setdefault(m, []).append(r)
    return rows


def _paired(results: dict, reference: str) -> dict:
    """{k: {method: [normalized - the ``reference`` row's normalized, per seed that has both]}}."""
    paired = {}
    for seed_rec in results["seeds"].values():
        for k, sub in seed_rec["subsets"].items():
            ref = sub["methods"].get(reference)
            if not isinstance(ref, dict):
                continue
            for m, r in sub["methods"].items():
                if isinstance(r, dict) and "normalized" in r:
                    paired.setdefault(k, {}).setdefault(m, []).append(r["normalized"] - ref["normalized"])
    return paired


def summarise(results: dict) -> dict:
    """{k: {method: {mean_acc, mean_acc_std, normalized, normalized_std, merge_seconds, n_seeds, ...}}}."""
    paired, vs_default = _paired(results, TA_ROW), _paired(results, DEFAULT_ROW)
    out = {}
    for k, methods in _rows_by_subset(results).items():
        out[k] = {}
        for m, rs in methods.items():
            a, a_sd = mean_std(r["mean_acc"] for r in rs)
            nrm, n_sd = mean_std(r["normalized"] for r in rs)
            row = out[k][m] = {"mean_acc": a, "mean_acc_std": a_sd, "normalized": nrm, "normalized_std": n_sd,
                               "merge_seconds": mean(r["merge_seconds"] for r in rs), "n_seeds": len(rs)}
            row["family"] = family(m)
            row["is_default"] = m == DEFAULT_ROW
            ds = paired.get(k, {}).get(m)
            if ds:
                row["delta_norm_vs_ta"], row["delta_norm_vs_ta_std"] = mean_std(ds)
            ds = vs_default.get(k, {}).get(m)
            if ds:
                row["delta_norm_vs_wudi_default"] = mean(ds)
                row["delta_norm_vs_wudi_default_ci95"] = ci95(ds)
                row["delta_norm_vs_wudi_default_n"] = len(ds)
            oods = [mean(r["ood_test"].values()) for r in rs
                    if r.get("ood_test") and m != "wudi adam (val scaling)"]  # (a copy of the 1.0 row)
            if oods:
                row["ood_mean_acc"] = mean(oods)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _delta_default(r: dict) -> str:
    if "delta_norm_vs_wudi_default" not in r:
        return ""
    if r.get("is_default"):
        return "(reference)"
    d, h = 100 * r["delta_norm_vs_wudi_default"], 100 * r["delta_norm_vs_wudi_default_ci95"]
    return f"{d:+.1f}" + ("" if h != h else f" [{d - h:+.1f}, {d + h:+.1f}]")  # h != h: NaN, one seed


def _ranking_table(summary: dict) -> list:
    """Every row at the largest subset, sorted by normalized accuracy."""
    if not summary:
        return []
    k = max(summary, key=int)
    rows = sorted(summary[k].items(), key=lambda kv: -kv[1]["normalized"])
    lines = [f"## Ranking at {k} tasks merged (sorted by normalized accuracy)", "",
             f"Δ vs WUDI default: paired difference in normalized accuracy against `{DEFAULT_ROW}` on the same "
             "expert seeds, mean [95% t-interval over seeds].", "",
             "| # | method | family | normalized acc (%) | Δ vs WUDI default (pts) | Δ vs TA (pts) | merge time (s) "
             "| seeds |", "|---|---|---|---|---|---|---|---|"]
    for i, (m, r) in enumerate(rows, 1):
        ta = f"{100*r['delta_norm_vs_ta']:+.1f}" if "delta_norm_vs_ta" in r else ""
        lines.append(f"| {i} | {m} | {r['family']} | {100*r['normalized']:.1f} ± {100*r['normalized_std']:.1f} | "
                     f"{_delta_default(r)} | {ta} | {r['merge_seconds']:.1f} | {r['n_seeds']} |")
    return lines + [""]


def overview_table(summary: dict, only=None, extra_columns=()) -> list:
    """One line per row, sorted by normalized accuracy at the largest subset: normalized at every subset, the
    paired difference from WUDI's default at the largest one (left out where no row has it: the LoRA rows omit
    adam) and the merge time there. ``only``: the rows to show (default all); ``extra_columns``: (header,
    function of the row name -> cell) pairs appended to each line (README's headline table adds speed)."""
    if not summary:
        return []
    ks = sorted(summary, key=int)
    big = summary[ks[-1]]
    with_default = any(_delta_default(r) for r in big.values())
    lines = ["| method | family | " + " | ".join(f"{k} tasks" for k in ks)
             + (f" | Δ vs WUDI default at {ks[-1]} [95% CI]" if with_default else "")
             + f" | merge s at {ks[-1]} | seeds at {ks[-1]} |" + "".join(f" {h} |" for h, _ in extra_columns),
             "|---|---|" + "---|" * len(ks) + ("---|" if with_default else "") + "---|---|"
             + "---|" * len(extra_columns)]
    for m, r in sorted(big.items(), key=lambda kv: -kv[1]["normalized"]):
        if only is not None and m not in only:
            continue
        cells = [f"{100 * summary[k][m]['normalized']:.1f}" if m in summary[k] else "" for k in ks]
        lines.append(f"| {m} | {r['family']} | " + " | ".join(cells)
                     + (f" | {_delta_default(r)}" if with_default else "")
                     + f" | {r['merge_seconds']:.1f} | {r['n_seeds']} |" + "".join(f" {fn(m)} |" for _, fn in extra_columns))
    return lines + [""]


def row_cells(summary: dict, row: str, k: str | None = None) -> dict:
    """Display strings of one row at subset ``k`` (default the largest): normalized accuracy (%), the paired
    difference from tuned task arithmetic and from WUDI's default (points), merge seconds, seeds."""
    k = k or max(summary, key=int)
    r = summary[k][row]
    ta = f"{100 * r['delta_norm_vs_ta']:+.1f}" if "delta_norm_vs_ta" in r else ""
    return {"normalized": f"{100 * r['normalized']:.1f}", "vs_ta": ta, "vs_default": _delta_default(r),
            "merge_seconds": f"{r['merge_seconds']:.1f}", "seeds": str(r["n_seeds"]), "tasks": k}


def _summary_tables(summary: dict) -> list:
    lines = []
    for k, methods in summary.items():
        # the column is left out where the default row was not run (the LoRA rows omit adam)
        with_default = any(_delta_default(r) for r in methods.values())
        lines += [f"## {k} tasks merged", "",
                  "| method | mean acc (%) | normalized acc (%) | Δ normalized vs TA, paired (pts) "
                  + ("| Δ vs WUDI default [95% CI] (pts) " if with_default else "")
                  + "| merge time (s) | OOD acc (held-out tasks, %) | seeds |",
                  "|---|---|---|---|---|---|---|" + ("---|" if with_default else "")]
        for m, r in methods.items():
            ood = f"{100*r['ood_mean_acc']:.1f}" if "ood_mean_acc" in r else ""
            lines.append(f"| {m} | {100*r['mean_acc']:.1f} ± {100*r['mean_acc_std']:.1f} | "
                         f"{100*r['normalized']:.1f} ± {100*r['normalized_std']:.1f} | "
                         + (f"{100*r['delta_norm_vs_ta']:+.1f} ± {100*r['delta_norm_vs_ta_std']:.1f}"
                            if "delta_norm_vs_ta" in r else "")
                         + (f" | {_delta_default(r)}" if with_default else "")
                         + f" | {r['merge_seconds']:.1f} | {ood} | {r['n_seeds']} |")
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
                              ("WUDI closed_form: ridge", "_closed_form_ridge_val", "ridge"),
                              ("WUDI fast path, spectral: cap on rank auto", "_spectral_rank_cap_val", "max rank"),
                              ("WUDI fast path, spectral: rank_energy", "_spectral_rank_energy_val", "energy"),
                              ("WUDI fast path, closed_form: rank_energy", "_closed_form_rank_energy_val", "energy")]:
        section = []
        for k in summary:
            grids = [s["subsets"][k]["methods"].get(key) for s in results["seeds"].values() if k in s["subsets"]]
            grids = [g for g in grids if g]
            if grids:
                section.append(f"- {k} tasks: " + ", ".join(f"{label}={v}: {100*mean([g[v] for g in grids]):.1f}"
                                                           for v in grids[0]))
        if section:
            lines += [f"## {title} on the validation split (mean val acc over seeds)", "", *section, ""]
    return lines


def _lora_section(results: dict) -> list:
    """The LoRA rows (``--lora``), one part per init regime: one table per subset, paired differences against
    the LoRA experts' own task arithmetic and WUDI default rows."""
    lines = []
    for regime, key in LORA_REGIMES.items():
        lora = results.get(key)
        if not lora or not lora.get("seeds"):
            continue
        cfg = lora["config"]
        lines += [f"# LoRA experts ({regime})", "",
                  f"One PEFT LoRA expert per task ({cfg['lora']}, encoder lr {cfg['lr_encoder']}), same tasks, seeds, "
                  "steps and subsets. Merges see each expert's effective weights W0 + (alpha/r) B A. Normalized = "
                  "merged / the LoRA expert's accuracy; Δ columns are paired against the LoRA rows.", ""]
        lines += [line.replace("## ", f"## LoRA experts ({regime}), ", 1) if line.startswith("## ") else line
                  for line in _summary_tables(lora["summary"])]
    return lines


def write_report(results: dict, name: str, log, results_dir: Path = RESULTS, claims_from: tuple = ()) -> None:
    """``claims_from``: other results files whose rows may decide ``summary.claims`` (see :func:`evaluate_claims`);
    with none, the claims are decided on ``results`` alone."""
    summary = summarise(results)
    for key in LORA_REGIMES.values():
        if results.get(key, {}).get("seeds"):
            results[key]["summary"] = summarise({"seeds": results[key]["seeds"]})
    sources = None
    if claims_from:
        def load(path):
            other = json.loads(Path(path).read_text())
            return input_grams_as_results(other) if "grams" in other else other

        sources = [(f"{name}.json", results)] + [(Path(f).as_posix(), load(f)) for f in claims_from]
    claims = evaluate_claims(results, sources=sources)
    # summary: {k: rows} plus the machine-readable claims (the markdown code reads the per-k part only)
    results["summary"] = {**summary, "claims": claims}
    results_dir.mkdir(parents=True, exist_ok=True)
    from mergekit_wudi.io import atomic_file

    with atomic_file(results_dir / f"{name}.json") as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1))
    cfg = results["config"]
    lines = [f"# Quality benchmark ({'quick' if cfg['quick'] else 'full'})", "",
             f"Command: `{results['command']}`", "",
             f"Base {cfg.get('model', 'all-MiniLM-L6-v2')}; {len(cfg['seeds'])} expert-training seed(s) "
             f"{cfg['seeds']}; "
             f"{cfg['steps']} steps x batch {cfg['batch_size']} per expert (lr {cfg['lr_encoder']} encoder / "
             f"{cfg['lr_head']} head), max_length {cfg['max_length']}. Each task scored with its own expert's head "
             "on the merged encoder. Mean over tasks, then mean +- std over seeds (each seed also draws which tasks "
             "form the 2- and 4-task subsets). Normalized = merged / expert accuracy, averaged over tasks.", ""]
    lines += (_ranking_table(summary) + ["## Overview: normalized accuracy (%) at every subset size", ""]
              + overview_table(summary) + _summary_tables(summary) + _per_task_table(results, summary)
              + _grid_lines(results, summary) + _lora_section(results)
              + (claims_table(claims) if any(c["n_seeds"] for c in claims) else []))
    lines.append("")
    (results_dir / f"{name}.md").write_text("\n".join(lines))
    plot(summary, results_dir / f"{name}.png", cfg.get("model", "all-MiniLM-L6-v2"))
    log(f"wrote {results_dir / name}.json/.md/.png")


def family_lines(summary: dict) -> dict:
    """{family: row} the plot draws: per family, its row with the best normalized accuracy at the largest subset
    among the rows present at every subset (WUDI's default always has its own line)."""
    ks = sorted(summary, key=int)
    everywhere = [m for m in summary[ks[-1]] if all(m in summary[k] for k in ks)]
    best = {}
    for m in everywhere:
        f = family(m)
        if f != "reference" and (f not in best or summary[ks[-1]][m]["normalized"]
                                 > summary[ks[-1]][best[f]]["normalized"]):
            best[f] = m
    if DEFAULT_ROW in everywhere:
        best["WUDI (default: adam)"] = DEFAULT_ROW
    return best


def plot(summary, path, model: str = "all-MiniLM-L6-v2"):
    """Left: normalized accuracy against the number of tasks merged, one line per family (its best row at the
    largest subset). Right: every row's merge time against its normalized accuracy at the largest subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary:
        return
    ks = sorted(summary, key=int)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    ax = axes[0]
    for f, m in sorted(family_lines(summary).items()):
        ys = [100 * summary[k][m]["normalized"] for k in ks]
        es = [100 * summary[k][m]["normalized_std"] for k in ks]
        ax.errorbar([int(k) for k in ks], ys, yerr=es, fmt="-o", capsize=3, label=f"{f}: {m}")
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("normalized accuracy (merged / expert, %)")
    ax.set_title("accuracy against number of tasks (best row per family)")
    ax.set_xticks([int(k) for k in ks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    big = summary[ks[-1]]
    families = sorted({r["family"] for r in big.values()} - {"reference"})
    for f in families:
        rows = [(m, r) for m, r in big.items() if r["family"] == f]
        ax.scatter([max(r["merge_seconds"], 0.05) for _, r in rows], [100 * r["normalized"] for _, r in rows],
                   label=f, s=25)
        for m, r in rows:
            ax.annotate(m.replace(" (val grid)", ""), (max(r["merge_seconds"], 0.05), 100 * r["normalized"]), fontsize=5,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("merge time (s, log scale; same run, CPU)")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title(f"cost and accuracy at {ks[-1]} tasks merged")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{Path(model).name} experts merged (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
