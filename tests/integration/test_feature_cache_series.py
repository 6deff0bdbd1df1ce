"""FeatureCache on satellite image time series: inputs ``{"images": (B, T, C, H, W), "mask": (B, T), "doy": (B, T)}``.

The module is a user's (written here, per the design notes): a small conv backbone with BatchNorm run
on every date's image (``images.flatten(0, 1)``, shared weights), the features unflattened to
``(B, T, D)``, and a trainable head that reads the mask and the days of year. Each comparison runs the
same seeded fit with and without the cache and compares the weights; the served batches are checked
against the loaded ones (mask and doy real, images a NaN placeholder).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ft.callbacks import FeatureCache
from lightning_ft.prefix import find_cut
from tests.conftest import fast_trainer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")]  # the frozen backbone, by design

T, C, SIZE, CLASSES = 4, 2, 8, 3


class Series(Dataset):
    """Series of ``T`` dates, 2..T of them valid (the rest padding: zero images, day 0), sorted days of year."""

    def __init__(self, n: int, seed: int, chans: int = C, size: int = SIZE) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = 2 + torch.arange(n) % (T - 1)
        self.mask = torch.arange(T)[None] < lengths[:, None]
        self.images = torch.randn(n, T, chans, size, size, generator=g) * self.mask[:, :, None, None, None]
        self.doy = torch.sort(torch.randint(1, 366, (n, T), generator=g), dim=1).values * self.mask
        self.y = torch.arange(n) % CLASSES

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"images": self.images[i], "mask": self.mask[i], "doy": self.doy[i]}, self.y[i]


class DateHead(nn.Module):
    """Per-date features plus an encoding of the day of year, averaged over the valid dates, then a classifier."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.date = nn.Linear(2, width)
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, features, mask, doy):
        angle = doy.float() * (2 * math.pi / 365)
        h = torch.relu(self.proj(features) + self.date(torch.stack([angle.sin(), angle.cos()], -1)))
        w = mask.unsqueeze(-1).to(h.dtype)
        return self.fc((h * w).sum(1) / w.sum(1).clamp_min(1))


