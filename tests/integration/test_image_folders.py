"""``ImageFolderDataModule`` on folders laid out the way datasets ship, in-process (the console script
runs them in ``test_folder_cli.py``): layouts, band counts, early errors, class names and the input
preparation carried by the checkpoint, FeatureCache on a folder with the datamodule's defaults, and
Lightning's eval-mode warning replaced by our line."""

from __future__ import annotations

import inspect
import shutil
import logging
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import FeatureCache, GradualUnfreezing
from lightning_ft.data import DIGIT_NAMES, EpochRandomSampler, ImageFolderDataModule, write_digits_folder

from tests.conftest import fast_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits") / "png", fmt="png", size=16, per_class=6)


def tiny_model(**kwargs) -> FineTuneModule:
    kwargs = {"backbone": "test_resnet", "num_classes": 10, "in_chans": 1, "img_size": 16, **kwargs}
    return FineTuneModule(**kwargs)


def test_train_and_test_without_val_gets_a_stratified_validation_split(png_folder: Path) -> None:
    dm = ImageFolderDataModule(str(png_folder), val_fraction=0.5, num_workers=0, image_size=16, mean=[0.5], std=[0.5])
    dm.setup("fit")
    assert set(dm.splits) == {"train", "val", "test"}
    assert dm.classes == sorted(DIGIT_NAMES)
    train, val, test = (dm.splits[k] for k in ("train", "val", "test"))
    assert len(train) == len(val) == 30 and len(test) == 60  # 6 per class in train/: halves; test/ as shipped
    assert not set(train.paths) & set(val.paths) and all("/train/" in p for p in train.paths + val.paths)
    assert all("/test/" in p for p in test.paths)
    assert Counter(train.targets) == Counter(val.targets) == Counter({i: 3 for i in range(10)})
    for path, label in val.samples:  # labels are the class folders
        assert Path(path).parent.name == dm.classes[label]
    dm.setup("fit")  # idempotent
    assert dm.splits["val"] is val


def test_a_val_folder_is_used_and_a_flat_folder_is_split(tmp_path: Path, png_folder: Path) -> None:
    root = tmp_path / "three"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((5, 5), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    dm = ImageFolderDataModule(str(root), num_workers=0, test_fraction=0.0, image_size=8, mean=[0.5], std=[0.5])
    dm.setup("fit")
    assert set(dm.splits) == {"train", "val"} and len(dm.splits["val"]) == 8 and len(dm.splits["train"]) == 8
    flat = ImageFolderDataModule(str(png_folder / "train"), num_workers=0, val_fraction=0.2, test_fraction=0.2,
                                 image_size=8, mean=[0.5], std=[0.5])
    flat.setup("fit")
    assert [len(flat.splits[k]) for k in ("train", "val", "test")] == [36, 12, 12]


def test_a_test_class_the_training_split_lacks_is_refused(tmp_path: Path) -> None:
    for split, classes in (("train", ("a", "b")), ("test", ("a", "c"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / split / c / "0.png")
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0, image_size=8, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match=r"stratified val split \(val_fraction=0.1 of 2 images, 2 classes, the "
                                         r"smallest with 1 images\).*set val_fraction=0"):
        dm.setup("fit")
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0, image_size=8, mean=[0.5], std=[0.5], val_fraction=0)
    with pytest.raises(ValueError, match=r"class folder\(s\) c that the training split does not have"):
        dm.setup("fit")


def test_without_a_model_the_missing_settings_are_named_not_guessed(png_folder: Path) -> None:
    dm = ImageFolderDataModule(str(png_folder), num_workers=0)
    dm.setup("predict")
    with pytest.raises(ValueError, match=r"needs image_size, mean, std: the model has no data_config"):
        dm.predict_dataloader()
    dm = ImageFolderDataModule(str(png_folder), num_workers=0, image_size=12, mean=[0.25], std=[0.5])
    dm.setup("predict")
    x, y = next(iter(dm.predict_dataloader()))
    assert x.shape == (32, 1, 12, 12)


def test_band_and_class_mismatches_fail_at_setup_before_any_step(tmp_path: Path, png_folder: Path) -> None:
    four = write_digits_folder(tmp_path / "npy", fmt="npy", bands=4, size=16, per_class=2)
    trainer = fast_trainer(max_steps=1)
    with pytest.raises(ValueError, match=r"has 4 bands .* model takes 3 \(in_chans=3\)"):
        trainer.fit(tiny_model(in_chans=3), datamodule=ImageFolderDataModule(str(four), num_workers=0))
    assert trainer.global_step == 0
    trainer = fast_trainer(max_steps=1)
    with pytest.raises(ValueError, match=r"has 10 classes \(eight, five, four, nine, one, \.\.\.\) but the model has "
                                         r"num_classes=3. Set num_classes=10"):
        trainer.fit(tiny_model(num_classes=3), datamodule=ImageFolderDataModule(str(png_folder), num_workers=0))
    assert trainer.global_step == 0


def test_a_plain_module_is_checked_against_its_first_convolution(png_folder: Path) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                           torch.nn.Linear(4, 10))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = fast_trainer(max_steps=1)
    dm = ImageFolderDataModule(str(png_folder), num_workers=0, image_size=16, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match=r"first convolution takes 3 channels. Set channels=3"):
        trainer.fit(Plain(), datamodule=dm)


