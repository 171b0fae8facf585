#!/usr/bin/env python
"""Merge time of WUDI's ``decorrelated`` solver (issue 21) on LoRA task vectors of LLM-shaped weights, next to the
exact ``closed_form`` and TSV-M, one CPU thread, one weight at a time (``merge_task_vectors``):

- ``float32 LoRA``: ``B A`` exactly (the callback's PEFT path, or ``mergekit-yaml`` in float32): the nonzero
  triplets come from the exact range sketch;
- ``bf16 LoRA``: the same experts stored in bfloat16 (``W0 + B A`` rounded, minus ``W0``): the rounding makes the
  task vectors full rank, every one gets a full SVD;
- ``decorrelated, full SVD``: the float32 case with the sketch switched off, for the ratio.

    python benchmarks/decorrelated_speed.py        # about 2 minutes -> results/decorrelated_speed.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, machine_info  # noqa: E402

SHAPES = ((2048, 2048, 16, 4), (4096, 1024, 16, 7))  # out, in, LoRA rank, tasks


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    from mergekit_wudi.solvers import subspace_merging
    from mergekit_wudi.solvers.subspace_merging import merge_task_vectors as subspace_merge
    from mergekit_wudi.solvers.wudi import merge_task_vectors

    torch.set_num_threads(1)
    rows = []
    for out, inn, rank, tasks in SHAPES:
        g = torch.Generator().manual_seed(0)
        w0 = torch.randn(out, inn, generator=g) * 0.02
        lora = torch.stack([torch.randn(out, rank, generator=g) @ torch.randn(rank, inn, generator=g) * 1e-3
                            for _ in range(tasks)])
        bf16 = (w0.bfloat16() + lora.bfloat16()).float() - w0.bfloat16().float()
        base = torch.zeros(out, inn)
        row = {"shape": [out, inn], "lora_rank": rank, "tasks": tasks}
        row["closed_form_s"] = timed(lambda: merge_task_vectors(base, lora, solver="closed_form"))
        row["tsv_merge_s"] = timed(lambda: subspace_merge(base, lora, "tsv_merge"))
        row["decorrelated_float32_s"] = timed(lambda: merge_task_vectors(base, lora, solver="decorrelated"))
        row["decorrelated_bf16_s"] = timed(lambda: merge_task_vectors(base, bf16, solver="decorrelated"))
        keep, subspace_merging.LOW_RANK_SKETCH = subspace_merging.LOW_RANK_SKETCH, 10 ** 9
        try:
            row["decorrelated_full_svd_s"] = timed(lambda: merge_task_vectors(base, lora, solver="decorrelated"))
        finally:
            subspace_merging.LOW_RANK_SKETCH = keep
        row["decorrelated_float32_over_closed_form"] = row["decorrelated_float32_s"] / row["closed_form_s"]
        row["decorrelated_bf16_over_closed_form"] = row["decorrelated_bf16_s"] / row["closed_form_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    path = RESULTS / "decorrelated_speed.json"
    path.write_text(json.dumps({"issue": 21, "threads": 1, "machine": machine_info(torch.device("cpu")),
                                "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
