"""Atomic file writes and expert loading for the Lightning callback and the LwPTV mask files.

(A ``mergekit-yaml`` output folder is handled by :mod:`mergekit_wudi.output`.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]


def umask() -> int:
    """The process's umask (read without changing it for longer than an instant)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[str]:
    """Yield a temporary path in the same folder; it replaces ``path`` only if the block succeeds."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    mode = 0o666 & ~umask()  # mkstemp makes 0600; a user expects what open() would give
    os.chmod(tmp, mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # again: a writer may have replaced the file (safetensors' save_file does)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path: PathLike, metadata=None) -> None:
    """``safetensors.torch.save_file`` that never leaves a partial file at ``path``."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file or a Lightning/PyTorch checkpoint (``weights_only``).

    A missing file is a ``FileNotFoundError``, one that cannot be read as weights (truncated, not a
    checkpoint, not a state dict of tensors) a ``ValueError``; both name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such expert/base file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with _named_errors(path):
            return load_file(str(path))
    return _checkpoint_state(path, mmap=False)


def tensor_shapes(path: PathLike) -> Dict[str, Tuple[int, ...]]:
    """``{name: shape}`` of a weights file, without reading its tensors: a safetensors header, or a
    checkpoint memory-mapped. Raises like :func:`load_state_dict` for a file that is not readable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such expert/base file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with _named_errors(path), safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    return {name: tuple(t.shape) for name, t in _checkpoint_state(path, mmap=True).items()}


@contextlib.contextmanager
def _named_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001  (safetensors, pickle and zip errors have no common base)
        detail = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's advice would mislead
        raise ValueError(f"{path}: cannot be read as weights (truncated or not a weights file?): "
                         f"{type(error).__name__}: {detail}") from error


def _checkpoint_state(path: Path, mmap: bool) -> Dict[str, torch.Tensor]:
    with _named_errors(path):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not (mmap and "mmap can only be used" in str(error)):  # a legacy (non-zip) file: no mmap
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: expected a state dict (or a checkpoint with 'state_dict') of tensors")
    return checkpoint
