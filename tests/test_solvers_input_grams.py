"""Eq. 1 with input Grams (solvers/input_grams.py) against a direct least-squares solve, RegMean's
formula on whole weights, and the streaming Nystrom sketch against the exact Gram."""

import pytest
import torch

from mergekit_wudi.solvers import input_grams as G
from mergekit_wudi.solvers.numerics import NonFiniteError


def task_data(T=3, n_out=5, n_in=7, tokens=(20, 11, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_out, n_in, generator=g, dtype=dtype)
    experts = [base + 0.1 * torch.randn(n_out, n_in, generator=g, dtype=dtype) for _ in range(T)]
    inputs = [torch.randn(n, n_in, generator=g, dtype=dtype) * (1 + i) for i, n in enumerate(tokens[:T])]
    return base, experts, inputs


def test_closed_form_is_the_least_squares_minimiser_of_eq1_with_inputs():
    """tau* = argmin sum_i w_i ||(tau - tau_i) X_i^T||^2 + rho ||tau||^2, solved as one stacked lstsq.
    Task 2 has fewer tokens than inputs (rank-deficient Gram); w_i = 1 / trace(G_i)."""
    base, experts, inputs = task_data()
    tvs = torch.stack([e - base for e in experts])
    grams = [x.T @ x for x in inputs]
    ridge = 1e-3
    weights = [1 / float(g.trace()) for g in grams]
    rho = ridge * float(sum(w * g for w, g in zip(weights, grams)).trace()) / base.shape[1]
    rows = [w ** 0.5 * x for w, x in zip(weights, inputs)] + [rho ** 0.5 * torch.eye(base.shape[1], dtype=base.dtype)]
    targets = [w ** 0.5 * x @ t.T for w, x, t in zip(weights, inputs, tvs)] + [torch.zeros(base.shape[1], base.shape[0],
                                                                                           dtype=base.dtype)]
    expected = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    ours = G.gram_merged_task_vector(tvs, grams, ridge=ridge)
    assert torch.allclose(ours, expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("shrink", [1.0, 0.7])
def test_unnormalised_unregularised_merge_is_regmean_on_whole_weights(shrink):
    """normalize='none', ridge=0: W0 + tau* = (sum_i W_i G_i')(sum_i G_i')^{-1}, G_i' with
    off-diagonals times alpha (RegMean, arXiv 2212.09849, Eq. 2 and its alpha)."""
    base, experts, inputs = task_data(tokens=(30, 25, 40))
    grams = [x.T @ x for x in inputs]
    shrunk = [shrink * g + (1 - shrink) * torch.diag(g.diagonal()) for g in grams]
    regmean = sum(w @ g for w, g in zip(experts, shrunk)) @ torch.linalg.inv(sum(shrunk))
    ours = G.merge_with_grams(base, experts, grams, normalize="none", ridge=0.0, shrink=shrink)
    assert torch.allclose(ours, regmean, atol=1e-10)


def test_float32_inputs_computed_in_float32_cast_back():
    base, experts, inputs = task_data(dtype=torch.float32)
    grams = [x.T @ x for x in inputs]
    ours = G.merge_with_grams(base.to(torch.bfloat16), [e.to(torch.bfloat16) for e in experts], grams)
    assert ours.dtype == torch.bfloat16
    reference = G.merge_with_grams(base.double(), [e.to(torch.bfloat16).double() for e in experts],
                                   [g.double() for g in grams])
    assert torch.allclose(ours.double(), reference, atol=2e-2)


def test_spectral_for_long_time_tends_to_closed_form():
    base, experts, inputs = task_data(tokens=(30, 25, 40))
    tvs = torch.stack([e - base for e in experts])
    grams = [x.T @ x for x in inputs]
    flow = G.gram_merged_task_vector(tvs, grams, solver="spectral", time=1e4)
    exact = G.gram_merged_task_vector(tvs, grams, ridge=0.0)
    assert torch.allclose(flow, exact, atol=1e-8)


def test_a_layer_that_saw_no_input_keeps_the_base():
    base, experts, inputs = task_data()
    zero = torch.zeros(base.shape[1], base.shape[1], dtype=base.dtype)
    assert torch.equal(G.merge_with_grams(base, experts, [zero] * 3), base)
    # one task without input: the others decide alone
    grams = [x.T @ x for x in inputs]
    two = G.merge_with_grams(base, experts[:2], grams[:2])
    assert torch.allclose(G.merge_with_grams(base, experts, grams[:2] + [zero]), two, atol=1e-12)


def test_bad_grams_are_errors_naming_the_task():
    base, experts, inputs = task_data()
    grams = [x.T @ x for x in inputs]
    with pytest.raises(ValueError, match="Gram of shape \\(6, 6\\)"):
        G.merge_with_grams(base, experts, grams[:2] + [torch.eye(6, dtype=base.dtype)])
    bad = grams[1].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="input Gram of task 1"):
        G.merge_with_grams(base, experts, [grams[0], bad, grams[2]])
    with pytest.raises(ValueError, match="got 2 Grams for 3"):
        G.merge_with_grams(base, experts, grams[:2])
    with pytest.raises(ValueError, match="shrink"):
        G.merge_with_grams(base, experts, grams, shrink=1.5)
    with pytest.raises(ValueError, match="solver must be one of"):
        G.merge_with_grams(base, experts, grams, solver="adam")


def streamed_sketch(inputs, rank, seed=0):
    """The sketch as the callback accumulates it: Y += X^T (X Omega), d += sum x^2, batch by batch."""
    n_in = inputs[0].shape[1]
    omega = G.sketch_test_matrix(n_in, rank, seed=seed, dtype=inputs[0].dtype)
    Y = torch.zeros(n_in, rank, dtype=inputs[0].dtype)
    d = torch.zeros(n_in, dtype=inputs[0].dtype)
    for x in inputs:
        Y += x.T @ (x @ omega)
        d += x.square().sum(0)
    return G.nystrom_sketch(Y, omega, d)


def test_sketch_is_exact_when_the_gram_has_at_most_its_rank():
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(3, 12, generator=g, dtype=torch.float64)
    batches = [torch.randn(5, 3, generator=g, dtype=torch.float64) @ basis for _ in range(4)]  # a 3-dim subspace
    gram = sum(x.T @ x for x in batches)
    sketch = streamed_sketch(batches, rank=5)
    assert sketch.factor.shape == (12, 5)
    assert torch.allclose(sketch.dense(), gram, atol=1e-8 * float(gram.norm()))


def test_sketch_keeps_diagonal_and_trace_and_approximates_the_gram():
    """A slowly decaying spectrum (the hard case for a fixed rank): rank 20 of 40 keeps >= 99.5% of
    the top eigenvalues and a relative Frobenius error < 2%; the diagonal is exact."""
    g = torch.Generator().manual_seed(4)
    scales = torch.logspace(1, -2, 40, dtype=torch.float64)
    batches = [torch.randn(64, 40, generator=g, dtype=torch.float64) * scales for _ in range(3)]
    gram = sum(x.T @ x for x in batches)
    sketch = streamed_sketch(batches, rank=20)
    assert torch.allclose(sketch.dense().diagonal(), gram.diagonal())
    lam, vec = torch.linalg.eigh(gram)
    kept = sketch.factor @ sketch.factor.T
    captured = torch.diagonal(vec[:, -3:].T @ kept @ vec[:, -3:]) / lam[-3:]
    assert bool((captured > 0.995).all()) and bool((captured < 1 + 1e-9).all())
    assert float((gram - kept).norm() / gram.norm()) < 0.02


def test_sketch_merge_equals_exact_merge_when_the_sketch_is_exact():
    base, experts, inputs = task_data(n_in=7, tokens=(30, 25, 40))
    grams = [x.T @ x for x in inputs]
    sketches = [streamed_sketch([x[:10], x[10:]], rank=7) for x in inputs]
    exact = G.merge_with_grams(base, experts, grams)
    assert torch.allclose(G.merge_with_grams(base, experts, sketches), exact, atol=1e-8)
    # a mix of exact and sketched Grams is allowed (a wide layer of one task only never happens, but per task it is fine)
    assert torch.allclose(G.merge_with_grams(base, experts, [grams[0], sketches[1], grams[2]]), exact, atol=1e-8)


def test_sketch_rank_is_checked():
    with pytest.raises(ValueError, match="sketch rank must be in \\[1, 4\\]"):
        G.sketch_test_matrix(4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"ridge": 0.1}, {"normalize": "none"}, {"solver": "spectral"},
                                     {"solver": "spectral", "time": 2.0}])
