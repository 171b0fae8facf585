"""AWD (mergekit_wudi/solvers/awd.py): the framework-free math."""

import math

import pytest
import torch

from mergekit_wudi.solvers import awd
from _data import task_vector_family as _family


@pytest.mark.parametrize("scope", ["tensor", "row"])
def test_awd_lowers_mean_abs_cosine_and_bounds_delta(scope):
    _, tvs = _family()
    alpha = 0.1
    before = float(awd.mean_abs_cosine(tvs, scope=scope))
    delta = awd.redundant_vector(tvs, alpha=alpha, steps=100, scope=scope)
    after = float(awd.mean_abs_cosine(tvs - delta, scope=scope))
    assert before > 0.3
    assert after < 0.5 * before
    # best iterate kept: L_orth(v) + alpha ||delta|| / s <= L_orth(tau)  =>  ||delta|| <= s * L_orth(tau) / alpha
    s = float(tvs.flatten(1).norm(dim=1).mean())
    assert float(delta.norm()) <= s * before / alpha + 1e-6
    assert float(delta.norm()) < float(tvs.flatten(1).norm(dim=1).max())
    torch.testing.assert_close(awd.disentangle(tvs, alpha=alpha, steps=100, scope=scope), tvs - delta)


@pytest.mark.parametrize("alpha", [1e6, math.inf])
@pytest.mark.parametrize("scope", ["tensor", "row"])
def test_awd_alpha_to_infinity_is_a_no_op(alpha, scope):
    _, tvs = _family()
    delta = awd.redundant_vector(tvs, alpha=alpha, steps=50, scope=scope)
    assert not bool(delta.any())
    assert torch.equal(awd.disentangle(tvs, alpha=alpha, steps=50, scope=scope), tvs)


def test_awd_larger_alpha_gives_smaller_delta():
    _, tvs = _family()
    norms = [float(awd.redundant_vector(tvs, alpha=a, steps=100).norm()) for a in (0.0, 0.3, 0.6, 1e3)]
    assert norms[0] >= norms[1] - 1e-6 and norms[1] >= norms[2] - 1e-6 and norms[3] == 0


def test_awd_relative_scale_invariance():
    _, tvs = _family()
    d1 = awd.redundant_vector(tvs, alpha=0.1, steps=50)
    d2 = awd.redundant_vector(tvs * 1000, alpha=0.1, steps=50)
    torch.testing.assert_close(d2, d1 * 1000, rtol=1e-3, atol=1e-5)


def test_awd_zero_task_vectors_stay_zero_and_no_nan():
    _, tvs = _family(T=3)
    tvs[1] = 0
    out = awd.disentangle(tvs, alpha=0.05, steps=50)
    assert torch.isfinite(out).all()
    assert not bool(out[1].any())
    assert bool((out[0] != tvs[0]).any())
    zeros = torch.zeros(3, 5, 4)
    assert torch.equal(awd.disentangle(zeros), zeros)
    single = tvs[:1]
    assert torch.equal(awd.disentangle(single), single)
    assert float(awd.mean_abs_cosine(zeros)) == 0.0


def test_awd_one_dimensional_row_scope_falls_back_to_tensor():
    _, tvs = _family(shape=(32,))
    a = awd.redundant_vector(tvs, alpha=0.1, steps=20, scope="row")
    b = awd.redundant_vector(tvs, alpha=0.1, steps=20, scope="tensor")
    assert torch.equal(a, b)


def test_awd_rejects_bad_input():
    _, tvs = _family()
    bad = tvs.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        awd.disentangle(bad)
    with pytest.raises(ValueError, match="scope"):
        awd.disentangle(tvs, scope="model")
    with pytest.raises(ValueError, match="alpha"):
        awd.disentangle(tvs, alpha=-1)
