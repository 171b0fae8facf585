"""Matrix functions of a symmetric PSD Gram for the spectral WUDI solver: the gradient-flow gain
``(1 - exp(-lam t)) / lam`` and its Chebyshev series (applied by Clenshaw's recurrence)."""

from __future__ import annotations

import math

import torch


def _flow_gain(lam: torch.Tensor, time: float) -> torch.Tensor:
    """``(1 - exp(-lam t)) / lam`` (``-> t`` as ``lam -> 0``), without dividing by zero."""
    tiny = torch.finfo(lam.dtype).tiny
    return torch.where(lam > tiny, -torch.expm1(-lam * time) / lam.clamp_min(tiny), torch.full_like(lam, time))


def _chebyshev_gain(bound: float, time: float, tol: float, max_degree: int = 256) -> list[float]:
    """Chebyshev coefficients of ``lam -> (1 - exp(-lam t)) / lam`` on ``[0, bound]``, truncated at the
    first three consecutive coefficients totalling below ``tol * t / 4`` (``t`` is the function's
    maximum; the function is entire, so past its hump the coefficients decay faster than geometrically
    and the dropped tail is below ``tol * t``)."""
    n = 2 * max_degree
    # Host-side scalar work (the result is a list of floats): on the CPU explicitly, whatever the
    # default device is.
    k = torch.arange(n, dtype=torch.float64, device="cpu")
    nodes = torch.cos(math.pi * (k + 0.5) / n)
    values = _flow_gain((nodes + 1) * (bound / 2), time)
    coeffs = (2 / n) * (torch.cos(math.pi * k[: max_degree + 3, None] * (k[None, :] + 0.5) / n) @ values)
    coeffs[0] /= 2
    window = coeffs.abs().unfold(0, 3, 1).sum(1)  # window[j] = |c_j| + |c_j+1| + |c_j+2|
    small = (window[1:] < tol * time / 4).nonzero()
    degree = int(small[0]) if len(small) else max_degree
    return coeffs[: degree + 1].tolist()


def _apply_chebyshev(rhs: torch.Tensor, gram: torch.Tensor, coeffs: list[float], bound: float) -> torch.Tensor:
    """``rhs @ p(gram)`` for the Chebyshev series ``p`` on ``[0, bound]``, by Clenshaw's recurrence
    (one product with ``gram`` per degree). When ``rhs`` has more rows than ``gram``, ``p(gram)`` is
    built first (cheaper) and applied once."""
    n = gram.shape[0]
    if rhs.shape[0] > n:
        return rhs @ _apply_chebyshev(torch.eye(n, dtype=gram.dtype, device=gram.device), gram, coeffs, bound)
    # x in [-1, 1] <-> lam = bound (x + 1) / 2: right-multiplying by G_hat = (2 / bound) G - I.
    scale = 2 / bound
    b1 = torch.zeros_like(rhs)
    b2 = torch.zeros_like(rhs)
    for c in reversed(coeffs[1:]):
        # b_k = c_k rhs + 2 b_{k+1} G_hat - b_{k+2} = 2 scale b_{k+1} G - (b_{k+2} + 2 b_{k+1} - c_k rhs),
        # written over b_{k+2}'s buffer.
        b2.add_(b1, alpha=2).sub_(rhs, alpha=c).addmm_(b1, gram, beta=-1, alpha=2 * scale)
        b2, b1 = b1, b2
    out = torch.addmm(b1, b1, gram, beta=-1, alpha=scale)
    return out.sub_(b2).add_(rhs, alpha=coeffs[0])


def _spectral_bound(gram: torch.Tensor) -> float:
    """An upper bound on the Gram's largest eigenvalue: min(trace, Frobenius norm) (it is PSD)."""
    bound = min(float(gram.diagonal().sum()), float(torch.linalg.matrix_norm(gram)))
    return bound * (1 + 1e-4) + torch.finfo(gram.dtype).tiny
