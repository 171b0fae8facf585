"""How long the iterative WUDI solvers will take on a CPU, said before the first tensor (issue #22).

The faithful solvers (``adam``, the default, and ``lowrank``) run 300 full-batch iterations per
linear weight: minutes on a GPU, tens of minutes to hours on a CPU. A ``mergekit-yaml`` merge that
uses one of them on the CPU therefore prints, before any tensor is read, an estimate of its compute
time and of the fast alternative's (``solver: spectral`` with ``rank: auto``), when the estimate is
above :data:`WARN_SECONDS`, and then goes on. The estimate counts multiply-adds from the base
model's tensor shapes (its safetensors headers, read by the input checks) and divides them by the
rate of a short calibration matrix product on this machine; it leaves out I/O and per-tensor
overhead (about task arithmetic's time), so it is a floor.

Per linear weight ``[out, in]`` with ``T`` experts, ``n = iterations``:

- ``adam``: each iteration multiplies the ``[out, in]`` step by the smaller Gram, ``C`` (``in x in``) or
  the dual one through ``X`` (``in x T out``, two products): ``2 out in min(in, 2 T out)`` flop, plus
  forming that Gram once;
- ``lowrank``: the same with ``T k = min(out, in)`` columns in place of ``T out``, plus two full SVDs
  per expert;
- the fast alternative: ``O(T out in k)`` (:mod:`.solvers.wudi_lowrank`, cost model).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, Iterable, Optional, Tuple

# Say so when the iterative solver's estimate is above this (seconds); the environment variable
# MERGEKIT_WUDI_CPU_ESTIMATE_SECONDS overrides it (tests set it low).
WARN_SECONDS = 600.0
ENV_THRESHOLD = "MERGEKIT_WUDI_CPU_ESTIMATE_SECONDS"
ELEMENTWISE_FLOP = 10  # an Adam step's elementwise work per entry, in flop-equivalents
SVD_FLOP = 20  # a full SVD of [out, in]: about SVD_FLOP * out * in * min(out, in)


def linear_shapes(shapes: Dict[str, Tuple[int, ...]]) -> list:
    """``[out, in]`` of the tensors WUDI solves by the package's rule (2-D, not a vocabulary matrix)."""
    from mergekit_wudi.linear_weights import is_linear_weight

    return [tuple(s) for name, s in shapes.items() if is_linear_weight(name, s)]


def solver_flop(solver: str, shapes: Iterable[Tuple[int, int]], experts: int, iterations: int) -> float:
    """Multiply-adds x 2 of ``solver`` over the linear weights ``shapes`` (module docstring)."""
    from mergekit_wudi.solvers.wudi_lowrank import AUTO_MAX_RANK, OVERSAMPLE, POWER_ITERATIONS

    total = 0.0
    for n_out, n_in in shapes:
        size = n_out * n_in
        if solver in ("adam", "lowrank"):
            width = experts * n_out if solver == "adam" else min(n_out, n_in)
            gram = min(n_in, width)
            total += 2.0 * size * gram  # the Gram, once
            total += iterations * (2.0 * size * min(n_in, 2 * width) + ELEMENTWISE_FLOP * size)
            if solver == "lowrank":
                total += 2 * experts * SVD_FLOP * size * min(n_out, n_in)
        else:  # spectral + rank: auto at most AUTO_MAX_RANK directions per task vector
            q = AUTO_MAX_RANK + OVERSAMPLE
            total += 2.0 * size * experts * (2 * (1 + POWER_ITERATIONS) * q + 2 * AUTO_MAX_RANK)
    return total


def calibrate(seconds: float = 0.05) -> float:
    """flop/s of a float32 matrix product on this machine with torch's current threads."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 256)
    torch.mm(a, b)  # warm-up
    runs, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return runs * 2.0 * 512 * 512 * 256 / elapsed


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def cpu_estimate_message(solver: str, shapes: Dict[str, Tuple[int, ...]], experts: int, iterations: int,
                         threshold: Optional[float] = None) -> Optional[str]:
    """The message for ``solver`` on these base tensor ``shapes``, or None when its estimate is below
    ``threshold`` (default: :data:`WARN_SECONDS`, or the environment variable) or there is nothing to say."""
    if solver not in ("adam", "lowrank") or experts < 1:
        return None
    if threshold is None:
        threshold = float(os.environ.get(ENV_THRESHOLD, WARN_SECONDS))
    linear = linear_shapes(shapes)
    if not linear:
        return None
    rate = calibrate()
    slow = solver_flop(solver, linear, experts, iterations) / rate
    if slow < threshold:
        return None
    fast = solver_flop("spectral", linear, experts, iterations) / rate
    import torch

    return (f"mergekit-wudi: solver {solver!r} ({iterations} iterations) runs on the CPU: estimated "
            f"{_minutes(slow)} of compute for {len(linear)} linear weights of {experts} experts (from the tensor "
            f"shapes and a calibration product at {rate / 1e9:.0f} GFLOP/s with {torch.get_num_threads()} "
            f"thread(s); reading and writing come on top). The fast alternative, `solver: spectral` with "
            f"`rank: auto`, is estimated at {_minutes(fast)}; on a GPU pass --cuda. Continuing with {solver!r}.")


def warn_if_slow_on_cpu(merge_config, options, base_shapes: Optional[Dict[str, Tuple[int, ...]]]) -> None:
    """Print :func:`cpu_estimate_message` to stderr for a ``wudi`` merge on the CPU (before any tensor)."""
    if base_shapes is None or merge_config.merge_method != "wudi":
        return
    if options is not None and (getattr(options, "cuda", False) or (getattr(options, "device", None) or "cpu") != "cpu"):
        return
    from mergekit_wudi.solvers.wudi import ITERATIONS

    params = dict(merge_config.parameters or {})
    solver = params.get("solver", "adam")  # the wudi method's default solver
    iterations = params.get("iterations", ITERATIONS)
    if not isinstance(solver, str) or not isinstance(iterations, int):
        return  # per-tensor settings: no single estimate
    experts = len({str(m.model) for m in merge_config.models or () if m.model != merge_config.base_model})
    message = cpu_estimate_message(solver, base_shapes, experts, iterations)
    if message:
        print(message, file=sys.stderr, flush=True)
