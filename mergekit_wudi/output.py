"""What a ``mergekit-yaml`` merge with our methods does to its output folder, in one place.

mergekit writes straight into ``OUT``: files it does not write are kept, but a failed run leaves a
half-written model. For merges that use this package's methods, :func:`install` wraps
``mergekit.merge.run_merge`` (the one function that writes every output file: shards, config,
model card, tokenizer) so that

1. the config is checked first (:func:`mergekit_wudi.validation.check_merge_config`,
   :func:`mergekit_wudi.inputs.check_model_files`): a typo or a broken input file is an error
   before any tensor is read;
2. mergekit writes into a staging folder (:func:`staged_output`); ``OUT`` is untouched until the
   merge has succeeded;
3. the finished files are committed: if ``OUT`` did not exist, the staging folder is renamed to it
   (one atomic step); otherwise each written file replaces its namesake in ``OUT`` by an atomic
   rename, after a journal listing them was written. Files in ``OUT`` that the merge does not write
   are never touched (weight files of an earlier merge that could shadow the new one are named in
   a warning). SIGINT/SIGTERM wait until the renames are done. ``OUT`` may be ``.``; a symlink
   ``OUT`` is written through to its target; a regular file ``OUT`` is an error.
4. a staging folder left by a killed run (its lock is free) is removed by the next run, and a commit
   that was interrupted by SIGKILL (journal present) is completed by it. A live run's folder is
   locked (``flock``) and never touched.

Merges with mergekit's own methods run exactly as mergekit runs them.

Why a wrapper around ``run_merge``: mergekit 0.1.5 has no output hook, and ``run_merge`` is the one
place that sees every file of a merge (the tensor writer alone would miss config, card and tokenizer).
The wrapper keeps its signature and result, acts only for this package's methods, and is installed
once, here, by the start-up hook (a user calling ``mergekit.merge.run_merge`` gets it too).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List

LOG = logging.getLogger(__name__)
STAGING_PREFIX = ".mergekit-wudi-staging-"
_FRESH_PREFIX = ".mergekit-wudi-new-"  # a staging folder before its lock is held
_LOCK, _JOURNAL, _PAYLOAD = "lock", "commit.json", "payload"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def install(merge_module) -> None:
    """Wrap ``merge_module.run_merge`` (idempotent). Called by :mod:`mergekit_wudi._startup` right
    after ``mergekit.merge`` is imported, so ``mergekit-yaml`` imports the wrapped function."""
    original = merge_module.run_merge
    if getattr(original, "_mergekit_wudi_wrapped", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        from mergekit_wudi.registration import method_names

        if merge_config.merge_method not in method_names():
            return original(merge_config, out_path, options, config_source=config_source)
        check_before_merge(merge_config, config_source, options)
        with staged_output(out_path) as staging:
            return original(merge_config, staging, options, config_source=config_source)

    run_merge._mergekit_wudi_wrapped = True
    merge_module.run_merge = run_merge


def check_before_merge(merge_config, config_source=None, options=None) -> None:
    """Everything that can be checked before a tensor is read: parameter names and values (from the
    YAML text when there is one, so that keys pydantic drops are seen too) and the input files; then,
    for an iterative solver on the CPU, the time estimate of :mod:`mergekit_wudi.estimate`."""
    import yaml

    from mergekit_wudi.estimate import warn_if_slow_on_cpu
    from mergekit_wudi.inputs import check_model_files
    from mergekit_wudi.validation import check_merge_config

    raw = yaml.safe_load(config_source) if config_source else None
    if not isinstance(raw, dict):
        raw = merge_config.model_dump(mode="json", exclude_none=True)
    check_merge_config(raw)
    base_shapes = check_model_files(merge_config)
    warn_if_slow_on_cpu(merge_config, options, base_shapes)


def _resolve_output(out_path) -> Path:
    out = Path(os.path.realpath(os.path.expanduser(str(out_path))))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out_path)!r} is an existing file, not a folder; nothing was merged")
    return out


@contextlib.contextmanager
def staged_output(out_path) -> Iterator[str]:
    """Yield a folder to write a model into; it is committed to ``out_path`` only if the block succeeds."""
    out = _resolve_output(out_path)
    home = out if out.is_dir() else out.parent
    created = _make_parents(home)
    recover(home)
    if home != out.parent and out.parent.is_dir():
        recover(out.parent)
    staging, lock = _locked_staging(home)
    payload = staging / _PAYLOAD / out.name  # mergekit names the model card after this folder
    payload.parent.mkdir()
    committed = False
    try:
        with _terminate_as_exception():
            yield str(payload)
            _commit(staging, payload, out)
        committed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.close()
        for folder in [] if committed else created:  # parents made for an OUT that was never written
            with contextlib.suppress(OSError):
                folder.rmdir()


def _locked_staging(home: Path):
    """A new staging folder in ``home``, visible under its final name only once its lock is held."""
    fresh = Path(tempfile.mkdtemp(prefix=_FRESH_PREFIX, dir=home))
    lock = open(fresh / _LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    staging = home / (STAGING_PREFIX + fresh.name[len(_FRESH_PREFIX):])
    os.rename(fresh, staging)
    return staging, lock


def _make_parents(home: Path) -> List[Path]:
    """Create ``home`` and its missing parents; return the created ones, deepest first."""
    missing = []
    folder = home
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    home.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def _terminate_as_exception():
    """SIGTERM raises ``SystemExit`` (so cleanup runs) instead of killing the process outright."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block is done, then act on them as usual.

    Python runs signal handlers in the main thread whichever thread received the signal (a blocking
    mask would not do: torch's worker threads leave SIGTERM unblocked), so a recording handler does it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for signum in received[:1]:
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


def _files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _commit(staging: Path, payload: Path, out: Path) -> None:
    if not out.exists():
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(payload, out)  # one atomic step; fails if OUT appeared meanwhile
            return
    files = _files(payload)
    _warn_shadowing_weights(out, files)
    journal = staging / (_JOURNAL + ".tmp")
    journal.write_text(json.dumps({"out": str(out), "files": files}))
    os.replace(journal, staging / _JOURNAL)
    with _signals_deferred():
        _move_files(payload, out, files)


def _move_files(payload: Path, out: Path, files: List[str]) -> None:
    for relative in files:
        source = payload / relative
        if source.exists() or source.is_symlink():
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)


