"""Rewrite the generated regions of README.md and docs/*.md from the committed benchmark results.

    python benchmarks/update_docs.py            # rewrite every region in place
    python benchmarks/update_docs.py --check    # exit 1 (and name the regions) if any is out of date

A region is the text between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``; NAME is one of
:data:`REGIONS`. Every table in them is rendered by the benchmarks' own report code
(``qualitybench/report.py``, ``speedbench/report.py``, ``mudsc.py``) from ``benchmarks/results/*.json``, so the
documentation cannot drift from the results (``tests/test_docs.py`` checks it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS  # noqa: E402
from benchmarks.qualitybench import report as quality_report  # noqa: E402
from benchmarks.speedbench import report as speed_report  # noqa: E402
from mergekit_wudi.io import atomic_file  # noqa: E402

REGION = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
SIZES = ("0.5B", "1.5B", "3B", "7B")
# Size sweeps whose wall-time ratios the tables quote; a later file's (size, method) replaces an earlier one's.
SWEEPS = ("speed_sweep.json", "speed_sweep_fastpath.json")
# Full-fine-tune-like experts (issue 22): the wall-time ratios quoted for full fine-tunes come from this sweep
# alone, never mixed with the low-rank experts of SWEEPS.
FULLFT_SWEEP = "speed_sweep_fullft.json"
# quality row -> the size sweep's method of the same configuration
SWEEP_METHOD = {
    "task_arithmetic (val lambda)": "task_arithmetic",
    "ties (d=0.2, val lambda)": "ties",
    "wudi closed_form (ridge 0.01)": "closed_form",
    "wudi spectral (flow_time 8)": "spectral",
    "wudi spectral (val flow_time)": "spectral",
    "wudi closed_form (rank auto <= 8, energy 0.9)": "closed_form_rank_auto",
    "wudi spectral (rank auto <= 8, energy 0.9)": "spectral_rank_auto",
}
HEADLINE_ROWS = (
    "expert (own task, upper bound)", "wudi spectral (val flow_time)", "wudi closed_form (ridge 0.01)",
    "iso_cts (val grid)", "iso_c (val grid)", "tsv_merge (val grid)", "wudi spectral (rank auto <= 8, energy 0.9)", "wudi adam (scaling 1.0)",
    "ties (d=0.2, val lambda)", "dare_ties (val grid)", "task_arithmetic (val lambda)", "pretrained encoder",
)
# README's "what to use": (your experts, hardware, data at hand, configuration, results, row). ``results`` names
# the results a row is read from (:func:`what_to_use_sources`); add a situation by adding a line.
WHAT_TO_USE = [
    ("full fine-tunes", "any", "none", "`solver: spectral`, `rank: auto` (README's first YAML, the callback's default)",
     "full", "wudi spectral (rank auto <= 8, energy 0.9)"),
    ("full fine-tunes", "GPU, or a small model on CPU", "none",
     "`solver: closed_form` (the exact minimiser): ahead on short fine-tunes only", "full",
     "wudi closed_form (ridge 0.01)"),
    ("full fine-tunes", "any", "validation split",
     "`merge_method: iso_cts` (Iso-CTS, registered by this plugin), `alpha` chosen on it from 0.5 ... 16", "full",
     "iso_cts (val grid)"),
    ("full fine-tunes", "GPU", "none", "no parameters: `solver: adam`, the authors' algorithm", "full",
     "wudi adam (scaling 1.0)"),
    ("full fine-tunes", "any", "training data in the callback",
     "`WUDIMergeCallback(input_grams=InputGrams())`: measured below the data-free rows, keep those",
     "grams, full", "input grams (default, post hoc)"),
    ("LoRA adapters", "any", "none", "`solver: decorrelated`", "lora, 300 texts", quality_report.DECORRELATED_ROW),
    ("LoRA adapters trained by `WUDIMergeCallback`", "any", "none",
     "`WUDIMergeCallback()` defaults: Eq. 1 with each adapter's `A` update as its input Gram (`lora_a_updates`)",
     "lora callback, 300 texts", quality_report.A_UPDATES_ROW),
    ("LoRA adapters", "any", "validation split",
     "`merge_method: iso_c` (Iso-C, registered by this plugin), `alpha` chosen on it from 0.5 ... 64",
     "lora, 300 texts", "iso_c (val grid)"),
    ("LoRA adapters", "any", "training data in the callback", "`WUDIMergeCallback(input_grams=InputGrams())`",
     "grams, lora", "input grams (default, post hoc)"),
]
# The full fine-tune rows' second number: the same row on experts fine-tuned 6x longer (300 steps), closer to the
# long fine-tunes users merge (benchmarks/quality_variants.py --steps 300 --test-out, 5 seeds combined).
FULL_LONG = "issue21/test_full300.json"
# {results name of WHAT_TO_USE: the results name of the same row on the 300-step experts}
LONG_SOURCES = {"full": "full, 300 steps", "grams, full": "grams, full, 300 steps"}
# Where each results name of WHAT_TO_USE is read from (benchmarks/results/...), for the table's last column.
WHAT_TO_USE_FILES = {"full": "quality.json", "full, 300 steps": FULL_LONG, "lora": "quality.json (lora)",
                     "grams, full, 300 steps": "input_grams_quality_full300.json",
                     "lora, 300 texts": "issue21/issue21.json (lora)", "grams, full": "input_grams_quality_full.json",
                     "lora callback, 300 texts": "issue21/issue21.json (lora_callback)",
                     "grams, lora": "input_grams_quality_lora_s04.json"}


# Issue 21: the recommended configuration per expert kind against the tuned baselines, 3 LoRA init regimes and
# full fine-tunes (benchmarks/quality_variants.py --test-out, combined by benchmarks/quality.py --combine).
ISSUE21 = "issue21/issue21.json"
ISSUE21_ROWS = ("task_arithmetic (val lambda)", "ties (d=0.2, val lambda)", "tsv_merge (val grid)", "iso_c (val grid)",
                "iso_cts (val grid)", "iso_c (alpha 1, untuned)", "iso_cts (alpha 1, untuned)",
                "wudi closed_form (ridge 0.01)", quality_report.DECORRELATED_ROW, quality_report.A_UPDATES_ROW)
# Full fine-tunes: also TSV-M untuned and the WUDI rows FULL_EXTRA_ROWS of benchmarks/quality_variants.py adds.
ISSUE21_FULL_ROWS = ISSUE21_ROWS[:3] + ("tsv_merge (alpha 1, untuned)",) + ISSUE21_ROWS[3:] + (
    "wudi adam (scaling 1.0)", "wudi spectral (flow_time 8)", "wudi spectral (rank auto <= 8, energy 0.9)",
    "wudi decorrelated (prior 0)")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _sizes_cell(ratios: Dict[str, float]) -> str:
    return " / ".join(f"{ratios[s]:.2f}" if s in ratios else "–" for s in SIZES)


def per_subset(summary: dict) -> dict:
    """A results file's summary without its ``claims`` list: ``{number of tasks: rows}``."""
    return {k: v for k, v in summary.items() if k != "claims"}


