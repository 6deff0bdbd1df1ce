"""A fit resumed from a checkpoint equals the uninterrupted fit, bitwise, on a plain LightningModule
with BatchNorm: GradualUnfreezing restores the BatchNorm modes of the phase it resumes into.

The module is a user's, written here: backbone ``Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d
-> ReLU``, head ``Linear``, ``AdamW`` (over all parameters, or over the trainable ones only) and a
per-step cosine schedule, data in a fixed order. Each case fits 5 epochs once without interruption
(checkpointing every epoch), then fits again from the checkpoint written at the end of epoch 2.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.callbacks import GradualUnfreezing

EPOCHS = 5
RESUME_AFTER = 2  # the checkpoint of the end of epoch 2


class BatchNormUserModule(L.LightningModule):
    def __init__(self, only_trainable: bool | str = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.head = nn.Linear(16, 3)
        self.only_trainable = only_trainable
        self.modes: list[tuple[int, bool, bool]] = []  # (epoch, BN 1 trains, BN 4 trains) at each training step

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        self.modes.append((self.current_epoch, self.backbone[1].training, self.backbone[4].training))
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad] if self.only_trainable else self.parameters()
        if self.only_trainable == "head_first":  # the user's own order, not the module's
            params = [*self.head.parameters(), *[p for p in self.backbone.parameters() if p.requires_grad]]
        optimizer = torch.optim.AdamW(params, lr=0.02)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g) * 3 + 1
    y = (x[:, 0] > 1).long() + (x[:, 1] > 1).long()
    return (DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8))


CASES = {
    # milestones, expected (BN 1 trains, BN 4 trains) in epochs 3 and 4
    "full_thaw": ({0: ["head"], 1: "all"}, (True, True)),
    "partial_thaw": ({0: ["head"], 1: ["backbone.4", "backbone.3"]}, (False, True)),
    "resumed_in_phase_0": ({0: ["head"], 4: "all"}, None),
    "no_callback": (None, (True, True)),
}


def fit(tmp: Path, milestones, only_trainable: bool | str, frozen_bn: str, ckpt: Path | None = None):
    torch.manual_seed(0)
    module = BatchNormUserModule(only_trainable)
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_top_k=-1, every_n_epochs=1, enable_version_counter=False)
    ]
    unfreezing = None
    if milestones is not None:
        unfreezing = GradualUnfreezing(milestones=milestones, frozen_bn=frozen_bn, verbose=False)
        callbacks.append(unfreezing)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=EPOCHS, deterministic=True, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    train, val = loaders()
    trainer.fit(module, train, val, ckpt_path=ckpt, weights_only=True if ckpt else None)
    return module, trainer, unfreezing


OPTIMIZERS = {False: "all_params", True: "trainable_params_only", "head_first": "trainable_params_head_first"}


@pytest.mark.parametrize(
    ("case", "only_trainable"),
    # without the callback every parameter trains, so the three optimizers are one: run it once
    [pytest.param(c, o, id=f"{c}-{OPTIMIZERS[o]}") for c in sorted(CASES) for o in OPTIMIZERS
     if c != "no_callback" or o is False],
)
def test_resumed_equals_uninterrupted_with_batchnorm(tmp_path, case, only_trainable):
    milestones, late_modes = CASES[case]
    ref, ref_trainer, ref_cb = fit(tmp_path / "a", milestones, only_trainable, "eval")
    got, got_trainer, got_cb = fit(tmp_path / "b", milestones, only_trainable, "eval",
                                   ckpt=tmp_path / "a" / f"epoch={RESUME_AFTER}.ckpt")
    assert got_trainer.global_step == ref_trainer.global_step == EPOCHS * 4
    # the resumed run trained with the BatchNorm modes of the uninterrupted one
    assert got.modes == [m for m in ref.modes if m[0] > RESUME_AFTER]
    if late_modes is not None:
        assert {m[1:] for m in ref.modes if m[0] > RESUME_AFTER} == {late_modes}
    else:  # phase 0 until epoch 4: both BatchNorm layers stay in eval, then train
        assert {m[1:] for m in ref.modes if m[0] < 4} == {(False, False)}
        assert {m[1:] for m in ref.modes if m[0] == 4} == {(True, True)}
    if ref_cb is not None:
        assert got_cb.phase == ref_cb.phase and got_cb.transitions == ref_cb.transitions
    a, b = ref.state_dict(), got.state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{case}: resumed != uninterrupted for {different}"
    if only_trainable:  # one param group, which took in the params to thaw (and only those), in module order
        groups = got_trainer.optimizers[0].param_groups
        thawed = [id(p) for p in got.parameters() if p.requires_grad]
        assert len(groups) == 1 and [id(p) for p in groups[0]["params"]] == thawed
        if case == "partial_thaw":
            assert len(thawed) < len(list(got.parameters()))


def test_recalibrated_statistics_are_not_re_estimated_on_resume(tmp_path):
    milestones = {0: ["head"], 4: "all"}
    ref, _, ref_cb = fit(tmp_path / "a", milestones, False, "recalibrate")
    saved = torch.load(tmp_path / "a" / f"epoch={RESUME_AFTER}.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("GradualUnfreezing"))
    assert state["recalibrated"] is True
    got, _, got_cb = fit(tmp_path / "b", milestones, False, "recalibrate",
                         ckpt=tmp_path / "a" / f"epoch={RESUME_AFTER}.ckpt")
    a, b = ref.state_dict(), got.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert got_cb.recalibrated
