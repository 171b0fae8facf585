"""The distributed part of the callback: which rank merges which tensors, and gathering results.

Under multi-process DDP every rank merges a share of the tensors (:func:`shard_names`) and the
shares are gathered on every rank (:func:`gather_results`); an error on any rank is re-raised on
all of them, so no rank waits forever for a peer that failed.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy


def distributed_world(trainer: Optional[Trainer]) -> Tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, ``(1, 0)`` without one."""
    if trainer is None or trainer.world_size <= 1:
        return 1, 0
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 0
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


def is_sharded_module(trainer: Optional[Trainer]) -> bool:
    """The module is FSDP-sharded (it stays sharded on device after the fit)."""
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def is_global_zero(trainer: Optional[Trainer]) -> bool:
    return trainer is None or trainer.is_global_zero


def barrier(trainer: Optional[Trainer]) -> None:
    if trainer is not None:
        trainer.strategy.barrier()


def broadcast(trainer: Optional[Trainer], obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a trainer)."""
    return obj if trainer is None else trainer.strategy.broadcast(obj)


def shard_names(names: Sequence[str], sizes: Sequence[int], world_size: int) -> List[List[str]]:
    """Deterministic greedy split of tensors over ranks, largest first, balancing element counts."""
    loads = [0] * world_size
    shares: List[List[str]] = [[] for _ in range(world_size)]
    for size, name in sorted(zip(sizes, names), key=lambda t: -t[0]):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += size
    return shares


def gather_results(
    compute: Callable[[], Dict[str, torch.Tensor]], trainer: Optional[Trainer], what: str
) -> Dict[str, torch.Tensor]:
    """Run ``compute`` (this rank's share) and return the union of every rank's results.

    An exception on any rank becomes a ``RuntimeError`` on every rank that names the failed ranks.
    """
    world_size, rank = distributed_world(trainer)
    if world_size == 1:
        return compute()
    try:
        outcome: Tuple[str, Any] = ("ok", compute())
    except Exception as error:  # noqa: BLE001  (re-raised on every rank below)
        outcome = ("error", f"rank {rank}: {type(error).__name__}: {error}")
    gathered: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, outcome)
    errors = [payload for kind, payload in gathered if kind == "error"]
    if errors:
        raise RuntimeError(f"{what} failed: " + "; ".join(errors))
    results: Dict[str, torch.Tensor] = {}
    for _, payload in gathered:
        results.update(payload)
    return results
