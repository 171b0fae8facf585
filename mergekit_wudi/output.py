"""What a ``mergekit-yaml`` merge with our methods does to its output folder ``OUT``, in one place.

mergekit writes straight into ``OUT``: a failed run leaves a half-written model. For merges that use
this package's methods, :func:`install` wraps ``mergekit.merge.run_merge`` (the one function that
writes every output file: shards, config, model card, tokenizer). The guarantees:

1. **Checked first.** Before any tensor is read: ``OUT`` must not be empty (``""`` is an error,
   never the current folder), not a regular file, and neither equal to, inside, nor containing a
   local model folder of the config (:func:`check_output_path`; every model reference counts:
   ``base_model``, ``models``, ``slices`` sources, tokenizer sources, LoRA ``base+adapter`` paths;
   hub ids are skipped), ``OUT/config.json`` is not a folder; then the config and the input files
   (:func:`mergekit_wudi.validation.check_merge_config`, :func:`mergekit_wudi.validation.check_model_files`).
2. **Staged.** mergekit writes into a staging folder made by ``mkdtemp`` (mode 0700, locked with
   ``flock`` for the run's whole life): inside ``OUT`` when it exists, else beside it, named
   ``.mergekit-wudi-staging-<OUT's name>-XXXXXXXX``. ``OUT`` is untouched until the merge succeeded.
3. **Committed all or nothing.** A new ``OUT`` appears by one atomic rename of the finished folder.
   Into an existing ``OUT``, under ``OUT``'s commit lock (``.mergekit-wudi.lock``; a second merge
   into the same ``OUT`` waits for it): the files about to be replaced are first kept (hard links)
   in the staging folder, a journal lists the new files, then each one replaces its namesake by an
   atomic rename, and weight files that an earlier merge of ours wrote and this one does not (old
   shards; ``.mergekit-wudi-manifest.json`` records what we wrote, with each file's size, mtime and
   inode: a file changed since, or named by a manifest that is a symlink, not yours or of the old
   names-only format, is not ours and is kept) are removed. SIGINT/SIGTERM wait
   for the renames. An exception during them (a full disk) puts every replaced file back: ``OUT`` is
   exactly as it was, but for an empty lock file (if putting back fails too, the journal stays and
   the error says so). A folder in ``OUT`` where the merge writes a file is an error before any
   rename (``OUT`` unchanged). A SIGKILL between two renames leaves ``OUT`` partly new until the next merge
   into ``OUT`` (or :func:`recover`) rolls the journal forward: ``OUT`` is then the new model.
   Files this merge does not write are kept; replaced files that no earlier merge of ours wrote
   (your own README.md / config.json) and weight files we did not write that could shadow the new
   model are named in a warning. ``OUT`` may be ``.``; a symlink ``OUT`` is written through.
4. **Recovery trusts nothing it did not make.** Before a merge, :func:`recover` looks at staging
   folders inside ``OUT`` and at those beside it named for ``OUT`` only. It never writes outside
   ``OUT`` (beside ``OUT`` it only removes its own dead staging folders, without following links),
   and ignores, naming them in a warning, staging folders that are symlinks, owned by another user
   or not of mode 0700, and folders named like ours (the exact ``mkdtemp`` pattern is required) that
   hold anything a staging folder never holds (your data). A journal holds only relative names: the target is the folder the journal
   lies in. A journal that cannot be trusted (not valid JSON, another format, absolute or ``..``
   names, a symlink among its files or on their way) is never replayed: its folder is renamed to
   ``.mergekit-wudi-rejected-*`` in ``OUT`` (kept for you to inspect and delete), with a warning,
   and the merge proceeds; so is one naming a folder of ``OUT`` as a file, or one whose replay fails
   (an ``OSError``). A live run's folder is locked and never touched.

Merges with mergekit's own methods run exactly as mergekit runs them.

Why a wrapper around ``run_merge``: mergekit 0.1.5 has no output hook, and ``run_merge`` is the one
place that sees every file of a merge (the tensor writer alone would miss config, card and tokenizer).
The wrapper keeps its signature and result, acts only for this package's methods, and is installed
once, here, by the start-up hook (a user calling ``mergekit.merge.run_merge`` gets it too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Iterator, List, Optional, Sequence, Tuple

LOG = logging.getLogger(__name__)
STAGING_PREFIX = ".mergekit-wudi-staging-"
REJECTED_PREFIX = ".mergekit-wudi-rejected-"  # a staging folder whose journal could not be trusted
MANIFEST = ".mergekit-wudi-manifest.json"  # in OUT: the files our last merge wrote
COMMIT_LOCK = ".mergekit-wudi.lock"  # in OUT: held while a commit or a replay changes OUT
_FRESH_PREFIX = ".mergekit-wudi-new-"  # a staging folder before its lock is held
_LOCK, _JOURNAL, _PAYLOAD, _NEW, _OLD = "lock", "commit.json", "payload", "new", "old"
_STAGING_ENTRIES = frozenset({_LOCK, _JOURNAL, _JOURNAL + ".tmp", _PAYLOAD, _NEW, _OLD})  # all a staging folder holds
_FRESH_ENTRIES = frozenset({_LOCK})
_JOURNAL_VERSION = 2
_MANIFEST_VERSION = 2  # files: {name: [size, mtime_ns, inode]} (version 1, names only, is not trusted)
_RANDOM = re.compile(r"[a-z0-9_]{8}")  # the part tempfile.mkdtemp adds
_FRESH_GRACE_S = 60.0  # a fresh folder is locked within microseconds; an older unlocked one is dead
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


class OutputPathError(ValueError):
    """An output folder a merge must not write into; the message names why."""


class _Untrusted(Exception):
    """A staging folder or journal that recovery must not act on; the message says why."""


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
        check_output_path(merge_config, out_path)
        check_output_targets(resolve_output(out_path), ["config.json"])  # mergekit always writes it
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
    from mergekit_wudi.validation import check_merge_config, check_model_files

    raw = yaml.safe_load(config_source) if config_source else None
    if not isinstance(raw, dict):
        raw = merge_config.model_dump(mode="json", exclude_none=True)
    check_merge_config(raw)
    base_shapes = check_model_files(merge_config)
    warn_if_slow_on_cpu(merge_config, options, base_shapes)


# ---------------------------------------------------------------------------------------------
# The output path


def resolve_output(out_path) -> Path:
    """``out_path`` as an absolute real path; an empty path or a regular file is an error."""
    if out_path is None or not str(out_path).strip():
        raise OutputPathError(
            f"output path is empty ({str(out_path)!r}; an unset shell variable?): give the folder to write "
            "the merged model into; nothing was merged"
        )
    out = Path(os.path.realpath(os.path.expanduser(str(out_path))))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out_path)!r} is an existing file, not a folder; nothing was merged")
    return out


def _model_paths(node, where: str) -> Iterator[Tuple[str, str]]:
    """``(where in the config, path)`` of every model and LoRA path a mergekit config references."""
    from mergekit.common import ModelReference
    from pydantic import BaseModel

    if isinstance(node, ModelReference):
        yield where, node.model.path
        if node.lora is not None:
            yield f"{where} (LoRA adapter)", node.lora.path
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _model_paths(getattr(node, name), f"{where}.{name}" if where else name)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _model_paths(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _model_paths(value, f"{where}[{i}]")


def check_output_path(merge_config, out_path) -> None:
    """``out_path`` is usable (:func:`resolve_output`) and is neither a local model folder of
    ``merge_config``, nor inside one, nor contains one (paths compared after ``realpath``); names
    that are no local path (hub ids) are skipped. Nothing is read."""
    out = resolve_output(out_path)
    for where, path in _model_paths(merge_config, ""):
        local = os.path.expanduser(path)
        if not os.path.exists(local):
            continue
        model = Path(os.path.realpath(local))
        relation = ("is" if out == model else "is inside" if out.is_relative_to(model)
                    else "contains" if model.is_relative_to(out) else None)
        if relation:
            raise OutputPathError(
                f"output folder {out} {relation} the model folder {model} ({where}: {path!r}); the merge would "
                "overwrite or mix with an input model. Choose an output folder outside every model folder; "
                "nothing was read or written"
            )


# ---------------------------------------------------------------------------------------------
# Staging and commit


class _Staging:
    """A staging folder (mode 0700) and the open file whose ``flock`` says its run is alive."""

    def __init__(self, path: Path, lock):
        self.path, self.lock = path, lock
        self.keep = False  # a commit that could neither finish nor be undone: its journal must stay

    @classmethod
    def create(cls, home: Path, tag: str) -> "_Staging":
        """Made under a fresh name and renamed once locked, so recovery never sees it unlocked."""
        fresh = Path(tempfile.mkdtemp(prefix=_FRESH_PREFIX + tag, dir=home))
        lock = _open_lock(fresh / _LOCK)
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = home / (STAGING_PREFIX + fresh.name[len(_FRESH_PREFIX):])
        os.rename(fresh, path)
        return cls(path, lock)

    def move_into(self, out: Path) -> None:
        """Into ``OUT`` (same file system), so that its journal lies in the folder it commits to."""
        target = out / (STAGING_PREFIX + self.path.name[-8:])
        os.rename(self.path, target)
        self.path = target

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)
        self.lock.close()


def _beside_tag(out: Path) -> str:
    return out.name[:100] + "-"  # keeps the folder name within NAME_MAX


@contextlib.contextmanager
def staged_output(out_path) -> Iterator[str]:
    """Yield a folder to write a model into; it is committed to ``out_path`` only if the block succeeds."""
    out = resolve_output(out_path)
    inside = out.is_dir()
    created = [] if inside else _make_parents(out.parent)
    recover(out)
    staging = _Staging.create(out, "") if inside else _Staging.create(out.parent, _beside_tag(out))
    payload = staging.path / _PAYLOAD / out.name  # mergekit names the model card after this folder
    payload.parent.mkdir()
    committed = False
    try:
        with _terminate_as_exception():
            yield str(payload)
            _commit(staging, payload, out)
        committed = True
    finally:
        staging.close()
        for folder in [] if committed else created:  # parents made for an OUT that was never written
            with contextlib.suppress(OSError):
                folder.rmdir()


def _make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; return the created ones, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


@contextlib.contextmanager
def commit_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT``'s commit lock (waiting, with a log line, while another merge commits)."""
    with _open_lock(Path(out) / COMMIT_LOCK) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.warning("another merge is committing into %s; waiting for it to finish", out)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _open_lock(path: Path):
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.fdopen(os.open(path, os.O_RDWR | flags, 0o666), "r+")
    except PermissionError:  # a shared OUT whose lock file another user made
        return os.fdopen(os.open(path, os.O_RDONLY | flags), "r")


