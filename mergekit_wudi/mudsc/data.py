"""The unlabeled data MuDSC runs on: picking inputs out of batches, and the BatchNorm reset.

After units are averaged, BatchNorm running statistics no longer describe the merged model's
activations; MuDSC (arXiv 2403.01753), like REPAIR, recomputes them on data.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

__all__ = ["default_input_fn", "as_args", "take_batches", "modes_restored", "reset_batchnorm"]


def default_input_fn(batch: Any) -> Any:
    """Inputs of a batch, never its labels: ``(x, y, ...)`` -> ``x``; dict -> its first input-like key."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        for k in ("x", "input", "inputs", "input_ids", "pixel_values", "image", "images"):
            if k in batch:
                return batch[k]
        raise ValueError(f"mudsc: cannot find the inputs in a dict batch with keys {list(batch)}; pass input_fn=")
    return batch


def as_args(x: Any) -> tuple:
    """Model inputs as positional arguments: a tuple is several inputs, anything else one."""
    return tuple(x) if isinstance(x, tuple) else (x,)


def take_batches(dataloader: Iterable, n: int) -> Iterator:
    for i, b in enumerate(dataloader):
        if i >= n:
            break
        yield b


@contextlib.contextmanager
def modes_restored(*models: nn.Module) -> Iterator[None]:
    """On exit, every module of ``models`` gets its own training flag back."""
    was = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, training in was:
            m.train(training)


class _BatchNormOnlyTraining(nn.Module):
    """``model`` as :func:`torch.optim.swa_utils.update_bn` should see it: its ``train()`` puts only the
    BatchNorm layers in training mode (update_bn's would turn Dropout on as well), and ``forward``
    takes a batch of the data loader and calls ``model(*input_fn(batch))``."""

    def __init__(self, model: nn.Module, input_fn: Callable):
        super().__init__()
        self.model = model
        self.input_fn = input_fn

    def train(self, mode: bool = True) -> "_BatchNormOnlyTraining":
        self.training = mode
        self.model.eval()
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                m.train(mode)
        return self

    def forward(self, batch: Any) -> Any:
        return self.model(*as_args(self.input_fn(batch)))


def reset_batchnorm(model: nn.Module, dataloader: Iterable, *, input_fn: Callable = default_input_fn,
                    max_batches: int = 8) -> nn.Module:
    """Recompute the running statistics of every BatchNorm of ``model`` on unlabeled batches (in place).

    :func:`torch.optim.swa_utils.update_bn` does the work (reset, cumulative average with
    ``momentum=None``, momenta restored); around it: only the BatchNorm layers are in training mode,
    inputs are picked with ``input_fn`` (a tuple is several positional inputs; update_bn would pass only
    the first), at most ``max_batches`` batches are used, every module gets its own training flag back,
    and a loader that yields no batch is an error (update_bn would leave mean 0 and variance 1).
    """
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return model
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, _BatchNorm)}
    seen = 0

    def batches() -> Iterator[tuple]:
        nonlocal seen
        for batch in take_batches(dataloader, max_batches):
            seen += 1
            yield (batch,)  # update_bn calls the model on the first element of a tuple batch

    with modes_restored(model):
        try:
            update_bn(batches(), _BatchNormOnlyTraining(model, input_fn))
        finally:  # update_bn restores the momenta only when it returns
            for m, momentum in momenta.items():
                m.momentum = momentum
    if seen == 0:
        raise ValueError("mudsc: the dataloader yielded no batch for the BatchNorm reset")
    return model
