"""Helpers shared by the speed and quality benchmarks: paths, output names, hashing, logging,
statistics, machine description and the report on what a run leaves in its cache folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
DEFAULT_CACHE = BENCHMARKS / "cache"
RESULTS = BENCHMARKS / "results"


class MissingDependency(RuntimeError):
    """An optional package or data file the benchmark needs is not installed."""


def require(module: str, package: str, why: str = ""):
    """Import ``module`` or raise :class:`MissingDependency` naming the package to install."""
    try:
        return __import__(module)
    except ImportError as exc:
        raise MissingDependency(
            f"the benchmark needs the package '{package}'{f' ({why})' if why else ''}; "
            "install the benchmark extras with: pip install -r benchmarks/requirements.txt"
        ) from exc


def output_stem(kind: str, quick: bool, name: str | None = None) -> str:
    """File stem of a run's results: ``name`` if given, else ``<kind>_quick`` for --quick, else ``<kind>``.
    A quick run never writes the full run's files unless the user names them explicitly."""
    return name or (f"{kind}_quick" if quick else kind)


def stable_hash(obj, length: int = 12) -> str:
    """SHA-1 of the canonical JSON of ``obj`` (same value -> same key, across runs and machines)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def mean_std(xs: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    mu = mean(xs)
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mu, sd


def make_logger(path: Path | None) -> Callable[[str], None]:
    """``log(msg)``: a time-stamped line to stdout and (appended) to ``path``."""
    handle = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if handle:
            handle.write(line + "\n")
            handle.flush()

    return log


def folder_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def report_cache(path: Path, clean: bool, what: str) -> str:
    """Remove ``path`` (``clean``) or say how much disk it holds and how to remove it. Returns the message."""
    size = folder_bytes(path)
    if clean:
        shutil.rmtree(path, ignore_errors=True)
        msg = f"removed the cache {path} ({size / 2**30:.2f} GiB: {what})"
    else:
        msg = (f"the cache {path} holds {size / 2**30:.2f} GiB ({what}; the next run reuses it). "
               f"Remove it with: rm -rf {path}   (or run with --clean-cache)")
    print(msg, flush=True)
    return msg


def machine_info(device=None) -> dict:
    """CPU model, cores, memory, torch / python / mergekit versions and the device used."""
    import torch

    info = {
        "nproc": os.cpu_count(),
        "nproc_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _proc_field("/proc/cpuinfo", "model name", lambda v: v.split(":", 1)[1].strip()) or "",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "mem_total_gib": _proc_field("/proc/meminfo", "MemTotal", lambda v: round(int(v.split()[1]) / 2**20, 1)),
        "device": str(device), "gpu": None,
    }
    try:
        from importlib.metadata import version

        info["mergekit"] = version("mergekit")
    except Exception:  # noqa: BLE001 - informative only
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _proc_field(path: str, prefix: str, parse):
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return parse(line)
    except OSError:
        pass
    return None