def input_grams_summary(grams: dict) -> dict:
    """``benchmarks/input_grams_quality.py``'s rows (one subset per seed) as the quality report's summary."""
    results = quality_report.input_grams_as_results(grams)
    lora_key = next((k for k in results if k not in ("config", "seeds")), None)
    return quality_report.summarise(results[lora_key] if lora_key else results)


def what_to_use_sources(quality: dict, issue21: dict) -> Dict[str, dict]:
    """{results name of WHAT_TO_USE: the quality report's summary it reads}."""
    return {"full": per_subset(quality["summary"]), "lora": quality["lora"]["summary"], "lora, 300 texts": issue21["lora"]["summary"],
            "lora callback, 300 texts": issue21["lora_callback"]["summary"],
            "full, 300 steps": per_subset(_load(FULL_LONG)["summary"]),
            **({"grams, full, 300 steps": input_grams_summary(_load(WHAT_TO_USE_FILES["grams, full, 300 steps"]))}
               if (RESULTS / WHAT_TO_USE_FILES["grams, full, 300 steps"]).exists() else {}),
            "grams, full": input_grams_summary(_load(WHAT_TO_USE_FILES["grams, full"])),
            "grams, lora": input_grams_summary(_load(WHAT_TO_USE_FILES["grams, lora"]))}


