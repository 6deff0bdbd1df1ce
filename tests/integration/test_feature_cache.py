"""FeatureCache: the cached path trains the same model as the uncached one; when layers thaw it
caches the frozen prefix before the first trainable one and runs the rest, and goes off when
nothing before a trainable layer stays frozen; it is rebuilt when the frozen weights or the data
change, and refuses random augmentation with a message that says what to do.

Each comparison runs the same seeded fit twice, with and without the callback, on the same
shuffled batches, and compares the final weights (float tolerance: the cached features were
computed in other batch groupings).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_ft import FineTuneModule
from lightning_ft.feature_tables import random_transform_report
from lightning_ft.callbacks import FeatureCache, GradualUnfreezing
from lightning_ft.data import DigitsDataModule, MNISTSubsetDataModule, SourceTargetDataModule
from tests.conftest import fast_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kwargs):
    torch.manual_seed(0)
    return FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=32, lr=1e-2, **kwargs)


def _data(**kwargs):
    return DigitsDataModule(limit=96, batch_size=16, **kwargs)


class BatchKinds(Callback):
    """Records per epoch what each training step ran from: the head's inputs ("cached"), the input of a
    backbone module ("prefix:<name>") or the images (``FeatureCache.serving``; the cache's hook runs first)."""

    def __init__(self, cache=None):
        self.cache = cache
        self.kinds: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        serving = self.cache.serving if self.cache is not None else None
        kind = "images" if serving is None else "cached" if serving.startswith("head") else f"prefix:{serving.removeprefix('backbone.')}"
        self.kinds.setdefault(trainer.current_epoch, []).append(kind)


def _fit(cache: FeatureCache | None, epochs: int = 3, model=None, callbacks=(), data=None, **trainer_kwargs):
    L.seed_everything(0)
    model = model or _model(freeze_backbone=True)
    kinds = BatchKinds(cache or next((c for c in callbacks if isinstance(c, FeatureCache)), None))
    cbs = [*callbacks, *([cache] if cache is not None else []), kinds]  # kinds sees what the step gets
    trainer = fast_trainer(max_epochs=epochs, callbacks=cbs, **trainer_kwargs)
    trainer.fit(model, datamodule=data or _data())
    return model, trainer, kinds.kinds


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [float((sa[k].float() - sb[k].float()).abs().max()) for k in sa]
    return float("inf") if any(d != d for d in diffs) else max(diffs)  # a NaN anywhere is no match (max() skips it)


def test_cached_linear_probe_equals_the_uncached_run():
    plain, plain_trainer, plain_kinds = _fit(None)
    cache = FeatureCache()
    cached, trainer, kinds = _fit(cache)
    assert set(plain_kinds[0]) == {"images"}
    assert all(k == "cached" for epoch in kinds.values() for k in epoch)  # every batch, epoch 0 included
    batches = trainer.num_training_batches
    assert cache.served == {e: {"head.fc": batches} for e in range(3)}  # epochs 0..2 served from the table in full
    assert cache.stats["builds"] == 2  # train and val, once each
    assert _max_diff(plain, cached) < 1e-5
    for key in ("val/acc", "val/loss", "train/loss_epoch"):  # validation was served from the cache too
        assert float(trainer.callback_metrics[key]) == pytest.approx(float(plain_trainer.callback_metrics[key]), abs=1e-5)
    assert not cache.tables  # dropped at teardown


def test_bf16_mixed_features_match_the_uncached_run():
    plain, _, _ = _fit(None, precision="bf16-mixed")
    cache = FeatureCache()
    cached, _, _ = _fit(cache, precision="bf16-mixed")
    assert _max_diff(plain, cached) < 1e-4


def test_memory_mapped_tables_equal_in_memory_ones_and_are_deleted(tmp_path):
    plain, _, _ = _fit(None)
    cache = FeatureCache(max_memory_gb=0, cache_dir=tmp_path)
    seen: list[Path] = []

    class Files(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.extend(tmp_path.iterdir())

    cached, _, _ = _fit(cache, callbacks=[Files()])
    assert seen and all(p.suffix == ".f32" for p in seen)  # on disk during the run...
    assert not list(tmp_path.iterdir())  # ...and gone after it
    assert _max_diff(plain, cached) < 1e-5


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_thawing_moves_the_cut_then_switches_the_cache_off_and_matches_the_uncached_run(precision):
    def unfreezing():
        return GradualUnfreezing(monitor=None, milestones={1: ["layer4.0"], 2: ["layer3.0"], 3: "all"}, verbose=False)

    plain, plain_trainer, _ = _fit(None, epochs=4, model=_model(), callbacks=[unfreezing()], precision=precision)
    cache = FeatureCache()
    cached, cached_trainer, kinds = _fit(cache, epochs=4, model=_model(), callbacks=[unfreezing()],
                                         precision=precision)
    assert [set(kinds[e]) for e in range(4)] == [{"cached"}, {"prefix:layer4"}, {"prefix:layer3"}, {"images"}]
    assert cache.stats["builds"] == 6  # train + val: head inputs, then the inputs of layer4, then of layer3
    for key in ("val/acc", "val/loss", "train/loss_epoch"):  # validation and logging ran from the tables too
        assert float(cached_trainer.callback_metrics[key]) == pytest.approx(
            float(plain_trainer.callback_metrics[key]), abs=1e-5 if precision == "32-true" else 1e-2), key
    # the whole model, thawed layers included: the suffix trained on the cached prefix as on the images
    assert _max_diff(plain, cached) < (1e-5 if precision == "32-true" else 1e-3)


@pytest.mark.parametrize("on_disk", [False, True], ids=["in_memory", "memmap"])
@pytest.mark.parametrize("thaw, expect", [("layer4", "moved"), ("all", "reloaded")])
def test_a_thaw_at_a_mid_epoch_validation_serves_the_prefetched_batch_right(thaw, expect, on_disk, tmp_path):
    class ThawMidEpoch(Callback):  # thaws at the first mid-epoch validation, after the next batch was prefetched
        def on_validation_end(self, trainer, pl_module):
            if trainer.current_epoch == 0 and not trainer.sanity_checking:
                for p in (pl_module.backbone if thaw == "all" else pl_module.backbone.layer4).parameters():
                    p.requires_grad_(True)

    def callbacks():
        return [GradualUnfreezing(monitor=None, milestones={1: "all"}, verbose=False), ThawMidEpoch()]

    plain, _, _ = _fit(None, epochs=1, model=_model(freeze_backbone=False), callbacks=callbacks(),
                       val_check_interval=0.5)
    cache = FeatureCache(max_memory_gb=0, cache_dir=tmp_path) if on_disk else FeatureCache()
    cached, _, kinds = _fit(cache, epochs=1, model=_model(freeze_backbone=False), callbacks=callbacks(),
                            val_check_interval=0.5)
    if expect == "moved":  # the prefetched batch is served from the new table (inputs of layer4)
        assert kinds[0][0] == "cached" and kinds[0][-1] == "prefix:layer4"
        # the one batch fetched before the thaw moves to the new table; the rest are read from it
        assert kinds[0].count("prefix:layer4") > 1
        assert cache.stats["moved_batches"] == 1 and cache.stats["reloaded_batches"] == 0
    else:  # nothing frozen before a trainable layer: the prefetched batch is loaded as images
        assert "cached" in kinds[0] and kinds[0][-1] == "images"
        # the batch fetched before the thaw is re-loaded; the rest of the epoch is loaded as images
        assert kinds[0].count("images") > 1
        assert cache.stats["reloaded_batches"] == 1 and cache.stats["moved_batches"] == 0
    assert _max_diff(plain, cached) < 1e-5


@pytest.mark.parametrize("order", ["cache_first", "cache_last"])
def test_batchnorm_recalibrated_at_train_start_is_what_the_cache_serves(order):
    def unfreezing():
        return GradualUnfreezing(milestones={0: ["head"]}, frozen_bn="recalibrate", verbose=False)

    plain, _, _ = _fit(None, model=_model(), callbacks=[unfreezing()])
    cache = FeatureCache()
    callbacks = [cache, unfreezing()] if order == "cache_first" else [unfreezing(), cache]
    cached, _, kinds = _fit(None, model=_model(), callbacks=callbacks)
    assert all(set(k) == {"cached"} for k in kinds.values())
    assert cache.stats["builds"] == (4 if order == "cache_first" else 2)  # built before the recalibration: again
    assert _max_diff(plain, cached) < 1e-5


def test_frozen_weights_changed_mid_epoch_rebuild_the_tables_and_move_the_prefetched_batch():
    class NudgeMidEpoch(Callback):  # at the first mid-epoch validation, after the next batch was prefetched
        def on_validation_end(self, trainer, pl_module):
            if trainer.current_epoch == 0 and not trainer.sanity_checking:
                with torch.no_grad():
                    pl_module.backbone.layer4[0].conv1.weight.mul_(1.5)

    plain, _, _ = _fit(None, epochs=1, callbacks=[NudgeMidEpoch()], val_check_interval=0.5)
    cache = FeatureCache()
    cached, _, kinds = _fit(cache, epochs=1, callbacks=[NudgeMidEpoch()], val_check_interval=0.5)
    assert set(kinds[0]) == {"cached"} and cache.stats["builds"] == 4
    assert cache.stats["moved_batches"] == 1  # the prefetched batch held rows of the old table
    assert _max_diff(plain, cached) < 1e-5


def test_tables_that_do_not_fit_on_disk_are_refused_before_training(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ValueError, match=r"need .* on disk under .* which has 1000.0 B free. Point cache_dir"):
        _fit(FeatureCache(max_memory_gb=0, cache_dir=tmp_path), epochs=1)


def test_changed_frozen_weights_rebuild_the_tables():
    class Nudge(Callback):  # changes the frozen weights without training them (restore_best does this)
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                with torch.no_grad():
                    pl_module.backbone.layer4[0].conv1.weight.mul_(1.5)

    plain, _, _ = _fit(None, callbacks=[Nudge()])
    cache = FeatureCache()
    cached, _, _ = _fit(cache, callbacks=[Nudge()])
    assert cache.stats["builds"] == 4  # train + val, then again after the change
    assert _max_diff(plain, cached) < 1e-5


def test_resumed_cached_run_equals_the_resumed_uncached_run(tmp_path):
    results, kinds = [], []
    for cache in (None, FeatureCache()):
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(cache is None), save_last=True)
        _fit(cache if cache is None else FeatureCache(), epochs=2, callbacks=[ckpt], enable_checkpointing=True)
        L.seed_everything(1)
        model, record = _model(freeze_backbone=True), BatchKinds(cache)
        cbs = [*([cache] if cache is not None else []), record]
        fast_trainer(max_epochs=4, callbacks=cbs).fit(model, datamodule=_data(), ckpt_path=ckpt.last_model_path)
        results.append(model)
        kinds.append(record.kinds)
    assert sorted(kinds[1]) == [2, 3] and all(set(k) == {"cached"} for k in kinds[1].values())  # served, in full
    assert all(set(k) == {"images"} for k in kinds[0].values())
    assert _max_diff(*results) < 1e-5


def test_a_run_resumed_in_a_prefix_phase_serves_the_prefix_and_equals_the_uncached_resume(tmp_path):
    def unfreezing():
        return GradualUnfreezing(monitor=None, milestones={1: ["layer4.0"], 3: ["layer3.0"]}, verbose=False)

    results, kinds = [], []
    for cached in (False, True):
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(cached), save_last=True)
        _fit(FeatureCache() if cached else None, epochs=2, model=_model(), callbacks=[unfreezing(), ckpt],
             enable_checkpointing=True)  # stops after epoch 1: layer4 thawed
        L.seed_everything(1)
        cache = FeatureCache() if cached else None
        model, record = _model(), BatchKinds(cache)
        cbs = [unfreezing(), *([cache] if cached else []), record]
        fast_trainer(max_epochs=4, callbacks=cbs).fit(model, datamodule=_data(), ckpt_path=ckpt.last_model_path)
        results.append(model)
        kinds.append(record.kinds)
    assert [set(kinds[1][e]) for e in (2, 3)] == [{"prefix:layer4"}, {"prefix:layer3"}]
    assert _max_diff(*results) < 1e-5


