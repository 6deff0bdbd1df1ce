"""Small modules and callbacks shared by the callback tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def vector_loader(n: int = 32, batch: int = 8, features: int = 4, classes: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, features, generator=g), torch.arange(n) % classes), batch_size=batch)


class ScriptedModule(L.LightningModule):
    """A plain user module (not ours): body.0..2 + head, its own AdamW over self.parameters().

    ``values[epoch]`` is logged as ``val/score``, so plateau logic sees a scripted sequence.
    ``scheduler`` builds the scheduler config from the optimizer and the trainer.
    """

    def __init__(self, values: Sequence[float] = (), scheduler: Callable[..., Any] | None = None,
                 lr: float = 0.01, only_trainable: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)
        self.values = list(values)
        self.scheduler = scheduler
        self.lr = lr
        self.only_trainable = only_trainable

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def on_validation_epoch_end(self):
        if self.values:
            self.log("val/score", float(self.values[min(self.current_epoch, len(self.values) - 1)]))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad] if self.only_trainable else self.parameters()
        opt = torch.optim.AdamW(params, lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt, self.trainer)}


class TimmUserModule(L.LightningModule):
    """A user module around a timm backbone: encoder + classifier, AdamW over everything."""

    def __init__(self, scheduler: Callable[..., Any] | None = None, lr: float = 0.01, name: str = "test_resnet"):
        super().__init__()
        self.encoder = timm.create_model(name, num_classes=0)
        self.classifier = nn.Linear(self.encoder.num_features, 3)
        self.scheduler = scheduler
        self.lr = lr

    def forward(self, x):
        return self.classifier(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt, self.trainer)}


class LrRecorder(L.Callback):
    """(group name, lr) pairs each optimizer step uses, read just before the step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append([(str(g.get("name", i)), g["lr"]) for i, g in enumerate(optimizer.param_groups)])
