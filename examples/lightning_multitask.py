"""Fine-tune one pretrained model into task experts with Lightning, then WUDI-merge them.

    python examples/lightning_multitask.py [--tasks 3] [--steps 150] [--method wudi] [--out runs/multitask]

A tiny MLP is "pretrained" on the union of a few synthetic regression tasks, each with inputs in
its own low-dimensional subspace and its own target map.
Then one ``trainer.fit`` per task fine-tunes the same module; :class:`WUDIMergeCallback` snapshots
the pretrained weights at the first fit, saves each expert, and after the last task merges them
(WUDI-Merging, arXiv 2503.08099) into ``<out>/merge/merged.safetensors`` (``merge-v1``, ... on later
runs). The per-task output heads are kept out of the merge (``exclude=["head"]``) and restored per task
for evaluation.

Printed: per-task test loss of the pretrained model, of each task's own expert, of plain task
arithmetic (the sum of task vectors), and of the WUDI merge. Runs on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mergekit_wudi.io import load_state_dict
from mergekit_wudi.lightning import WUDIMergeCallback

IN, HIDDEN, OUT = 32, 64, 4


class MultiTaskMLP(LightningModule):
    """A shared body and one small head (replaced per task through the callback's kept-out heads)."""

    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU())
        self.head = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_tasks(num_tasks: int, n: int = 512, rank: int = 4):
    """Task ``t`` sees inputs from its own ``rank``-dim subspace of R^IN and fits its own target map.

    Disjoint input subspaces are the regime WUDI-Merging is built on: a linear layer's task vector
    lies in the span of the inputs the task fed it, so the experts can share one merged layer.
    """
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(num_tasks):
        basis = torch.linalg.qr(torch.randn(IN, rank, generator=g))[0].T  # [rank, IN]
        target_map = torch.randn(IN, OUT, generator=g) / rank**0.5
        x = torch.randn(2 * n, rank, generator=g) @ basis + 0.05 * torch.randn(2 * n, IN, generator=g)
        y = torch.tanh(x @ target_map) * 2
        tasks.append(((x[:n], y[:n]), (x[n:], y[n:])))
    return tasks


def loss(model: nn.Module, data) -> float:
    x, y = data
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def trainer(out: str, steps: int, callbacks=()) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, callbacks=list(callbacks), default_root_dir=out,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task")
    parser.add_argument("--method", default="wudi")
    parser.add_argument("--out", default=os.path.join("runs", "multitask"))
    args = parser.parse_args()
    seed_everything(0, verbose=False)
    tasks = make_tasks(args.tasks)

    # "Pretraining": all tasks at once, one shared head.
    model = MultiTaskMLP()
    union = TensorDataset(torch.cat([t[0][0] for t in tasks]), torch.cat([t[0][1] for t in tasks]))
    trainer(args.out, args.steps // 3).fit(model, DataLoader(union, batch_size=64, shuffle=True))
    pretrained = copy.deepcopy(model)

    parameters = {"solver": "adam", "iterations": 300, "learning_rate": 1e-3} if args.method == "wudi" else {}
    merge = WUDIMergeCallback(
        method=args.method, parameters=parameters, exclude=["head"], num_tasks=args.tasks,
    )  # output: <out>/merge (merge-v1, ... when an earlier run's files are there)
    for train, _ in tasks:  # one fit per task; the callback resets the body to the pretrained weights
        trainer(args.out, args.steps, [merge]).fit(model, DataLoader(TensorDataset(*train), batch_size=32, shuffle=True))

    experts = [load_state_dict(p) for p in merge.expert_paths]
    base = load_state_dict(os.path.join(merge.output_dir, "base.safetensors"))
    summed = copy.deepcopy(pretrained)
    summed.load_state_dict({n: base[n] + sum(e[n] - base[n] for e in experts) for n in base if not n.startswith("head")},
                           strict=False)
    rows = []
    for i, (_, test) in enumerate(tasks):
        expert = copy.deepcopy(pretrained)
        expert.load_state_dict(experts[i])
        for m in (pretrained, summed, model):
            merge.load_task_head(m, i)  # every model is evaluated with task i's fine-tuned head
        rows.append((loss(pretrained, test), loss(expert, test), loss(summed, test), loss(model, test)))

    print(f"\nmerged file: {merge.merged_path}")
    print(f"{'task':>4} {'pretrained':>11} {'expert':>8} {'task-sum':>9} {args.method:>8}   (test MSE, lower is better)")
    for i, row in enumerate(rows):
        print(f"{i:>4} " + " ".join(f"{v:{w}.4f}" for v, w in zip(row, (11, 8, 9, 8))))
    means = [sum(col) / len(col) for col in zip(*rows)]
    print(f"{'mean':>4} " + " ".join(f"{v:{w}.4f}" for v, w in zip(means, (11, 8, 9, 8))))


if __name__ == "__main__":
    main()
