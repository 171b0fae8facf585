"""TSV-M, Iso-C and Iso-CTS (mergekit_wudi/solvers/subspace_merging.py, registered as `tsv_merge`, `iso_c`,
`iso_cts`): the papers' behaviour on cases checked by hand, the authors' code (tests/reference_subspace.py) on
random state dicts, the registered methods through merge_tensors / merge_state_dicts / a real `mergekit-yaml`,
and bad parameters at config load."""

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import MergeOptions, run_merge
from mergekit.merge_methods import PerGroupValues
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
from safetensors.torch import load_file

import mergekit_wudi  # noqa: F401  (registers the methods)
from mergekit_wudi.linear_weights import is_linear_weight
from mergekit_wudi.solvers.subspace_merging import iso_c, iso_cts, iso_cts_sizes, tsv_merge
from mergekit_wudi.toy import mergekit_yaml_executable
from reference_subspace import AUTHORS

METHODS = {"tsv_merge": tsv_merge, "iso_c": iso_c, "iso_cts": iso_cts}


def _outer(i, j, n=4):
    m = torch.zeros(n, n)
    m[i, j] = 1.0
    return m


# --- the papers' behaviour, checked by hand -----------------------------------------------------


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base = torch.randn(2, 2)
    experts = [base + torch.diag(torch.tensor([3.0, 0.0])), base + torch.diag(torch.tensor([0.0, 1.0]))]
    # sum = diag(3, 1): singular values 3 and 1, mean 2, singular vectors the identity
    torch.testing.assert_close(iso_c(base, experts, alpha=0.5), base + 0.5 * 2.0 * torch.eye(2))


def test_iso_c_output_has_a_flat_spectrum_at_the_mean_singular_value():
    torch.manual_seed(5)
    base = torch.randn(7, 5)
    taus = [torch.randn(7, 5) for _ in range(3)]
    s_sum = torch.linalg.svdvals(sum(taus))
    s_out = torch.linalg.svdvals(iso_c(base, [base + t for t in taus]) - base)
    torch.testing.assert_close(s_out, torch.full((5,), float(s_sum.mean())), atol=1e-5, rtol=1e-5)


def test_tsv_merge_of_orthogonal_rank_one_tasks_is_task_arithmetic():
    base = torch.randn(4, 4)
    taus = [2.0 * _outer(0, 1), 5.0 * _outer(2, 3)]  # orthogonal left and right singular vectors
    merged = tsv_merge(base, [base + t for t in taus], sv_reduction=0.25)  # k = 1 per task
    torch.testing.assert_close(merged, base + taus[0] + taus[1])


def test_tsv_merge_of_one_task_is_its_top_k_truncation():
    torch.manual_seed(6)
    base, tau = torch.randn(6, 5), torch.randn(6, 5)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    top2 = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # k = int(5 * 0.4) = 2
    torch.testing.assert_close(tsv_merge(base, [base + tau], sv_reduction=0.4), base + top2, atol=1e-5, rtol=1e-5)


def test_one_task_tsv_is_the_task_and_iso_c_its_flat_spectrum():
    torch.manual_seed(0)
    base, tau = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(tsv_merge(base, [base + tau]), base + tau, atol=1e-5, rtol=1e-5)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(iso_c(base, [base + tau]), base + s.mean() * u @ vh, atol=1e-5, rtol=1e-5)


def test_iso_cts_of_orthogonal_tasks_keeps_every_task_direction_at_one_flat_value():
    base = torch.zeros(4, 4)
    taus = [3.0 * _outer(0, 0), 1.0 * _outer(1, 1), 2.0 * _outer(2, 2), 0.5 * _outer(3, 3)]
    # r = 4, T = 4, fraction 0.5: k = 2 common (the two largest of the sum), k_ts = round(2 / 4) = 0 -> Iso-C
    assert iso_cts_sizes(4, 4, 0.5) == (4, 0)
    # T = 2 orthogonal tasks of rank 2, fraction 0.5: k = 2 common, 1 per task; all 4 directions kept
    a, b = taus[0] + taus[1], taus[2] + taus[3]
    assert iso_cts_sizes(4, 2, 0.5) == (2, 1)
    merged = iso_cts(base, [a, b], common_space_fraction=0.5)
    torch.testing.assert_close(merged, (3 + 2 + 1 + 0.5) / 4 * torch.eye(4), atol=1e-6, rtol=1e-6)


