"""The numeric helpers of the LLM-sized hot path (solvers/numerics.py, task_vector_stack) and the
no-copy paths of merge_task_vectors / wudi_factored: same values as the plain expressions, inputs
never modified."""

import pytest
import torch

from mergekit_wudi.solvers import wudi as W
from mergekit_wudi.solvers import wudi_lowrank as L
from mergekit_wudi.solvers.numerics import NonFiniteError, add_cast_, all_finite, check_finite, squared_norms
from mergekit_wudi.solvers.task_vectors import task_vector_stack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    t = torch.randn(300, 7).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[123 // 7, 123 % 7] = bad
        assert not all_finite(u)
        with pytest.raises(NonFiniteError, match="tensor 'x'"):
            check_finite(u, "tensor 'x'")


def test_all_finite_when_the_sum_overflows():
    # every element finite, their sum is not: the element-wise test decides
    big = torch.full((4,), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert not bool(torch.isfinite(big.sum()))
    assert all_finite(big)
    assert all_finite(torch.arange(5))  # integers are always finite


def test_squared_norms_match_square_sum():
    t = torch.randn(3, 700, 900) * 1e-3  # more than one chunk per row
    ref = t.double().square().sum(dim=(1, 2))
    got = squared_norms(t)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert torch.allclose(got.double(), ref, rtol=1e-6)
    assert squared_norms(torch.zeros(0, 5)).shape == (0,)
    assert squared_norms(torch.zeros(2, 0)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("numel", [1, (1 << 18) - 1, (1 << 18) + 5])
def test_add_cast_equals_add_of_the_cast(numel):
    out = torch.randn(numel)
    other = torch.randn(numel).to(torch.bfloat16)
    ref = out.clone().add_(other.to(torch.float32), alpha=-0.5)
    assert torch.equal(add_cast_(out, other, alpha=-0.5), ref)
    with pytest.raises(ValueError, match="shapes"):
        add_cast_(torch.zeros(3), torch.zeros(4))


def test_task_vector_stack_is_exact_and_checks_shapes():
    base = torch.randn(5, 6).to(torch.bfloat16)
    experts = [torch.randn(5, 6).to(torch.bfloat16) for _ in range(2)]
    tvs = task_vector_stack(base, experts)
    assert tvs.dtype == torch.float32
    assert torch.equal(tvs, torch.stack([e.float() - base.float() for e in experts]))
    assert task_vector_stack(base.double(), [e.double() for e in experts]).dtype == torch.float64
    with pytest.raises(ValueError, match=r"expert 1 has shape \(6,\)"):
        task_vector_stack(base, [experts[0], torch.zeros(6)])


def test_merge_task_vectors_leaves_its_inputs_alone():
    base = torch.randn(6, 8)
    tvs = torch.randn(3, 6, 8) * 0.1
    tvs[1] = 0  # dropped: Eq. 1 divides by its norm
    kept = tvs.clone()
    merged = W.merge_task_vectors(base, tvs, solver="closed_form", weights=[2.0, 1.0, 0.5], scaling=0.7)
    assert torch.equal(tvs, kept)
    expected = base + 0.7 * W.wudi_merged_task_vector(torch.stack([2.0 * kept[0], 0.5 * kept[2]]), "closed_form")
    assert torch.allclose(merged, expected, atol=1e-6)
    bf16 = W.merge_task_vectors(base.to(torch.bfloat16), kept, solver="closed_form")
    assert bf16.dtype == torch.bfloat16


def test_wudi_factored_overwrites_init_only_when_asked():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(9, 2, generator=g), torch.randn(2, 7, generator=g)) for _ in range(2)]
    init = torch.randn(9, 7, generator=g)
    kept = init.clone()
    plain = L.wudi_factored(factors, "spectral", init=init)
    assert torch.equal(init, kept)
    overwritten = L.wudi_factored(factors, "spectral", init=init, overwrite_init=True)
    assert torch.allclose(overwritten, plain, atol=1e-6)


@pytest.mark.parametrize("solver", ["closed_form", "spectral"])
def test_fast_path_reuses_the_task_vectors_only_when_allowed(solver):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 10, generator=g)
    tvs = torch.randn(3, 12, 2, generator=g) @ torch.randn(3, 2, 10, generator=g)  # rank 2 each
    kept = tvs.clone()
    plain = W.merge_task_vectors(base, tvs, solver=solver, rank="auto")
    assert torch.equal(tvs, kept)  # not the caller's to lose
    reused = W.merge_task_vectors(base, tvs, solver=solver, rank="auto", overwrite_task_vectors=True)
    assert torch.equal(reused, plain)  # same arithmetic, another buffer
    assert not torch.equal(tvs, kept)  # the buffer did hold the result
    scaled = W.merge_task_vectors(base, kept, solver=solver, rank="auto", scaling=0.3)
    assert torch.allclose(scaled - base, 0.3 * (plain - base), atol=1e-6)


def test_task_vector_whose_squared_norm_underflows_is_skipped():
    # every entry nonzero, but ||tau||^2 == 0 in float32: Eq. 1 would divide by zero
    base = torch.randn(5, 4)
    tvs = torch.stack([torch.randn(5, 4) * 0.1, torch.full((5, 4), 1e-30)])
    assert bool(tvs[1].any()) and float(squared_norms(tvs)[1]) == 0.0
    for solver in ("closed_form", "spectral", "adam"):
        merged = W.merge_task_vectors(base, tvs, solver=solver, iterations=5)
        only_first = W.merge_task_vectors(base, tvs[:1], solver=solver, iterations=5)
        assert torch.equal(merged, only_first)
        assert bool(torch.isfinite(merged).all())


def test_a_non_finite_task_vector_is_an_error_never_a_skipped_expert():
    # its squared norm is NaN / Inf, which is not "> 0": it must not pass for a zero task vector
    base = torch.randn(6, 8)
    for bad in (float("nan"), float("inf")):
        tvs = torch.randn(3, 6, 8) * 0.1
        tvs[1, 2, 3] = bad
        for solver, rank in (("closed_form", None), ("closed_form", "auto"), ("spectral", 2), ("adam", None)):
            with pytest.raises(NonFiniteError, match=r"non-finite values \(NaN or Inf\) in task vector 1"):
                W.merge_task_vectors(base, tvs, solver=solver, rank=rank, iterations=2)
        for solver in ("closed_form", "lowrank"):
            with pytest.raises(NonFiniteError, match="task vector 1"):
                W.wudi_merged_task_vector(tvs, solver, iterations=2)
        with pytest.raises(NonFiniteError, match="task vector 1"):
            L.low_rank_factors(tvs, "auto")
    huge = torch.full((2, 4, 4), 1e30)  # finite, but its squared norm overflows float32
    with pytest.raises(NonFiniteError, match="overflows torch.float32"):
        W.merge_task_vectors(torch.zeros(4, 4), huge, solver="closed_form")
