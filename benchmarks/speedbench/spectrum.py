"""How real full fine-tunes' task vectors decay (issue #22): the singular-value profile of the quality
benchmark's cached MiniLM experts, and task vectors drawn with that profile at any shape.

    python benchmarks/speed.py --spectrum-profile /work/cache-quality   # -> results/spectrum_profile.json

:func:`measure_profile` reads every cached expert (``<cache>/experts/s<seed>-<key>.safetensors``, the
encoder's weights under ``encoder.``, with the pretrained weights in the ``base.safetensors`` of the
``WUDIMergeCallback`` folder its ``.json`` names), takes the task vector ``tau = W - W0`` of each linear
weight (the package's rule, :mod:`mergekit_wudi.linear_weights`) and its singular values ``s_0 >= s_1 ...``
(``n = min(out, in)`` of them), and puts ``s_i / s_0`` on a fixed grid of the relative index ``x = i / n``
(linear interpolation of ``log(s_i / s_0)``). The profile is the median over all (expert, weight) pairs at
each grid point; the quartiles, the relative ranks that keep 50/80/90/95% of the energy, and the task
vectors' size relative to the pretrained weights are stored beside it.

:func:`profile_singular_values` scales the profile to a shape (``s_i = s_0 * profile(i / n)``) and
:func:`fullft_task_vector` draws a task vector with exactly those singular values and random orthonormal
singular vectors. A Haar-random ``[out, out]`` orthogonal factor costs ``O(out^3)`` (minutes per 7B MLP
weight); instead each side is a Kronecker product of two small Haar-random orthogonal matrices
(``out = a b``, ``a`` the largest divisor <= sqrt(out)) times random signs, applied to
``diag(s)`` in ``O(out in (a + b))``. The singular values are exact; the singular vectors are orthonormal
but structured. For what the benchmark times this is the same as Haar vectors: the randomized range
finder's Gaussian test matrix, and every exact solver's cost, are invariant under rotations of the
singular vectors.

Even that costs minutes per 7B expert on a loaded 2-core machine, so the sweep's models
(:func:`layer_task_vector`) draw it once per (shape, expert) and give each weight a fresh row and column
permutation with random signs of that template: ``P1 D1 (U diag(s) V^T) D2 P2`` has the same singular
values and orthonormal singular vectors (permuted, sign-flipped), at ``O(out in)`` per weight. Every
weight is solved on its own, so weights that share a template up to permutations cost the same as
independent ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import torch

# Relative index grid: dense near 0, where a fine-tune's spectrum falls fastest.
GRID = [0.0] + [float(x) for x in torch.logspace(math.log10(1 / 1024), math.log10(0.99), 63, dtype=torch.float64)]
ENERGY_SHARES = (0.5, 0.8, 0.9, 0.95)


def _log_ratio_on_grid(s: torch.Tensor) -> torch.Tensor:
    """``log(s_i / s_0)`` at ``x = i / n`` interpolated (linearly in ``x``) onto :data:`GRID`."""
    n = len(s)
    logs = torch.log(s.double().clamp_min(float(s[0]) * 1e-12) / s[0])
    x = torch.arange(n, dtype=torch.float64) / n
    grid = torch.tensor(GRID, dtype=torch.float64).clamp(max=(n - 1) / n)
    idx = torch.searchsorted(x, grid, right=True).clamp(1, n - 1)
    x0, x1 = x[idx - 1], x[idx]
    w = ((grid - x0) / (x1 - x0)).clamp(0, 1)
    return logs[idx - 1] * (1 - w) + logs[idx] * w


def _relative_energy_ranks(s: torch.Tensor) -> dict:
    energy = s.double().square().cumsum(0)
    energy = energy / energy[-1]
    return {str(share): (int((energy >= share).nonzero()[0]) + 1) / len(s) for share in ENERGY_SHARES}


def _expert_pairs(cache: Path, seeds=None):
    """(expert .safetensors, its callback's base.safetensors, metadata) of every cached expert."""
    for meta_path in sorted((cache / "experts").glob("s*-*.json")):
        path = meta_path.with_suffix(".safetensors")
        meta = json.loads(meta_path.read_text())
        base = Path(meta.get("callback_output", "")) / "base.safetensors"
        if path.exists() and base.exists() and (seeds is None or meta["seed"] in seeds):
            yield path, base, meta


def measure_profile(cache: Path, seeds=None, log=print) -> dict:
    """The profile of every cached expert under ``cache`` (see the module docstring)."""
    from safetensors.torch import load_file

    from mergekit_wudi.linear_weights import is_linear_weight

    curves, ranks, rel_norms, shapes, experts = [], {str(e): [] for e in ENERGY_SHARES}, [], set(), []
    bases = {}
    for path, base_path, meta in _expert_pairs(cache, seeds):
        base = bases.setdefault(base_path, load_file(str(base_path)))
        expert = load_file(str(path))
        experts.append({"task": meta["task"], "seed": meta["seed"], "file": path.name})
        for name, w0 in base.items():
            if not name.startswith("encoder.") or name not in expert:  # the heads are per task
                continue
            if not is_linear_weight(name[len("encoder."):], w0.shape):
                continue
            tau = expert[name].double() - w0.double()
            s = torch.linalg.svdvals(tau)
            if not bool(s[0] > 0):
                continue
            curves.append(_log_ratio_on_grid(s))
            for share, r in _relative_energy_ranks(s).items():
                ranks[share].append(r)
            rel_norms.append(float(tau.norm() / w0.double().norm()))
            shapes.add(tuple(w0.shape))
    if not curves:
        raise FileNotFoundError(f"no cached experts with their base under {cache / 'experts'} "
                                "(train them with: python benchmarks/quality.py --train-only --cache-dir ...)")
    log(f"[spectrum] {len(experts)} experts, {len(curves)} linear task vectors")
    stacked = torch.stack(curves)
    q = torch.quantile(stacked, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0).exp()
    median = lambda xs: float(torch.tensor(xs).median())  # noqa: E731
    return {
        "issue": 22, "date": _dt.datetime.now().isoformat(timespec="seconds"), "cache": str(cache),
        "experts": experts, "task_vectors": len(curves), "shapes": sorted(shapes),
        "relative_index_grid": GRID,
        "median_s_over_s0": q[1].tolist(), "q25_s_over_s0": q[0].tolist(), "q75_s_over_s0": q[2].tolist(),
        "relative_rank_for_energy_median": {k: median(v) for k, v in ranks.items()},
        "relative_rank_for_energy_max": {k: max(v) for k, v in ranks.items()},
        "task_vector_norm_over_base_norm_median": median(rel_norms),
        "how": "per linear task vector: s_i/s_0 at x = i/min(out,in), log-linear interpolation onto the grid; "
               "median (and quartiles) over all (expert, weight) pairs",
    }


def write_profile(cache: Path, out: Path, seeds=None) -> Path:
    profile = measure_profile(cache, seeds)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spectrum_profile.json"
    path.write_text(json.dumps(profile, indent=1))
    r = profile["relative_rank_for_energy_median"]
    print(f"[spectrum] wrote {path}: median rank share for 50/80/90/95% energy "
          + " / ".join(f"{100 * r[str(e)]:.1f}%" for e in ENERGY_SHARES))
    return path


def profile_singular_values(profile: dict, n: int, frobenius: float) -> torch.Tensor:
    """``n`` singular values following ``profile``'s median ``s_i / s_0`` at ``x = i / n``, scaled so that
    their squares sum to ``frobenius ** 2`` (float64)."""
    grid = torch.tensor(profile["relative_index_grid"], dtype=torch.float64)
    logp = torch.tensor(profile["median_s_over_s0"], dtype=torch.float64).log()
    x = (torch.arange(n, dtype=torch.float64) / n).clamp(max=float(grid[-1]))
    idx = torch.searchsorted(grid, x, right=True).clamp(1, len(grid) - 1)
    w = ((x - grid[idx - 1]) / (grid[idx] - grid[idx - 1])).clamp(0, 1)
    s = (logp[idx - 1] * (1 - w) + logp[idx] * w).exp()
    return s * (frobenius / s.norm())


def _split(n: int) -> tuple[int, int]:
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _haar(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q * torch.sign(torch.diagonal(r))


def _kron_orthogonal_apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``D (A kron B) x`` for ``x`` [n, m]: ``A`` [a, a], ``B`` [b, b] Haar-random orthogonal (``n = a b``),
    ``D`` random signs: an orthogonal map applied in ``O(n m (a + b))``."""
    n, m = x.shape
    a, b = _split(n)
    y = (_haar(a, g) @ x.reshape(a, b * m)).reshape(a, b, m)
    y = torch.matmul(_haar(b, g), y).reshape(n, m)
    signs = torch.randint(0, 2, (n, 1), generator=g).mul_(2).sub_(1).to(y.dtype)
    return y.mul_(signs)


def fullft_task_vector(shape, profile: dict, frobenius: float, g: torch.Generator) -> torch.Tensor:
    """A float32 [out, in] task vector with singular values :func:`profile_singular_values` and random
    orthonormal singular vectors (module docstring)."""
    n_out, n_in = shape
    core = torch.zeros(n_out, n_in)
    core.diagonal().copy_(profile_singular_values(profile, min(n_out, n_in), frobenius))
    left = _kron_orthogonal_apply(core, g)  # U diag(s), [out, in]
    return _kron_orthogonal_apply(left.T.contiguous(), g).T.contiguous()  # (V (U diag(s))^T)^T = U diag(s) V^T


_TEMPLATES: dict = {}


def layer_task_vector(name: str, shape, profile: dict, frobenius: float, generator_of, model: int) -> torch.Tensor:
    """The task vector of weight ``name`` of expert ``model``: the (shape, expert) template of
    :func:`fullft_task_vector` with rows and columns permuted and sign-flipped by ``generator_of(name)``
    (module docstring). ``generator_of(*key)``: a generator seeded by the key alone, so any weight can be
    rebuilt alone, in any order. Keeps the templates of one expert at a time."""
    key = (tuple(shape), model, float(frobenius))
    if key not in _TEMPLATES:
        if any(k[1] != model for k in _TEMPLATES):
            _TEMPLATES.clear()
        _TEMPLATES[key] = fullft_task_vector(shape, profile, frobenius, generator_of("template", *key))
    template = _TEMPLATES[key]
    g = generator_of(name, model, "permutation")
    rows, cols = torch.randperm(shape[0], generator=g), torch.randperm(shape[1], generator=g)
    row_signs = torch.randint(0, 2, (shape[0], 1), generator=g).mul_(2).sub_(1).float()
    col_signs = torch.randint(0, 2, (1, shape[1]), generator=g).mul_(2).sub_(1).float()
    return template[rows][:, cols].mul_(row_signs).mul_(col_signs)