def test_iso_cts_without_task_specific_space_is_iso_c():
    torch.manual_seed(1)
    base = torch.randn(6, 6)
    experts = [base + torch.randn(6, 6) for _ in range(3)]
    torch.testing.assert_close(iso_cts(base, experts, common_space_fraction=1.0), iso_c(base, experts))


@pytest.mark.parametrize("method", [tsv_merge, iso_c, iso_cts])
def test_task_order_zero_tasks_dtype_and_bad_input(method):
    torch.manual_seed(2)
    base = torch.randn(8, 6)
    experts = [base + 0.1 * torch.randn(8, 6) for _ in range(3)]
    merged = method(base, experts)
    torch.testing.assert_close(method(base, experts[::-1]), merged, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(merged).all() and merged.shape == base.shape
    torch.testing.assert_close(method(base, experts + [base.clone()]), merged, atol=1e-5, rtol=1e-5)
    assert torch.equal(method(base, [base.clone()]), base)
    half = method(base.bfloat16(), [e.bfloat16() for e in experts])  # computed in float32, returned in bf16
    rounded = method(base.bfloat16().float(), [e.bfloat16().float() for e in experts])
    assert half.dtype == torch.bfloat16 and torch.equal(half, rounded.bfloat16())
    double = method(base.double(), [e.double() for e in experts])
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), merged, atol=1e-5, rtol=1e-5)
    bad = experts[0].clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite values .* task vector 0"):
        method(base, [bad, experts[1]])


# --- the authors' code -----------------------------------------------------------------------------


def _state_dicts(seed=3, T=3):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(12, 9, generator=g), "b.weight": torch.randn(7, 10, generator=g),
            "a.bias": torch.randn(12, generator=g), "norm.weight": torch.ones(9)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    return base, experts


@pytest.mark.parametrize("method", sorted(METHODS))
def test_registered_methods_equal_the_authors_code_on_a_state_dict(method):
    base, experts = _state_dicts()
    alpha = 0.7
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    expected = {k: base[k] + alpha * v for k, v in AUTHORS[method](taus).items()}
    # the authors decompose every 2-D tensor; `linear` says which ones here
    flags = PerGroupValues([v.ndim == 2 for v in base.values()])
    merged = merge_state_dicts({"base": base, **{f"e{i}": e for i, e in enumerate(experts)}}, method, base="base",
                               parameters={"alpha": alpha, "linear": flags})
    assert set(merged) == set(base)
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], atol=2e-5, rtol=1e-5, msg=f"{method} {name}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_tensors_is_the_solver_exactly_in_every_dtype(method):
    base, experts = _state_dicts(seed=4)
    tensors = [base["b.weight"], *[e["b.weight"] for e in experts]]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        cast = [t.to(dtype) for t in tensors]
        out = merge_tensors(cast, method, base_index=0, parameters={"alpha": 1.5}, name="layer.weight")
        assert out.dtype == dtype and torch.equal(out, METHODS[method](cast[0], cast[1:], alpha=1.5)), dtype


@pytest.mark.parametrize("non_linear,expected", [
    ("mean", lambda b, es, a: b + a * sum(e - b for e in es) / len(es)),
    ("sum", lambda b, es, a: b + a * sum(e - b for e in es)),
    ("base", lambda b, es, a: b),
])
def test_tensors_that_are_not_linear_weights_follow_non_linear(non_linear, expected):
    base, experts = _state_dicts(seed=5)
    models = {"base": base, **{f"e{i}": e for i, e in enumerate(experts)}}
    for method in METHODS:
        merged = merge_state_dicts(models, method, base="base", parameters={"alpha": 2.0, "non_linear": non_linear})
        for name in ("a.bias", "norm.weight"):
            torch.testing.assert_close(merged[name], expected(base[name], [e[name] for e in experts], 2.0))


def test_embeddings_are_not_decomposed_by_default():
    base, experts = _state_dicts(seed=6)
    name = "model.embed_tokens.weight"
    assert not is_linear_weight(name, base["a.weight"].shape)
    tensors = [base["a.weight"], *[e["a.weight"] for e in experts]]
    out = merge_tensors(tensors, "iso_c", base_index=0, parameters={"alpha": 1.0}, name=name)
    torch.testing.assert_close(out, base["a.weight"] + sum(t - base["a.weight"] for t in tensors[1:]) / 3)