class SeriesNet(L.LightningModule):
    """Somebody else's time-series model: a frozen conv backbone per date (BatchNorm in eval), a trainable head."""

    def __init__(self, thaw_last_conv: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(C, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.backbone[1].running_mean.normal_()  # statistics that matter: an eval-mode BatchNorm is no identity
        self.head = DateHead(16)
        self.backbone.requires_grad_(False).eval()
        if thaw_last_conv:
            self.backbone[3].requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm keeps its statistics
        return self

    def forward(self, x):
        images = x["images"]
        b, t = images.shape[:2]
        features = self.backbone(images.flatten(0, 1)).unflatten(0, (b, t))
        return self.head(features, x["mask"], x["doy"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


class Seen(Callback):
    """The inputs each training step gets (after the cache's hook), and the tables' shapes at each epoch's end."""

    def __init__(self, cache: FeatureCache | None = None) -> None:
        self.cache = cache
        self.inputs: list[dict[str, torch.Tensor]] = []
        self.tables: list[dict[str, tuple]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append({k: v.clone() for k, v in batch[0].items()})

    def on_train_epoch_end(self, trainer, pl_module):
        if self.cache is not None:
            self.tables.append({"features": sorted(tuple(t.features.shape) for t in self.cache.tables.values()),
                                "extras": sorted((k, v.dtype, tuple(v.shape)) for t in self.cache.tables.values()
                                                 for k, v in t.extras.items())})


def _fit(model, cache: FeatureCache | None, epochs: int = 3, train=None, val=None):
    L.seed_everything(0)
    seen = Seen(cache)
    callbacks = [*([cache] if cache is not None else []), seen]  # seen runs after the cache: what the step gets
    train = train or Series(24, seed=1)
    val = val or Series(12, seed=2)
    trainer = fast_trainer(max_epochs=epochs, deterministic=True, callbacks=callbacks)
    trainer.fit(model, DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8))
    return model, trainer, seen


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on_disk", [False, True], ids=["in_memory", "memmap"])
def test_cached_series_run_equals_the_uncached_run_and_serves_mask_and_doy_as_loaded(on_disk, tmp_path):
    plain, plain_trainer, plain_seen = _fit(SeriesNet(), None)
    cache = FeatureCache(max_memory_gb=0, cache_dir=tmp_path) if on_disk else FeatureCache()
    cached, trainer, seen = _fit(SeriesNet(), cache)

    assert cache.served == {e: {"head": trainer.num_training_batches} for e in range(3)}  # every batch, from the head's inputs
    # one row per sample: the T dates' features, (T, 16); the mask and days of year beside them
    assert seen.tables[0] == {"features": [(12, T, 16), (24, T, 16)],
                              "extras": [("doy", torch.int64, (12, T)), ("doy", torch.int64, (24, T)),
                                         ("mask", torch.bool, (12, T)), ("mask", torch.bool, (24, T))]}
    assert len(seen.inputs) == len(plain_seen.inputs) == 9
    for served, loaded in zip(seen.inputs, plain_seen.inputs):  # the same shuffled batches
        assert torch.equal(served["mask"], loaded["mask"]) and torch.equal(served["doy"], loaded["doy"])
        assert served["images"].shape == loaded["images"].shape and served["images"].isnan().all()
    _assert_same_weights(plain, cached)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(plain_trainer.callback_metrics["val_loss"]), abs=1e-6)
    assert not cache.tables and all("forward" not in m.__dict__ for m in cached.modules())


def test_the_head_reads_mask_and_doy_so_serving_them_wrong_would_show():
    model = SeriesNet().eval()
    x, _ = next(iter(DataLoader(Series(8, seed=1), batch_size=8)))
    out = model(x)
    assert not torch.allclose(out, model({**x, "doy": torch.zeros_like(x["doy"])}))
    assert not torch.allclose(out, model({**x, "mask": torch.ones_like(x["mask"])}))


def test_a_cut_inside_the_backbone_caches_every_dates_rows_and_equals_the_uncached_run():
    plain, _, _ = _fit(SeriesNet(thaw_last_conv=True), None)
    cache = FeatureCache()
    cached, trainer, seen = _fit(SeriesNet(thaw_last_conv=True), cache)
    assert cache.served == {e: {"backbone.3": trainer.num_training_batches} for e in range(3)}
    assert cache.cut is not None and cache.cut.rows == T  # the cut conv sees B*T rows: T per sample
    assert seen.tables[0]["features"] == [(12, T, 8, SIZE, SIZE), (24, T, 8, SIZE, SIZE)]
    _assert_same_weights(plain, cached)  # the thawed conv and the head


def test_capture_folds_the_dates_and_inject_unfolds_them():
    model = SeriesNet(thaw_last_conv=True).eval()
    x, _ = next(iter(DataLoader(Series(5, seed=3), batch_size=5)))
    cut, why = find_cut(model, model, x)
    assert cut is not None, why
    assert (cut.name, cut.rows, cut.input_key) == ("backbone.3", T, "images")
    features = cut.capture(model, x)
    assert features.shape == (5, T, 8, SIZE, SIZE)
    inputs = cut.placeholder_input(5, torch.device("cpu"), cut.extras(x))
    assert list(inputs) == ["images", "mask", "doy"] and inputs["images"].stride() == (0,) * 5
    assert inputs["mask"] is x["mask"] and inputs["doy"] is x["doy"]
    with cut.inject(features):
        again = model(inputs)
    torch.testing.assert_close(again, model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the real 'mask', 'doy'"):
        cut.placeholder_input(5, torch.device("cpu"))


class ReadsImages(SeriesNet):
    """A head that also reads the images past the backbone: caching the backbone alone would be wrong."""

    def forward(self, x):
        return super().forward(x) + x["images"].mean(dim=(1, 2, 3, 4))[:, None]


def test_a_head_that_reads_the_images_is_not_cut():
    model = ReadsImages().eval()
    x, _ = next(iter(DataLoader(Series(3, seed=3), batch_size=3)))
    cut, why = find_cut(model, model, x)
    assert cut is None and "reads the inputs' 'images'" in why
    trainer = fast_trainer(max_epochs=1, callbacks=[FeatureCache()])
    with pytest.raises(ValueError, match="needs a frozen part.*reads the inputs' 'images'"):
        trainer.fit(ReadsImages(), DataLoader(Series(8, seed=1), batch_size=4))


@pytest.mark.parametrize("pooling, cut_name, row", [("mean", "head.fc", (96,)), ("attention", "head", (T, 96))])
def test_fine_tune_module_with_a_temporal_head_cached_equals_uncached(pooling, cut_name, row):
    heads = pytest.importorskip("lightning_ft.heads")
    if "temporal" not in getattr(heads, "HEADS", {}):
        pytest.skip("lightning_ft.heads has no 'temporal' head")
    from lightning_ft import FineTuneModule

    kwargs = {"pooling": pooling, **({"hidden_dim": 16, "num_heads": 2} if pooling == "attention" else {})}

    def model():
        torch.manual_seed(0)
        return FineTuneModule(backbone="test_resnet", num_classes=3, head="temporal", head_kwargs=kwargs,
                              freeze_backbone=True, lr=1e-2)

    data = {"train": Series(16, seed=1, chans=3, size=16), "val": Series(8, seed=2, chans=3, size=16)}
    plain, _, _ = _fit(model(), None, **data)
    cache = FeatureCache()
    cached, trainer, seen = _fit(model(), cache, **data)
    # mean pooling: the pooled dates at the classifier; attention: every date's features at the head (mask, doy served)
    assert cache.served == {e: {cut_name: trainer.num_training_batches} for e in range(3)}
    assert seen.tables[0]["features"] == [(8, *row), (16, *row)]
    _assert_same_weights(plain, cached)


def test_a_placeholder_changed_on_its_way_to_the_step_stops_the_run_with_a_message():
    model = SeriesNet()
    model.on_after_batch_transfer = lambda batch, dataloader_idx: [
        {**batch[0], "images": (batch[0]["images"] - 0.5) / 0.5}, batch[1]]  # a user's normalisation
    trainer = fast_trainer(max_epochs=1, callbacks=[FeatureCache()])
    with pytest.raises(RuntimeError, match="inputs were replaced before the step"):
        trainer.fit(model, DataLoader(Series(8, seed=1), batch_size=4))
