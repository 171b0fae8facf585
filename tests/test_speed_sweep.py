"""The size sweep of the speed benchmark (issue #12, part 3): the /proc poller, the streamed model builder and
one end-to-end sweep at the tiny size. The real sizes are a benchmark, not a test."""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.speedbench import sweep


def test_poller_sees_anonymous_memory_and_cpu_of_a_child(tmp_path):
    code = "import time; b = bytearray(300 * 1024 * 1024); [0 for _ in range(3_000_000)]; time.sleep(0.5)"
    res = sweep.run_polled([sys.executable, "-c", code], tmp_path / "log")
    assert res["rc"] == 0
    assert 280 <= res["peak_rss_anon_mib"] < 600  # the 300 MiB bytearray is anonymous memory
    assert res["peak_rss_file_mib"] < res["peak_rss_anon_mib"]
    assert 0 < res["cpu_s"] <= res["wall_s"] + 0.5


def test_streamed_models_are_reproducible_and_sharded(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from benchmarks.speedbench import models

    monkeypatch.setattr(models, "SHARD_BYTES", 40_000)  # several shards even at the tiny size
    models.write_model(tmp_path / "a", sweep.SIZES["tiny"], 1)
    models.write_model(tmp_path / "b", sweep.SIZES["tiny"], 1)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and set(index["weight_map"]) == set(sweep._shapes("tiny"))
    a = {k: v for f in shards for k, v in load_file(str(tmp_path / "a" / f)).items()}
    b = {k: v for f in shards for k, v in load_file(str(tmp_path / "b" / f)).items()}
    assert all(torch.equal(a[k], b[k]) for k in a) and all(v.dtype == torch.bfloat16 for v in a.values())
    base = models.model_tensor("model.layers.0.mlp.up_proj.weight", (160, 64), 0)
    assert not torch.equal(base, models.model_tensor("model.layers.0.mlp.up_proj.weight", (160, 64), 0, seed=1))
    delta = a["model.layers.0.mlp.up_proj.weight"].float() - base
    s = torch.linalg.svdvals(delta)
    assert s[8] < 0.2 * s[7]  # rank-8 delta + small noise (+ bf16 rounding)
    assert sweep.parameter_count("7B") > 7e9 and sweep.parameter_count("0.5B") < 0.6e9


def test_sweep_end_to_end_at_the_tiny_size(tmp_path):
    out = tmp_path / "res"
    r = sweep.sweep(["tiny"], ["task_arithmetic", "spectral_rank_auto"], 2, tmp_path / "cache", out, "t", 1,
                    resume=True)
    rows = r["sizes"]["tiny"]["rows"]
    assert all(rows[m]["ok"] for m in rows) and set(rows) == {"task_arithmetic", "spectral_rank_auto"}
    assert rows["task_arithmetic"]["wall_s_ratio_vs_ta"] == 1.0
    assert rows["spectral_rank_auto"]["wall_s_ratio_vs_ta"] > 0 and rows["spectral_rank_auto"]["peak_rss_anon_mib"] > 0
    assert "floor" not in r["sizes"]["tiny"]  # only exact solvers are compared with the floor
    assert not (tmp_path / "cache" / "sweep_tiny_E2").exists()  # models deleted after the size
    saved = json.loads((out / "t.json").read_text())
    assert saved["sizes"]["tiny"]["rows"].keys() == rows.keys()
    assert "| spectral_rank_auto |" in (out / "t.md").read_text()
    try:
        import matplotlib  # noqa: F401  (a benchmark extra: the plot is skipped without it)
    except ImportError:
        assert not (out / "t.png").exists()
    else:
        assert (out / "t.png").stat().st_size > 0
    again = sweep.sweep(["tiny"], ["task_arithmetic", "closed_form"], 2, tmp_path / "cache", out, "t", 1,
                        resume=True)
    entry = again["sizes"]["tiny"]
    assert entry["rows"]["task_arithmetic"] == rows["task_arithmetic"]  # kept, not re-run
    assert entry["floor"]["gram_plus_cholesky_total_s"] > 0 and entry["floor"]["closed_form_solver_total_s"] > 0
    assert entry["rows"]["closed_form"]["ratio_vs_io_plus_solver"] > 0
