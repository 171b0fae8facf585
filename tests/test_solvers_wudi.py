"""The WUDI solvers against references: the authors' literal loop, numpy/scipy, and known answers."""

import numpy as np
import pytest
import scipy.linalg
import torch

from mergekit_wudi.solvers import wudi as W
from tests.reference_wudi import naive_lowrank_loop, naive_wudi_loop


def task_vectors(T, n_out, n_in, *, seed=0, rank=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(T, n_out, rank, generator=g) @ torch.randn(T, rank, n_in, generator=g)
    return (0.02 * low / rank**0.5 + 0.005 * torch.randn(T, n_out, n_in, generator=g)).to(dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "T,n_out,n_in",
    [(4, 64, 48), (3, 48, 40), (4, 16, 200)],  # primal, primal, dual (2*T*out < in)
)
def test_adam_equals_authors_loop(T, n_out, n_in):
    tvs = task_vectors(T, n_out, n_in)
    problem = W.wudi_problem(tvs)
    assert problem.dual == (2 * T * n_out < n_in)
    ours = W.wudi_merged_task_vector(tvs, "adam")
    reference = naive_wudi_loop(tvs)
    assert rel(ours, reference) < 1e-5


def test_adam_equals_authors_loop_on_1024_square():
    tvs = task_vectors(4, 1024, 1024, seed=1)
    ours = W.wudi_merged_task_vector(tvs, "adam", iterations=20)
    reference = naive_wudi_loop(tvs, iterations=20)
    assert rel(ours, reference) < 1e-5


def test_adam_keeps_float64():
    tvs = task_vectors(3, 20, 30, dtype=torch.float64)
    ours = W.wudi_merged_task_vector(tvs, "adam", iterations=50)
    assert ours.dtype == torch.float64
    assert rel(ours, naive_wudi_loop(tvs, iterations=50)) < 1e-10


def test_gradient_is_authors_gradient():
    tvs = task_vectors(3, 12, 10, dtype=torch.float64)
    tau = torch.randn(12, 10, dtype=torch.float64, requires_grad=True)
    sq = tvs.flatten(1).norm(dim=1).square()
    loss = (((tau - tvs) @ tvs.transpose(1, 2)).square() / sq[:, None, None]).sum()
    loss.backward()
    for problem in (W.wudi_problem(tvs), W.InterferenceProblem(init=None, X=None)):
        if problem.init is None:  # the dual form of the same problem, built by hand
            full = W.wudi_problem(tvs)
            X = torch.cat([(t / s.sqrt()).T for t, s in zip(tvs, sq)], dim=1)
            Y = torch.cat([t @ (t / s.sqrt()).T for t, s in zip(tvs, sq)], dim=1)
            problem = W.InterferenceProblem(init=full.init, X=X, Y=Y, G=X.T @ X)
        assert torch.allclose(2 * problem.half_gradient(tau.detach()), tau.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T,n_out,n_in", [(4, 30, 20), (2, 6, 40)])
def test_closed_form_matches_scipy_least_squares(T, n_out, n_in):
    tvs = task_vectors(T, n_out, n_in, dtype=torch.float64)
    ours = W.wudi_merged_task_vector(tvs, "closed_form", ridge=0.0)
    # Eq. 1 as one least-squares problem: tau [sqrt(w_i) tau_i^T]_i = [sqrt(w_i) tau_i tau_i^T]_i
    arrays = [t.numpy() / np.linalg.norm(t.numpy()) for t in tvs]
    X = np.concatenate([a.T for a in arrays], axis=1)
    Y = np.concatenate([t.numpy() @ a.T for t, a in zip(tvs, arrays)], axis=1)
    expected, *_ = scipy.linalg.lstsq(X.T, Y.T)
    np.testing.assert_allclose(ours.numpy(), expected.T, rtol=1e-6, atol=1e-9)
    # and it is D C^+ from the notes
    C = X @ X.T
    D = Y @ X.T
    np.testing.assert_allclose(ours.numpy(), D @ np.linalg.pinv(C), rtol=1e-6, atol=1e-9)


def test_closed_form_is_a_stationary_point():
    tvs = task_vectors(3, 40, 32)
    problem = W.wudi_problem(tvs)
    tau = W.closed_form_solve(problem, ridge=0.0)
    grad = problem.half_gradient(tau)
    assert float(grad.norm()) < 1e-4 * float(problem.half_gradient(problem.init).norm())


@pytest.mark.parametrize("T,n_out,n_in", [(4, 30, 20), (2, 6, 40)])
def test_spectral_flow_limits(T, n_out, n_in):
    tvs = task_vectors(T, n_out, n_in, dtype=torch.float64)
    problem = W.wudi_problem(tvs)
    # t = 0 is the init (sum of task vectors); t -> infinity is the exact minimiser when C is full rank
    assert torch.allclose(W.spectral_solve(problem, time=0.0), tvs.sum(0))
    if not problem.dual:
        assert torch.linalg.matrix_rank(problem.C) == n_in
    limit = W.spectral_solve(problem, time=1e9)
    closed = W.closed_form_solve(problem, ridge=0.0)
    assert rel(limit, closed) < 1e-8


def test_spectral_matches_fine_gradient_descent():
    tvs = task_vectors(3, 10, 8, dtype=torch.float64)
    problem = W.wudi_problem(tvs)
    t, steps = 3.0, 30000
    tau = problem.init.clone()
    for _ in range(steps):
        tau -= (t / steps) * problem.half_gradient(tau)
    assert rel(W.spectral_solve(problem, time=t), tau) < 1e-3


def test_spectral_keep_fraction_moves_only_top_directions():
    tvs = task_vectors(3, 30, 20, dtype=torch.float64)
    problem = W.wudi_problem(tvs)
    lam, vec = problem.eigh()
    top = vec[:, :5]
    moved = W.spectral_solve(problem, time=5.0, keep_fraction=5 / 20) - problem.init
    assert torch.allclose(moved, moved @ top @ top.T, atol=1e-12)
    assert float(moved.norm()) > 0


@pytest.mark.parametrize("T,n_out,n_in", [(3, 24, 36), (3, 48, 200)])  # primal, dual
def test_lowrank_equals_optmerge_loop(T, n_out, n_in):
    tvs = task_vectors(T, n_out, n_in)
    assert W.lowrank_problem(tvs).dual == (n_in == 200)
    ours = W.wudi_merged_task_vector(tvs, "lowrank", iterations=100)
    reference = naive_lowrank_loop(tvs, iterations=100)
    assert rel(ours, reference) < 1e-5


def test_wudi_skips_zero_task_vectors_and_keeps_dtype():
    base = torch.randn(16, 12).to(torch.bfloat16)
    tvs = task_vectors(2, 16, 12)
    experts = [base, (base.float() + tvs[0]).to(torch.bfloat16), (base.float() + tvs[1]).to(torch.bfloat16)]
    merged = W.wudi(base, experts, iterations=30)
    assert merged.dtype == torch.bfloat16
    expected_tvs = torch.stack([e.float() - base.float() for e in experts[1:]])
    expected = (base.float() + naive_wudi_loop(expected_tvs, iterations=30)).to(torch.bfloat16)
    assert torch.equal(merged, expected)
    assert torch.equal(W.wudi(base, [base, base]), base)


def test_weights_scale_task_vectors_before_solving():
    base = torch.zeros(8, 6)
    tvs = task_vectors(2, 8, 6)
    merged = W.wudi(base, list(tvs), weights=[0.5, 2.0], solver="closed_form", scaling=0.3)
    expected = 0.3 * W.wudi_merged_task_vector(torch.stack([0.5 * tvs[0], 2 * tvs[1]]), "closed_form")
    assert torch.allclose(merged, expected)


def test_unknown_solver_and_bad_options():
    tvs = task_vectors(2, 4, 4)
    with pytest.raises(ValueError, match="unknown WUDI solver 'nope'"):
        W.wudi_merged_task_vector(tvs, "nope")
    with pytest.raises(ValueError, match="keep_fraction"):
        W.wudi_merged_task_vector(tvs, "spectral", keep_fraction=0)
    with pytest.raises(ValueError, match="exactly zero"):
        W.wudi_problem(torch.zeros(2, 3, 3))


def _prior_reference(tvs, prior, scale, ridge=0.0):
    """Eq. 3 written out: each task's Gram tau_i^T tau_i + c_i I, solved by a dense float64 inverse."""
    t = tvs.double()
    T, _, n_in = t.shape
    sq = t.square().sum((1, 2))
    grams = [tau.T @ tau for tau in t]
    c = [prior * s / (n_in if scale == "dim" else torch.linalg.matrix_rank(tau.float()).item())
         for s, tau in zip(sq, t)]
    lhs = sum((g + ci * torch.eye(n_in, dtype=t.dtype)) / s for g, ci, s in zip(grams, c, sq))
    rhs = sum(tau @ (g + ci * torch.eye(n_in, dtype=t.dtype)) / s for tau, g, ci, s in zip(t, grams, c, sq))
    gram_size = min(n_in, T * t.shape[1])  # closed_form's ridge is relative to its Gram's mean eigenvalue
    rho_r = ridge * float(sum(g.trace() / s for g, s in zip(grams, sq))) / gram_size
    return rhs @ torch.linalg.inv(lhs + rho_r * torch.eye(n_in, dtype=t.dtype))


@pytest.mark.parametrize("T,n_out,n_in", [(3, 24, 20), (2, 6, 40)])  # primal, dual (T*out < in)
@pytest.mark.parametrize("scale", ["rank", "dim"])
def test_prior_closed_form_matches_written_out_objective(T, n_out, n_in, scale):
    tvs = task_vectors(T, n_out, n_in, dtype=torch.float64)
    assert W.wudi_problem(tvs, dual=W._use_dual_direct(T, n_out, n_in)).dual == (T * n_out < n_in)
    for prior, ridge in ((0.5, 0.0), (3.0, 1e-2)):
        ours = W.wudi_merged_task_vector(tvs, "closed_form", prior=prior, prior_scale=scale, ridge=ridge)
        assert rel(ours, _prior_reference(tvs, prior, scale, ridge)) < 1e-10


def test_prior_on_disjoint_row_spaces_is_a_hand_computed_shrink():
    """Two rank-1 task vectors with orthogonal rows (LoRA-like): Eq. 1 returns their sum; with the prior each
    keeps (g + a)/(g + 2a) of itself (g = 1 here, a = prior / r = prior): the other task is zero there."""
    tvs = torch.zeros(2, 8, 12, dtype=torch.float64)
    tvs[0, 0, 0], tvs[1, 1, 1] = 2.0, 5.0
    assert W.numerical_ranks(tvs).tolist() == [1, 1]
    plain = W.wudi_merged_task_vector(tvs, "closed_form", ridge=0.0)
    assert torch.allclose(plain, tvs.sum(0))
    a = 0.5
    ours = W.wudi_merged_task_vector(tvs, "closed_form", prior=a, ridge=0.0)
    expected = torch.zeros(8, 12, dtype=torch.float64)
    expected[0, 0] = (1 + a) / (1 + 2 * a) * 2.0
    expected[1, 1] = (1 + a) / (1 + 2 * a) * 5.0
    # directions 2..11: nobody's support, the solution is the (rank-weighted) mean there: zero here
    assert torch.allclose(ours, expected, atol=1e-12)
    # "dim": a = prior / in for every task
    ours_dim = W.wudi_merged_task_vector(tvs, "closed_form", prior=12 * a, prior_scale="dim", ridge=0.0)
    assert torch.allclose(ours_dim, expected, atol=1e-12)


def test_prior_zero_is_todays_closed_form_and_identical_tasks_stay():
    tvs = task_vectors(3, 20, 16)
    assert torch.equal(W.wudi_merged_task_vector(tvs, "closed_form", prior=0.0),
                       W.wudi_merged_task_vector(tvs, "closed_form"))
    same = tvs[:1].expand(3, -1, -1).contiguous()  # every task the same: the prior's mean is that task too
    ours = W.wudi_merged_task_vector(same.double(), "closed_form", prior=2.0, ridge=0.0)
    assert rel(ours, same[0].double()) < 1e-10


def test_prior_option_errors():
    tvs = task_vectors(2, 8, 8)
    with pytest.raises(ValueError, match="'prior' works with solver 'closed_form' only, got solver 'spectral'"):
        W.wudi_merged_task_vector(tvs, "spectral", prior=1.0)
    with pytest.raises(ValueError, match="'prior' works with the exact closed_form solver only"):
        W.wudi_merged_task_vector(tvs, "closed_form", prior=1.0, rank=2)
    with pytest.raises(ValueError, match="'prior' must be a finite number >= 0, got -1"):
        W.wudi_merged_task_vector(tvs, "closed_form", prior=-1.0)
    with pytest.raises(ValueError, match="'prior' must be a finite number >= 0, got nan"):
        W.wudi_merged_task_vector(tvs, "closed_form", prior=float("nan"))
    with pytest.raises(ValueError, match="'prior_scale' must be one of rank, dim, got 'width'"):
        W.wudi_merged_task_vector(tvs, "closed_form", prior=1.0, prior_scale="width")


def test_numerical_ranks_of_lora_and_full_updates():
    """A LoRA-like update B A of rank r counts r (float32 rounding of W0 + BA - W0 does not add rank); a dense
    delta counts min(out, in), and so does a rank the sketch (min(out, in) // 4 columns) cannot tell from full."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(48, 40, generator=g) * 0.05
    lora = torch.stack([(w0 + 0.01 * torch.randn(48, r, generator=g) @ torch.randn(r, 40, generator=g)) - w0
                        for r in (3, 8)])
    assert W.numerical_ranks(lora).tolist() == [3, 8]
    assert W.numerical_ranks(task_vectors(2, 48, 40)).tolist() == [40, 40]
    wide = (torch.randn(1, 48, 20, generator=g) @ torch.randn(1, 20, 40, generator=g))  # rank 20 > 40 // 4
    assert W.numerical_ranks(wide).tolist() == [40]


def test_output_proxy_is_eq1_on_the_transposed_task_vectors_and_both_averages():
    tvs = task_vectors(3, 12, 20, dtype=torch.float64)
    for opts in ({}, {"prior": 1.0}):
        inp = W.wudi_merged_task_vector(tvs, "closed_form", **opts)
        out = W.wudi_merged_task_vector(tvs, "closed_form", proxy="output", **opts)
        assert rel(out, W.wudi_merged_task_vector(tvs.transpose(1, 2), "closed_form", **opts).T) < 1e-12
        assert rel(out, inp) > 1e-3  # a different proxy, a different merge
        both = W.wudi_merged_task_vector(tvs, "closed_form", proxy="both", **opts)
        assert rel(both, 0.5 * (inp + out)) < 1e-12
    with pytest.raises(ValueError, match="'proxy' 'output' works with the exact closed_form solver only"):
        W.wudi_merged_task_vector(tvs, "spectral", proxy="output")
    with pytest.raises(ValueError, match="'proxy' must be one of input, output, both, got 'x'"):
        W.wudi_merged_task_vector(tvs, "closed_form", proxy="x")
