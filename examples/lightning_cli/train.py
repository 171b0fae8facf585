"""An ordinary LightningCLI training script that fine-tunes one model on several tasks in turn.

    python examples/lightning_cli/train.py --config examples/lightning_cli/config.yaml

It knows nothing about merging: ``config.yaml`` adds ``mergekit_wudi.lightning.WUDIMergeCallback`` to
``trainer.callbacks``, and the callback snapshots the pretrained weights at the first fit, saves one expert per
task, starts every fit from the pretrained weights, and after the last task merges the experts into
``trainer.default_root_dir``'s ``merge/merged.safetensors`` and loads them into the model. Runs in seconds on a CPU.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TaskRegressor(LightningModule):
    """A shared body and a head; one fit per task."""

    def __init__(self, width: int = 16, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TaskData(LightningDataModule):
    """Synthetic regression tasks: task ``t`` has its own inputs and target map; ``task`` picks the one to fit."""

    def __init__(self, num_tasks: int = 3, samples: int = 128, batch_size: int = 32):
        super().__init__()
        self.num_tasks, self.samples, self.batch_size = num_tasks, samples, batch_size
        self.task = 0

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.task)
        x = torch.randn(self.samples, 8, generator=g)
        y = torch.tanh(x @ torch.randn(8, 2, generator=g))
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def main(args=None):
    cli = LightningCLI(TaskRegressor, TaskData, run=False, save_config_callback=None, args=args)
    for task in range(cli.datamodule.num_tasks):
        cli.datamodule.task = task
        trainer = cli.trainer if task == 0 else cli.instantiate_trainer()  # same callbacks, fresh loop state
        trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


if __name__ == "__main__":
    main()
