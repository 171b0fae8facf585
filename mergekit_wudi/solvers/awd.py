"""AWD, Adaptive Weight Disentanglement (Xiong et al., arXiv 2411.18729): plain functions.

AWD pre-processes task vectors before any merge. It learns ONE redundant vector ``delta`` shared
by all tasks, so that the disentangled vectors ``v_i = tau_i - delta`` are closer to mutually
orthogonal while ``delta`` stays small (the paper's objective):

    L(delta) = L_orth + alpha * L_norm                                              (AWD, Eq. 1)
    L_orth   = mean over ordered pairs i != j of |cos(v_i, v_j)|
    L_norm   = ||delta||_2

The disentangled ``v_i`` then go to any merge method (task arithmetic, TIES, WUDI, ...).

This project's reading, where the paper leaves room:

- Scope. The paper flattens whole models. A mergekit kernel sees one tensor at a time, so here
  the objective is solved PER TENSOR (``scope="tensor"``: cosine of the flattened tensors), or
  per tensor with a row-wise cosine (``scope="row"``: ``L_orth`` is the mean over rows of the
  row-wise mean |cos|, the variant in the authors' later code). 1-D tensors always use the
  tensor scope (a row of a vector is one number).
- Scale. Cosines do not depend on the scale of the task vectors, ``||delta||`` does, and one
  model's tensors differ in scale by orders of magnitude. So ``L_norm`` is measured relative to
  the tensor's task vectors: ``L_norm = ||delta||_2 / s`` with ``s = mean_i ||tau_i||_2``
  (``relative=True``, the default). The optimiser then works on ``u = delta / s``, so ``alpha``
  and ``lr`` mean the same for every tensor; ``relative=False`` is the paper's absolute norm.
- Optimiser: ``torch.optim.SGD`` (plain gradient descent, lr 0.01, 300 steps, ``delta = 0``
  at start, float32; the defaults of a third-party reproduction; ``momentum`` is available).
- Optimality at zero. ``alpha * ||delta||`` is not differentiable at 0; by the subgradient
  condition ``delta = 0`` is optimal exactly when ``||grad L_orth(0)|| <= alpha``. That is
  checked first, and then nothing moves: so ``alpha -> infinity`` is an exact no-op.
- The iterate with the lowest ``L`` seen (``delta = 0`` included) is returned. Hence
  ``L_orth(v) + alpha ||u|| <= L_orth(tau)``: the mean |cos| never rises and
  ``||delta|| <= s * L_orth(tau) / alpha`` (bounded).
- Task vectors that are exactly zero (e.g. dropped by LwPTV) have no direction: they take no
  part in ``L_orth`` and stay zero. With fewer than two nonzero task vectors there is nothing
  to disentangle and the input comes back unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch

from mergekit_wudi.solvers.numerics import check_finite, compute_dtype

Scope = Literal["tensor", "row"]
SCOPES: tuple[str, ...] = ("tensor", "row")

ALPHA = 0.1
STEPS = 300
LR = 0.01
_EPS = 1e-12


def mean_abs_cosine(task_vectors: torch.Tensor, *, scope: Scope = "tensor") -> torch.Tensor:
    """``L_orth``: mean over ordered pairs ``i != j`` of ``|cos(v_i, v_j)|`` for ``[T, ...]``.

    ``scope="tensor"`` flattens each task vector; ``scope="row"`` takes the cosine of each row
    (first axis after ``T``) and averages over rows too. Zero vectors give cosine 0 (never a
    division by zero). Differentiable; returns a 0-d tensor (0 for fewer than two vectors).
    """
    if scope not in SCOPES:
        raise ValueError(f"AWD scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    T = task_vectors.shape[0]
    if T < 2:
        return task_vectors.new_zeros(())
    if scope == "row" and task_vectors.ndim >= 3:
        flat = task_vectors.reshape(T, task_vectors.shape[1], -1).transpose(0, 1)  # [rows, T, n]
        norms = flat.norm(dim=-1, keepdim=True)  # [rows, T, 1]
        unit = flat / norms.clamp_min(_EPS)
        cos = unit @ unit.transpose(1, 2)  # [rows, T, T]
    else:
        flat = task_vectors.reshape(T, -1)
        unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        cos = (unit @ unit.T).unsqueeze(0)  # [1, T, T]
    off_diagonal = cos.abs().sum() - cos.diagonal(dim1=1, dim2=2).abs().sum()
    return off_diagonal / (cos.shape[0] * T * (T - 1))


def redundant_vector(
    task_vectors: torch.Tensor,
    *,
    alpha: float = ALPHA,
    steps: int = STEPS,
    lr: float = LR,
    scope: Scope = "tensor",
    momentum: float = 0.0,
    relative: bool = True,
) -> torch.Tensor:
    """The shared redundant vector ``delta`` of AWD (Eq. 1) for task vectors ``[T, ...]``.

    Returns ``delta`` with the shape of one task vector, in float32 (float64 for float64 input).
    See the module docstring for the objective and this project's choices.
    """
    if alpha < 0:
        raise ValueError(f"AWD alpha must be >= 0, got {alpha}")
    if steps < 0:
        raise ValueError(f"AWD steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"AWD lr must be > 0, got {lr}")
    if scope not in SCOPES:
        raise ValueError(f"AWD scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    if task_vectors.ndim < 1:
        raise ValueError("AWD expects task vectors stacked as [T, ...]")
    tvs = task_vectors.detach().to(compute_dtype(task_vectors.dtype))
    check_finite(tvs, "the task vectors given to AWD")
    delta = torch.zeros_like(tvs[0]) if tvs.shape[0] else tvs.new_zeros(tvs.shape[1:])
    norms = tvs.reshape(tvs.shape[0], -1).norm(dim=1)
    active = norms > 0
    if int(active.sum()) < 2 or steps == 0 or alpha == float("inf"):
        return delta
    tvs, norms = tvs[active], norms[active]
    scale = float(norms.mean()) if relative else 1.0

    def objective(u: torch.Tensor) -> torch.Tensor:
        return mean_abs_cosine(tvs - scale * u, scope=scope) + alpha * u.norm()

    u = torch.zeros_like(delta, requires_grad=True)
    with torch.enable_grad():
        start = mean_abs_cosine(tvs - scale * u, scope=scope)
        (grad,) = torch.autograd.grad(start, u)
    if float(grad.norm()) <= alpha:  # subgradient condition: delta = 0 is optimal
        return delta
    best_loss, best_u = float(start.detach()), u.detach().clone()
    optimizer = torch.optim.SGD([u], lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = objective(u)
            if float(loss.detach()) < best_loss:
                best_loss, best_u = float(loss.detach()), u.detach().clone()
            loss.backward()
            optimizer.step()
        final = float(objective(u).detach())
    if final < best_loss:
        best_u = u.detach().clone()
    return scale * best_u


def disentangle(
    task_vectors: torch.Tensor,
    *,
    alpha: float = ALPHA,
    steps: int = STEPS,
    lr: float = LR,
    scope: Scope = "tensor",
    momentum: float = 0.0,
    relative: bool = True,
) -> torch.Tensor:
    """AWD: ``v_i = tau_i - delta`` with ``delta`` = :func:`redundant_vector` (Eq. 1).

    Input ``[T, ...]``; output the same shape, in float32 (float64 for float64 input). Exactly
    zero task vectors stay zero. Merge the result with any method, e.g. task arithmetic
    ``W0 + lambda * sum_i v_i``.
    """
    delta = redundant_vector(
        task_vectors, alpha=alpha, steps=steps, lr=lr, scope=scope, momentum=momentum, relative=relative
    )
    tvs = task_vectors.detach().to(delta.dtype)
    if not bool(delta.any()):
        return tvs.clone()
    active = tvs.reshape(tvs.shape[0], -1).ne(0).any(dim=1)
    shape = (-1,) + (1,) * (tvs.ndim - 1)
    return tvs - delta.unsqueeze(0) * active.to(tvs.dtype).reshape(shape)