def test_class_names_and_input_preparation_travel_with_the_checkpoint(tmp_path: Path, png_folder: Path) -> None:
    dm = ImageFolderDataModule(str(png_folder), batch_size=8, num_workers=0, image_size=20, crop_pct=1.0)
    trainer = fast_trainer(max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path)
    model = tiny_model()
    trainer.fit(model, datamodule=dm)
    assert model.class_names == sorted(DIGIT_NAMES)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = FineTuneModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True).eval()
    assert loaded.class_names == model.class_names
    assert loaded.data_config["input_size"] == (1, 20, 20) and loaded.data_config["crop_pct"] == 1.0
    # model.transform() prepares a file exactly as the datamodule's loader did
    paths = dm.splits["test"].paths[:8]
    x = torch.stack([loaded.transform()(p) for p in paths])
    batch = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(x, batch)
    # a model built from a config (no class names of its own) gets them back when the checkpoint loads
    fresh = tiny_model()
    fresh.on_load_checkpoint(torch.load(tmp_path / "m.ckpt", weights_only=True))
    assert fresh.class_names == model.class_names and fresh.data_config["input_size"] == (1, 20, 20)
    with pytest.raises(ValueError, match="differ from the datamodule's classes"):
        fast_trainer(max_steps=1).fit(tiny_model(class_names=[str(i) for i in range(10)]),
                                      datamodule=ImageFolderDataModule(str(png_folder), num_workers=0))


def test_epoch_random_sampler_is_a_function_of_seed_and_epoch() -> None:
    a, b = EpochRandomSampler(range(50), seed=3), EpochRandomSampler(range(50), seed=3)
    assert list(a) == list(b)
    torch.manual_seed(123)  # the global stream does not matter
    a.set_epoch(1)
    first = list(a)
    assert first != list(b) and sorted(first) == list(range(50))
    b.set_epoch(1)
    assert list(b) == first


def test_linear_probe_on_a_folder_with_the_datamodules_defaults(png_folder: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """FeatureCache on ImageFolderDataModule as constructed by default (2 worker processes, augment=None)."""
    dm = ImageFolderDataModule(str(png_folder), batch_size=8)
    assert dm.num_workers == 2 and not dm.persistent_workers
    cache = FeatureCache()
    trainer = fast_trainer(max_epochs=2, callbacks=[cache], default_root_dir=tmp_path)
    model = tiny_model(freeze_backbone=True)
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    assert len(dm.splits["train"]) == 50 and len(dm.splits["val"]) == 10  # one image per class carved for val
    assert trainer.global_step == 2 * 7  # 50 training images in batches of 8
    assert "augment=None -> off: FeatureCache is a callback" in caplog.text
    # the first epoch's worker processes were started before the cache was built: it runs on images;
    # the second trains on cached features (cached epochs use no workers), and nobody is warned about it
    assert cache.served == {0: {"images": 7}, 1: {"head.fc": 7}}
    assert "epoch 0's loader worker processes started before the tables were built" in caplog.text
    assert not [w for w in caught if "were loaded from the data" in str(w.message)]


@pytest.mark.parametrize("option", ["augment", "persistent_workers"])
def test_feature_cache_refusals_name_an_option_that_exists(png_folder: Path, option: str) -> None:
    kwargs = {"augment": True, "num_workers": 0} if option == "augment" else {"persistent_workers": True, "num_workers": 1}
    dm = ImageFolderDataModule(str(png_folder), batch_size=8, **kwargs)
    with pytest.raises(ValueError) as err:
        fast_trainer(max_steps=1, callbacks=[FeatureCache()]).fit(tiny_model(freeze_backbone=True), datamodule=dm)
    message = str(err.value)
    assert f"ImageFolderDataModule({option}=False)" in message
    assert option in inspect.signature(ImageFolderDataModule).parameters


def _fit_and_collect(model: L.LightningModule, callbacks: list, caplog: pytest.LogCaptureFixture) -> list[str]:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.arange(8) % 10), batch_size=4)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        fast_trainer(max_epochs=1, callbacks=callbacks, limit_val_batches=0).fit(model, loader)
    return [str(w.message) for w in caught if "eval mode" in str(w.message)]


