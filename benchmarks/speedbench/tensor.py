"""One weight, both expert kinds (issue #22): what ``rank: auto`` costs against the exact solvers.

    python benchmarks/speed.py --tensor-bench            # 8960 x 1536 (Qwen2.5-1.5B MLP), 2 experts, 1 thread

Task vectors of kind ``lora`` (rank 8 + dense noise, as the sweep's) and ``fullft`` (the measured spectrum
profile, ``spectrum.py``) at one shape; each solver timed through ``merge_task_vectors`` on float32 task
vectors (best of ``repeat``), with the rank ``rank: auto`` chose and its time as a share of exact
``spectral``'s. ``spectral_rank_auto_uncapped`` is issue #12's rule (no cap), for comparison. Writes
``<out>/speed_tensor.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from pathlib import Path

import torch

from mergekit_wudi.solvers import wudi as W
from mergekit_wudi.solvers import wudi_lowrank as L

from .models import LOWRANK_STD, NOISE_STD, RANK

ROWS = {  # name -> merge_task_vectors options
    "closed_form": {"solver": "closed_form"},
    "spectral": {"solver": "spectral"},
    "spectral_rank_auto": {"solver": "spectral", "rank": "auto"},
    "spectral_rank_auto_uncapped": {"solver": "spectral", "rank": "auto", "_uncapped": True},
    "spectral_rank_32": {"solver": "spectral", "rank": 32},
}


def task_vectors(kind: str, shape, experts: int, profile: dict | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(22)
    out = []
    for _ in range(experts):
        if kind == "lora":
            tau = torch.randn(shape[0], RANK, generator=g) @ torch.randn(RANK, shape[1], generator=g)
            tau = tau.mul_(LOWRANK_STD / math.sqrt(RANK)).add_(torch.randn(shape, generator=g), alpha=NOISE_STD)
        else:
            from .spectrum import fullft_task_vector

            tau = fullft_task_vector(shape, profile, LOWRANK_STD * math.sqrt(shape[0] * shape[1]), g)
        out.append(tau)
    return torch.stack(out)


def chosen_rank(tvs: torch.Tensor, uncapped: bool) -> int | None:
    factors = L.low_rank_factors(tvs, "auto", max_rank=10**9 if uncapped else None)
    return None if factors is None else max(left.shape[1] for left, _ in factors)


def time_row(tvs: torch.Tensor, options: dict, repeat: int) -> float:
    options = dict(options)
    uncapped = options.pop("_uncapped", False)
    saved = L.AUTO_MAX_RANK
    best = float("inf")
    base = torch.zeros(tvs.shape[1:])
    try:
        if uncapped:
            L.AUTO_MAX_RANK = 10**9
        for _ in range(repeat):
            t0 = time.perf_counter()
            W.merge_task_vectors(base, tvs, **options)
            best = min(best, time.perf_counter() - t0)
    finally:
        L.AUTO_MAX_RANK = saved
    return best


def tensor_bench(out: Path, profile: dict, shape=(8960, 1536), experts: int = 2, threads: int = 1,
                 repeat: int = 3, kinds=("fullft", "lora")) -> dict:
    torch.set_num_threads(threads)
    path = out / "speed_tensor.json"
    result = {"issue": 22, "date": _dt.datetime.now().isoformat(timespec="seconds"), "shape": list(shape),
              "experts": experts, "threads": threads, "repeat": repeat, "torch": torch.__version__,
              "loadavg_start": list(os.getloadavg()), "auto_max_rank": L.AUTO_MAX_RANK,
              "rank_energy": W.RANK_ENERGY, "how": "merge_task_vectors on float32 task vectors, best of repeat",
              "kinds": {}}
    for kind in kinds:
        tvs = task_vectors(kind, shape, experts, profile)
        rows = {}
        for name, options in ROWS.items():
            rows[name] = {"seconds": time_row(tvs, options, repeat)}
            print(f"[tensor] {kind} {name}: {rows[name]['seconds']:.2f} s", flush=True)
        for name in rows:
            rows[name]["ratio_vs_exact_spectral"] = rows[name]["seconds"] / rows["spectral"]["seconds"]
        result["kinds"][kind] = {"rows": rows, "auto_rank": chosen_rank(tvs, False),
                                 "auto_rank_uncapped": chosen_rank(tvs, True)}
    result["loadavg_end"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result