def what_to_use(summaries: Dict[str, dict], wall_ratios: Dict[str, dict]) -> List[str]:
    """README's table: situation -> configuration, with its measured quality and cost (from the JSON);
    ``summaries``: :func:`what_to_use_sources`; ``wall_ratios[kind]``: the size sweep of that kind of experts
    ("full" or "lora")."""
    lines = ["| your experts | hardware | data at hand | configuration (`merge_method: wudi` unless named) "
             "| normalized acc at 7 tasks (%), full fine-tunes: 50 / 300 steps | Δ vs tuned task arithmetic (pts) "
             "| merge s (TA) at 7 tasks "
             f"| wall x TA of the same kind of experts, {' / '.join(SIZES)} | seeds | results |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for experts, hardware, data, configuration, source, row in WHAT_TO_USE:
        summary = summaries[source]
        cells = quality_report.row_cells(summary, row)
        ta = quality_report.row_cells(summary, quality_report.TA_ROW)
        kind = "full" if experts.startswith("full") else "lora"
        ratios = wall_ratios[kind].get(SWEEP_METHOD.get(row, ""), {})
        acc, vs_ta, seeds, files = cells["normalized"], cells["vs_ta"], cells["seeds"], WHAT_TO_USE_FILES[source]
        if kind == "full":  # "50-step / 300-step experts"
            long = summaries.get(LONG_SOURCES.get(source), {})
            other = quality_report.row_cells(long, row) if row in long.get("7", {}) else None
            acc, vs_ta = f"{acc} / {other['normalized'] if other else '–'}", f"{vs_ta} / {other['vs_ta'] if other else '–'}"
            seeds = f"{seeds} / {other['seeds'] if other else '–'}"
            files += f" / {WHAT_TO_USE_FILES[LONG_SOURCES[source]]}" if other else ""
        lines.append(f"| {experts} | {hardware} | {data} | {configuration} | {acc} | {vs_ta} "
                     f"| {cells['merge_seconds']} ({ta['merge_seconds']}) | {_sizes_cell(ratios) if ratios else '–'} "
                     f"| {seeds} | {files} |")
    return lines + [""]


def render_regions() -> Dict[str, str]:
    """{region name: its generated text} from the committed results."""
    quality, speed, issue21 = _load("quality.json"), _load("speed.json"), _load(ISSUE21)
    sweeps = {name: _load(name) for name in (*SWEEPS, FULLFT_SWEEP)}
    wall_ratios = {"lora": speed_report.sweep_wall_ratios(*(sweeps[name] for name in SWEEPS)),
                   "full": speed_report.sweep_wall_ratios(sweeps[FULLFT_SWEEP])}

    def wall_cell(row: str) -> str:
        ratios = wall_ratios["full"].get(SWEEP_METHOD.get(row, ""), {})
        return _sizes_cell(ratios) if ratios else ""

    from benchmarks.mudsc import render_table as mudsc_table

    builders: Dict[str, Callable[[], List[str]]] = {
        "headline": lambda: quality_report.overview_table(
            per_subset(quality["summary"]), only=HEADLINE_ROWS,
            extra_columns=[(f"wall x TA (full-fine-tune-like experts), {' / '.join(SIZES)}", wall_cell)]),
        "what-to-use": lambda: what_to_use(what_to_use_sources(quality, issue21), wall_ratios),
        "quality-overview": lambda: quality_report.overview_table(per_subset(quality["summary"])),
        "quality-lora": lambda: quality_report.overview_table(quality["lora"]["summary"]),
        "speed-whole-model": lambda: speed_report.whole_model_table(speed),
        "speed-micro": lambda: speed_report.micro_table(speed),
        "speed-sweep-all": lambda: speed_report.sweep_tables(sweeps["speed_sweep.json"]),
        "speed-sweep-fastpath": lambda: speed_report.sweep_tables(sweeps["speed_sweep_fastpath.json"]),
        "speed-sweep-fullft": lambda: speed_report.sweep_tables(sweeps[FULLFT_SWEEP]),
        "mudsc": lambda: mudsc_table(_load("mudsc.json")),
        "issue21-lora-readme": lambda: quality_report.regime_table(
            {k: v for k, v in issue21.items() if k != "seeds"},
            (quality_report.TA_ROW, quality_report.TIES_ROW, quality_report.DECORRELATED_ROW,
             quality_report.A_UPDATES_ROW), tasks=(7,)),
        "issue21-lora": lambda: quality_report.regime_table(
            {k: v for k, v in issue21.items() if k != "seeds"}, ISSUE21_ROWS),
        "issue21-full": lambda: quality_report.regime_table({"seeds": issue21["seeds"]}, ISSUE21_FULL_ROWS,
                                                            tasks=(7, 4, 2)),
        "issue21-full-long": lambda: quality_report.regime_table(_load(FULL_LONG), ISSUE21_FULL_ROWS, tasks=(7, 4, 2)),
        "issue21-claims": lambda: quality_report.claims_table(quality["summary"]["claims"])[2:],
    }
    return {name: "\n".join(build()).rstrip("\n") + "\n" for name, build in builders.items()}


def doc_files(repo: Path = REPO) -> List[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def regions_in(text: str) -> Dict[str, str]:
    """{name: current text} of the generated regions of a document."""
    return {m.group(2): m.group(3) for m in REGION.finditer(text)}


def rewrite(text: str, rendered: Dict[str, str], where: str = "") -> str:
    """``text`` with every generated region replaced by its rendering; an unknown region name is an error."""
    def replace(m: re.Match) -> str:
        if m.group(2) not in rendered:
            raise KeyError(f"{where}: unknown generated region {m.group(2)!r}; known: {', '.join(sorted(rendered))}")
        return m.group(1) + rendered[m.group(2)] + m.group(4)

    return REGION.sub(replace, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report out-of-date regions (exit 1 if any)")
    args = ap.parse_args(argv)
    rendered = render_regions()
    stale = []
    for path in doc_files():
        text = path.read_text()
        new = rewrite(text, rendered, str(path))
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                with atomic_file(path) as tmp:
                    Path(tmp).write_text(new)
    verb = "out of date" if args.check else "rewritten"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "generated regions up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