def _warn_shadowing_weights(out: Path, written: List[str]) -> None:
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in written):
        return
    stale = [name for name in _files_shallow(out) if name.endswith(WEIGHT_SUFFIXES) and name not in written]
    if stale:
        LOG.warning(
            "%s holds weight files this merge did not write: %s. They are kept (mergekit-wudi never deletes "
            "files it did not write), but a loader may read them instead of the new model (transformers "
            "prefers model.safetensors over a sharded index). Delete them if they are left from an earlier merge.",
            out, ", ".join(stale),
        )


def _files_shallow(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def recover(folder) -> List[str]:
    """Clean up after killed runs in ``folder``: for each staging folder whose lock is free (its run
    is dead), complete its commit if it had started one (journal present), then remove it. Returns
    what was done, one line each (also logged)."""
    done = []
    leftovers = [p for prefix in (STAGING_PREFIX, _FRESH_PREFIX) for p in sorted(Path(folder).glob(prefix + "*"))]
    for staging in leftovers:
        try:
            lock = open(staging / _LOCK)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue  # a live run holds it
        except OSError:
            continue  # not one of ours, or unreadable: leave it
        with lock:
            journal = staging / _JOURNAL
            if journal.exists():
                record = json.loads(journal.read_text())
                out = Path(record["out"])
                _move_files(staging / _PAYLOAD / out.name, out, record["files"])
                done.append(f"completed the interrupted commit of {out} ({len(record['files'])} files)")
            shutil.rmtree(staging, ignore_errors=True)
            done.append(f"removed the staging folder of a killed run: {staging}")
    for line in done:
        LOG.warning(line)
    return done
