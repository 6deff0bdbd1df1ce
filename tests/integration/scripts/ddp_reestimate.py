"""BatchNorm statistics re-estimated under 2-rank CPU DDP (gloo): GradualUnfreezing(frozen_bn="recalibrate")
before the first step and AdaptBatchNorm before each validation.

Usage: ``python ddp_reestimate.py OUT_DIR``. Each rank writes ``rank{r}.json``: the frozen BatchNorm's
statistics at the first training step (after the recalibration), and per validation the first
layer's weights and the statistics the target loader ran with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ft.callbacks import AdaptBatchNorm, GradualUnfreezing  # noqa: E402

BATCH = 8


def datasets() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Training (source), target and validation data: 48 samples each, 4 features."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g) * 2 + 1
    y = (x[:, 0] > 1).long()
    xt = torch.randn(48, 4, generator=g) * 3 - 2  # another domain
    yt = (xt[:, 0] > -2).long()
    return TensorDataset(x, y), TensorDataset(xt, yt), TensorDataset(x[:16], y[:16])


class Data(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.source_train, self.target_train, self.val = datasets()
        self.batch_size = BATCH

    def train_dataloader(self):
        return DataLoader(self.source_train, batch_size=BATCH, shuffle=True)

    def val_dataloader(self):
        return [DataLoader(self.val, batch_size=BATCH), DataLoader(self.target_train, batch_size=BATCH)]


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)
        self.record: dict = {"first_step": None, "validations": []}

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        if self.record["first_step"] is None:
            bn = self.body[1]
            self.record["first_step"] = {"mean": bn.running_mean.tolist(), "var": bn.running_var.tolist(),
                                         "training": bn.training}
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if dataloader_idx == 1 and batch_idx == 0:
            bn = self.body[1]
            self.record["validations"].append({
                "w": self.body[0].weight.tolist(), "b": self.body[0].bias.tolist(),
                "mean": bn.running_mean.tolist(), "var": bn.running_var.tolist(),
            })
        self.log(f"val{dataloader_idx}", F.cross_entropy(self(batch[0]), batch[1]), add_dataloader_idx=False)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def main(out_dir: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[GradualUnfreezing(milestones={0: ["head"], 1: "all"}, frozen_bn="recalibrate", verbose=False),
                   AdaptBatchNorm(verbose=False)],
    )
    trainer.fit(model, datamodule=Data())
    (out_dir / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"rank": trainer.global_rank, **model.record})
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
