"""FeatureCache(share_dir=...): a table built by one fit is loaded by the next fit that has the same
frozen weights and data (another seed, another process), and the run trains exactly as a fit that built
its own; changed frozen weights or data get a new table. ``lightning-ft compare`` relies on it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import FeatureCache
from lightning_ft.data import DigitsDataModule
from tests.conftest import fast_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(cache: FeatureCache, seed: int = 0, perturb: bool = False, limit: int | None = 96):
    torch.manual_seed(0)  # the same pretrained-like backbone in every run
    model = FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=32, lr=1e-2, freeze_backbone=True)
    if perturb:
        with torch.no_grad():
            next(model.backbone.parameters()).add_(0.1)
    L.seed_everything(seed)
    for layer in model.head.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()  # the head is what the seed draws
    trainer = fast_trainer(max_epochs=2, callbacks=[cache])
    trainer.fit(model, datamodule=DigitsDataModule(limit=limit, batch_size=16))
    return model


def _w(model):
    return torch.cat([p.detach().flatten() for p in model.head.parameters()])


def test_second_fit_loads_the_table_and_trains_the_same(tmp_path):
    share = tmp_path / "tables"
    first = FeatureCache(share_dir=share)
    a = _fit(first, seed=1)
    assert first.stats["shared_loads"] == 0 and first.stats["builds"] == 2  # train + val built, saved
    assert len(list(share.glob("*.pt"))) == 2
    second = FeatureCache(share_dir=share)
    b = _fit(second, seed=1)
    assert second.stats["shared_loads"] == 2 and second.stats["builds"] == 0
    torch.testing.assert_close(_w(b), _w(a), rtol=0, atol=0)  # the same run, bit for bit
    own = FeatureCache()  # no sharing at all: the same result again
    c = _fit(own, seed=1)
    torch.testing.assert_close(_w(c), _w(a), rtol=1e-6, atol=1e-6)
    other_seed = FeatureCache(share_dir=share)
    d = _fit(other_seed, seed=2)
    assert other_seed.stats["shared_loads"] == 2
    assert not torch.allclose(_w(d), _w(a))  # the seed still matters for the head


def test_changed_weights_or_data_build_a_new_table(tmp_path):
    share = tmp_path / "tables"
    _fit(FeatureCache(share_dir=share))
    changed = FeatureCache(share_dir=share)
    _fit(changed, perturb=True)
    assert changed.stats["shared_loads"] == 0 and changed.stats["builds"] == 2
    other_data = FeatureCache(share_dir=share)
    _fit(other_data, limit=80)
    assert other_data.stats["shared_loads"] == 0
    assert len(list(share.glob("*.pt"))) == 6


class _Relabelled(DigitsDataModule):
    """The digits with one training label corrected after the split: the same samples, the same 16 rows the
    key samples, one different target."""

    def setup(self, stage=None):
        fresh = self.train_set is None
        super().setup(stage)
        if fresh:
            labels = self.train_set.dataset.tensors[1]
            i = self.train_set.indices[5]  # not one of the rows at linspace(0, n - 1, 16)
            labels[i] = (labels[i] + 1) % 10


def test_a_corrected_label_builds_a_new_table(tmp_path):
    share = tmp_path / "tables"
    _fit(FeatureCache(share_dir=share), limit=None)
    relabelled = FeatureCache(share_dir=share)
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=32, lr=1e-2, freeze_backbone=True)
    fast_trainer(max_epochs=1, limit_train_batches=1, callbacks=[relabelled]).fit(
        model, datamodule=_Relabelled(batch_size=16))
    assert relabelled.stats["builds"] >= 1  # built again (the tables share one tensor of labels): not stale
