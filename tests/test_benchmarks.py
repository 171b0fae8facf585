"""The benchmarks' plumbing (issues 10, 11, 13), without the packaged MiniLM or the long runs: the task
source contract with a tiny custom task module, content-keyed caches, --resume keeping other seeds, quick
output paths, LwPTV's threshold from the solver, and one end-to-end quality run on a tiny random BERT."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from benchmarks.common import output_stem, report_cache
from benchmarks.qualitybench import experts as bench_experts
from benchmarks.qualitybench import methods as bench_methods
from benchmarks.qualitybench import run as bench_run
from benchmarks.qualitybench.tasks import (TaskFormatError, load_task_source, load_tasks, select_tasks,
                                           task_fingerprint, validate_tasks)

WORDS = {0: ["red", "blue", "green", "yellow"], 1: ["cat", "dog", "bird", "fish"]}

TINY_TASKS = textwrap.dedent('''
    import random

    WORDS = {words!r}

    def _split(rng, label_words, n):
        out = []
        for _ in range(n):
            y = rng.randrange(len(label_words))
            out.append((" ".join(rng.choice(label_words[y]) for _ in range(3)), y))
        return out

    def build(seed):
        rng = random.Random(seed)
        colour_or_animal = {{0: WORDS[0], 1: WORDS[1]}}
        size = {{0: ["small", "tiny"], 1: ["huge", "big"]}}
        return {{
            "my colours vs animals": {{"labels": ["colour", "animal"],
                                       **{{s: _split(rng, colour_or_animal, n) for s, n in
                                           (("train", 32), ("validation", 8), ("test", 8))}}}},
            "size/2": {{"labels": ["small", "big"],
                        **{{s: _split(rng, size, n) for s, n in (("train", 32), ("validation", 8), ("test", 8))}}}},
        }}

    build.quick_tasks = ["size/2"]
''').format(words=WORDS)


@pytest.fixture()
def tiny_source(tmp_path):
    path = tmp_path / "tiny_tasks.py"
    path.write_text(TINY_TASKS)
    return f"{path}:build"


def test_custom_task_source_loads_by_path_with_any_names(tiny_source):
    tasks, quick = load_tasks(tiny_source, 1234)
    assert list(tasks) == ["my colours vs animals", "size/2"]
    assert quick == ["size/2"]
    assert select_tasks(tasks, ["size/2"]).keys() == {"size/2"}
    with pytest.raises(ValueError, match="unknown task"):
        select_tasks(tasks, ["fortune_tech"])


def test_task_source_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="module:function"):
        load_task_source("no_colon_here")
    with pytest.raises(ValueError, match="no such file"):
        load_task_source(f"{tmp_path}/missing.py:build")
    (tmp_path / "m.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no function 'build'"):
        load_task_source(f"{tmp_path}/m.py:build")


def _task(**overrides):
    task = {"labels": ["a", "b"], "train": [("x", 0), ("y", 1)], "validation": [("z", 0)], "test": [("w", 1)]}
    task.update(overrides)
    return task


@pytest.mark.parametrize("bad, message", [
    ({}, "non-empty dict"),
    ({"t": _task(labels=["only"])}, "at least 2"),
    ({"t": _task(test=[])}, "split 'test'"),
    ({"t": _task(train=[("x", 2)])}, r"task 't', train\[0\]"),
    ({"t": _task(validation=[("x", True)])}, r"validation\[0\]"),
    ({"t": _task(train=[(3, 0)])}, r"train\[0\]"),
])
def test_validate_tasks_names_the_fault(bad, message):
    with pytest.raises(TaskFormatError, match=message):
        validate_tasks(bad, source="src")


def test_builtin_source_order_is_the_former_task_order(monkeypatch):
    """The default source through the same loader; its dict order (= each task's training-seed position)
    is the former TASK_ORDER, so the built-in experts are trained exactly as before."""
    from benchmarks import text_tasks

    def examples(n_labels):
        return [(f"text {i}", i % n_labels) for i in range(40)]

    monkeypatch.setattr(text_tasks, "_fortune_task", lambda cats, seed: (list(cats), examples(len(cats))))
    monkeypatch.setattr(text_tasks, "_gender_task", lambda seed: (["male", "female"], examples(2)))
    monkeypatch.setattr(text_tasks, "_language_task", lambda seed, n: (["de", "fr"], examples(2)))
    monkeypatch.setattr(text_tasks, "_entity_task", lambda seed, n: (["job", "company"], examples(2)))
    tasks, quick = load_tasks("benchmarks.text_tasks:build_tasks", 1234)
    assert tuple(tasks) == text_tasks.TASK_ORDER
    assert quick == ["language", "entity"]


def test_fortune_dir_names_missing_categories(monkeypatch, tmp_path):
    from benchmarks import text_tasks
    from benchmarks.common import MissingDependency

    (tmp_path / "love").write_text("a\n%\n")
    monkeypatch.setattr(text_tasks, "FORTUNE_DIRS", (str(tmp_path),))
    assert text_tasks.fortune_dir(["love"]) == tmp_path  # no fixed 'computers' file needed
    with pytest.raises(MissingDependency, match="zippy"):
        text_tasks.fortune_dir(["love", "zippy"])


def test_expert_cache_key_follows_content_not_name(tmp_path):
    cfg = {"steps": 5, "batch_size": 4, "lr_encoder": 1e-4, "lr_head": 1e-3, "max_length": 16, "model": "m"}
    task = _task()
    key = bench_experts.expert_key(cfg, task, seed=0, position=0)
    assert bench_experts.expert_key(cfg, dict(task), 0, 0) == key
    assert bench_experts.expert_key(cfg, _task(train=[("x", 0), ("y", 0)]), 0, 0) != key  # a label changed
    assert bench_experts.expert_key(cfg, _task(labels=["a", "c"]), 0, 0) != key
    assert bench_experts.expert_key({**cfg, "steps": 6}, task, 0, 0) != key
    assert bench_experts.expert_key(cfg, task, 1, 0) != key and bench_experts.expert_key(cfg, task, 0, 1) != key
    path = bench_experts.expert_path(cfg, tmp_path, task, 0, 0)
    assert path.parent == tmp_path / "experts" and key in path.name
    assert task_fingerprint(task) != task_fingerprint(_task(test=[("w", 0)]))


def test_quick_outputs_never_use_the_full_names():
    assert output_stem("speed", quick=True) == "speed_quick"
    assert output_stem("speed", quick=False) == "speed"
    assert output_stem("quality", quick=True) == "quality_quick"
    assert output_stem("quality", quick=True, name="mine") == "mine"


def test_speed_quick_writes_its_own_files_and_reports_the_cache(tmp_path, capsys):
    from benchmarks.speedbench.run import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["--quick", "--layers", "1", "--skip-merges", "--skip-micro", "--out", str(out),
                 "--cache-dir", str(cache)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["speed_quick.json", "speed_quick.md"]
    assert json.loads((out / "speed_quick.json").read_text())["mode"] == "quick"
    assert f"the cache {cache} holds" in capsys.readouterr().out
    (cache / "blob").write_bytes(b"x" * 1000)
    assert "removed" in report_cache(cache, clean=True, what="test") and not cache.exists()


def _seed_record(tag):
    return {"subsets": {"2": {"tasks": ["a", "b"], "held_out": [], "methods": {"m": {"tag": tag}}}}}


def test_resume_keeps_the_other_seeds():
    cfg = {"seeds": [1], "threads": 1}
    previous = {"seeds": {"0": _seed_record("old0"), "1": _seed_record("old1"), "2": _seed_record("old2")}}
    results = bench_run.start_results(cfg, {"t": _task()}, [], previous)
    assert set(results["seeds"]) == {"0", "2"}  # seed 1 is re-run (its old subsets are merged back in the loop)
    assert results["config"]["seeds"] == [0, 1, 2] and cfg["seeds"] == [1]


def test_combine_unites_seeds_and_rows(tmp_path):
    a = {"command": "a", "config": {"seeds": [0]}, "seeds": {"0": _seed_record("a")}}
    b = {"command": "b", "config": {"seeds": [1]}, "seeds": {"1": _seed_record("b"), "0": _seed_record("b0")}}
    b["seeds"]["0"]["subsets"]["2"]["methods"]["extra"] = {"tag": "x"}
    for name, part in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    out = bench_run.combine([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert out["config"]["seeds"] == [0, 1]
    assert out["seeds"]["0"]["subsets"]["2"]["methods"] == {"m": {"tag": "a"}, "extra": {"tag": "x"}}


def test_lwptv_threshold_uses_the_solver_saliency():
    g = torch.Generator().manual_seed(0)
    sd0 = {"embeddings.word": torch.randn(10, 4, generator=g), "layer.0.w": torch.randn(4, 4, generator=g),
           "layer.1.w": torch.randn(4, 4, generator=g), "layer.0.b": torch.randn(4, generator=g)}
    experts = [{k: v + s * torch.randn(v.shape, generator=g) for k, v in sd0.items()} for s in (0.01, 0.1)]
    scores = sorted(float((e[k] - sd0[k]).norm() / sd0[k].norm()) for e in experts for k in ("layer.0.w", "layer.1.w"))
    assert bench_methods.lwptv_threshold(sd0, experts, 0.0) == pytest.approx(scores[0], rel=1e-5)
    assert bench_methods.lwptv_threshold(sd0, experts, 0.5) == pytest.approx(scores[2], rel=1e-5)


def test_method_table_is_one_list_and_accepts_an_entry():
    names = [s.name for s in bench_methods.method_specs()]
    assert names[:3] == ["task_arithmetic", "ties", "wudi adam"]

    class Ctx:
        cfg = {"preprocess_only": False, "refresh": ["spectral"]}

    spec = bench_methods.MethodSpec("x", run=lambda ctx: None)
    assert not bench_methods.selected(spec, Ctx)  # --refresh spectral skips the "others" group
    assert bench_methods.selected(bench_methods.MethodSpec("s", run=lambda c: None, group="spectral"), Ctx)


def _tiny_bert(folder):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for ws in WORDS.values() for w in ws} | {"small", "tiny", "huge", "big"})
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def test_quality_end_to_end_on_a_tiny_bert_with_custom_tasks(tmp_path, tiny_source, monkeypatch):
    """Two custom tasks, two seeds, a tiny random BERT: experts through WUDIMergeCallback, every built-in
    row, the report; then --resume with one seed keeps the other."""
    from benchmarks.qualitybench import report

    monkeypatch.setattr(bench_run, "REQUIRED", [("lightning", "lightning")])
    monkeypatch.setattr(report, "plot", lambda *a, **k: None)  # matplotlib is a benchmark extra
    model = _tiny_bert(tmp_path / "bert")
    common = ["--tasks-from", tiny_source, "--model", str(model), "--steps", "2", "--no-lowrank",
              "--preprocess-subsets", "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "c"),
              "--name", "tiny", "--subsets", "2"]
    assert bench_run.main(common + ["--seeds", "0", "1"]) == 0
    results = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert set(results["seeds"]) == {"0", "1"}
    rows = results["seeds"]["0"]["subsets"]["2"]["methods"]
    from mergekit_wudi.solvers.wudi import RIDGE

    assert {"expert (own task, upper bound)", "pretrained encoder", "task_arithmetic (val lambda)",
            "ties (d=0.2, val lambda)", "wudi adam (scaling 1.0)", "wudi adam (val scaling)",
            f"wudi closed_form (ridge {RIDGE:g})", "wudi spectral (val flow_time)"} <= set(rows)
    assert "wudi lowrank" not in rows  # --no-lowrank
    assert set(rows["_spectral_rank_cap_val"]) == {"8", "16", "32", "none"}  # issue #22's validation grid
    assert "callback_merge_max_abs_diff_vs_api" in results["seeds"]["0"]
    assert results["seeds"]["0"]["callback_merge_max_abs_diff_vs_api"] < 1e-4
    assert "my colours vs animals" in (tmp_path / "res" / "tiny.md").read_text()
    n_experts = len(list((tmp_path / "c" / "experts").glob("*.safetensors")))
    assert n_experts == 4
    assert bench_run.main(common + ["--seeds", "1", "--resume"]) == 0  # experts cached, rows kept
    again = json.loads((tmp_path / "res" / "tiny.json").read_text())
    assert set(again["seeds"]) == {"0", "1"} and again["config"]["seeds"] == [0, 1]
    assert again["seeds"]["0"] == results["seeds"]["0"]
    assert len(list((tmp_path / "c" / "experts").glob("*.safetensors"))) == n_experts


def test_baseline_table_plugs_into_the_quality_rows():
    from benchmarks import baselines
    from benchmarks.qualitybench.methods import method_specs

    names = [spec.name for spec in method_specs()]
    assert len(names) == len(set(names))
    expected = {spec.name for spec in baselines.method_table()} - {"task_arithmetic", "ties"}
    assert expected <= set(names) and {"dare_ties", "della", "model_stock", "tsv_merge", "iso_cts"} <= expected


def test_every_baseline_row_merges_a_tiny_model_at_every_grid_point():
    """Every row of benchmarks/baselines.py through mergekit's registry; the subspace rows decompose every 2-D
    tensor as the authors' code does (here an embedding the package's own rule would only average)."""
    from benchmarks import baselines
    from mergekit_wudi.solvers import subspace_merging

    torch.manual_seed(4)
    base = {"layer.weight": torch.randn(6, 5), "layer.bias": torch.randn(6), "norm.weight": torch.ones(6),
            "embeddings.word_embeddings.weight": torch.randn(9, 4)}
    experts = {f"task_{i}": {k: v + 0.05 * torch.randn(v.shape) for k, v in base.items()} for i in range(3)}
    table = baselines.method_table()
    assert {row.name for row in table} >= {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                           "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce",
                                           "karcher", "linear", "multislerp", "tsv_merge", "iso_c", "iso_cts"}
    for row in table:
        for point in row.grid:
            merged = row.merge(base, experts, point, 0)
            assert set(merged) == set(base), row.name
            for name, tensor in merged.items():
                assert tensor.shape == base[name].shape and torch.isfinite(tensor).all(), (row.name, point, name)
            if row.stochastic:  # the same seed gives the same masks
                again = row.merge(base, experts, point, 0)
                assert all(torch.equal(merged[n], again[n]) for n in merged), row.name
            if row.family == "subspace":
                solver = getattr(subspace_merging, row.name)
                for name in ("layer.weight", "embeddings.word_embeddings.weight"):
                    expected = solver(base[name], [e[name] for e in experts.values()], **point)
                    assert torch.equal(merged[name], expected), (row.name, point, name)


def test_scale_shortcut_scores_the_same_models_as_merging_every_grid_point():
    """Validation scores each lambda / alpha as ``W0 + v * (merge at 1 - W0)``: that must BE the merge at ``v``,
    for deterministic, stochastic (same seed, same masks) and subspace rows; one merge per non-scale point."""
    import torch

    from benchmarks import baselines

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(12, 10, generator=g), "b": torch.randn(12, generator=g)}
    experts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("x", "y", "z")}
    table = {spec.name: spec for spec in baselines.method_table()}
    for name in ("dare_ties", "breadcrumbs_ties", "della", "tsv_merge"):
        spec = table[name]
        groups = baselines.scale_groups(spec)
        assert sum(len(values) for _, values in groups) == len(spec.grid)
        assert len(groups) == len({repr({k: v for k, v in p.items() if k != spec.scale_param}) for p in spec.grid})
        point, values = groups[0]
        one = spec.merge(base, experts, point, 3)
        real = spec.merge(base, experts, {**point, spec.scale_param: values[0]}, 3)
        shortcut = baselines.scaled_state_dict(base, one, values[0])
        for k in base:
            assert torch.allclose(shortcut[k], real[k], atol=1e-5), (name, k)
        merges = []
        best, scores = baselines.tune_on_validation(
            spec, base, lambda p: merges.append(p) or spec.merge(base, experts, p, 3),
            lambda sd: -float((sd["w"] - experts["x"]["w"]).norm()))
        assert len(merges) == len(groups) and len(scores) == len(spec.grid)
        assert scores[repr(best)] == max(scores.values())


def test_language_task_is_the_same_in_every_process():
    """Faker's it_IT city list is built from a set: the task (and the expert cache keyed by its content) must
    not change with PYTHONHASHSEED."""
    import subprocess
    import sys

    pytest.importorskip("faker")
    code = ("from benchmarks.text_tasks import _language_task; import hashlib; "
            "print(hashlib.sha256(repr(_language_task(7, 60)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(h)},
                              capture_output=True, text=True, check=True).stdout for h in (1, 2, 3)}
    assert len(digests) == 1, digests


def test_report_ranks_rows_and_gives_paired_intervals_against_wudi_default():
    from benchmarks.qualitybench import report

    def row(norm):
        return {"test": {"a": norm}, "mean_acc": norm, "normalized": norm, "merge_seconds": 1.0}

    seeds = {}
    for s, (wudi, ta, dare) in enumerate([(0.95, 0.90, 0.91), (0.96, 0.88, 0.90), (0.94, 0.89, 0.93)]):
        methods = {report.DEFAULT_ROW: row(wudi), report.TA_ROW: row(ta), "dare_ties (val grid)": row(dare)}
        seeds[str(s)] = {"subsets": {"2": {"methods": methods}, "7": {"methods": methods}}}
    summary = report.summarise({"seeds": seeds})
    dare = summary["7"]["dare_ties (val grid)"]
    diffs = [0.91 - 0.95, 0.90 - 0.96, 0.93 - 0.94]
    assert dare["family"] == "random drop (DARE)" and dare["n_seeds"] == 3
    assert abs(dare["delta_norm_vs_wudi_default"] - sum(diffs) / 3) < 1e-12
    sd = (sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5
    assert abs(dare["delta_norm_vs_wudi_default_ci95"] - 4.302652729 * sd / 3 ** 0.5) < 1e-6  # t(0.975, 2)
    ranking = report._ranking_table(summary)
    order = [line.split(" | ")[1] for line in ranking if line.startswith("| 1 ") or line.startswith("| 2 ")
             or line.startswith("| 3 ")]
    assert order == [report.DEFAULT_ROW, "dare_ties (val grid)", report.TA_ROW]
    assert set(report.family_lines(summary).values()) == {report.DEFAULT_ROW, report.TA_ROW, "dare_ties (val grid)"}
    table = report._summary_tables({"7": summary["7"]})
    assert "Δ vs WUDI default" in table[2] and table[2].count("|") == table[4].count("|") == 9
    # without the default row (the LoRA rows omit adam) the empty column is left out
    no_default = {s_: {"subsets": {"7": {"methods": {report.TA_ROW: row(0.9), "dare_ties (val grid)": row(0.91)}}}}
                  for s_ in ("0", "1")}
    table = report._summary_tables(report.summarise({"seeds": no_default}))
    assert "WUDI default" not in table[2] and table[2].count("|") == table[3].count("|") == table[4].count("|") == 8


def test_claims_from_a_tiny_results_dict(tmp_path, monkeypatch):
    """summary.claims: paired differences per seed, the 95% t-interval, the rule, met / not met / not measured,
    written into <name>.json by write_report."""
    from benchmarks.qualitybench import report

    monkeypatch.setattr(report, "plot", lambda *a, **k: None)  # matplotlib is a benchmark extra

    def row(norm):
        return {"test": {"a": norm}, "mean_acc": norm, "normalized": norm, "merge_seconds": 0.5}

    cand, iso = report.FULL_ROW, report.SUBSPACE_ROWS[0]
    seeds = {str(s): {"subsets": {"7": {"methods": {cand: row(c), iso: row(i)}},
                                  "2": {"methods": {cand: row(c - 0.05), iso: row(i)}}}}
             for s, (c, i) in enumerate([(0.96, 0.95), (0.962, 0.95), (0.958, 0.95)])}
    lora = {"0": {"subsets": {"4": {"methods": {cand: row(0.90), report.TA_ROW: row(0.88)}}}}}
    results = {"seeds": seeds, "lora": {"seeds": lora, "config": {"lora": {"r": 8}, "lr_encoder": 1e-3}}}
    claims = [report.Claim("full fine-tunes", 7, cand, iso, "ahead"),
              report.Claim("full fine-tunes", 2, cand, iso, "at least as good"),
              report.Claim("LoRA, independent init", 4, cand, report.TA_ROW, "at least as good"),
              report.Claim("LoRA, shared init", 4, cand, report.TA_ROW, "at least as good")]
    ahead, worse, lora_one, missing = report.evaluate_claims(results, claims)
    diffs = [0.01, 0.012, 0.008]
    half = 4.302652729 * (sum((d - 0.01) ** 2 for d in diffs) / 2) ** 0.5 / 3 ** 0.5  # t(0.975, 2)
    assert ahead["n_seeds"] == 3 and abs(ahead["paired_difference"] - 0.01) < 1e-12
    assert abs(ahead["ci95"][0] - (0.01 - half)) < 1e-9 and abs(ahead["ci95"][1] - (0.01 + half)) < 1e-9
    assert ahead["met"] is True and ahead["status"] == "met" and ahead["rule"] == report.CLAIM_RULES["ahead"]
    assert worse["met"] is False and worse["status"] == "not met" and abs(worse["paired_difference"] + 0.04) < 1e-12
    # one seed: no interval, decided by the mean
    assert lora_one["n_seeds"] == 1 and lora_one["ci95"] is None and lora_one["met"] is True
    assert missing["status"] == "not measured" and missing["met"] is None and missing["n_seeds"] == 0
    assert ahead["ci95_above_0"] is True and "source" not in ahead
    # "ahead" is issue 21's rule (mean > 0); an interval reaching below 0 is said, not hidden
    seeds["0"]["subsets"]["7"]["methods"][cand] = row(0.99)
    seeds["2"]["subsets"]["7"]["methods"][cand] = row(0.92)
    wide = report.evaluate_claims(results, claims[:1])[0]
    assert wide["status"] == "met" and wide["paired_difference"] > 0 and wide["ci95_above_0"] is False
    seeds["0"]["subsets"]["7"]["methods"][cand] = row(0.95)
    assert report.evaluate_claims(results, claims[:1])[0]["status"] == "not met"
    # several sources: each claim decided on the one with the most seeds, the others' numbers kept beside it
    other = {"config": {"test_limit": 300}, "seeds": {"0": seeds["0"]},
             "lora_shared_init": {"seeds": {s_: {"subsets": {"4": {"methods": {cand: row(0.8), report.TA_ROW: row(0.9)}}}}
                                            for s_ in ("0", "1")}}}
    first = {**results, "config": {"test_limit": None}}
    by_source = report.evaluate_claims(first, claims, sources=[("a.json", first), ("b.json", other)])
    assert by_source[0]["source"] == "a.json" and by_source[0]["test_texts_per_task"] == "all"
    assert [m["source"] for m in by_source[0]["also_measured"]] == ["b.json"]
    assert by_source[0]["also_measured"][0]["n_seeds"] == 1 and by_source[0]["also_measured"][0]["ci95"] is None
    shared = by_source[3]
    assert shared["source"] == "b.json" and shared["test_texts_per_task"] == 300 and shared["n_seeds"] == 2
    assert shared["status"] == "not met" and abs(shared["paired_difference"] + 0.1) < 1e-12 and not shared["also_measured"]
    # write_report puts the default claims list into summary.claims of the JSON, next to the per-k rows
    # a full fine-tune regime is measured only by files of its experts' steps (50: the benchmark's own)
    long = {"config": {"steps": 300, "test_limit": 300}, "seeds": {"0": seeds["1"], "1": seeds["2"]}}
    by_steps = report.evaluate_claims(first, [report.Claim("full fine-tunes, 300 steps", 7, cand, iso, "ahead"),
                                              claims[0]], sources=[("a.json", first), ("long.json", long)])
    assert by_steps[0]["source"] == "long.json" and by_steps[0]["n_seeds"] == 2 and not by_steps[0]["also_measured"]
    assert by_steps[1]["source"] == "a.json" and not by_steps[1]["also_measured"]
    results.update(config={"quick": True, "seeds": [0, 1, 2], "steps": 50, "batch_size": 1, "lr_encoder": 1,
                           "lr_head": 1, "max_length": 8}, command="test")
    report.write_report(results, "claims", lambda msg: None, tmp_path)
    written = json.loads((tmp_path / "claims.json").read_text())["summary"]
    assert "7" in written and len(written["claims"]) == len(report.issue21_claims())
    by_name = {c["name"]: c for c in written["claims"]}
    assert by_name[report.Claim("full fine-tunes", 7, cand, iso, "ahead").name]["status"] == "not met"
    assert "Claims (issue 21)" in (tmp_path / "claims.md").read_text()
    # --claims-from: a claim this file does not measure is decided on the other file, which is named
    (tmp_path / "other.json").write_text(json.dumps(other))
    report.write_report(results, "with_other", lambda msg: None, tmp_path, claims_from=[tmp_path / "other.json"])
    written = {c["name"]: c for c in json.loads((tmp_path / "with_other.json").read_text())["summary"]["claims"]}
    shared = written[report.Claim("LoRA, shared init", 4, report.DECORRELATED_ROW, report.TA_ROW,
                                  "at least as good").name]
    assert shared["status"] == "not measured"  # other.json's shared-init rows are not the decorrelated row
    full7 = written[report.Claim("full fine-tunes", 7, cand, iso, "ahead").name]
    assert full7["source"] == "with_other.json" and full7["also_measured"][0]["source"].endswith("other.json")
    assert "measured in" in (tmp_path / "with_other.md").read_text()


def test_lora_rows_on_a_tiny_bert(tmp_path, tiny_source, monkeypatch):
    """``--lora``: PEFT LoRA experts whose cached weights are W0 + (alpha/r) B A, the LoRA rows, and
    ``--combine`` of a main file with the LoRA file."""
    pytest.importorskip("peft")
    from benchmarks.qualitybench import lora as bench_lora
    from benchmarks.qualitybench import report

    monkeypatch.setattr(bench_run, "REQUIRED", [("lightning", "lightning")])
    monkeypatch.setattr(report, "plot", lambda *a, **k: None)
    model = _tiny_bert(tmp_path / "bert")
    common = ["--tasks-from", tiny_source, "--model", str(model), "--steps", "3", "--seeds", "0",
              "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "c"), "--subsets", "2"]
    assert bench_run.main(common + ["--lora"]) == 0
    results = json.loads((tmp_path / "res" / "quality_lora.json").read_text())
    rows = results["lora"]["seeds"]["0"]["subsets"]["2"]["methods"]
    assert {"task_arithmetic (val lambda)", "ties (d=0.2, val lambda)", "wudi spectral (flow_time 8)",
            "wudi spectral (rank 16 = total LoRA rank)", "wudi closed_form (rank 16 = total LoRA rank)",
            "wudi spectral (val scaling)", "wudi closed_form (val scaling)"} <= set(rows)
    assert all(0 < r["normalized"] <= 1.5 for r in rows.values() if isinstance(r, dict) and "normalized" in r)
    # the cached expert is the base plus the trained low-rank update, and nothing else moved
    from safetensors.torch import load_file

    from benchmarks.qualitybench.model import load_encoder

    sd0 = load_encoder(str(model)).state_dict()
    (path,) = list((tmp_path / "c" / "lora_experts").glob("s0-*.safetensors"))[:1]
    expert = load_file(str(path))
    moved = {k for k in sd0 if not torch.equal(expert[f"encoder.{k}"], sd0[k])}
    assert moved and all(k.endswith("weight") and ("query" in k or "key" in k or "value" in k or "dense" in k)
                         for k in moved)
    for k in moved:
        assert torch.linalg.matrix_rank(expert[f"encoder.{k}"] - sd0[k]).item() <= bench_lora.LORA["r"]
    # --combine a main file (no lora) with the LoRA file: one report with both
    assert bench_run.main(common + ["--name", "main", "--no-lowrank", "--preprocess-subsets"]) == 0
    bench_run.main(["--combine", str(tmp_path / "res" / "main.json"), str(tmp_path / "res" / "quality_lora.json"),
                    "--name", "both", "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "c")])
    both = json.loads((tmp_path / "res" / "both.json").read_text())
    assert set(both["seeds"]) == {"0"} and set(both["lora"]["seeds"]) == {"0"}
    assert "# LoRA experts" in (tmp_path / "res" / "both.md").read_text()


def test_lora_init_regimes_on_a_tiny_bert(tmp_path, tiny_source, monkeypatch):
    """``--lora-init shared``: every adapter of a seed starts from the same A, so the experts' updates share
    their row space (independent inits do not); ``--lora-init callback``: the experts come from one PEFT encoder
    fitted task after task through WUDIMergeCallback. Each regime has its own results key and cache entries."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from benchmarks.qualitybench import report
    from benchmarks.qualitybench.model import load_encoder

    monkeypatch.setattr(bench_run, "REQUIRED", [("lightning", "lightning")])
    monkeypatch.setattr(report, "plot", lambda *a, **k: None)
    model = _tiny_bert(tmp_path / "bert")
    common = ["--tasks-from", tiny_source, "--model", str(model), "--steps", "3", "--seeds", "0", "--lora",
              "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "c"), "--subsets", "2"]
    sd0 = load_encoder(str(model)).state_dict()
    name = "encoder.layer.0.attention.self.query.weight"  # the cached files prefix the encoder's keys: encoder.<k>

    def row_overlap(paths):
        """Share of the second expert's update (on one weight) inside the first one's row space."""
        d1, d2 = (load_file(str(p))[f"encoder.{name}"] - sd0[name] for p in paths)
        _, sv, vh = torch.linalg.svd(d1)
        q = vh[sv > 1e-4 * sv[0]].T  # the row space of the rank-r update
        return float((d2 @ q).norm() / d2.norm())

    overlaps = {}
    for init, key in (("independent", "lora"), ("shared", "lora_shared_init"), ("callback", "lora_callback")):
        before = set((tmp_path / "c" / "lora_experts").glob("*.safetensors")) if init != "independent" else set()
        assert bench_run.main(common + ["--lora-init", init, "--name", init]) == 0
        results = json.loads((tmp_path / "res" / f"{init}.json").read_text())
        assert set(results) & {"lora", "lora_shared_init", "lora_callback"} == {key}
        assert "task_arithmetic (val lambda)" in results[key]["seeds"]["0"]["subsets"]["2"]["methods"]
        added = sorted(set((tmp_path / "c" / "lora_experts").glob("*.safetensors")) - before)
        new = [p for p in added if not p.name.endswith(".a_updates.safetensors")]
        assert len(new) == 2  # its own cache entries, one per task
        # the callback path also keeps each expert's LoRA A-update Grams (the callback's default merge)
        assert len(added) - len(new) == (2 if init == "callback" else 0)
        vias = {json.loads(p.with_suffix(".json").read_text())["via"] for p in new}
        assert vias == ({"WUDIMergeCallback (sequential, PEFT LoRA)"} if init == "callback"
                        else {"Lightning fit of a PEFT LoRA encoder"})
        overlaps[init] = row_overlap(new)
    assert overlaps["shared"] > 0.95 and overlaps["callback"] > 0.95 and overlaps["independent"] < 0.8, overlaps


def test_quality_variants_screen_functions():
    """The issue 21 screen's variants: the package's `decorrelated` at each prior, its first version on TSV-M's own
    triplets (equal on full-rank task vectors, not on low-rank ones), and gram power 1/2 = TSV-M as eps -> 0."""
    from benchmarks import quality_variants as qv
    from mergekit_wudi.solvers.subspace_merging import decorrelated_wudi_merged_task_vector, tsv_merged_task_vector

    torch.manual_seed(11)
    tvs = torch.randn(3, 10, 9)
    found = qv.variants()
    for c in (0.1, 0.2, 0.3):
        expected = decorrelated_wudi_merged_task_vector(tvs, prior=c)
        torch.testing.assert_close(found[f"decorrelated prior {c:g}"](tvs), expected)
        torch.testing.assert_close(found[f"decorrelated tsv-triplets prior {c:g}"](tvs), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qv.gram_power_merge(tvs, 0.5, eps=0.0), tsv_merged_task_vector(tvs), rtol=1e-4, atol=1e-5)
    low_rank = torch.randn(3, 10, 2) @ torch.randn(3, 2, 9)  # rank 2 < min(out, in) / T = 3: zero triplets
    assert not torch.allclose(found["decorrelated tsv-triplets prior 0.2"](low_rank),
                              found["decorrelated prior 0.2"](low_rank), atol=1e-4)


def test_screen_flat_spectrum_and_ace():
    """flat_spectrum keeps the singular vectors at one level (rms: the norm; energy: sum s^2 / sum s); ace_merge
    without its refinement is a ridge-regularised Gram-weighted solve, and equal task vectors merge to their
    row-centred value."""
    from benchmarks import quality_variants as qv

    torch.manual_seed(3)
    m = torch.randn(8, 6, dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    for level, value in (("rms", s.pow(2).mean().sqrt()), ("energy", s.pow(2).sum() / s.sum())):
        flat = qv.flat_spectrum(m, level)
        torch.testing.assert_close(torch.linalg.svdvals(flat), torch.full_like(s, float(value)))
    assert torch.linalg.norm(qv.flat_spectrum(m, "rms")).item() == pytest.approx(torch.linalg.norm(m).item())
    assert torch.count_nonzero(qv.flat_spectrum(torch.zeros(4, 3), "energy")) == 0
    same = torch.randn(1, 5, 4, dtype=torch.float64).expand(3, 5, 4).clone()
    centred = same[0] - same[0].mean(0, keepdim=True)
    merged = qv.ace_merge(same, eps=1e-9, refine=False)
    # the C_agg term (column means of the summed Grams, broadcast over rows) shifts the solve slightly; no refinement
    assert torch.linalg.norm(merged - centred) < 0.5 * torch.linalg.norm(centred)
    refined = qv.ace_merge(same, eps=1e-9, refine=True)
    assert refined.shape == (5, 4) and torch.isfinite(refined).all()
    found = qv.variants()
    assert {"ace", "ace always-refine", "closed_form ace-refine", "closed_form flat energy-level",
            "iso_c rms-level", "iso_c eq1-scale"} <= set(found)
    # eq1_scaled: the minimiser of Eq. 1 along the direction (a 1-D quadratic: both neighbours are worse)
    tvs = torch.randn(3, 6, 5, dtype=torch.float64)

    def eq1(tau):
        return sum(((tau - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in tvs)

    scaled = qv.eq1_scaled(m[:6, :5], tvs)
    assert eq1(scaled) < eq1(1.01 * scaled) and eq1(scaled) < eq1(0.99 * scaled)


def test_refresh_subspace_recomputes_only_the_subspace_rows():
    from benchmarks import baselines
    from benchmarks.qualitybench.loop import refresh_rows, row_group

    rows = {f"{m} (val grid)": {} for m in baselines.SUBSPACE_METHODS}
    rows.update({"ties (d=0.2, val lambda)": {}, "dare_ties (val grid)": {}, "wudi closed_form (ridge 0.01)": {}})
    assert {row_group(r) for r in rows if r.split(" (")[0] in baselines.SUBSPACE_METHODS} == {"subspace"}
    assert set(refresh_rows({"methods": rows}, ["subspace"])) == {"ties (d=0.2, val lambda)", "dare_ties (val grid)",
                                                                  "wudi closed_form (ridge 0.01)"}
    groups = {spec.name: spec.group for spec in bench_methods.method_specs()}
    assert all(groups[m] == "subspace" for m in baselines.SUBSPACE_METHODS) and groups["dare_ties"] == "baselines"
    assert bench_run.parse_args(["--resume", "--refresh", "subspace"]).refresh == ["subspace"]
    # the alpha grid reaches past where Iso-C / Iso-CTS peaked on the benchmark's validation split (4-8)
    assert max(baselines.ALPHAS_REFERENCE) >= 16


def test_combine_keeps_the_part_times_of_a_combined_part(tmp_path):
    a = {"command": "a", "config": {"seeds": [0]}, "seeds": {"0": _seed_record("a")}, "wall_seconds_per_part": [1, 2]}
    b = {"command": "b", "config": {"seeds": [1]}, "seeds": {"1": _seed_record("b")}, "wall_seconds": 3}
    for name, part in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    assert bench_run.combine([str(tmp_path / "a.json"), str(tmp_path / "b.json")])["wall_seconds_per_part"] == [1, 2, 3]


def test_input_grams_results_decide_the_part2_claims(tmp_path, monkeypatch):
    """input_grams_quality.py's output feeds summary.claims through --claims-from: the Gram row against the
    best data-free row, "ahead by 1 point"."""
    from benchmarks.qualitybench import report

    monkeypatch.setattr(report, "plot", lambda *a, **k: None)

    def row(norm):
        return {"test": {"a": norm}, "mean_acc": norm, "normalized": norm, "merge_seconds": 0.1}

    subset = ["a", "b", "c", "d", "e", "f", "g"]
    lora = {"grams": "post hoc", "lora": {"r": 8, "init": "independent"},
            "seeds": {str(s): {"subset": subset, "rows": {report.INPUT_GRAMS_ROW: row(0.93 + d),
                                                         report.DECORRELATED_ROW: row(0.91)}}
                      for s, d in enumerate([0.0, 0.01, 0.02])}}
    full = {"grams": "post hoc", "seeds": {str(s): {"subset": subset, "rows": {report.INPUT_GRAMS_ROW: row(0.92),
                                                                             report.CLOSED_FORM_ROW: row(0.95)}}
                                           for s in range(2)}}
    as_results = report.input_grams_as_results(lora)
    assert set(as_results["lora"]["seeds"]) == {"0", "1", "2"} and as_results["config"]["test_limit"] is None
    for name, data in (("lora.json", lora), ("full.json", full)):
        (tmp_path / name).write_text(json.dumps(data))
    results = {"config": {"quick": True, "seeds": [0], "steps": 1, "batch_size": 1, "lr_encoder": 1, "lr_head": 1,
                          "max_length": 8}, "command": "test", "seeds": {}}
    report.write_report(results, "q", lambda msg: None, tmp_path,
                        claims_from=[tmp_path / "lora.json", tmp_path / "full.json"])
    claims = {(c["regime"], c["row"]): c for c in json.loads((tmp_path / "q.json").read_text())["summary"]["claims"]}
    lora_claim = claims[("LoRA, independent init", report.INPUT_GRAMS_ROW)]
    assert lora_claim["status"] == "met" and lora_claim["rule"] == report.CLAIM_RULES["ahead by 1 point"]
    assert abs(lora_claim["paired_difference"] - 0.03) < 1e-12 and lora_claim["source"].endswith("lora.json")
    full_claim = claims[("full fine-tunes", report.INPUT_GRAMS_ROW)]
    assert full_claim["status"] == "not met" and abs(full_claim["paired_difference"] + 0.03) < 1e-12
