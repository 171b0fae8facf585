"""The low-rank fast path (``rank=``, :mod:`mergekit_wudi.solvers.wudi_lowrank`) against the exact
solvers, and device placement of every WUDI solver (issue #12, parts 1 and 4).

Tolerances: the fast path and the exact solver agree to float32 rounding, measured as the relative
Frobenius error. ``closed_form`` on rank-deficient task vectors is the less accurate of the two in
float32 (a Cholesky of a rank-deficient Gram plus a 1e-2 relative ridge: ~1e-4 against float64,
the fast path ~1e-6), hence 3e-4 against the dense float32 solver and 1e-5 against float64.
"""

import math
import pathlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree

from mergekit_wudi.solvers import wudi as W
from mergekit_wudi.solvers import wudi_lowrank as L

FAST = ("closed_form", "spectral")


def rel(a, b):
    return float((a - b.to(a.dtype)).norm() / b.norm())


def lora_factors(T, n_out, n_in, ranks, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ranks = [ranks] * T if isinstance(ranks, int) else ranks
    return [
        (0.05 * torch.randn(n_out, r, generator=g, dtype=dtype), torch.randn(r, n_in, generator=g, dtype=dtype))
        for r in ranks
    ]


def decaying(T, n_out, n_in, *, seed=0, decay=0.85, dtype=torch.float32):
    """Full-rank task vectors with singular values ``decay^j`` (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    n = min(n_out, n_in)
    out = []
    for _ in range(T):
        u = torch.linalg.qr(torch.randn(n_out, n, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n_in, n, generator=g, dtype=torch.float64)).Q
        out.append((u * decay ** torch.arange(n, dtype=torch.float64)) @ v.T)
    return torch.stack(out).to(dtype)


def products(factors):
    return torch.stack([left @ right for left, right in factors])


# (T, out, in, rank): primal (tall), dual (2*T*out < in: the exact solver works in the dual), wide
SHAPES = [(3, 64, 48, 4), (4, 16, 200, 3), (3, 40, 120, 5)]


@pytest.mark.parametrize("solver", FAST)
@pytest.mark.parametrize("T,n_out,n_in,r", SHAPES)
def test_exactly_low_rank_equals_exact_solver(solver, T, n_out, n_in, r):
    factors64 = lora_factors(T, n_out, n_in, r, dtype=torch.float64)
    reference = W.wudi_merged_task_vector(products(factors64), solver)  # float64, exact
    tvs = products(factors64).float()
    exact = W.wudi_merged_task_vector(tvs, solver)
    tol = 3e-4 if solver == "closed_form" else 5e-6
    for rank in (r, r + 3, "auto"):
        fast = W.wudi_merged_task_vector(tvs, solver, rank=rank, rank_energy=0.99999)
        assert fast.dtype == torch.float32
        assert rel(fast, exact) < tol, rank
        assert rel(fast, reference) < 1e-5, rank


@pytest.mark.parametrize("keep_fraction", [0.05, 0.3])
def test_exactly_low_rank_spectral_keeps_the_exact_solvers_directions(keep_fraction):
    tvs = products(lora_factors(3, 64, 48, 4, dtype=torch.float64))
    # ceil(0.05 * 48) = 3 of the 12 nonzero directions move; with 0.3 all 12 do
    exact = W.wudi_merged_task_vector(tvs, "spectral", keep_fraction=keep_fraction)
    fast = W.wudi_merged_task_vector(tvs, "spectral", keep_fraction=keep_fraction, rank=6)
    assert rel(fast, exact) < 1e-10
    assert rel(exact, W.wudi_merged_task_vector(tvs, "spectral")) > 1e-3 or keep_fraction == 0.3


@pytest.mark.parametrize("solver", FAST)
def test_factored_input_equals_dense_solver_on_the_products(solver):
    # different ranks per task, a LoRA scale folded into the left factor; float64 then float32
    factors = lora_factors(3, 40, 120, [2, 5, 8], seed=1, dtype=torch.float64)
    factors[1] = (2.0 * factors[1][0], factors[1][1])
    exact = W.wudi_merged_task_vector(products(factors), solver, ridge=1e-3, time=4.0)
    fast = L.wudi_factored(factors, solver, ridge=1e-3, time=4.0)
    assert fast.dtype == torch.float64 and rel(fast, exact) < 1e-10
    fast32 = L.wudi_factored([(a.float(), b.float()) for a, b in factors], solver, ridge=1e-3, time=4.0)
    assert fast32.dtype == torch.float32 and rel(fast32, exact) < 1e-5
    half = L.wudi_factored([(a.to(torch.bfloat16), b.float()) for a, b in factors], solver, ridge=1e-3, time=4.0)
    assert half.dtype == torch.float32  # bf16 factors are computed in float32
    # full-rank factors (sum of ranks > in: the basis is all of R^in) are still exact
    tvs = decaying(3, 30, 24, dtype=torch.float64)
    full = [(u * s, vh) for u, s, vh in (torch.linalg.svd(t, full_matrices=False) for t in tvs)]
    assert rel(L.wudi_factored(full, solver), W.wudi_merged_task_vector(tvs, solver)) < 1e-10


@pytest.mark.parametrize("solver", FAST)
def test_full_rank_error_falls_as_rank_grows(solver):
    tvs = decaying(3, 48, 40, dtype=torch.float64)
    exact = W.wudi_merged_task_vector(tvs, solver)
    errors = [rel(W.wudi_merged_task_vector(tvs, solver, rank=k), exact) for k in (1, 4, 10, 20, 30)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0], errors
    # rank >= min(out, in): the exact solver itself
    assert torch.equal(W.wudi_merged_task_vector(tvs, solver, rank=40), exact)
    assert torch.equal(W.wudi_merged_task_vector(tvs, solver, rank=10**6), exact)


def test_spectral_moves_only_the_span_of_the_truncation():
    tvs = decaying(3, 48, 40)
    factors = L.low_rank_factors(tvs, 5)
    basis = torch.linalg.qr(torch.cat([right.T for _, right in factors], dim=1)).Q
    moved = W.wudi_merged_task_vector(tvs, "spectral", rank=5) - tvs.sum(0)
    assert float(moved.norm()) > 0.1 * float(tvs.sum(0).norm())
    assert float((moved - moved @ basis @ basis.T).norm()) < 1e-5 * float(moved.norm())
    assert torch.equal(W.wudi_merged_task_vector(tvs, "spectral", rank=5, time=0.0), tvs.sum(0))


def test_auto_rank_is_the_smallest_meeting_the_energy_share():
    g = torch.Generator().manual_seed(3)
    decays = (0.7, 0.85, 0.93)
    tvs = torch.cat([decaying(1, 120, 100, seed=i, decay=d) for i, d in enumerate(decays)])
    tvs = tvs * torch.rand(3, 1, 1, generator=g)  # scale must not matter
    for share in (0.5, 0.9, 0.97):
        # the optimal (exact SVD) smallest rank per task; the tensor's rank is their maximum
        best = []
        for t in tvs.double():
            energy = torch.linalg.svdvals(t).square().cumsum(0) / t.square().sum()
            best.append(int((energy >= share).nonzero()[0]) + 1)
        factors = L.low_rank_factors(tvs, "auto", share, max_rank=50)  # a cap that does not bind
        ranks = {left.shape[1] for left, _ in factors}
        assert len(ranks) == 1
        (k,) = ranks
        assert max(best) <= k <= max(best) + 1, (share, best, k)
        for (left, right), t in zip(factors, tvs):
            kept = float((left @ right).double().square().sum() / t.double().square().sum())
            assert kept >= share * (1 - 1e-5)
    # no truncation: the share is everything, or (a cap above half the rank) it needs more than half the rank
    assert L.low_rank_factors(tvs, "auto", 1.0) is None
    assert L.low_rank_factors(decaying(2, 60, 40, decay=0.999), "auto", 0.9, max_rank=30) is None


def test_auto_rank_is_capped_on_full_fine_tune_like_spectra(monkeypatch):
    """Issue #22: a slowly decaying spectrum (90% of the energy needs ~60 of 200 directions) gets
    ``AUTO_MAX_RANK`` directions from sketches of at most ``AUTO_MAX_RANK + OVERSAMPLE`` columns, never
    the exact solver; a LoRA-like spectrum below the cap keeps its own smaller rank."""
    slow = decaying(2, 240, 200, decay=0.98)
    sketch_widths = []
    real_svd = L.randomized_svd
    monkeypatch.setattr(L, "randomized_svd", lambda tau, q: sketch_widths.append(q) or real_svd(tau, q))
    factors = L.low_rank_factors(slow, "auto", 0.9)
    assert {left.shape[1] for left, _ in factors} == {L.AUTO_MAX_RANK}
    assert max(sketch_widths) <= L.AUTO_MAX_RANK + L.OVERSAMPLE
    assert W.wudi_merged_task_vector(slow, "spectral", rank="auto") is not None
    monkeypatch.setattr(L, "AUTO_MAX_RANK", 24)  # the default cap is read at call time
    assert {left.shape[1] for left, _ in L.low_rank_factors(slow, "auto", 0.9)} == {24}
    steep = products(lora_factors(2, 240, 200, 3))
    assert {left.shape[1] for left, _ in L.low_rank_factors(steep, "auto", 0.9)} <= {1, 2, 3}
    # the merge itself uses the capped truncation: it differs from the exact solve
    exact = W.wudi_merged_task_vector(slow, "spectral")
    assert rel(W.wudi_merged_task_vector(slow, "spectral", rank="auto"), exact) > 1e-3


def test_zero_task_vectors_and_huge_rank():
    base = torch.randn(48, 40, generator=torch.Generator().manual_seed(5))
    tvs = products(lora_factors(2, 48, 40, 3))
    experts = [base + tvs[0], base.clone(), base + tvs[1]]
    seen = torch.stack([experts[0] - base, experts[2] - base])  # the nonzero task vectors wudi() solves for
    for solver in FAST:
        merged = W.wudi(base, experts, solver=solver, rank=6)
        assert torch.equal(merged, base + W.wudi_merged_task_vector(seen, solver, rank=6))
        assert rel(merged - base, W.wudi_merged_task_vector(tvs, solver)) < 3e-4
        assert torch.equal(W.wudi(base, experts, solver=solver, rank=500), W.wudi(base, experts, solver=solver))
        assert torch.equal(W.wudi(base, [base, base], solver=solver, rank=4), base)
    # factored: an exactly-zero product is skipped; none left gives zero
    factors = lora_factors(2, 48, 40, 3, dtype=torch.float64)
    zero = (torch.zeros(48, 2, dtype=torch.float64), torch.randn(2, 40, dtype=torch.float64))
    for solver in FAST:
        assert rel(L.wudi_factored([factors[0], zero, factors[1]], solver), L.wudi_factored(factors, solver)) < 1e-10
    assert torch.equal(L.wudi_factored([zero]), torch.zeros(48, 40, dtype=torch.float64))


@pytest.mark.parametrize("solver", FAST)
def test_bf16_and_float64_inputs(solver):
    tvs64 = products(lora_factors(3, 48, 40, 4, dtype=torch.float64))
    base64 = torch.randn(48, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    merged64 = W.wudi(base64, list(base64 + tvs64), solver=solver, rank=8)
    assert merged64.dtype == torch.float64
    assert rel(merged64 - base64, W.wudi_merged_task_vector(tvs64, solver)) < 1e-10
    base = base64.to(torch.bfloat16)
    experts = [(base64 + t).to(torch.bfloat16) for t in tvs64]
    merged = W.wudi(base, experts, solver=solver, rank=8)
    assert merged.dtype == torch.bfloat16
    tvs32 = torch.stack([e.float() - base.float() for e in experts])  # what wudi() solves, in float32
    expected = (base.float() + W.wudi_merged_task_vector(tvs32, solver, rank=8)).to(torch.bfloat16)
    assert torch.equal(merged, expected)


def test_rank_none_changes_nothing():
    tvs = decaying(3, 30, 24)
    base = torch.randn(30, 24)
    for solver in W.SOLVERS:
        plain = W.wudi(base, list(base + tvs), solver=solver, iterations=5)
        assert torch.equal(W.wudi(base, list(base + tvs), solver=solver, iterations=5, rank=None), plain)


def test_bad_rank_options_name_the_parameter():
    tvs = decaying(2, 12, 10)
    for solver in ("adam", "lowrank"):
        with pytest.raises(ValueError, match="'rank'.*closed_form.*spectral"):
            W.wudi_merged_task_vector(tvs, solver, rank=4)
    for rank in (0, -2, 1.5, "full", True):
        with pytest.raises(ValueError, match="'rank' must be"):
            W.wudi_merged_task_vector(tvs, "closed_form", rank=rank)
    for share in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="'rank_energy'"):
            W.wudi_merged_task_vector(tvs, "closed_form", rank="auto", rank_energy=share)
    factors = lora_factors(2, 12, 10, 2)
    with pytest.raises(ValueError, match=r"factors\[1\]"):
        L.wudi_factored([factors[0], (factors[1][0], factors[1][1][:, :9])])
    with pytest.raises(ValueError, match=r"non-finite.*factors\[0\]"):
        L.wudi_factored([(factors[0][0] * math.inf, factors[0][1])])
    with pytest.raises(ValueError, match="solver"):
        L.wudi_factored(factors, "adam")
    with pytest.raises(ValueError, match="init"):
        L.wudi_factored(factors, "spectral", init=torch.zeros(10, 12))


class _Shapes(TorchFunctionMode):
    """Records the shape and device of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.shapes, self.devices = set(), set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in _pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.shapes.add(tuple(leaf.shape))
                self.devices.add(leaf.device.type)
        return out


@pytest.mark.parametrize("solver", FAST)
def test_fast_path_never_forms_a_big_gram(solver):
    T, n_out, n_in = 3, 150, 130
    tvs = products(lora_factors(T, n_out, n_in, 3))
    for rank in (5, "auto"):
        with _Shapes() as seen:
            W.wudi_merged_task_vector(tvs, solver, rank=rank, rank_energy=0.9)
        big = {(n_in, n_in), (n_out, n_out), (T * n_out, T * n_out)}
        assert not seen.shapes & big, seen.shapes & big
        assert (n_out, n_in) in seen.shapes  # (the recorder does see the solver's tensors)
    with _Shapes() as seen:
        W.wudi_merged_task_vector(tvs, solver)
    assert (n_in, n_in) in seen.shapes  # the exact solver's Gram, for contrast


def _every_solver_run(tvs, base):
    yield W.wudi(base, list(base + tvs), solver="adam", iterations=3)
    yield W.wudi(base.to(torch.bfloat16), list((base + tvs).to(torch.bfloat16)), solver="spectral", rank=3)
    yield W.wudi_merged_task_vector(tvs, "lowrank", iterations=3)
    for solver in FAST:
        for keep_fraction in (1.0, 0.5):
            yield W.wudi_merged_task_vector(tvs, solver, keep_fraction=keep_fraction)
            yield W.wudi_merged_task_vector(tvs, solver, keep_fraction=keep_fraction, rank=3)
        yield W.wudi_merged_task_vector(tvs, solver, rank="auto", rank_energy=0.8)
        yield L.wudi_factored(L.low_rank_factors(tvs, 2), solver)


@pytest.mark.parametrize("shape", [(3, 20, 30), (2, 6, 40)])  # primal, dual
def test_solvers_create_every_tensor_on_the_inputs_device(shape):
    # A tensor created without an explicit device would land on `meta` and the op would fail
    # (or show up in the recorder): every solver must take its device from its inputs.
    tvs = decaying(*shape)
    base = torch.randn(shape[1:])
    with torch.device("meta"), _Shapes() as seen:
        results = list(_every_solver_run(tvs, base))
    assert all(r.device.type == "cpu" and bool(torch.isfinite(r).all()) for r in results)
    assert seen.devices == {"cpu"}


def test_solver_sources_have_no_host_round_trips():
    root = pathlib.Path(W.__file__).parent
    for module in ("wudi.py", "wudi_lowrank.py"):
        source = (root / module).read_text()
        for needle in (".cpu(", ".numpy(", "scipy"):
            assert needle not in source, (module, needle)


def test_small_factorizations_run_on_one_thread_and_the_thread_count_is_restored(monkeypatch):
    """Issue #22, part 4: with 2 threads on a busy 2-core machine the fast path's tiny LAPACK calls and
    chunked norm pass cost a scheduler slice per parallel region (5x slower merges); they run on one
    thread, the caller's thread count is back afterwards, also after an error."""
    from mergekit_wudi.solvers import numerics

    tvs = decaying(2, 64, 48)
    seen = []
    real_svd, real_qr = torch.linalg.svd, torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: seen.append(("svd", torch.get_num_threads())) or real_svd(*a, **k))
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: seen.append(("qr", torch.get_num_threads())) or real_qr(*a, **k))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        W.merge_task_vectors(torch.zeros(64, 48), tvs, solver="spectral", rank="auto")
        assert torch.get_num_threads() == 2
        assert {name for name, _ in seen} == {"svd", "qr"} and all(n == 1 for _, n in seen), seen
        with pytest.raises(RuntimeError, match="inside"):
            with numerics.one_cpu_thread(torch.device("cpu")):
                assert torch.get_num_threads() == 1
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with numerics.one_cpu_thread(torch.device("meta")):  # off the CPU: nothing changes
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