def test_lora_a_update_grams_are_solved_in_their_low_rank_dual_exactly_as_densely(dtype, options):
    """lora_update_gram's Grams are F F^T with r columns: the merge builds X = [sqrt(w_i) F_i] instead of
    in x in matrices; the result is the dense merge's (one task whose A did not move counts for nothing)."""
    from mergekit_wudi.solvers.input_grams import _factor_gram_problem, gram_merged_task_vector, lora_update_gram

    g = torch.Generator().manual_seed(5)
    n_out, n_in, r = 9, 40, 3
    tvs = torch.randn(4, n_out, n_in, generator=g, dtype=dtype)
    starts = [torch.randn(r, n_in, generator=g, dtype=dtype) for _ in range(4)]
    ends = [a + 0.1 * torch.randn(r, n_in, generator=g, dtype=dtype) for a in starts]
    ends[2] = starts[2].clone()  # no update: a zero Gram
    grams = [lora_update_gram(a0, a1) for a0, a1 in zip(starts, ends)]
    assert all(gram.is_factor_only for gram in grams)
    # the reference: the dense problem in float64 (in float32 the dense Cholesky of C + rho I, rank 9 of 40,
    # is the less accurate of the two)
    expected = gram_merged_task_vector(tvs.double(), [gram.dense(torch.float64) for gram in grams], **options)
    problem = G.gram_problem(tvs, grams, normalize=options.get("normalize", "trace"))
    assert problem.dual and problem.X.shape == (n_in, 3 * r)  # the zero update left out
    got = gram_merged_task_vector(tvs, grams, **options)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-5 if dtype == torch.float32 else 1e-11)
    assert torch.equal(gram_merged_task_vector(tvs[:1], grams[2:3]), torch.zeros_like(tvs[0]))  # nothing moved
    assert not _factor_gram_problem(tvs, grams, "trace").Y.isnan().any()


def test_a_sketch_with_a_residual_and_a_shrink_keep_the_dense_problem():
    from mergekit_wudi.solvers.input_grams import GramSketch, lora_update_gram

    g = torch.Generator().manual_seed(6)
    tvs = torch.randn(2, 5, 30, generator=g)
    exact = [lora_update_gram(torch.zeros(2, 30), torch.randn(2, 30, generator=g)) for _ in range(2)]
    residual = [GramSketch(e.factor, e.diagonal + 1.0) for e in exact]
    assert not residual[0].is_factor_only
    assert not G.gram_problem(tvs, residual).dual
    assert not G.gram_problem(tvs, exact, shrink=0.9).dual
    with pytest.raises(ValueError, match=r"one \[r, in\] shape"):
        lora_update_gram(torch.zeros(2, 30), torch.zeros(3, 30))