def test_our_frozen_batchnorm_is_said_in_one_line_not_lightnings_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert _fit_and_collect(tiny_model(freeze_backbone=True), [], caplog) == []
    assert "FineTuneModule: " in caplog.text and "kept in eval mode: the backbone is frozen" in caplog.text
    caplog.clear()
    gu = GradualUnfreezing(milestones={0: ["head"], 1: "all"}, frozen_bn="eval")
    assert _fit_and_collect(tiny_model(), [gu], caplog) == []
    assert "GradualUnfreezing: " in caplog.text and "BatchNorm of frozen layer groups" in caplog.text


def test_other_eval_mode_modules_still_warn(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model(freeze_backbone=True)
    model.head.eval()  # the user's own doing: not ours to explain away
    messages = _fit_and_collect(model, [], caplog)
    assert len(messages) == 1 and "lightning_ft did not put there (head" in messages[0]
    plain = tiny_model()
    plain.head.eval()
    messages = _fit_and_collect(plain, [], caplog)  # no holder at all: Lightning's own warning
    n_head = len(list(plain.head.modules()))
    assert len(messages) == 1 and messages[0].startswith(f"Found {n_head} module(s) in eval mode at the start of training.")


def test_a_failed_fit_leaves_no_trace_on_the_next_one(caplog: pytest.LogCaptureFixture) -> None:
    """The eval-mode explanation is bound to one trainer's fit loop: a fit that fails before training starts
    leaves no warning filter behind, and other warning filters are never touched."""
    import warnings as w

    before = list(w.filters)

    class Boom(L.Callback):
        def on_sanity_check_start(self, trainer, pl_module):
            raise RuntimeError("boom")

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1, 16, 16), torch.arange(4)),
                                         batch_size=2)
    with pytest.raises(RuntimeError, match="boom"):
        fast_trainer(callbacks=[Boom()], num_sanity_val_steps=1).fit(tiny_model(freeze_backbone=True), loader, loader)
    assert list(w.filters) == before
    plain = tiny_model()
    plain.head.eval()
    assert len(_fit_and_collect(plain, [], caplog)) == 1  # Lightning's warning is back for the next trainer
    assert list(w.filters) == before


def test_predict_setup_then_fit_and_a_predict_folder_with_loose_files(tmp_path: Path, png_folder: Path) -> None:
    new = tmp_path / "new"
    (new / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((png_folder / "test").rglob("*.png"))[:3]):
        shutil.copy(src, (new if i < 2 else new / "sub") / f"{i}.png")
    dm = ImageFolderDataModule(str(png_folder), num_workers=0, predict=str(new), image_size=16, mean=[0.5], std=[0.5])
    dm.setup("predict")
    assert len(dm.splits["predict"]) == 3 and set(dm.splits["predict"].targets) == {-1}  # loose files: all, unlabelled
    dm.setup("fit")  # the training splits are read after a predict-only setup too
    assert {"train", "val", "test", "predict"} <= set(dm.splits)


def test_in_memory_datamodules_record_their_recipe_so_model_transform_matches(tmp_path: Path) -> None:
    from lightning_ft.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=8, limit=16)
    model = tiny_model(img_size=24)
    fast_trainer(max_steps=1, default_root_dir=tmp_path, limit_val_batches=0).fit(model, datamodule=dm)
    assert model.data_config["crop_pct"] == 1.0 and model.data_config["interpolation"] == "bilinear"
    images, _ = dm.load_arrays()
    index = dm.train_set.indices[0]
    torch.testing.assert_close(model.transform()(images[index]), dm.train_set[0][0], rtol=0, atol=1e-5)


def test_a_checkpoint_of_other_classes_is_refused_on_resume(tmp_path: Path, png_folder: Path) -> None:
    model = tiny_model()
    model.class_names = sorted(DIGIT_NAMES)
    checkpoint = {"hyper_parameters": {"class_names": [str(i) for i in range(10)]}, "state_dict": {}}
    with pytest.raises(ValueError, match="checkpoint's class_names .* differ from this model's"):
        model.on_load_checkpoint(checkpoint)
