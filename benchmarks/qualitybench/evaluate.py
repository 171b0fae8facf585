"""Accuracy of a (merged) encoder: each task scored with its own expert's head on the encoder's output."""

from __future__ import annotations

import time

import torch
from torch import nn

from .model import DEFAULT_MODEL, load_encoder, mean_pool, trim


def evenly_spaced(n: int, limit: int | None) -> torch.Tensor | None:
    """Indices of an evenly spaced subsample of ``limit`` out of ``n`` (None: all)."""
    if not limit:
        return None
    return torch.linspace(0, n - 1, min(limit, n)).long()


class Evaluator:
    def __init__(self, data, model: str = DEFAULT_MODEL, eval_batch: int = 256):
        self.data, self.eval_batch = data, eval_batch
        self.encoder = load_encoder(model).eval()
        self.seconds = 0.0

    @torch.inference_mode()
    def accuracy(self, encoder_sd, heads: dict, split: str, limit: int | None = None) -> dict:
        """{task: accuracy} of ``encoder_sd`` with each task's own head on ``split`` (at most ``limit``
        examples per task, evenly spaced over the length-sorted split; the same cap for every task)."""
        t0 = time.perf_counter()
        self.encoder.load_state_dict(encoder_sd, strict=True)
        out = {}
        for task, head in heads.items():
            ids, mask, y = self.data[task][split]
            idx = evenly_spaced(len(y), limit)
            if idx is not None:
                ids, mask, y = ids[idx], mask[idx], y[idx]
            lin = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
            lin.load_state_dict(head)
            correct = 0
            for i in range(0, len(y), self.eval_batch):
                b_ids, b_mask = trim(ids[i:i + self.eval_batch], mask[i:i + self.eval_batch])
                pred = lin(mean_pool(self.encoder, b_ids, b_mask)).argmax(-1)
                correct += int((pred == y[i:i + self.eval_batch]).sum())
            out[task] = correct / len(y)
        self.seconds += time.perf_counter() - t0
        return out
