"""The bad-input matrix: every name and value a user writes is checked, early, with a named error.

Each YAML row runs `run_merge` in-process with model loading forbidden (`LoaderCache.get` raises), so a
passing row proves the error came BEFORE any tensor was read. The in-memory rows use mergekit's
`merge_tensors` / `merge_state_dicts` (errors at parameter binding, before the kernel runs).

| case                                       | expected error names            | when             |
|--------------------------------------------|---------------------------------|------------------|
| unknown global / per-model / slice key     | the key + closest valid name    | before loading   |
| global parameter written per model         | the key + where to put it       | before loading   |
| non-numeric / non-finite / out-of-range    | the parameter                   | before loading   |
| bad {filter, value} entry                  | the entry's keys                | before loading   |
| lwptv without threshold or mask, or both   | lwptv_threshold / mask file     | before loading   |
| mask file missing / bad JSON / wrong format | the file                        | before loading   |
| mask file without a config model           | the file + the models           | before loading   |
| truncated safetensors                      | the model + the file            | before loading   |
| missing model folder                       | the model                       | before loading   |
| model of another size                      | the model + tensor + shapes     | before loading   |
| NaN/Inf in an input tensor                 | the tensor + the model          | while merging    |
| non-finite result                          | the tensor + the parameters     | while merging    |
"""

import json
import math
import shutil
from pathlib import Path
import subprocess
import sys

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import MergeOptions, run_merge
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
from safetensors.torch import load_file, save_file

import mergekit_wudi  # noqa: F401
from mergekit_wudi.toy import make_llama_family


def _run_yaml(config, out):
    from mergekit_wudi.toy import mergekit_yaml_executable

    cfg = out.parent / f"{out.name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run([mergekit_yaml_executable(), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"],
                          capture_output=True, text=True)


def _config(family, method="wudi", **parameters):
    base, *experts = family
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": parameters, "dtype": "float32"}


def _per_model(**parameters):
    def mutate(config):
        config["models"][1]["parameters"] = parameters
    return mutate


def _global(**parameters):
    def mutate(config):
        config["parameters"].update(parameters)
    return mutate


def _mask_file(content):
    def mutate(config, tmp_path):
        path = tmp_path / "mask.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        config["parameters"].update(preprocess="lwptv", lwptv_mask_file=str(path))
    return mutate


def _mask_without_models(family):
    names = ["model.layers.0.mlp.up_proj.weight"]
    return {"format": "mergekit-wudi/lwptv-mask", "version": 1, "tensors": names, "drop": {"/elsewhere": []}}


def _mask_with_a_stranger(config, tensor=None):
    """A valid mask for the config's experts, plus a model it does not merge (or a tensor the base lacks)."""
    names = ["model.layers.0.mlp.up_proj.weight"] + ([tensor] if tensor else [])
    drop = {m["model"]: [] for m in config["models"]}
    if tensor is None:
        drop["/elsewhere"] = []
    return {"format": "mergekit-wudi/lwptv-mask", "version": 1, "tensors": names, "drop": drop}


