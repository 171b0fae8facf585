#!/usr/bin/env python
"""Speed / scale benchmark of ``merge_method: wudi`` (issue 3). Not a test: it takes minutes.

What it does, offline, in ONE invocation (so that ratios compare like with like on a shared machine):

1. Builds (and caches under ``--cache-dir``, default ``benchmarks/cache/``) an LLM-shaped model: Qwen2.5-0.5B's
   config (hidden 896, intermediate 4864, GQA 14/2 heads, vocab 151936, tied embeddings) with random bf16 base
   weights and 3 experts = base + rank-8 delta + small dense noise per 2-D weight (small noise on 1-D weights), as safetensors.
2. Runs the real ``mergekit-yaml`` for task_arithmetic, ties and wudi with each solver, each merge in its own
   wrapper process so that its peak RSS (getrusage of the child) is that merge's own. ``adam`` and ``lowrank``
   would take hours on CPU for the whole model: they run on a 1-layer model built the same way, next to
   task_arithmetic on that same model, and the full-model time is EXTRAPOLATED (labelled as such).
3. Times the floor: the float32 Gram product of every linear weight of the model (in the cheaper space), and the
   Gram plus a Cholesky solve.
4. Per-layer microbenchmark: the authors' naive loop (tests/reference_wudi.py) vs ``adam`` vs ``closed_form`` vs
   ``spectral`` on 1024x1024, 4864x896 and 896x4864 weights with 3-8 experts; max relative difference of ``adam``
   vs the naive loop.
5. Writes ``benchmarks/results/speed.json`` and ``speed.md`` (README tables, machine named); ``--quick`` writes
   ``speed_quick.json`` / ``speed_quick.md`` instead and never touches the full results. At the end it prints the
   size and path of the cache folder (the 24-layer models take a few GB; ``--clean-cache`` deletes it).

    python benchmarks/speed.py            # full: 24 layers (~15-25 min on 2 busy CPU cores)
    python benchmarks/speed.py --quick    # 2 layers, short microbenchmark (a few minutes) -> speed_quick.*
    python benchmarks/speed.py --cuda     # passes --cuda to mergekit-yaml and runs the microbenchmark on GPU
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*, tests.*

from benchmarks.speedbench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