class Noisy(Dataset):
    """Random augmentation: noise drawn on every load."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((1, 32, 32), float(i)) + 0.1 * torch.randn(1, 32, 32), i % 10


def test_random_augmentation_is_refused_before_any_step_and_the_random_stream_is_untouched():
    state = torch.get_rng_state()
    assert "loads differently under two seeds" in random_transform_report(Noisy())
    assert torch.equal(torch.get_rng_state(), state)  # the probe restored the global random state
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = fast_trainer(max_epochs=1, callbacks=[FeatureCache(), Count()])
    with pytest.raises(ValueError, match="randomly augmented.*allow_random_transforms=True"):
        trainer.fit(_model(freeze_backbone=True), DataLoader(Noisy(), batch_size=8, shuffle=True))
    assert not steps


def test_allow_random_transforms_caches_one_draw_with_a_warning():
    cache = FeatureCache(allow_random_transforms=True)
    record = BatchKinds(cache)
    trainer = fast_trainer(max_epochs=3, callbacks=[cache, record])
    model = _model(freeze_backbone=True)
    with pytest.warns(UserWarning, match="caching one draw per sample"):
        trainer.fit(model, DataLoader(Noisy(), batch_size=8, shuffle=True))
    assert all(set(k) == {"cached"} for k in record.kinds.values()) and len(record.kinds) == 3
    assert cache.stats["builds"] == 1  # one draw per sample, built once, served every epoch


def test_source_only_baseline_serves_both_validation_loaders_from_the_cache():
    def data():
        return SourceTargetDataModule(MNISTSubsetDataModule(limit=64), DigitsDataModule(limit=64, mnist_frame=True),
                                      batch_size=16, source_only=True)

    plain, plain_trainer, _ = _fit(None, epochs=2, data=data())
    cache = FeatureCache()
    cached, trainer, kinds = _fit(cache, epochs=2, data=data())
    assert all(set(k) == {"cached"} for k in kinds.values())
    assert cache.stats["builds"] == 3  # source train, source val, target val
    for key in ("val/acc", "val_target/acc", "val/target_entropy", "val/label_free"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(float(plain_trainer.callback_metrics[key]), abs=1e-5)
    assert _max_diff(plain, cached) < 1e-5


def test_a_first_epoch_that_falls_back_to_images_is_reported(monkeypatch):
    """The first epoch's iterator exists before on_train_start; the cache takes it over through a structure
    of Lightning's with no public handle. Were that structure to change (simulated here: the take-over
    finds nothing), epoch 0 would train on images: right, but not faster, and the user is told."""
    monkeypatch.setattr(FeatureCache, "_take_over_first_epoch", lambda self, trainer: None)
    cache = FeatureCache()
    with pytest.warns(UserWarning, match=r"FeatureCache: 6 of the 6 training batches of epoch 0 were loaded from the data") as seen:
        _, trainer, kinds = _fit(cache)
    assert kinds[0] == ["images"] * 6 and kinds[1] == kinds[2] == ["cached"] * 6  # later epochs: served
    assert sum("were loaded from the data" in str(w.message) for w in seen) == 1


def test_epochs_whose_loader_iterator_is_not_the_caches_are_reported(monkeypatch):
    """As if torch built a DataLoader's iterator without ``_get_iterator`` (the instance attribute the
    cache sets): every epoch after the first (taken over live) trains on images, and each says so."""
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: type(self)._get_iterator(self))
    cache = FeatureCache()
    with pytest.warns(UserWarning, match="training batches of epoch 2 were loaded from the data") as seen:
        _, _, kinds = _fit(cache)
    assert set(kinds[0]) == {"cached"} and set(kinds[1]) == set(kinds[2]) == {"images"}
    assert {e for e in range(3) if any(f"of epoch {e} were loaded" in str(w.message) for w in seen)} == {1, 2}


def test_a_trainable_backbone_is_refused_at_the_start():
    trainer = fast_trainer(max_epochs=1, callbacks=[FeatureCache()])
    with pytest.raises(ValueError, match="needs a frozen part before the first trainable layer.*'backbone.conv1' is the first layer that runs"):
        trainer.fit(_model(), datamodule=_data())


def test_batches_without_targets_are_refused_before_training():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = fast_trainer(max_epochs=1, callbacks=[FeatureCache()])
    with pytest.raises(ValueError, match=r"serves \(inputs, targets\) batches of tensors; the train loader's batches are a Tensor"):
        trainer.fit(Plain(), DataLoader(torch.randn(8, 4)))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_share_the_tables_and_match_the_uncached_run(tmp_path):
    from tests.helpers import run_ddp_script

    script = Path(__file__).resolve().parent / "scripts" / "ddp_feature_cache.py"
    c0, c1 = run_ddp_script(script, tmp_path / "cache", ["cache"])
    p0, p1 = run_ddp_script(script, tmp_path / "plain", ["plain"])
    weights = {name: torch.load(tmp_path / name / "rank0.pt", weights_only=True) for name in ("cache", "plain")}
    rank1 = torch.load(tmp_path / "cache" / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank1[k], v) for k, v in weights["cache"].items())  # ranks identical
    # epoch 0 from the head-input table, epoch 1 (layer4 thawed) from the table of layer4's inputs
    assert c0["cached"] == c1["cached"] > 0 and c0["prefix"] == c1["prefix"] > 0 and c0["images"] == 0
    for key, value in weights["plain"].items():  # the whole model, layer4 and head trained
        assert torch.allclose(weights["cache"][key].float(), value.float(), atol=1e-5), key
    assert c0["val_acc"] == pytest.approx(p0["val_acc"], abs=1e-6)


def test_changed_data_rebuilds_the_tables():
    class ChangeImages(Callback):  # the training images change in place after epoch 0 (same dataset object)
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                images = trainer.datamodule.train_set.dataset.tensors[0]
                images.mul_(-1.0)

    plain, _, _ = _fit(None, callbacks=[ChangeImages()])
    cache = FeatureCache()
    cached, _, _ = _fit(cache, callbacks=[ChangeImages()])
    assert cache.stats["builds"] == 4  # train + val, then again once the data changed
    assert _max_diff(plain, cached) < 1e-5


@pytest.mark.parametrize("problem", ["iterable", "persistent_workers"])
def test_loaders_the_cache_cannot_serve_are_refused(problem):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(1, 32, 32), 0)] * 8)

    loader = (DataLoader(Stream(), batch_size=4) if problem == "iterable"
              else DataLoader(Noisy(), batch_size=8, num_workers=1, persistent_workers=True))
    match = "IterableDataset" if problem == "iterable" else "persistent_workers=True"
    trainer = fast_trainer(max_steps=2, callbacks=[FeatureCache()])  # a stream has no length to schedule by
    with pytest.raises(ValueError, match=match):
        trainer.fit(_model(freeze_backbone=True), loader)


def test_a_negative_memory_limit_is_refused():
    with pytest.raises(ValueError, match="max_memory_gb must be >= 0"):
        FeatureCache(max_memory_gb=-1)


def test_placeholder_inputs_changed_on_their_way_to_the_step_stop_the_run_with_a_message():
    """A user's on_after_batch_transfer that normalises the inputs would turn the cached batch's placeholder
    into a NaN tensor and the loss into NaN; the cache stops the run and says why."""
    model = _model(freeze_backbone=True)
    model.on_after_batch_transfer = lambda batch, dataloader_idx: [(batch[0] - 0.5) / 0.5, batch[1]]
    trainer = fast_trainer(max_epochs=2, callbacks=[FeatureCache()])
    with pytest.raises(RuntimeError, match="inputs were replaced before the step"):
        trainer.fit(model, datamodule=_data())


def test_a_batch_skipped_by_the_modules_hook_leaves_no_injection_behind():
    """on_train_batch_start returning -1 ends the epoch without on_train_batch_end: the injection the cache
    entered for that batch must not outlive it. Here the frozen weights then change, so the next epoch
    rebuilds the tables: built under a leftover injection they would be NaN."""
    class Nudge(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.backbone.conv1[0].weight.mul_(1.01)

    plain, cached = _model(freeze_backbone=True), _model(freeze_backbone=True)
    for model in (plain, cached):
        model.on_train_batch_start = lambda batch, batch_idx: -1 if batch_idx == 3 else None
    _fit(None, model=plain, callbacks=[Nudge()], limit_val_batches=0)
    cache = FeatureCache()
    _fit(cache, model=cached, callbacks=[Nudge()], limit_val_batches=0)
    assert cache.stats["builds"] >= 2  # rebuilt after the nudge
    assert cache.serving is None and all("forward" not in m.__dict__ for m in cached.modules())
    assert _max_diff(plain, cached) < 1e-5


@pytest.mark.parametrize("problem", ["precision", "float_targets"])
def test_what_the_cache_cannot_serve_right_is_refused_before_training(problem):
    from torch.utils.data import TensorDataset

    if problem == "precision":
        trainer = fast_trainer(max_steps=1, precision="bf16-true", callbacks=[FeatureCache()])
        with pytest.raises(ValueError, match="precision='32-true' and the mixed precisions.*'bf16-true'"):
            trainer.fit(_model(freeze_backbone=True), datamodule=_data())
        return
    data = TensorDataset(torch.randn(16, 1, 32, 32), torch.rand(16))  # regression targets
    trainer = fast_trainer(max_steps=1, callbacks=[FeatureCache()])
    with pytest.raises(ValueError, match="class-index targets.*dtype torch.float32"):
        trainer.fit(_model(freeze_backbone=True), DataLoader(data, batch_size=8))
