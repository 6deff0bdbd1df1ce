"""FeatureCache, GradualUnfreezing and DomainAdaptation on a LightningModule written here, with BatchNorm.

The module is a user's: a small conv net with BatchNorm as ``backbone`` and a linear ``head``, steps
that call ``self(x)``, an optimizer over the trainable parameters. Nothing of lightning_ft's module
is involved. Each callback is compared with a run that does the same thing without it (the uncached
run; the losses written out by hand), as the tests on FineTuneModule do.
"""

from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ft.callbacks import DomainAdaptation, FeatureCache, GradualUnfreezing
from lightning_ft.data import DigitsDataModule, MNISTSubsetDataModule, SourceTargetDataModule
from lightning_ft.losses import MMDLoss, domain_forward
from tests.conftest import fast_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class UserNet(L.LightningModule):
    """Somebody else's module: a conv net with BatchNorm, a linear head, steps that call self(x)."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)
        if frozen:  # a linear probe by hand: weights frozen, BatchNorm left to Lightning's train mode
            self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))

    def features_and_logits(self, x):
        features = self.backbone(x)
        return features, self.head(features)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def _data():
    return DigitsDataModule(limit=96, batch_size=16, image_size=16, channels=1, mean=(0.5,), std=(0.5,))


def _fit(model, callbacks, epochs=3, data=None):
    L.seed_everything(0)
    trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks)
    trainer.fit(model, datamodule=data or _data())
    return trainer


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [float((sa[k].float() - sb[k].float()).abs().max()) for k in sa]
    return float("inf") if any(d != d for d in diffs) else max(diffs)  # a NaN anywhere is no match (max() skips it)


def test_feature_cache_on_a_users_frozen_convs_caches_up_to_the_first_training_batchnorm():
    """Frozen weights, BatchNorm in training mode (moving statistics): the first conv is the frozen
    prefix; its output is cached and the BatchNorm after it still sees every batch."""
    plain, cached = UserNet(frozen=True), UserNet(frozen=True)
    _fit(plain, [])
    cache = FeatureCache()
    trainer = _fit(cached, [cache])
    batches = trainer.num_training_batches
    assert cache.cut is not None and cache.cut.name == "backbone.1"
    assert cache.served == {e: Counter({"backbone.1": batches}) for e in range(3)}  # every epoch served in full
    assert _max_diff(plain, cached) < 1e-5  # BatchNorm statistics included


def test_gradual_unfreezing_with_the_cache_on_a_users_module_equals_the_uncached_run():
    def callbacks(cache=None):
        unfreezing = GradualUnfreezing(milestones={0: ["head"], 2: ["backbone.3", "backbone.4"]}, verbose=False)
        return [unfreezing, *([cache] if cache else [])]

    plain, cached = UserNet(), UserNet()
    plain_trainer = _fit(plain, callbacks(), epochs=4)
    cache = FeatureCache()
    trainer = _fit(cached, callbacks(cache), epochs=4)
    batches = trainer.num_training_batches
    assert [set(cache.served[e]) for e in range(4)] == [{"head"}] * 2 + [{"backbone.3"}] * 2
    assert all(sum(cache.served[e].values()) == batches for e in range(4))
    assert all(not p.requires_grad for p in cached.backbone[0].parameters())  # the stem stayed frozen
    assert _max_diff(plain, cached) < 1e-5
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
        float(plain_trainer.callback_metrics["val_loss"]), abs=1e-5)


class UserAdaptation(UserNet):
    """The three documented lines of a training step with DomainAdaptation (or, with ``by_hand``, the
    same MMD term written out: the reference)."""

    def __init__(self, by_hand: bool = False) -> None:
        super().__init__()
        self.by_hand = MMDLoss() if by_hand else None

    def training_step(self, batch, batch_idx):
        (xs, ys), (xt, *_) = batch["source"], batch["target"]
        if self.by_hand is not None:
            fs, logits_s, ft, _ = domain_forward(self.features_and_logits, xs, xt, "separate")
            return F.cross_entropy(logits_s, ys) + 0.5 * self.by_hand(fs, ft)
        fs, logits_s, ft, logits_t = domain_forward(self.features_and_logits, xs, xt, self.domain_adaptation.forward_mode)
        return F.cross_entropy(logits_s, ys) + self.domain_adaptation(
            self, source_features=fs, target_features=ft, source_logits=logits_s, target_logits=logits_t)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):  # source and target validation loaders
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), add_dataloader_idx=True)


def test_domain_adaptation_on_a_users_module_equals_the_loss_written_by_hand():
    def data():
        fixed = dict(image_size=16, channels=1, mean=(0.5,), std=(0.5,))
        return SourceTargetDataModule(MNISTSubsetDataModule(limit=48, **fixed),
                                      DigitsDataModule(limit=48, mnist_frame=True, **fixed), batch_size=16)

    reference, adapted = UserAdaptation(by_hand=True), UserAdaptation()
    _fit(reference, [], epochs=2, data=data())
    adaptation = DomainAdaptation({"mmd": 0.5}, schedule="constant")
    trainer = _fit(adapted, [adaptation], epochs=2, data=data())
    assert "da/mmd" in trainer.callback_metrics
    assert not hasattr(adapted, "domain_adaptation")  # the callback let go of the module at the end
    assert _max_diff(reference.backbone, adapted.backbone) < 1e-6 and _max_diff(reference.head, adapted.head) < 1e-6
    moved = _max_diff(UserNet().backbone, adapted.backbone)
    assert moved > 1e-3  # it trained: the comparison is not between two untouched models
