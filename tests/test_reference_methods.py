"""The quality benchmark's reference rows (benchmarks/reference_methods.py: TSV-M, Iso-C, Iso-CTS) on cases
checked by hand, and every row of the baseline table (benchmarks/baselines.py) on a tiny state dict."""

import math

import pytest
import torch

from benchmarks import baselines
from benchmarks.reference_methods import iso_c, iso_cts, merge_state_dict, tsv_merge


def _outer(i, j, n=4):
    m = torch.zeros(n, n)
    m[i, j] = 1.0
    return m


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base = torch.randn(2, 2)
    experts = [base + torch.diag(torch.tensor([3.0, 0.0])), base + torch.diag(torch.tensor([0.0, 1.0]))]
    # sum = diag(3, 1): singular values 3 and 1, mean 2, singular vectors the identity
    torch.testing.assert_close(iso_c(base, experts, alpha=0.5), base + 0.5 * 2.0 * torch.eye(2))


def test_tsv_merge_of_orthogonal_rank_one_tasks_is_task_arithmetic():
    base = torch.randn(4, 4)
    taus = [2.0 * _outer(0, 1), 5.0 * _outer(2, 3)]  # orthogonal left and right singular vectors
    merged = tsv_merge(base, [base + t for t in taus], sv_reduction=0.25)  # k = 1 per task
    torch.testing.assert_close(merged, base + taus[0] + taus[1])


def test_one_task_tsv_is_the_task_and_iso_c_its_flat_spectrum():
    torch.manual_seed(0)
    base, tau = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(tsv_merge(base, [base + tau]), base + tau, atol=1e-5, rtol=1e-5)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(iso_c(base, [base + tau]), base + s.mean() * u @ vh, atol=1e-5, rtol=1e-5)


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
    bad = experts[0].clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="w1"):
        method(base, [bad, experts[1]], name="w1")


def test_state_dict_merge_averages_what_it_does_not_decompose():
    torch.manual_seed(3)
    base = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    experts = [{k: v + 0.1 * torch.randn(v.shape) for k, v in base.items()} for _ in range(2)]
    merged = merge_state_dict("iso_c", base, experts, alpha=2.0)
    torch.testing.assert_close(merged["b"], base["b"] + 2.0 * (experts[0]["b"] + experts[1]["b"] - 2 * base["b"]) / 2)
    torch.testing.assert_close(merged["w"], iso_c(base["w"], [e["w"] for e in experts], alpha=2.0))


def test_every_baseline_row_merges_a_tiny_model_at_every_grid_point():
    torch.manual_seed(4)
    base = {"layer.weight": torch.randn(6, 5), "layer.bias": torch.randn(6), "norm.weight": torch.ones(6)}
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