def _commit(staging: _Staging, payload: Path, out: Path) -> None:
    """Point 3 of the module docstring."""
    _write_manifest(payload)
    if not os.path.lexists(out):
        try:
            os.rename(payload, out)  # one atomic step
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise  # else OUT appeared meanwhile (another merge): commit into it
    with commit_lock(out):
        check_output_targets(out, _files(payload))
        if staging.path.parent != out:
            staging.move_into(out)
        new = staging.path / _NEW
        os.rename(staging.path / _PAYLOAD / out.name, new)
        files = sorted(_files(new), key=lambda name: name == MANIFEST)  # the manifest last
        remove = _plan_replacement(out, files)
        _keep_old_versions(staging.path, out, [f for f in files if os.path.lexists(out / f)] + remove)
        _write_journal(staging.path, files, remove)
        with _signals_deferred():
            try:
                _roll_forward(staging.path, out, files, remove)
            except BaseException:
                try:
                    _roll_back(staging.path, out, files, remove)
                except BaseException:
                    staging.keep = True
                    LOG.error("the commit into %s failed and could not be undone; its journal stays in %s: the "
                              "next merge into %s (or mergekit_wudi.output.recover) completes it", out, staging.path, out)
                    raise
                raise
            (staging.path / _JOURNAL).unlink()


