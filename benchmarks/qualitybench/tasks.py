"""Where the quality benchmark's tasks come from, and the format every task source must follow.

A task source is a function ``fn(seed: int) -> dict`` named on the command line as
``--tasks-from module:function`` (an importable module, e.g. ``my_pkg.my_tasks:build``) or
``--tasks-from path/to/file.py:function``. The default is the built-in offline text tasks,
``benchmarks.text_tasks:build_tasks``. It returns, for every task name (any string):

    {"labels": ["neg", "pos", ...],                 # class names; label ids are 0..len(labels)-1
     "train": [(text, label_id), ...],              # fine-tunes that task's expert
     "validation": [(text, label_id), ...],         # chooses hyper-parameters (lambda, scaling, ...)
     "test": [(text, label_id), ...]}               # the reported accuracy

Nothing depends on the names: the order of the returned dict fixes each task's training seed
(``seed * 1000 + position``) and the order of the tables; caches are keyed by the content.
An optional attribute ``fn.quick_tasks`` (a list of names) picks the tasks of ``--quick``;
without it ``--quick`` uses the first two tasks.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from ..common import stable_hash

SPLITS = ("train", "validation", "test")
DEFAULT_SOURCE = "benchmarks.text_tasks:build_tasks"


class TaskFormatError(ValueError):
    """A task source returned something that is not in the documented format."""


def load_task_source(spec: str) -> Callable[[int], dict]:
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--tasks-from {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise ValueError(f"--tasks-from {spec!r}: no such file {path}")
        loader_spec = importlib.util.spec_from_file_location(f"_bench_tasks_{stable_hash(str(path))}", path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"--tasks-from {spec!r}: {module_name} has no function {func_name!r}")
    return fn


def validate_tasks(tasks, source: str = "the task source") -> dict:
    """Check the documented format; raise :class:`TaskFormatError` naming the task, split and example."""
    if not isinstance(tasks, dict) or not tasks:
        raise TaskFormatError(f"{source} must return a non-empty dict {{task name: task}}, got {type(tasks).__name__}")
    for name, task in tasks.items():
        where = f"{source}, task {name!r}"
        if not isinstance(name, str) or not name:
            raise TaskFormatError(f"{source}: task names must be non-empty strings, got {name!r}")
        if not isinstance(task, dict) or "labels" not in task:
            raise TaskFormatError(f"{where}: expected a dict with 'labels' and the splits {SPLITS}")
        labels = task["labels"]
        if not isinstance(labels, (list, tuple)) or len(labels) < 2:
            raise TaskFormatError(f"{where}: 'labels' must list at least 2 class names, got {labels!r}")
        for split in SPLITS:
            examples = task.get(split)
            if not isinstance(examples, (list, tuple)) or not examples:
                raise TaskFormatError(f"{where}: split {split!r} must be a non-empty list of (text, label_id)")
            for i, example in enumerate(examples):
                ok = isinstance(example, (list, tuple)) and len(example) == 2 and isinstance(example[0], str)
                if not ok or not isinstance(example[1], int) or isinstance(example[1], bool) \
                        or not 0 <= example[1] < len(labels):
                    raise TaskFormatError(f"{where}, {split}[{i}]: expected (text: str, label_id: int in "
                                          f"0..{len(labels) - 1}), got {example!r}")
    return tasks


def load_tasks(spec: str, seed: int) -> tuple[dict, list[str]]:
    """(all tasks in the source's order, the names ``--quick`` uses)."""
    fn = load_task_source(spec)
    tasks = validate_tasks(fn(seed), source=spec)
    quick = list(getattr(fn, "quick_tasks", None) or list(tasks)[:2])
    unknown = [t for t in quick if t not in tasks]
    if unknown:
        raise TaskFormatError(f"{spec}: quick_tasks names {unknown}, which the source did not return")
    return tasks, quick


def select_tasks(tasks: dict, names: list[str]) -> dict:
    """The named tasks, in the source's order; an unknown name is an error listing the known ones."""
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; the task source has {list(tasks)}")
    return {t: tasks[t] for t in tasks if t in names}


def task_fingerprint(task: dict, splits=SPLITS) -> str:
    """Hash of a task's labels and examples (of ``splits``): changes whenever its content does."""
    return stable_hash({"labels": list(task["labels"]),
                        **{s: [[x, int(y)] for x, y in task[s]] for s in splits}}, length=16)
