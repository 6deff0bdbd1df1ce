import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ft import FineTuneModule
from lightning_ft.data import DigitsDataModule, ImageFolderDataModule, MNISTSubsetDataModule, stratified_split
from tests.conftest import fast_trainer


def test_stratified_split_is_deterministic_disjoint_and_balanced():
    labels = np.repeat(np.arange(4), 50)
    a = stratified_split(labels, 0.1, 0.2, seed=3)
    b = stratified_split(labels, 0.1, 0.2, seed=3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    train, val, test = a
    assert len(set(train) | set(val) | set(test)) == 200 and len(train) + len(val) + len(test) == 200
    assert np.bincount(labels[test]).tolist() == [10] * 4
    assert np.bincount(labels[val]).tolist() == [5] * 4
    with pytest.raises(ValueError, match="sum below 1"):
        stratified_split(labels, 0.5, 0.5, seed=0)


def test_digits_resized_and_normalised_with_explicit_config():
    dm = DigitsDataModule(image_size=16, channels=3, mean=(0.5,), std=(0.25,))
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and y.dtype == torch.long
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (v - 0.5) / 0.25 with v in [0, 1]
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    # known pixels, exactly (raw [0, 1] pixels would pass the range check above, not these):
    # the digits' top-left corner is background (0) in every image -> (0 - 0.5) / 0.25; full ink (1) -> 2
    raw, _ = dm.load_arrays()
    assert (raw[:, 0, 0] == 0).all() and raw.max() == 1.0
    everything = dm.train_set.dataset.tensors[0]
    assert torch.equal(everything[:, :, 0, 0], torch.full((1797, 3), -2.0))
    assert float(everything.min()) == -2.0 and float(everything.max()) == 2.0


def test_digits_at_their_own_size_are_exactly_the_normalised_raw_pixels():
    dm = DigitsDataModule(image_size=8, channels=3, mean=(0.5,), std=(0.25,), limit=20)
    dm.setup()
    raw, labels = dm.load_arrays()
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for position, index in enumerate(split.indices):
            x, y = split[position]
            expected = (np.repeat(raw[index][None], 3, axis=0) - 0.5) / 0.25  # the same value in each channel
            assert np.array_equal(x.numpy(), expected.astype(np.float32)) and int(y) == labels[index]


@pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
def test_digits_follow_the_models_data_config():
    model = FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=24)
    dm = DigitsDataModule(limit=16, batch_size=8)
    trainer = fast_trainer(max_steps=1, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    cfg = dm.resolved_config()
    assert cfg["image_size"] == 24 and cfg["channels"] == 1
    assert cfg["mean"] == pytest.approx((sum(model.backbone.pretrained_cfg["mean"]) / 3,))
    assert dm.train_set[0][0].shape == (1, 24, 24)
    # the model's statistics reached the pixels: background (0) and full ink (1), exactly normalised
    mean = sum(model.backbone.pretrained_cfg["mean"]) / 3  # one channel: the RGB statistics averaged
    std = sum(model.backbone.pretrained_cfg["std"]) / 3
    images = dm.train_set.dataset.tensors[0]
    assert images[:, 0, 0, 0].tolist() == pytest.approx([(0.0 - mean) / std] * len(images), rel=1e-6)
    assert float(images.max()) == pytest.approx((1.0 - mean) / std, rel=1e-6)
    assert float(images.min()) == pytest.approx((0.0 - mean) / std, rel=1e-6)


def test_mnist_frame_puts_digits_in_a_20px_box_on_a_28px_canvas():
    dm = DigitsDataModule(mnist_frame=True)
    images, _ = dm.load_arrays()
    assert images.shape[1:] == (28, 28)
    assert images[:, :4].max() == 0 and images[:, 24:].max() == 0 and images[:, 4:24, 4:24].max() > 0.5


def test_mnist_subset_is_the_5000_image_set():
    images, labels = MNISTSubsetDataModule().load_arrays()
    assert images.shape == (5000, 28, 28) and 0.0 <= images.min() and images.max() <= 1.0
    assert sorted(set(labels.tolist())) == list(range(10))


def test_channel_mismatch_is_explained():
    dm = DigitsDataModule(channels=3)
    with pytest.raises(ValueError, match="channels"):
        dm.preprocess(np.zeros((2, 2, 8, 8), dtype=np.float32))


def _write_folder(root, classes=("cat", "dog"), per_class=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_splits_and_checks_num_classes(tmp_path):
    _write_folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), batch_size=4, image_size=32, val_fraction=0.25, test_fraction=0.25,
                               num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # no model to follow
    dm.setup()
    assert dm.classes == ["cat", "dog"] and len(dm.splits["train"]) == 6
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32)
    model = FineTuneModule("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match="has 2 classes.*num_classes=3.*Set num_classes=2"):
        fast_trainer(max_steps=1).fit(model, datamodule=ImageFolderDataModule(str(tmp_path), num_workers=0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing"))


def test_limit_takes_a_random_subset_not_the_first_classes():
    dm = MNISTSubsetDataModule(limit=40, image_size=8, channels=1, mean=(0.5,), std=(0.5,))
    dm.setup()
    labels = [int(dm.val_set[i][1]) for i in range(len(dm.val_set))]
    assert len(labels) == 40 and len(set(labels)) >= 5