YAML_CASES = {
    "unknown global key": (_global(iteratons=20), "unknown parameter 'iteratons' for merge_method 'wudi'; did you mean 'iterations'"),
    "unknown global key 2": (_global(learning_rat=1e-2), "did you mean 'learning_rate'"),
    "unknown per-model key": (_per_model(wieght=0.5), r"models\[1\] .*unknown parameter 'wieght'.*did you mean 'weight'"),
    "global key per model": (_per_model(solver="adam"), "'solver' is a global parameter of 'wudi'"),
    "non-numeric value": (_global(learning_rate="fast"), "bad value 'fast' for parameter 'learning_rate'"),
    "infinite learning rate": (_global(learning_rate=math.inf), "'learning_rate' must be a finite number"),
    "NaN scaling": (_global(scaling=math.nan), "'scaling' must be a finite number"),
    "NaN per-model weight": (_per_model(weight=math.nan), "'weight' must be a finite number"),
    "boolean where a number goes": (_global(iterations=True), "'iterations' takes a number, got the boolean True"),
    "number that parses to inf": (_global(learning_rate="1e999"), "'learning_rate' must be a finite number"),
    "negative iterations": (_global(iterations=-1), "'iterations' must be >= 0"),
    "unknown solver": (_global(solver="sgd"), "'solver' must be one of adam, closed_form, spectral, lowrank"),
    "zero learning rate": (_global(learning_rate=0), "'learning_rate' must be > 0"),
    "unknown non_linear rule": (_global(non_linear="max"), "'non_linear' must be one of base, mean, sum"),
    "keep_fraction out of range": (_global(keep_fraction=1.5), "'keep_fraction' must be > 0 and <= 1"),
    "bad value in filter entry": (_global(ridge=[{"filter": "mlp", "value": -1}]), "ridge.*filter 'mlp'.*must be >= 0"),
    "lwptv without threshold": (_global(preprocess="lwptv"), "needs 'lwptv_threshold'.*or 'lwptv_mask_file'"),
    "rank with the adam solver": (_global(rank=8), "'rank' is for solver closed_form or spectral"),
    "rank zero": (_global(solver="closed_form", rank=0), "'rank' must be an integer >= 1 or 'auto'"),
    "rank_energy above 1": (_global(solver="spectral", rank="auto", rank_energy=1.5), "'rank_energy' must be > 0 and <= 1"),
    "bad preprocess": (_global(preprocess="awd+ties"), "'preprocess' must be one of"),
    "prior with the adam solver": (_global(prior=1.0), "'prior' is for solver closed_form; the solver here is 'adam'"),
    "prior with spectral": (_global(solver="spectral", prior=1.0), "'prior' is for solver closed_form"),
    "prior with rank": (_global(solver="closed_form", prior=1.0, rank=8), "'prior' works with the exact closed_form"),
    "output proxy with adam": (_global(proxy="output"), "'proxy' is for solver closed_form; the solver here is 'adam'"),
    "unknown proxy": (_global(solver="closed_form", proxy="weights"), "'proxy' must be one of input, output, both"),
    "negative prior": (_global(solver="closed_form", prior=-1.0), "'prior' must be >= 0"),
    "unknown prior_scale": (_global(solver="closed_form", prior=1.0, prior_scale="width"),
                            "'prior_scale' must be one of rank, dim"),
    "infinite awd_alpha": (_global(preprocess="awd", awd_alpha=math.inf), "'awd_alpha' must be a finite number"),
}

MASK_CASES = {
    "mask file missing": (lambda c, t: c["parameters"].update(preprocess="lwptv", lwptv_mask_file=str(t / "nope.json")),
                          "lwptv_mask_file not found"),
    "mask file bad JSON": (_mask_file("{not json"), "is not valid JSON"),
    "mask file wrong format": (_mask_file({"format": "other"}), "missing or wrong 'format'"),
    "mask file wrong version": (_mask_file({"format": "mergekit-wudi/lwptv-mask", "version": 9}), "unsupported version 9"),
    "mask file bad entry type": (_mask_file({"format": "mergekit-wudi/lwptv-mask", "version": 1, "tensors": ["a"],
                                             "drop": {"m": "a"}}), "'drop' of model 'm' must be a list"),
    "mask file without the config's models": (_mask_file(_mask_without_models(None)), "has no entry for model"),
    "mask file naming a model the config lacks": (lambda c, t: _mask_file(_mask_with_a_stranger(c))(c, t),
                                                  "names model\\(s\\) \\['/elsewhere'\\] that this config does not merge"),
    "mask file naming a tensor the base lacks": (lambda c, t: _mask_file(_mask_with_a_stranger(c, tensor="nope.weight"))(c, t),
                                                 "names tensors the base model lacks: \\['nope.weight'\\]"),
}


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(LoaderCache, "get", refuse)