def test_nan_input_and_non_2d_linear_are_named():
    base, experts = _state_dicts(seed=7)
    tensors = [base["a.weight"], *[e["a.weight"].clone() for e in experts]]
    tensors[2][0, 0] = math.nan
    for method in METHODS:
        with pytest.raises(ValueError, match="non-finite values \\(NaN or Inf\\) in tensor 'w' of model 2"):
            merge_tensors(tensors, method, base_index=0, name="w")
    bias = [base["a.bias"], *[e["a.bias"] for e in experts]]
    with pytest.raises(ValueError, match="tsv_merge: tensor 'a.bias' has shape \\(12,\\); 'linear: true' needs a 2-D"):
        merge_tensors(bias, "tsv_merge", base_index=0, name="a.bias", parameters={"linear": True})


# --- mergekit-yaml --------------------------------------------------------------------------------


def _config(family, method, **parameters):
    base, *experts = family
    return {"merge_method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": parameters, "dtype": "float32"}


def test_mergekit_yaml_runs_the_three_methods_like_the_solvers(llama_family, tmp_path):
    """A plain `mergekit-yaml` (fresh interpreter) per method: linear weights as the solver function, every
    other tensor (embeddings, lm_head, norms) ``W0 + alpha * mean tau``."""
    load = lambda p: load_file(str(Path(p) / "model.safetensors"))  # noqa: E731
    base, *experts = [load(p) for p in llama_family]
    cases = {"tsv_merge": {"alpha": 1.0}, "iso_c": {"alpha": 1.3}, "iso_cts": {"alpha": 0.9, "common_space_fraction": 0.5}}
    for method, parameters in cases.items():
        out = tmp_path / method
        cfg = tmp_path / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(_config(llama_family, method, **parameters)))
        done = subprocess.run([mergekit_yaml_executable(), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        merged = load(out)
        assert set(merged) == set(base)
        decomposed = 0
        for name, tensor in merged.items():
            ex = [e[name] for e in experts]
            if is_linear_weight(name, tensor.shape):
                expected = METHODS[method](base[name], ex, **parameters)
                decomposed += 1
            else:
                expected = base[name] + parameters["alpha"] * sum(e - base[name] for e in ex) / len(ex)
            torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=1e-5, msg=f"{method} {name}")
        assert decomposed == 14  # 7 projections x 2 layers; embed_tokens and lm_head are averaged
        assert f"({'https://arxiv.org/abs/2412.00081' if method == 'tsv_merge' else 'https://arxiv.org/abs/2502.04959'})" \
            in (out / "README.md").read_text()


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(LoaderCache, "get", refuse)


@pytest.mark.parametrize("method,parameters,message", [
    ("iso_c", {"alpha": -1}, "bad value -1 for parameter 'alpha'.*must be >= 0"),
    ("tsv_merge", {"alpha": math.inf}, "'alpha' must be a finite number"),
    ("iso_cts", {"common_space_fraction": 1.5}, "parameter 'common_space_fraction'.*must be >= 0 and <= 1"),
    ("tsv_merge", {"sv_reduction": 0}, "parameter 'sv_reduction'.*must be > 0 and <= 1"),
    ("iso_cts", {"comon_space_fraction": 0.5}, "unknown parameter 'comon_space_fraction' for merge_method 'iso_cts'; "
                                               "did you mean 'common_space_fraction'"),
    ("tsv_merge", {"sv_reductoin": 0.5}, "did you mean 'sv_reduction'"),
    ("iso_c", {"non_linear": "max"}, "'non_linear' must be one of base, mean, sum"),
    ("iso_c", {"common_space_fraction": 0.5}, "unknown parameter 'common_space_fraction' for merge_method 'iso_c'"),
])
def test_bad_parameters_fail_at_config_load_naming_them(method, parameters, message, llama_family, tmp_path,
                                                        no_loading):
    with pytest.raises(ValueError, match=message):
        run_merge(MergeConfiguration.model_validate(_config(llama_family, method, **parameters)), str(tmp_path / "o"),
                  MergeOptions(copy_tokenizer=False, quiet=True))
    assert not (tmp_path / "o").exists()


def test_alpha_per_model_is_refused_naming_where_to_put_it(llama_family, tmp_path, no_loading):
    config = _config(llama_family, "tsv_merge")
    config["models"][0]["parameters"] = {"alpha": 0.5}
    with pytest.raises(ValueError, match="'alpha' is a global parameter of 'tsv_merge'"):
        run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "o"),
                  MergeOptions(copy_tokenizer=False, quiet=True))


# --- WUDI's `decorrelated` solver: Eq. 1 with an isotropic prior on TSV-decorrelated task vectors ------


