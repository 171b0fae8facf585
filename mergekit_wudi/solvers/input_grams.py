"""Eq. 1 of WUDI-Merging with the inputs the experts actually saw (RegMean's objective on task vectors).

WUDI (arXiv 2503.08099) minimises ``sum_i w_i ||(tau - tau_i) tau_i^T||_F^2``: the rows of ``tau_i``
stand in for the inputs of the layer. When the inputs ``X_i`` ([tokens, in]) of task ``i`` are known,
the objective they stand for is

    L(tau) = sum_i w_i ||(tau - tau_i) X_i^T||_F^2 = sum_i w_i tr((tau - tau_i) G_i (tau - tau_i)^T),
    G_i = X_i^T X_i                                                                      (Eq. 1 with Grams)

minimised by ``tau* = (sum_i w_i tau_i G_i) (sum_i w_i G_i + rho I)^{-1}``: RegMean's closed form
(Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
arXiv 2212.09849) written on task vectors. With ``w_i = 1``, ``rho = 0`` it IS RegMean:
``W0 + tau* = (sum_i W_i G_i)(sum_i G_i)^{-1}``.

Choices (each an option):

- ``normalize="trace"`` (default): ``w_i = 1 / trace(G_i)``, so a task that saw more tokens (or larger
  activations) does not dominate; it is WUDI's own ``w_i = 1 / ||tau_i||_F^2 = 1 / trace(tau_i^T tau_i)``
  with the real Gram in place of the proxy, and it makes ``trace(C) = T`` (``spectral``'s time stays
  dimensionless). ``"none"``: ``w_i = 1`` (RegMean's sums).
- ``shrink`` (RegMean's ``alpha``, 0.6-0.9 in its paper; default 1: none): off-diagonal entries of each
  ``G_i`` are multiplied by ``alpha``, the diagonal kept: ``G_i' = alpha G_i + (1 - alpha) diag(G_i)``.
- ``ridge``: ``rho = ridge * trace(C) / in`` (relative to the mean eigenvalue, as in
  :func:`.wudi.closed_form_solve`, which solves it); directions no task's inputs reach keep the base.

Each task's Gram is either exact (a ``[in, in]`` tensor) or a :class:`GramSketch`: a rank-``k``
streaming Nystrom sketch (Tropp, Yurtsever, Udell, Cevher, "Fixed-rank approximation of a positive-
semidefinite matrix from streaming data", NeurIPS 2017) plus the exact diagonal, for layers too wide
to hold ``in x in`` per task. It stands for ``F F^T + diag(d - rownorms(F)^2)``: the top-``k`` part of
the Gram, with the energy it misses put back on the diagonal (the Nystrom residual ``G - F F^T`` is
positive semi-definite, so this term is >= 0) -- exact diagonal and trace, a data-informed ridge
for the directions the sketch does not keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch

from mergekit_wudi.solvers.interference import InterferenceProblem, TensorsLike, _stack
from mergekit_wudi.solvers.numerics import add_cast_, check_finite
from mergekit_wudi.solvers.task_vectors import task_vector_stack
from mergekit_wudi.solvers.wudi import RIDGE, FLOW_TIME, closed_form_solve, spectral_solve

GRAM_SOLVERS: tuple[str, ...] = ("closed_form", "spectral")
NORMALIZATIONS: tuple[str, ...] = ("trace", "none")
# Default of the Gram merge: no shrink (the exact Eq. 1 / RegMean objective); RegMean's paper tunes 0.6-0.9.
SHRINK = 1.0


@dataclass
class GramSketch:
    """A rank-``k`` approximation of a Gram ``G`` ([in, in]): ``factor`` ([in, k], ``F F^T`` ~ ``G``)
    and ``diagonal`` (``diag(G)``, exact). See the module docstring for the matrix it stands for."""

    factor: torch.Tensor
    diagonal: torch.Tensor

    @property
    def size(self) -> int:
        return self.diagonal.shape[0]

    @property
    def is_factor_only(self) -> bool:
        """``G = F F^T`` up to rounding (no residual on the diagonal): an exactly low-rank Gram, such as
        :func:`lora_update_gram`'s, or a sketch that kept all of its Gram."""
        residual = self.diagonal - self.factor.square().sum(dim=1).to(self.diagonal.dtype)
        scale = float(self.diagonal.abs().max()) if self.diagonal.numel() else 0.0
        return float(residual.abs().max()) <= 1e-5 * scale if scale > 0 else True

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``F F^T + diag(max(d - rownorms(F)^2, 0))`` as an ``[in, in]`` tensor."""
        factor = self.factor.to(dtype or self.factor.dtype)
        gram = factor @ factor.T
        residual = (self.diagonal.to(gram.dtype) - factor.square().sum(dim=1)).clamp_min(0)
        gram.diagonal().add_(residual)
        return gram


Gram = Union[torch.Tensor, GramSketch]


def sketch_test_matrix(n_in: int, rank: int, *, seed: int = 0, device=None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The streaming sketch's test matrix: ``[in, rank]`` with orthonormal columns (QR of a Gaussian),
    reproducible from ``seed`` (every DDP rank draws the same one, so rank sketches add up)."""
    if not 1 <= rank <= n_in:
        raise ValueError(f"sketch rank must be in [1, {n_in}] for a layer with {n_in} inputs, got {rank}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_in, rank, generator=g, dtype=torch.float64))
    return q.to(device=device, dtype=dtype)


def nystrom_sketch(range_sketch: torch.Tensor, test_matrix: torch.Tensor, diagonal: torch.Tensor) -> GramSketch:
    """The sketch of ``G`` from ``range_sketch = G @ test_matrix`` (accumulated over batches: it is
    linear in ``G``), by the numerically stable Nystrom step of Tropp et al. 2017 (Alg. 3): a tiny
    shift ``nu`` (the input dtype's epsilon times ``||Y||``), a Cholesky of ``Omega^T Y_nu``, an SVD; eigenvalues ``sigma^2 - nu``, clipped at 0.
    Computed in float64."""
    Y, omega = range_sketch.double(), test_matrix.double()
    nu = torch.finfo(range_sketch.dtype).eps * max(float(torch.linalg.matrix_norm(Y, ord=2)), 1e-300)
    Y_nu = Y + nu * omega
    core = omega.T @ Y_nu
    chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
    if int(info) != 0:  # Y ~ 0 (a layer that never saw input), or rounding: fall back to an eigen-split
        lam, vec = torch.linalg.eigh((core + core.T) / 2)
        keep = lam > lam.max().clamp_min(0) * 1e-12
        E = Y_nu @ (vec[:, keep] / lam[keep].sqrt())
    else:
        E = torch.linalg.solve_triangular(chol, Y_nu.T, upper=False).T  # Y_nu chol^{-T}
    U, sigma, _ = torch.linalg.svd(E, full_matrices=False)
    values = (sigma.square() - nu).clamp_min(0)
    return GramSketch(factor=(U * values.sqrt()).to(range_sketch.dtype), diagonal=diagonal.clone())


def lora_update_gram(a_start: torch.Tensor, a_end: torch.Tensor) -> GramSketch:
    """The input proxy of a LoRA layer trained from a known ``A``: ``G = dA^T dA``, ``dA = a_end - a_start``
    ([r, in] each), exact, as a rank-``r`` :class:`GramSketch` (no residual).

    A LoRA update ``s B A`` has the row space of ``A``, which stays close to its random init, so WUDI's proxy
    ``tau^T tau`` says little about the layer's inputs. The change of ``A`` does: its gradient is
    ``s B^T (dL/dy) x^T``, so every step adds rows in the span of the inputs ``x`` the layer saw."""
    if a_start.shape != a_end.shape or a_end.dim() != 2:
        raise ValueError(f"LoRA A at the start {tuple(a_start.shape)} and end {tuple(a_end.shape)} of a fit must "
                         "have one [r, in] shape")
    dtype = torch.float64 if a_end.dtype == torch.float64 else torch.float32
    delta = a_end.to(dtype) - a_start.to(dtype)
    check_finite(delta, "the LoRA A update")
    return GramSketch(factor=delta.T.contiguous(), diagonal=delta.square().sum(dim=0))


def _dense_gram(gram: Gram, n_in: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    dense = gram.dense(dtype) if isinstance(gram, GramSketch) else gram.to(dtype)
    if dense.shape != (n_in, n_in):
        raise ValueError(f"{what}: Gram of shape {tuple(dense.shape)} for a weight with {n_in} inputs")
    check_finite(dense, what)
    return dense


def gram_problem(
    task_vectors: TensorsLike,
    grams: Sequence[Gram],
    *,
    normalize: Literal["trace", "none"] = "trace",
    shrink: float = SHRINK,
) -> InterferenceProblem:
    """Eq. 1 with input Grams in primal form: ``C = sum_i w_i G_i'``, ``D = sum_i w_i tau_i G_i'``
    (``G_i'`` the shrunk Gram; see the module docstring for ``w_i``). Tasks whose Gram has zero trace
    (a layer that saw no input) are dropped; if none is left, ``C = 0`` and every solver keeps the base."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if not 0 <= shrink <= 1:
        raise ValueError(f"shrink (RegMean's alpha) must be in [0, 1], got {shrink}")
    tvs = _stack(task_vectors)
    T, n_out, n_in = tvs.shape
    if len(grams) != T:
        raise ValueError(f"got {len(grams)} Grams for {T} task vectors")
    check_finite(tvs, "the task vectors")
    if shrink == 1 and all(isinstance(g, GramSketch) and g.is_factor_only for g in grams) and sum(
            g.factor.shape[1] for g in grams) < n_in:
        return _factor_gram_problem(tvs, grams, normalize)
    C = torch.zeros(n_in, n_in, dtype=tvs.dtype, device=tvs.device)
    D = torch.zeros(n_out, n_in, dtype=tvs.dtype, device=tvs.device)
    for i, (tau, gram) in enumerate(zip(tvs, grams)):
        g = _dense_gram(gram, n_in, tvs.dtype, f"input Gram of task {i}").to(tvs.device)
        if shrink != 1:
            diagonal = g.diagonal().clone()
            g.mul_(shrink).diagonal().copy_(diagonal)
        trace = float(g.diagonal().sum())
        if trace <= 0:
            continue
        w = 1 / trace if normalize == "trace" else 1.0
        C.add_(g, alpha=w)
        D.addmm_(tau, g, alpha=w)
    return InterferenceProblem(init=tvs.sum(dim=0), C=C, D=D)


def _factor_gram_problem(tvs: torch.Tensor, grams: Sequence[GramSketch], normalize: str) -> InterferenceProblem:
    """The same problem in dual form when every ``G_i = F_i F_i^T`` with few columns in all:
    ``X = [sqrt(w_i) F_i]``, ``Y = [sqrt(w_i) tau_i F_i]`` (``C = X X^T``, ``D = Y X^T``), so nothing
    ``in x in`` is formed (a LoRA layer's A-update Grams: ``T r`` columns against ``in``)."""
    xs, ys = [], []
    for i, (tau, gram) in enumerate(zip(tvs, grams)):
        factor = gram.factor.to(device=tvs.device, dtype=tvs.dtype)
        if factor.shape[0] != tvs.shape[2]:
            raise ValueError(f"input Gram of task {i}: factor of shape {tuple(factor.shape)} for a weight with "
                             f"{tvs.shape[2]} inputs")
        check_finite(factor, f"input Gram of task {i}")
        trace = float(factor.square().sum())
        if trace <= 0:
            continue
        root = trace ** -0.5 if normalize == "trace" else 1.0
        xs.append(factor * root)
        ys.append((tau @ factor) * root)
    X = torch.cat(xs, dim=1) if xs else tvs.new_zeros(tvs.shape[2], 0)
    Y = torch.cat(ys, dim=1) if ys else tvs.new_zeros(tvs.shape[1], 0)
    return InterferenceProblem(init=tvs.sum(dim=0), X=X, Y=Y, G=X.T @ X)


def gram_merged_task_vector(
    task_vectors: TensorsLike,
    grams: Sequence[Gram],
    *,
    solver: str = "closed_form",
    ridge: float = RIDGE,
    time: float = FLOW_TIME,
    normalize: Literal["trace", "none"] = "trace",
    shrink: float = SHRINK,
) -> torch.Tensor:
    """``tau*`` of Eq. 1 with input Grams: ``closed_form`` (``D (C + rho I)^{-1}``) or ``spectral``
    (gradient flow for ``time`` from the sum of task vectors), the very solvers of :mod:`.wudi`."""
    if solver not in GRAM_SOLVERS:
        raise ValueError(f"input-Gram merge: solver must be one of {', '.join(GRAM_SOLVERS)}, got {solver!r}")
    problem = gram_problem(task_vectors, grams, normalize=normalize, shrink=shrink)
    if float(problem.gram.diagonal().sum()) == 0:
        return torch.zeros_like(problem.init)
    if solver == "closed_form":
        # rho = ridge * trace(C) / in in either form (closed_form_solve divides by its Gram's size)
        n_in = problem.init.shape[1]
        return closed_form_solve(problem, ridge=ridge * problem.gram.shape[0] / n_in if problem.dual else ridge)
    return spectral_solve(problem, time=time)


def merge_with_grams(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    grams: Sequence[Gram],
    *,
    scaling: float = 1.0,
    **options,
) -> torch.Tensor:
    """Merge one linear weight ``[out, in]`` from its experts and their input Grams:
    ``W0 + scaling * tau*`` (:func:`gram_merged_task_vector`; ``options``: ``solver``, ``ridge``,
    ``time``, ``normalize``, ``shrink``). Float32 (float64 for float64), cast back to the base's dtype."""
    tau = gram_merged_task_vector(task_vector_stack(base, experts), grams, **options)
    if scaling != 1:
        tau.mul_(scaling)
    return add_cast_(tau, base).to(base.dtype)
