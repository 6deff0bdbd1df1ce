"""Mixup/CutMix in FineTuneModule through timm's Mixup: the training loss equals soft-target
cross-entropy on the images and targets mixed by hand (the same numpy draws), an odd batch keeps its
last image, validation is never mixed, and what cannot be mixed is refused early."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import FeatureCache
from lightning_ft.data import DigitsDataModule
from tests.conftest import fast_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kwargs):
    torch.manual_seed(0)
    return FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=16, **kwargs)


def _step(model, x, y, monkeypatch):
    logged = {}
    monkeypatch.setattr(model, "_log_train_loss", lambda loss, count, n: logged.update(loss=loss))
    model.eval()  # BatchNorm on running statistics: the reference forward sees the same function
    return model._step((x, y), "train")


@pytest.mark.parametrize("batch", [8, 7])
def test_mixup_loss_equals_the_hand_mixed_reference(batch, monkeypatch):
    model = _model(mixup_alpha=0.4, label_smoothing=0.1)
    x = torch.randn(batch, 1, 16, 16)
    y = torch.arange(batch) % 10
    original = x.clone()
    np.random.seed(3)
    loss = _step(model, x, y, monkeypatch)
    torch.testing.assert_close(x, original)  # the loader's batch is not mixed in place
    np.random.seed(3)
    assert np.random.rand() < 1.0  # timm: the mix_prob draw
    lam = float(np.random.beta(0.4, 0.4))
    n = batch - batch % 2
    mixed = x.clone()
    mixed[:n] = x[:n] * lam + x[:n].flip(0) * (1 - lam)
    eps = 0.1
    one_hot = torch.full((batch, 10), eps / 10)
    one_hot[torch.arange(batch), y] = 1 - eps + eps / 10
    soft = one_hot.clone()
    soft[:n] = one_hot[:n] * lam + one_hot[:n].flip(0) * (1 - lam)
    with torch.no_grad():
        expected = torch.sum(-soft * F.log_softmax(model(mixed).float(), -1), -1).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert 0.0 < lam < 1.0


def test_cutmix_changes_a_box_only(monkeypatch):
    model = _model(cutmix_alpha=1.0)
    seen = {}
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: seen.setdefault("x", x.clone()) is not None and forward(x))
    x = torch.arange(4 * 16 * 16, dtype=torch.float32).view(4, 1, 16, 16)
    np.random.seed(0)
    _step(model, x, torch.tensor([0, 1, 2, 3]), monkeypatch)
    changed = (seen["x"] != x)
    assert changed.any() and not changed.all()  # a box pasted from the reversed batch
    flipped = x.flip(0)
    torch.testing.assert_close(seen["x"][changed], flipped[changed])


def test_validation_is_never_mixed_and_fit_runs():
    model = _model(mixup_alpha=0.2, cutmix_alpha=1.0)
    trainer = fast_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule(limit=48, batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/acc" in trainer.callback_metrics


@pytest.mark.parametrize("kwargs, match", [
    (dict(mixup_alpha=-1.0), "mixup_alpha and cutmix_alpha must be >= 0"),
    (dict(mixup_alpha=0.2, mix_prob=1.5), "probabilities"),
    (dict(mixup_alpha=0.2, tasks={"a": 3, "b": 4}), "tasks="),
])
def test_bad_mixing_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


def test_feature_cache_refuses_mixed_training():
    model = _model(mixup_alpha=0.2, freeze_backbone=True)
    trainer = fast_trainer(max_epochs=1, limit_train_batches=1, callbacks=[FeatureCache()])
    with pytest.raises(ValueError, match="mixes its training images"):
        trainer.fit(model, datamodule=DigitsDataModule(limit=32, batch_size=16))


def test_missing_labels_are_refused(monkeypatch):
    model = _model(mixup_alpha=0.2)
    with pytest.raises(ValueError, match="MISSING"):
        _step(model, torch.randn(4, 1, 16, 16), torch.tensor([0, -100, 1, 2]), monkeypatch)
