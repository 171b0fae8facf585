"""The size sweep of the speed benchmark (issue #12, part 3): the /proc poller, the streamed model builder and
one end-to-end sweep at the tiny size. The real sizes are a benchmark, not a test."""

from __future__ import annotations

import json
import sys

import pytest
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
    with pytest.raises(SystemExit, match="--experts 2 --threads 1"):  # a resume never mixes expert counts
        sweep.sweep(["tiny"], ["ties"], 3, tmp_path / "cache", out, "t", 1, resume=True)


def _fake_quality_cache(root, decay=0.9, experts=2):
    """A quality-benchmark cache: one callback base + ``experts`` experts whose linear task vectors have
    singular values ``decay^i`` (a head with a per-task shape, an embedding and a bias beside them)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"encoder.layer.0.dense.weight": torch.randn(48, 32, generator=g),
            "encoder.layer.0.dense.bias": torch.randn(48, generator=g),
            "encoder.embeddings.word_embeddings.weight": torch.randn(100, 32, generator=g),
            "head.weight": torch.randn(3, 32, generator=g)}
    (root / "callback" / "run").mkdir(parents=True)
    (root / "experts").mkdir()
    save_file(base, str(root / "callback" / "run" / "base.safetensors"))
    for e in range(experts):
        u = torch.linalg.qr(torch.randn(48, 32, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64)).Q
        tau = (u * decay ** torch.arange(32, dtype=torch.float64)) @ v.T
        sd = {k: t + 0.5 for k, t in base.items()}  # every other tensor moved too: only linear weights count
        sd["encoder.layer.0.dense.weight"] = (base["encoder.layer.0.dense.weight"].double() + tau).float()
        sd["head.weight"] = torch.randn(2 + e, 32, generator=g)
        save_file(sd, str(root / "experts" / f"s0-k{e}.safetensors"))
        (root / "experts" / f"s0-k{e}.json").write_text(json.dumps(
            {"task": f"t{e}", "seed": 0, "callback_output": str(root / "callback" / "run")}))


def test_spectrum_profile_is_measured_from_cached_experts_and_reproduced_at_any_shape(tmp_path):
    """Issue #22: the profile of the real experts' linear task vectors, and task vectors drawn with it."""
    from benchmarks.speedbench import models, spectrum

    _fake_quality_cache(tmp_path / "q", decay=0.9)
    path = spectrum.write_profile(tmp_path / "q", tmp_path / "res")
    profile = json.loads(path.read_text())
    assert profile["task_vectors"] == 2 and profile["shapes"] == [[48, 32]] and len(profile["experts"]) == 2
    grid = torch.tensor(profile["relative_index_grid"], dtype=torch.float64)
    expected = 0.9 ** (grid.clamp(max=31 / 32) * 32)  # s_i / s_0 = 0.9^i at x = i / 32
    assert torch.allclose(torch.tensor(profile["median_s_over_s0"], dtype=torch.float64), expected, rtol=1e-3)
    energy = torch.cumsum(0.81 ** torch.arange(32, dtype=torch.float64), 0)
    rank90 = int((energy / energy[-1] >= 0.9).nonzero()[0]) + 1
    assert profile["relative_rank_for_energy_median"]["0.9"] == rank90 / 32
    # a 160 x 96 task vector with that profile scaled to its shape, exact singular values and norm
    tau = spectrum.fullft_task_vector((160, 96), profile, 3.0, torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(tau.double())
    want = spectrum.profile_singular_values(profile, 96, 3.0)
    assert torch.allclose(s, want, rtol=1e-4, atol=1e-6 * float(want[0]))
    assert abs(float(s[32] / s[0]) - 0.9 ** (32 / 3)) < 1e-3  # relative index 1/3 at n = 96 is index 32/3 at n = 32
    # the sweep's fullft experts: that spectrum on linear weights, the LoRA-like delta on embeddings
    name = "model.layers.0.mlp.up_proj.weight"
    delta = models.model_tensor(name, (160, 64), 1, profile=profile) - models.model_tensor(name, (160, 64), 0)
    sv = torch.linalg.svdvals(delta.double())
    assert torch.allclose(sv, spectrum.profile_singular_values(profile, 64, float(delta.norm())), rtol=1e-3)
    other = "model.layers.1.mlp.up_proj.weight"  # another weight: same spectrum, other singular vectors
    delta2 = models.model_tensor(other, (160, 64), 1, profile=profile) - models.model_tensor(other, (160, 64), 0)
    assert torch.allclose(torch.linalg.svdvals(delta2.double()), sv, rtol=1e-3)
    assert float((delta2 - delta).norm()) > 0.5 * float(delta.norm())
    emb = "model.embed_tokens.weight"
    assert torch.equal(models.model_tensor(emb, (512, 64), 1, profile=profile), models.model_tensor(emb, (512, 64), 1))


def test_fullft_sweep_end_to_end_at_the_tiny_size(tmp_path):
    from benchmarks.speedbench import run, spectrum

    _fake_quality_cache(tmp_path / "q")
    out = tmp_path / "res"
    assert run.main(["--spectrum-profile", str(tmp_path / "q"), "--out", str(out)]) == 0
    args = ["--sweep", "--sizes", "tiny", "--experts", "2", "--sweep-methods", "task_arithmetic",
            "spectral_rank_auto", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--expert-kind", "fullft"]
    assert run.main(args) == 0
    r = json.loads((out / "speed_sweep_fullft.json").read_text())
    assert r["expert_kind"] == "fullft" and r["spectrum_profile"]["relative_index_grid"] == spectrum.GRID
    rows = r["sizes"]["tiny"]["rows"]
    assert rows["spectral_rank_auto"]["ok"] and rows["spectral_rank_auto"]["wall_s_ratio_vs_ta"] > 0
    assert len(rows["task_arithmetic"]["loadavg_start"]) == 3
    assert not (tmp_path / "cache" / "sweep_tiny_E2_fullft").exists()
    (out / "spectrum_profile.json").unlink()
    assert run.main(args[:-2] + ["--expert-kind", "fullft", "--name", "other"]) == 2  # no profile: a clear stop
