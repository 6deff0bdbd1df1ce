"""Small modules and callbacks shared by the callback tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
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


ROOT = Path(__file__).resolve().parents[1]
# variables that would make Lightning think the processes were launched for it
_LAUNCH_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


def run_ddp_script(
    script: Path, out_dir: Path, args: Sequence[str] = (), env: dict[str, str] | None = None, timeout: float = 240
) -> tuple[dict, dict]:
    """Run a 2-rank CPU DDP script (``script OUT_DIR *args``); return what ranks 0 and 1 wrote to ``rank{r}.json``."""
    run_env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    run_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    run_env["OMP_NUM_THREADS"] = "1"
    run_env.update(env or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "log.txt"
    with open(log, "w") as fh:
        # own session: on a hang, the whole group (rank 0 and the rank 1 it launched) is killed
        proc = subprocess.Popen(
            [sys.executable, str(script), str(out_dir), *args],
            cwd=ROOT, env=run_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"DDP run {script.name} {list(args)} hung for {timeout}s; log tail:\n{log.read_text()[-4000:]}")
    tail = log.read_text()[-4000:]
    assert rc == 0, f"DDP run {script.name} {list(args)} exited with {rc}; log tail:\n{tail}"
    ranks = []
    for r in (0, 1):
        path = out_dir / f"rank{r}.json"
        assert path.is_file(), f"rank {r} wrote no record; log tail:\n{tail}"
        ranks.append(json.loads(path.read_text()))
    return ranks[0], ranks[1]


class SigintAt(L.Callback):
    """Press Ctrl-C at the start of training epoch ``epoch``: a real SIGINT to this process, handled the way
    Lightning handles a user's (graceful shutdown, exit status 1). For console-script tests
    (``--trainer.callbacks+=tests.helpers.SigintAt``, with the repository on ``PYTHONPATH``)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)