def check_output_targets(out: Path, names: Sequence[str]) -> None:
    """No file the merge writes into ``OUT`` lands where ``OUT`` holds a folder (or, on its way, a
    non-folder): checked before any rename, so ``OUT`` is unchanged when this raises."""
    for name in names:
        path = out
        for i, part in enumerate(PurePosixPath(name).parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                break
            last = i == len(PurePosixPath(name).parts) - 1
            if last and stat.S_ISDIR(mode) or not last and not stat.S_ISDIR(mode):
                what = "a folder" if last else "not a folder"
                raise OutputPathError(
                    f"{path} is {what}, but the merge writes the file {out / name}: move or rename {path} and "
                    f"merge again; {out} was not changed"
                )


def _files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _identity(path: Path) -> List[int]:
    """``[size, mtime_ns, inode]`` of a file (not following a symlink): a rename keeps all three, a
    file saved over it or in its place changes at least one."""
    info = os.lstat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _write_manifest(payload: Path) -> None:
    files = {f: _identity(payload / f) for f in _files(payload) if f != MANIFEST}
    record = {"written_by": "mergekit-wudi", "version": _MANIFEST_VERSION, "files": files}
    (payload / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")


def _read_manifest(out: Path) -> List[str]:
    """The files our last merge into ``OUT`` wrote that are still the very files it wrote (same size,
    mtime and inode). None when the manifest is missing, unreadable, of the old names-only format, a
    symlink or not owned by you: a manifest anyone can copy or plant must not make a file ours."""
    path = out / MANIFEST
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ValueError(f"it is not a regular file owned by you (uid {os.geteuid()})")
            record = json.loads(handle.read())
        if not isinstance(record, dict) or record.get("version") != _MANIFEST_VERSION or not isinstance(record.get("files"), dict):
            raise ValueError(f"it is not a mergekit-wudi manifest of version {_MANIFEST_VERSION}")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as error:
        LOG.warning("%s is not used (%s): every file in %s counts as not written by us", path, error, out)
        return []
    ours = []
    for name, identity in record["files"].items():  # only compared: deletion is limited to OUT's top level
        with contextlib.suppress(OSError, ValueError):
            if _identity(out / name) == identity:
                ours.append(name)
    return ours


def _plan_replacement(out: Path, files: List[str]) -> List[str]:
    """Warn about what the commit replaces or leaves that is not ours; return our stale weight files."""
    ours = set(_read_manifest(out))
    foreign = [f for f in files if f != MANIFEST and os.path.lexists(out / f) and f not in ours]
    if foreign:
        LOG.warning(
            "%s holds files this merge replaces that no earlier mergekit-wudi merge wrote there: %s. They are "
            "replaced by the merge's own (move your files elsewhere before merging into this folder if you need them).",
            out, ", ".join(foreign),
        )
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
        return []
    stale = [p.name for p in sorted(out.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES) and p.name not in files
             and not p.is_symlink() and p.is_file()]
    kept = [name for name in stale if name not in ours]
    if kept:
        LOG.warning(
            "%s holds weight files this merge did not write: %s. They are kept (mergekit-wudi deletes only weight "
            "files its own earlier merge wrote there and that are unchanged since), but a loader may read them instead of the new model "
            "(transformers prefers model.safetensors over a sharded index). Delete them if they are not needed.",
            out, ", ".join(kept),
        )
    return [name for name in stale if name in ours]


def _keep_old_versions(staging: Path, out: Path, names: List[str]) -> None:
    """Hard links (copies where links fail) of the files the commit replaces or removes."""
    for name in names:
        _keep(out / name, staging / _OLD / name)


def _write_journal(staging: Path, files: List[str], remove: List[str]) -> None:
    tmp = staging / (_JOURNAL + ".tmp")
    with open(tmp, "w") as handle:
        json.dump({"version": _JOURNAL_VERSION, "files": files, "remove": remove}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, staging / _JOURNAL)


def _roll_forward(staging: Path, out: Path, files: Sequence[str], remove: Sequence[str]) -> None:
    """Move every new file still in the staging folder into ``OUT``, then delete ``remove``.
    Idempotent, so a replay after a SIGKILL (even one during a replay) completes the commit."""
    for name in files:
        source = staging / _NEW / name
        if os.path.lexists(source):
            os.replace(source, _inside(out, name, create=True))
    for name in remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_inside(out, name))


def _roll_back(staging: Path, out: Path, files: Sequence[str], remove: Sequence[str]) -> None:
    """Undo a partial :func:`_roll_forward`. Each new file goes back to the staging folder before its
    old version returns, so a SIGKILL here still leaves a journal that completes the commit."""
    for name in [*files, *remove]:
        target, new, old = out / name, staging / _NEW / name, staging / _OLD / name
        if name in files and (os.path.lexists(new) or not os.path.lexists(target)):
            continue  # never moved
        if name in files:
            _keep(target, new)
        if os.path.lexists(old):
            os.replace(old, target)
        elif name in files:
            os.unlink(target)
    (staging / _JOURNAL).unlink()


def _keep(source: Path, copy: Path) -> None:
    """A hard link ``copy`` of ``source`` (a copy where the file system refuses links)."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, copy, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, copy, follow_symlinks=False)


def _inside(root: Path, name: str, create: bool = False) -> Path:
    """``root / name`` for a checked relative ``name``, refusing a symlink on the way (``create``:
    make missing folders)."""
    folder = root
    for part in PurePosixPath(name).parts[:-1]:
        folder = folder / part
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            if not create:
                return root / name
            folder.mkdir()
            continue
        if not stat.S_ISDIR(mode):
            raise _Untrusted(f"{folder} is a symlink or not a folder")
    return root / name


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


# ---------------------------------------------------------------------------------------------
# Recovery


def recover(out_path) -> List[str]:
    """Clean up after killed runs that wrote to ``out_path``: inside it, replay each trusted journal
    (a commit interrupted by SIGKILL) and remove dead staging folders; beside it, remove dead staging
    folders named for it. What cannot be trusted is left alone or set aside (module docstring, 4).
    Returns what was done, one line each (also logged as warnings)."""
    out = Path(os.path.realpath(os.path.expanduser(str(out_path))))
    done: List[str] = []
    if out.is_dir():
        for path in _candidates(out, ""):
            done += _recover_one(path, out)
    if out.parent.is_dir():
        tag = _beside_tag(out)
        for path in _candidates(out.parent, tag):
            done += _recover_one(path, None)
    for line in done:
        LOG.warning(line)
    return done


def _candidates(folder: Path, tag: str) -> List[Path]:
    """Staging folders in ``folder``: named exactly as ours are (prefix, ``tag`` (empty inside ``OUT``,
    ``OUT``'s name beside it), then the 8 characters ``mkdtemp`` adds)."""
    found = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # e.g. a parent folder we may enter but not list
        return []
    for name in names:
        for prefix in (STAGING_PREFIX, _FRESH_PREFIX):
            if name.startswith(prefix + tag) and _RANDOM.fullmatch(name[len(prefix + tag):]):
                found.append(folder / name)
    return found


def _recover_one(path: Path, out: Optional[Path]) -> List[str]:
    """One staging folder: ``out`` is the folder it lies in when that is ``OUT``, None when beside it."""
    try:
        _check_ownership(path)
    except _Untrusted as reason:
        return [f"ignored {path}: {reason}; it was not made by you with mergekit-wudi, so nothing in it is used "
                "(remove it if you do not know it)"]
    fresh = path.name.startswith(_FRESH_PREFIX)
    if fresh and time.time() - os.lstat(path).st_mtime < _FRESH_GRACE_S:
        return []  # perhaps a run between mkdtemp and flock
    try:
        foreign = sorted(set(os.listdir(path)) - (_FRESH_ENTRIES if fresh else _STAGING_ENTRIES))
    except OSError as error:
        foreign = [f"(unlistable: {error.strerror})"]
    if foreign:
        return [f"ignored {path}: it holds {', '.join(foreign[:5])}, which no mergekit-wudi staging folder holds; "
                "it is left alone (remove it if you do not need it)"]
    try:
        lock = _open_lock_existing(path / _LOCK)
    except _Untrusted as reason:
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
            return [f"removed the staging folder of a killed run: {path}"]
        return [f"ignored {path}: {reason}"]
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # a live run holds it
        journal = path / _JOURNAL
        if out is None or fresh or not os.path.lexists(journal):
            shutil.rmtree(path, ignore_errors=True)  # rmtree never follows a symlink
            return [f"removed the staging folder of a killed run: {path}"]
        with commit_lock(out):
            try:
                files, remove = _read_journal(path, out)
            except _Untrusted as reason:
                aside = _set_aside(path, out)
                return [f"ignored the journal of {path}: {reason}. It was never replayed; the folder is kept as "
                        f"{aside} for you to inspect and delete (if a merge was killed while committing, {out} "
                        "may hold a partly written model: this merge replaces it)"]
            try:
                _roll_forward(path, out, files, remove)
            except (OSError, _Untrusted) as error:
                aside = _set_aside(path, out)
                return [f"could not replay the journal of {path} ({error}). The folder is kept as {aside} for you "
                        f"to inspect and delete; {out} may hold a partly written model: this merge replaces it"]
            journal.unlink()
        shutil.rmtree(path, ignore_errors=True)
        return [f"completed the interrupted commit of {out} ({len(files)} files) from {path}",
                f"removed the staging folder of a killed run: {path}"]


def _set_aside(path: Path, out: Path) -> Path:
    """Rename a staging folder whose journal is not trusted so that no recovery looks at it again."""
    for attempt in range(100):
        aside = out / f"{REJECTED_PREFIX}{path.name[len(STAGING_PREFIX):]}{'-%d' % attempt if attempt else ''}"
        try:
            os.rename(path, aside)  # fails on an existing non-empty folder: then try the next name
            return aside
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise OSError(f"cannot set {path} aside: too many {REJECTED_PREFIX}* folders in {out}")


def _check_ownership(path: Path) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise _Untrusted("it is a symlink")
    if not stat.S_ISDIR(info.st_mode):
        raise _Untrusted("it is not a folder")
    if info.st_uid != os.geteuid():
        raise _Untrusted(f"it is owned by uid {info.st_uid}, not by you (uid {os.geteuid()})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        raise _Untrusted(f"its mode is {oct(stat.S_IMODE(info.st_mode))}, not 0o700")


def _open_lock_existing(path: Path):
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise _Untrusted(f"its lock file cannot be opened ({error.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Untrusted("its lock is not a regular file")
    return os.fdopen(fd, "r+")


def _read_journal(staging: Path, out: Path) -> Tuple[List[str], List[str]]:
    """``(files, remove)`` of a journal, checked: format, relative names, no symlink on any path."""
    try:
        with os.fdopen(os.open(staging / _JOURNAL, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as handle:
            record = json.loads(handle.read())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _Untrusted(f"{staging / _JOURNAL} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or set(record) != {"version", "files", "remove"} or record["version"] != _JOURNAL_VERSION:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise _Untrusted(f"{staging / _JOURNAL} is not a mergekit-wudi journal of version {_JOURNAL_VERSION} "
                         f"(it holds {keys}; a journal never names its target folder)")
    files, remove = record["files"], record["remove"]
    if not isinstance(files, list) or not isinstance(remove, list):
        raise _Untrusted(f"{staging / _JOURNAL}: 'files' and 'remove' must be lists")
    for name in files + remove:
        _check_relative(name, staging)
    if any("/" in name for name in remove):
        raise _Untrusted(f"{staging / _JOURNAL}: 'remove' names a file below the top level")
    _check_no_link(staging, _NEW)
    for name in files:
        source = staging / _NEW / name
        if os.path.lexists(source):
            _check_no_link(staging / _NEW, name)
        _inside(out, name)
    for name in files + remove:
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(out / name).st_mode):
                raise _Untrusted(f"{staging / _JOURNAL} lists {name!r}, which is a folder in {out}, not a file")
    return files, remove


def _check_relative(name, staging: Path) -> None:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise _Untrusted(f"{staging / _JOURNAL} lists {name!r}, not a file name")
    path = PurePosixPath(name)
    if path.is_absolute() or str(path) != name or any(part in ("..", ".") for part in path.parts):
        raise _Untrusted(f"{staging / _JOURNAL} lists {name!r}: only plain relative names are allowed")


def _check_no_link(root: Path, name: str) -> None:
    """Every component of ``root / name`` is a real folder and the last one a regular file or folder."""
    path = root
    for part in PurePosixPath(name).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise _Untrusted(f"{path} is a symlink")
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise _Untrusted(f"{path} is not a regular file")
