"""Where the callback keeps its snapshots: one folder, one file per role, written by rank 0.

Layout of ``<output>``::

    base.safetensors                 the pretrained weights (sequential mode)
    experts/task_<i>.safetensors     task i's weights at the end of its fit
    heads/task_<i>.safetensors       task i's tensors kept out of the merge
    grams/task_<i>.safetensors       task i's input Grams (``input_grams`` mode, or its LoRA A update:
                                     ``lora_a_updates``), written before its expert
    grams/task_<i>.a_start.safetensors  task i's LoRA A factors when its training started (``lora_a_updates``)
    merged.safetensors               the merge; written last, so its presence means a whole merge

Every file is written atomically and carries ``run_id`` in its safetensors metadata. The callback's
checkpointable state holds only paths; the metadata lets a process that did not run a fit itself
(the parent of a ``ddp_spawn`` run, which fits a pickled copy of the callback) find what that fit
saved (:meth:`SnapshotStore.recover`), without a second copy of the state on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from lightning.pytorch import Trainer

from mergekit_wudi.io import save_safetensors_atomic
from mergekit_wudi.lightning.distributed import barrier, is_global_zero

MERGED_NAME = "merged.safetensors"
FOLDERS = ("experts", "grams", "heads", "adapters")  # what the store writes besides the base and merged files


def expert_id(index: int) -> str:
    """The id of the ``index``-th expert in mergekit's per-model parameters (``weight: {task_0: 1.0}``)."""
    return f"task_{index}"


def run_id_of(path: Path) -> Optional[str]:
    """The ``run_id`` in a safetensors file's metadata (None: no such file, or not one of ours)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("run_id")
    except Exception:  # noqa: BLE001  (an unreadable file is not ours)
        return None


class SnapshotStore:
    """Paths and rank-zero writes under one output folder, for one run (``run_id``)."""

    def __init__(self, folder: str, run_id: str) -> None:
        self.folder = Path(folder)
        self.run_id = run_id

    @property
    def base_path(self) -> str:
        return str(self.folder / "base.safetensors")

    @property
    def merged_path(self) -> str:
        return str(self.folder / MERGED_NAME)

    def expert_path(self, index: int) -> str:
        return str(self.folder / "experts" / f"{expert_id(index)}.safetensors")

    def gram_path(self, index: int) -> str:
        return str(self.folder / "grams" / f"{expert_id(index)}.safetensors")

    def a_start_path(self, index: int) -> str:
        return str(self.folder / "grams" / f"{expert_id(index)}.a_start.safetensors")

    def head_path(self, index: int) -> str:
        return str(self.folder / "heads" / f"{expert_id(index)}.safetensors")

    def writes(self, path: str) -> bool:
        """Whether ``path`` (after symlinks) is, or lies in, something this store writes: the base and
        merged files, or its ``experts`` / ``grams`` / ``heads`` / ``adapters`` folders."""
        target = Path(os.path.realpath(path))
        folder = Path(os.path.realpath(self.folder))
        if target in (folder / "base.safetensors", folder / MERGED_NAME):
            return True
        return any(target.is_relative_to(folder / sub) for sub in FOLDERS)

    def written(self) -> List[Path]:
        """What lies where this store writes: the base and merged files, the ``task_<i>`` files of its folders and
        the adapter folders (not the temporary files of an interrupted atomic write, nor a user's other files)."""
        found = [p for p in (Path(self.base_path), Path(self.merged_path)) if p.exists()]
        for sub in FOLDERS:
            if (self.folder / sub).is_dir():
                found += sorted(p for p in (self.folder / sub).glob(expert_id("*"))
                                if (p.is_dir() if sub == "adapters" else p.suffix == ".safetensors"))
        return found

    def other_runs_files(self) -> List[Path]:
        """The files another run (or anyone else) left where this store writes, which this run would
        replace; empty once this run has written here (its own later writes replace its own files)."""
        found = self.written()
        if any(run_id_of(p) == self.run_id for p in found):
            return []
        return found

    def save(
        self,
        trainer: Optional[Trainer],
        state: Mapping[str, torch.Tensor],
        path: str,
        metadata: Optional[Dict[str, str]] = None,
    ) -> str:
        """Write ``state`` to ``path`` on rank 0 (atomically), then wait for every rank."""
        if is_global_zero(trainer):
            save_safetensors_atomic(dict(state), path, metadata={**(metadata or {}), "run_id": self.run_id})
        barrier(trainer)
        return path

    def recover(self, experts: List[str]) -> Dict[str, object]:
        """What this run saved that the caller's state lacks: ``base``, further ``experts``,
        ``heads`` and ``merged`` paths of files labelled with this run's id (see module doc)."""
        found: Dict[str, object] = {}
        if run_id_of(Path(self.base_path)) == self.run_id:
            found["base"] = self.base_path
        index, more = len(experts), []
        while run_id_of(Path(self.expert_path(index))) == self.run_id:
            more.append(self.expert_path(index))
            index += 1
        found["experts"] = list(experts) + more
        if run_id_of(Path(self.merged_path)) == self.run_id:
            found["merged"] = self.merged_path
            heads = []
            while run_id_of(Path(self.head_path(len(heads)))) == self.run_id:
                heads.append(self.head_path(len(heads)))
            found["heads"] = heads
        return found