def _plan(config, out):
    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(copy_tokenizer=False, quiet=True))


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_yaml_parameters_are_checked_before_loading(case, llama_family, tmp_path, no_loading):
    mutate, message = YAML_CASES[case]
    config = _config(llama_family)
    mutate(config)
    with pytest.raises(ValueError, match=message):
        _plan(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_mask_files_are_checked_before_loading(case, llama_family, tmp_path, no_loading):
    mutate, message = MASK_CASES[case]
    config = _config(llama_family)
    mutate(config, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _plan(config, tmp_path / "out")


@pytest.mark.parametrize("parameters,message", [
    ({"iteratons": 20}, "did you mean 'iterations'"),
    # a key pydantic drops from a parsed config: only the YAML text shows it (mergekit-yaml passes it on)
    ({"scaling": [{"filtr": "mlp", "value": 0.5}]}, "got keys ['filtr', 'value']"),
])
def test_typos_through_the_command_line_exit_nonzero_with_the_name(parameters, message, llama_family, tmp_path):
    from mergekit_wudi.toy import mergekit_yaml_executable

    config = _config(llama_family, **parameters)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([mergekit_yaml_executable(), str(tmp_path / "c.yml"), str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_size(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("wide"), num_experts=1, hidden_size=48)[1]


def test_input_files_are_checked_before_loading(llama_family, other_size, tmp_path, no_loading):
    truncated = tmp_path / "truncated"
    shutil.copytree(llama_family[1], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    for model, message in [
        (truncated, f"model {truncated}: cannot read {weights}.*truncated or corrupt"),
        (tmp_path / "missing", f"model {tmp_path / 'missing'}: .* is not a model folder"),
        (other_size, f"model {other_size}: tensor '.*' has shape .* but the base model .* has"),
    ]:
        config = _config(llama_family)
        config["models"][0]["model"] = str(model)
        with pytest.raises(ValueError, match=message):
            _plan(config, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# The in-memory API (merge_tensors / merge_state_dicts) and merge-time checks.


def _tensors(n=3, shape=(6, 5)):
    torch.manual_seed(0)
    base = torch.randn(shape)
    return [base] + [base + 0.01 * torch.randn(shape) for _ in range(n)]


@pytest.mark.parametrize("parameters,message", [
    ({"iteratons": 20}, "Unknown parameter"),
    ({"learning_rate": math.inf}, "'learning_rate' must be a finite number"),
    ({"learning_rate": "fast"}, "valid number"),
    ({"solver": "sgd"}, "'solver' must be one of"),
])
def test_in_memory_parameters_are_checked(parameters, message):
    with pytest.raises((TypeError, ValueError), match=message):
        merge_tensors(_tensors(), "wudi", base_index=0, parameters=parameters)


@pytest.mark.parametrize("method", ["wudi", "preprocessed_task_arithmetic", "preprocessed_ties"])
def test_nan_input_is_named_for_every_method(method):
    tensors = _tensors()
    tensors[2][1, 1] = float("nan")
    parameters = {} if method == "wudi" else {"weight": 1.0, **({"density": 0.5} if "ties" in method else {})}
    with pytest.raises(ValueError, match="non-finite values \\(NaN or Inf\\) in tensor 'w' of model 2"):
        merge_tensors(tensors, method, base_index=0, parameters=parameters, name="w")


def test_non_finite_result_names_tensor_and_parameters(monkeypatch):
    from mergekit_wudi.solvers import wudi as solvers

    monkeypatch.setattr(solvers, "wudi_merged_task_vector", lambda tvs, solver, **kw: torch.full(tvs.shape[1:], math.inf))
    with pytest.raises(ValueError, match="the wudi result for tensor 'w'.*'solver': 'closed_form'"):
        merge_tensors(_tensors(), "wudi", base_index=0, parameters={"solver": "closed_form"}, name="w")


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight", "bert.embeddings.word_embeddings.weight",
                                  "transformer.wte.weight"])
def test_embeddings_and_lm_heads_are_not_linear_in_memory(name):
    tensors = _tensors(shape=(12, 4))
    merged = merge_tensors(tensors, "wudi", base_index=0, parameters={"solver": "closed_form"}, name=name)
    assert torch.equal(merged, tensors[0])  # kept at the base, as for the YAML path
    forced = merge_tensors(tensors, "wudi", base_index=0, parameters={"solver": "closed_form", "linear": True}, name=name)
    assert not torch.equal(forced, tensors[0])


def test_state_dict_merge_keeps_embeddings_and_merges_linear():
    tensors = _tensors(shape=(12, 4))
    models = {i: {"model.embed_tokens.weight": t, "model.layers.0.mlp.up_proj.weight": t * 2} for i, t in enumerate(tensors)}
    merged = merge_state_dicts(models, "wudi", base=0, parameters={"solver": "closed_form"})
    assert torch.equal(merged["model.embed_tokens.weight"], tensors[0])
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], tensors[0] * 2)


def test_lwptv_masks_cli_rejects_a_bad_ratio_before_reading(tmp_path):
    (tmp_path / "c.yml").write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "/nonexistent",
                                                     "models": [{"model": "/nonexistent2"}]}))
    done = subprocess.run([sys.executable, "-m", "mergekit_wudi.lwptv_masks", str(tmp_path / "c.yml"),
                           str(tmp_path / "m.json"), "--ratio", "1.5"], capture_output=True, text=True)
    assert done.returncode == 2 and "LwPTV ratio must be between 0 and 1, got 1.5" in done.stderr




def test_missing_base_model_is_a_clear_error(llama_family, tmp_path):
    config = _config(llama_family)
    del config["base_model"]
    result = _run_yaml(config, tmp_path / "out")
    assert result.returncode != 0
    assert "requires a base input" in result.stderr
    assert not (tmp_path / "out").exists()


def test_non_finite_input_names_tensor_and_model_and_leaves_no_output(llama_family, tmp_path):
    bad = tmp_path / "bad_expert"
    bad.mkdir()
    for f in Path(llama_family[1]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    config = _config([llama_family[0], llama_family[1], bad], iterations=5)
    out = tmp_path / "out"
    result = _run_yaml(config, out)
    assert result.returncode != 0
    assert "non-finite values (NaN or Inf) in tensor 'model.layers.1.mlp.down_proj.weight'" in result.stderr
    assert str(bad) in result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


