"""UpdateMonitor under 2-process CPU DDP; every rank writes what its loggers received to ``out_dir/rank{r}.json``.

Usage: ``python ddp_update_monitor.py OUT_DIR``

A plain LightningModule (MLP body + head, AdamW over all parameters) trains 2 epochs on 4 batches per
rank; GradualUnfreezing trains the head in epoch 0 and thaws ``body.2`` at epoch 1 (a new DDP
wrapper); UpdateMonitor logs every 2nd step. The logger here is not rank-zero-only, so each rank
records the values it computed: they must agree, and the run must end (the monitor calls no
collective operation, so a logging decision taken on one rank only could not hang it either).

Lightning's DDP launcher re-executes this file for rank 1: the run lives under ``__main__``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ft.callbacks import GradualUnfreezing, UpdateMonitor  # noqa: E402


class UserModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class AllRanks(Logger):
    """Keeps every log_metrics call on every rank (Lightning's own loggers write on rank 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    @property
    def name(self) -> str:
        return "all_ranks"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}})


def main(out_dir: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.arange(32) % 3)
    logger = AllRanks()
    unfreezing = GradualUnfreezing(monitor=None, milestones={0: ["head"], 1: ["body.2"]}, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=logger,
                        log_every_n_steps=2, callbacks=[unfreezing, UpdateMonitor(verbose=False)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(UserModule(), train_dataloaders=DataLoader(data, batch_size=4))
    path = out_dir / f"rank{trainer.global_rank}.json"
    path.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                "calls": logger.calls}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
