"""GradualUnfreezing killed mid-fit and resumed from ``last.ckpt`` (single CPU device, deterministic).

Usage::

    python resume_unfreeze.py OUT_DIR --config {ftm,user} [--kill-epoch K] [--resume]
                              [--weights-only {1,0}] [--warmup-steps N]

* ``ftm``: FineTuneModule(layer_decay=0.8) with its default warm-up + cosine schedule (per step),
  unfrozen on a plateau of a scripted metric ``val/scripted`` (patience 2).
* ``user``: a plain LightningModule with its own ``AdamW(self.parameters())`` + OneCycleLR, made
  layer-decayed by LayerwiseLRDecay, unfrozen on a plateau of ``val/loss`` (its value scripted).

Both scripts give the same plateau sequence: phase 0 -> 1 at the validation of epoch 3, 1 -> 2 at
epoch 6 (8 epochs). ``--kill-epoch K`` ends the process with ``os._exit(1)`` at the start of epoch K
(nothing is saved after ``last.ckpt`` of epoch K-1). ``--resume`` fits again from ``OUT_DIR/ckpt/last.ckpt``.
``LFT_FORGET_STATE=wait,best`` (negative control) resumes with those callback fields reset.
At the end the script writes ``OUT_DIR/final.pt`` (model/optimizer/scheduler state) and ``final.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
import timm  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ft import FineTuneModule  # noqa: E402
from lightning_ft.callbacks import GradualUnfreezing, LayerwiseLRDecay  # noqa: E402

# negative control: LFT_FORGET_STATE=wait,best (or phase, transitions) makes GradualUnfreezing
# resume with those fields at their initial values, as if they were not checkpointed
_FORGET = [k for k in os.environ.get("LFT_FORGET_STATE", "").split(",") if k]
if _FORGET:
    _initial = {"phase": 0, "wait": 0, "best": None, "transitions": []}
    _load = GradualUnfreezing.load_state_dict

    def _forgetful_load(self, state_dict):
        _load(self, {**state_dict, **{k: _initial[k] for k in _FORGET}})

    GradualUnfreezing.load_state_dict = _forgetful_load

MAX_EPOCHS = 8
# min mode, patience 2: best 1.0, .8 | wait 1, 2 -> phase 1 at epoch 3 (best reset) |
# best .7 | wait 1, 2 -> phase 2 at epoch 6 | best .74
SCRIPT = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.72, 0.74]


class ScriptedFineTuneModule(FineTuneModule):
    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)
        self.log("val/scripted", SCRIPT[self.current_epoch], on_step=False, on_epoch=True)
        return loss


class UserModule(L.LightningModule):
    """A user's module: its own optimizer over all parameters and its own OneCycle schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
        self.fc = nn.Linear(self.backbone.num_features, 3)

    def forward(self, x):
        return self.fc(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        F.cross_entropy(self(x), y)
        self.log("val/loss", SCRIPT[self.current_epoch], on_step=False, on_epoch=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=total, pct_start=0.25)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class KillAt(L.Callback):
    """Dies like a killed job (no teardown, no checkpoint) at the start of an epoch."""

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if self.epoch is not None and trainer.current_epoch == self.epoch:
            os._exit(1)


class LrLog(L.Callback):
    """The lr of every param group at every optimizer step (as used by the step)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append((trainer.global_step, [g["lr"] for g in optimizer.param_groups]))


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.arange(32) % 3
    xv = torch.randn(16, 3, 32, 32, generator=g)
    yv = torch.arange(16) % 3
    return (
        DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False),
        DataLoader(TensorDataset(xv, yv), batch_size=8, shuffle=False),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--config", choices=["ftm", "user"], default="ftm")
    parser.add_argument("--kill-epoch", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--weights-only", type=int, choices=[0, 1], default=1)
    parser.add_argument("--warmup-steps", type=int, default=0)
    args = parser.parse_args()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(7, verbose=False)
    if args.config == "ftm":
        model = ScriptedFineTuneModule("test_resnet", num_classes=3, pretrained=None, lr=5e-3, layer_decay=0.8, warmup=0.25)
        unfreezing = GradualUnfreezing(monitor="val/scripted", patience=2, warmup_steps=args.warmup_steps, verbose=False)
        callbacks: list[L.Callback] = [unfreezing]
    else:
        model = UserModule()
        unfreezing = GradualUnfreezing(monitor="val/loss", patience=2, warmup_steps=args.warmup_steps, verbose=False)
        callbacks = [LayerwiseLRDecay(decay=0.8, verbose=False), unfreezing]
    lrs = LrLog()
    callbacks = [KillAt(args.kill_epoch), *callbacks, lrs,
                 ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=MAX_EPOCHS, deterministic=True, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    train, val = loaders()
    ckpt = out / "ckpt" / "last.ckpt" if args.resume else None
    if ckpt is not None and not ckpt.is_file():
        raise SystemExit(f"no checkpoint to resume from: {ckpt}")
    trainer.fit(model, train, val, ckpt_path=ckpt, weights_only=bool(args.weights_only) if ckpt else None)

    torch.save(
        {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        },
        out / "final.pt",
    )
    (out / "final.json").write_text(json.dumps({
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "phase": unfreezing.phase,
        "wait": unfreezing.wait,
        "best": unfreezing.best,
        "transitions": unfreezing.transitions,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "lrs": lrs.steps,
        "resumed_from": str(ckpt) if ckpt else None,
    }, indent=1))


if __name__ == "__main__":
    main()