def _prior_minimiser(taus, row_projectors, c):
    """argmin_tau sum_i ||(tau - tau_i) (P_i + c I)^{1/2}||^2 from its normal equations."""
    eye = torch.eye(taus[0].shape[1], dtype=torch.float64)
    lhs = sum(p + c * eye for p in row_projectors)
    rhs = sum(t @ (p + c * eye) for t, p in zip(taus, row_projectors))
    return rhs @ torch.linalg.pinv(lhs)  # the minimum-norm minimiser where lhs is singular (c = 0)


@pytest.mark.parametrize("c", [0.0, 0.15, 1.0, 10.0])
def test_decorrelated_solver_is_the_prior_minimiser_on_decorrelated_tasks(c):
    from mergekit_wudi.solvers.subspace_merging import decorrelated_wudi_merged_task_vector

    torch.manual_seed(7)
    q_out, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    # three rank-2 tasks with orthonormal, mutually orthogonal singular vectors: already decorrelated
    taus, projectors = [], []
    for i in range(3):
        u, v = q_out[:, 2 * i: 2 * i + 2], q_in[:, 2 * i: 2 * i + 2]
        taus.append(u @ torch.diag(torch.tensor([3.0 - i, 1.0 + i], dtype=torch.float64)) @ v.T)
        projectors.append(v @ v.T)
    merged = decorrelated_wudi_merged_task_vector(torch.stack(taus), prior=c, sv_reduction=0.25)  # k = 2
    torch.testing.assert_close(merged, _prior_minimiser(taus, projectors, c))
    torch.testing.assert_close(merged, (1 + c) / (1 + 3 * c) * sum(taus))


def test_decorrelated_solver_spans_tsv_m_to_its_mean_and_refuses_a_negative_prior():
    from mergekit_wudi.solvers.subspace_merging import (
        decorrelated_wudi_merged_task_vector,
        tsv_merged_task_vector,
    )

    torch.manual_seed(8)
    tvs = torch.randn(4, 12, 6) @ torch.randn(4, 6, 10)
    tsv = tsv_merged_task_vector(tvs)
    torch.testing.assert_close(decorrelated_wudi_merged_task_vector(tvs, prior=0.0), tsv)
    torch.testing.assert_close(decorrelated_wudi_merged_task_vector(tvs, prior=1e6), tsv / 4, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="prior must be a finite number >= 0"):
        decorrelated_wudi_merged_task_vector(tvs, prior=-0.1)


def test_wudi_decorrelated_through_mergekit_is_the_solver_in_every_dtype():
    from mergekit_wudi.solvers.subspace_merging import DECORRELATED_PRIOR, decorrelated_wudi_merged_task_vector

    base, experts = _state_dicts(seed=9)
    tensors = [base["b.weight"], *[e["b.weight"] for e in experts]]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        cast = [t.to(dtype) for t in tensors]
        work = torch.float64 if dtype == torch.float64 else torch.float32
        tvs = torch.stack([t.to(work) - cast[0].to(work) for t in cast[1:]])
        for parameters, c in (({"solver": "decorrelated"}, DECORRELATED_PRIOR),
                              ({"solver": "decorrelated", "prior": 0.5}, 0.5)):
            out = merge_tensors(cast, "wudi", base_index=0, parameters=parameters, name="layer.weight")
            expected = (cast[0].to(work) + decorrelated_wudi_merged_task_vector(tvs, prior=c)).to(dtype)
            assert out.dtype == dtype
            torch.testing.assert_close(out, expected, atol=1e-6 if dtype != torch.bfloat16 else 1e-2, rtol=1e-5)


def test_prior_without_the_decorrelated_solver_is_named_and_a_negative_one_refused(caplog):
    from mergekit_wudi.validation import MergeConfigError, check_merge_config

    cfg = {"merge_method": "wudi", "base_model": "b", "models": [{"model": "e"}]}
    with caplog.at_level("WARNING"):
        check_merge_config({**cfg, "parameters": {"solver": "closed_form", "prior": 0.3}})
    assert "prior is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_merge_config({**cfg, "parameters": {"solver": "decorrelated", "prior": 0.3}})
    assert "prior is ignored" not in caplog.text
    with pytest.raises(MergeConfigError, match="prior"):
        check_merge_config({**cfg, "parameters": {"solver": "decorrelated", "prior": -1}})
    with pytest.raises(MergeConfigError, match="rank"):
        check_merge_config({**cfg, "parameters": {"solver": "decorrelated", "rank": 8}})
