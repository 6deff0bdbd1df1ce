"""TemperatureScaling under 2-process CPU DDP; each rank writes ``OUT_DIR/rank{r}.json``.

Usage: ``python ddp_temperature.py OUT_DIR``

A user's conv net with BatchNorm fits 2 epochs on the digits (180 validation rows: 90 per rank
through DistributedSampler, no padding), then tests and predicts. Each rank records the rows it
validated per epoch, the callback's fits (history), its final T, the logged metrics, the test results
and how far its predicted probabilities are from ``softmax(logits / T)`` of its share; rank 0
also fits T by hand on the whole validation set with the final weights (outside DDP, in order).

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
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ft.analysis.calibration import fit_temperature  # noqa: E402
from lightning_ft.callbacks import TemperatureScaling  # noqa: E402
from lightning_ft.data import DigitsDataModule  # noqa: E402


class UserNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)
        self.local_rows: list[int] = []
        self._rows = 0

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._rows += len(y)
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def on_validation_epoch_end(self):
        self.local_rows.append(self._rows)
        self._rows = 0

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0]).softmax(-1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, image_size=16, channels=1, limit=200, mean=(0.5,), std=(0.5,))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    model, scaling = UserNet(), TemperatureScaling(verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[scaling])
    dm = data()
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    # predict on 64 test images: DistributedSampler gives rank r the images r, r + 2, ...
    x = torch.cat([b[0] for b in dm.test_dataloader()])[:64]
    probs = torch.cat(trainer.predict(model, dataloaders=DataLoader(TensorDataset(x), batch_size=16)))
    model.eval()
    with torch.no_grad():
        expected = (model(x[trainer.global_rank::2]) / scaling.temperature).softmax(-1)
    record = {"local_rows": model.local_rows, "history": scaling.history, "temperature": scaling.temperature,
              "metrics": metrics, "test": test, "predict_rows": len(probs),
              "predict_error": float((probs - expected).abs().max())}
    if trainer.global_rank == 0:
        model.eval()
        with torch.no_grad():
            rows = [(model(x), y) for x, y in dm.val_dataloader()]
        record["by_hand"] = fit_temperature(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
