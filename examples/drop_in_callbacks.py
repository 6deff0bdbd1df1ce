"""Drop-in: GradualUnfreezing + LayerwiseLRDecay on your own LightningModule.

The module below is plain Lightning: a timm backbone, a linear classifier, and its own
``AdamW(self.parameters())`` with a OneCycle schedule. Two callbacks add the fine-tuning craft:

* ``LayerwiseLRDecay(0.8)`` turns the single param group into named layer groups (head: lr,
  k groups below: lr * 0.8**k) and moves the OneCycle schedule onto them;
* ``GradualUnfreezing`` trains the head alone, then thaws two groups from the top each time
  ``val/loss`` stops improving.

    python examples/drop_in_callbacks.py                 # pretrained Lite0 on digits, ~2 min on 2 cores
    python examples/drop_in_callbacks.py --quick         # a few steps (what the test runs)
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ft.backbones import create_backbone
from lightning_ft.callbacks import GradualUnfreezing, LayerwiseLRDecay
from lightning_ft.data import DigitsDataModule


class MyClassifier(L.LightningModule):
    """Your module: nothing here knows about lightning_ft's callbacks."""

    def __init__(self, pretrained: str | None = "efficientnet_lite0", lr: float = 3e-3) -> None:
        super().__init__()
        self.backbone = create_backbone("tf_efficientnet_lite0", pretrained, in_chans=1)
        self.classifier = nn.Linear(self.backbone.num_features, 10)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a few images")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)

    L.seed_everything(0)
    model = MyClassifier()
    data = DigitsDataModule(batch_size=32, image_size=64, channels=1, mean=(0.5,), std=(0.5,),
                            limit=64 if args.quick else None)
    unfreezing = GradualUnfreezing(monitor="val/loss", patience=0 if args.quick else 1, groups_per_step=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2 if args.quick else args.epochs,
        limit_train_batches=2 if args.quick else None,
        limit_val_batches=1 if args.quick else None,
        callbacks=[unfreezing, LayerwiseLRDecay(0.8)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.quick,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    print(f"phase {unfreezing.phase}/{unfreezing.num_phases - 1}, test accuracy {result['test/acc']:.4f}")
    return {"phase": unfreezing.phase, **result}


if __name__ == "__main__":
    main()
