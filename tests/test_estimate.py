"""Faithful solvers on a CPU say what they will cost before the first tensor (issue #22, part 3)."""

import pytest

from mergekit_wudi import estimate


def _run_merge(family, out, **parameters):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, *experts = family
    config = {"merge_method": "wudi", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
              "parameters": parameters, "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, copy_tokenizer=False))


def test_adam_on_a_cpu_prints_its_estimate_and_the_fast_alternative_then_merges(llama_family, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.setenv(estimate.ENV_THRESHOLD, "0")  # any estimate is "long" for this test
    _run_merge(llama_family, tmp_path / "adam", solver="adam", iterations=2)
    err = capsys.readouterr().err
    assert "solver 'adam' (2 iterations) runs on the CPU: estimated" in err
    assert "`solver: spectral` with `rank: auto`, is estimated at" in err and "Continuing with 'adam'" in err
    assert (tmp_path / "adam" / "model.safetensors").exists()  # and it went on
    _run_merge(llama_family, tmp_path / "lowrank", solver="lowrank", iterations=2)
    assert "solver 'lowrank'" in capsys.readouterr().err
    _run_merge(llama_family, tmp_path / "cf", solver="closed_form")  # not an iterative solver: nothing
    assert "estimated" not in capsys.readouterr().err
    monkeypatch.delenv(estimate.ENV_THRESHOLD)  # the real threshold: a tiny model is far below 10 minutes
    _run_merge(llama_family, tmp_path / "default", iterations=2)
    assert "estimated" not in capsys.readouterr().err


def test_the_estimate_comes_before_any_tensor_is_read(llama_family, tmp_path, monkeypatch, capsys):
    from mergekit.io.tasks import LoaderCache

    def no_loading(*args, **kwargs):
        raise RuntimeError("a model was loaded")

    monkeypatch.setattr(LoaderCache, "get", no_loading)
    monkeypatch.setenv(estimate.ENV_THRESHOLD, "0")
    with pytest.raises(RuntimeError, match="a model was loaded"):
        _run_merge(llama_family, tmp_path / "o", iterations=2)  # the default solver, adam
    assert "solver 'adam'" in capsys.readouterr().err


def test_cost_model_orders_the_solvers_on_llm_shapes():
    shapes = [(18944, 3584), (3584, 18944), (3584, 3584)]  # Qwen2.5-7B MLP and attention weights
    adam = estimate.solver_flop("adam", shapes, 2, 300)
    lowrank = estimate.solver_flop("lowrank", shapes, 2, 300)
    fast = estimate.solver_flop("spectral", shapes, 2, 300)
    assert adam > 100 * fast and lowrank > 100 * fast
    # adam: 300 products with the in x in (or dual) Gram dominate
    assert adam > 300 * 2 * 18944 * 3584 * 3584
    assert estimate.linear_shapes({"model.embed_tokens.weight": (100, 8), "a.weight": (4, 8), "a.bias": (4,)}) == [(4, 8)]
