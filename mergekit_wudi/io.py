"""Atomic writes and expert loading shared by the adapters."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Union

import torch

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_directory(out_path: PathLike) -> Iterator[str]:
    """Yield a temporary folder that replaces ``out_path`` only if the block succeeds.

    The folder is ``<parent>/.<name>.tmp-XXXX/<name>`` so tools that name outputs after the folder
    (mergekit's model card) see the final name. On error it is removed and ``out_path`` is untouched.
    """
    out = Path(out_path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    target = staging / out.name
    try:
        yield str(target)
        if out.exists():
            old = staging / ".previous"
            os.replace(out, old)
        os.replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[str]:
    """Yield a temporary path in the same folder; it replaces ``path`` only if the block succeeds."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
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
    """Weights from a ``.safetensors`` file or a Lightning/PyTorch checkpoint (``weights_only``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such expert/base file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: expected a state dict (or a checkpoint with 'state_dict') of tensors")
    return checkpoint
