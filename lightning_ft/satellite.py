"""Satellite data: the Statlog Landsat patches (real, installed offline) and synthetic crop time series.

* :class:`StatlogLandsatDataModule`: the UCI Statlog (Landsat Satellite) data, 6,435 patches of 3x3
  pixels in the 4 bands of the Landsat Multispectral Scanner (green, red, two near-infrared), each
  labelled with the land cover of its centre pixel (6 classes). Srinivasan, Statlog project (1993);
  UCI Machine Learning Repository, CC BY 4.0. It ships in Debian's ``r-cran-mlbench`` as
  ``Satellite.rda``; ``scripts/fetch_statlog_landsat.py`` (run by ``scripts/setup.sh``) converts it
  into ``statlog_landsat.npz`` in :func:`data_dir`, and :func:`load_statlog_landsat` reads it.
* :class:`SyntheticCropTimeSeries` and :class:`CropTimeSeriesDataModule`: small multispectral image
  time series on irregular, partly cloudy dates whose classes differ mainly in *when* the vegetation
  greens up: a task for a temporal head that pools over dates with their day of year
  (``FineTuneModule(head="temporal")``).

**The Statlog column order, checked on the data.** UCI documents each row as the 3x3 neighbourhood read
left to right, top to bottom, with the 4 spectral values of a pixel together (the centre pixel is
attributes 17-20). Read that way (``(row, column, band)``), a band's correlation between two pixels of
a patch falls with their distance: 0.94-0.96 for horizontal neighbours, 0.91-0.94 vertical, 0.89-0.92
diagonal, 0.83-0.87 two pixels apart; read band-first instead, "neighbours" correlate at 0.4-0.5 and
pixels two apart at -0.01-0.10, so the UCI order is the right one. The band order is green, red, NIR,
NIR: cotton crop (vegetation) has its lowest mean in the second band (red, 40) and its highest in the
last two (114, 119), the soils the reverse. The rows are UCI's training set (4,435 rows, class counts
1072/479/961/415/470/1038) followed by its test set (2,000 rows); the splits here are stratified random
splits of all 6,435, not UCI's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_ft.data import stratified_split

__all__ = [
    "STATLOG_CLASSES",
    "STATLOG_CLASS_COUNTS",
    "CropTimeSeriesDataModule",
    "StatlogLandsatDataModule",
    "SyntheticCropTimeSeries",
    "VEGETATED",
    "data_dir",
    "load_statlog_landsat",
]

STATLOG_FILENAME = "statlog_landsat.npz"
STATLOG_CLASSES = ("red soil", "cotton crop", "grey soil", "damp grey soil", "vegetation stubble", "very damp grey soil")
"""The Statlog Landsat classes in label order: UCI's classes 1, 2, 3, 4, 5 and 7 (its class 6, "mixture",
has no samples), named as in mlbench (UCI calls class 5 "soil with vegetation stubble")."""
STATLOG_CLASS_COUNTS = (1533, 703, 1358, 626, 707, 1508)
"""Samples per class, in label order (6,435 in all)."""
_STATLOG_SHA256 = "6a121ec094192f567e20f3eaf980c9d497957885ad4f20c44f4a341217de0aee"  # as in the fetch script
_FETCH_HINT = "Run `python scripts/fetch_statlog_landsat.py` (or `bash scripts/setup.sh`, which runs it)."
Split = Literal["train", "val", "test"]


def data_dir() -> Path:
    """Where lightning_ft keeps data sets: ``$LIGHTNING_FT_DATA_DIR`` if set, else ``data/`` inside
    lightning_ft's cache folder, ``$XDG_CACHE_HOME/lightning_ft/data`` or ``~/.cache/lightning_ft/data``
    (next to the converted weights of :func:`lightning_ft.weights.weights_dir`; moving the weights with
    ``$LIGHTNING_FT_WEIGHTS_DIR`` does not move the data)."""
    root = os.environ.get("LIGHTNING_FT_DATA_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_ft" / "data"


def _content_sha256(images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    digest.update("\n".join(classes).encode())
    return digest.hexdigest()


def load_statlog_landsat(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The Statlog Landsat data as written by ``scripts/fetch_statlog_landsat.py``.

    Args:
        path: the ``statlog_landsat.npz``; ``None`` looks in :func:`data_dir`.

    Returns:
        ``(images, labels, classes)``: uint8 ``(6435, 4, 3, 3)`` band-first (green, red, nir1, nir2;
        ``images[:, :, 1, 1]`` is the labelled centre pixel), int64 ``(6435,)``, the 6 class names.

    Raises:
        FileNotFoundError: the file is not there (the message says how to install it).
        ValueError: the file's contents are not the expected data.
    """
    path = Path(path).expanduser() if path is not None else data_dir() / STATLOG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"The Statlog Landsat data is not installed: {path} does not exist. {_FETCH_HINT}")
    with np.load(path, allow_pickle=False) as data:
        images, labels, classes = data["images"], data["labels"].astype(np.int64), [str(c) for c in data["classes"]]
    if _content_sha256(images, labels, classes) != _STATLOG_SHA256:
        raise ValueError(
            f"{path} does not hold the expected Statlog Landsat data (checksum mismatch). "
            "Convert it again with `python scripts/fetch_statlog_landsat.py --force`."
        )
    return images, labels, classes


# ====================================================================== Statlog Landsat
class _RandomDihedral(Dataset):
    """``(image, label)`` samples of ``base`` under one of the 8 flips/right-angle rotations, drawn per access
    from torch's global random stream (land cover has no orientation)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[index]
        k, flip = torch.randint(0, 4, ()).item(), torch.rand(()).item() < 0.5
        x = torch.rot90(x, int(k), dims=(-2, -1))
        return (x.flip(-1) if flip else x).contiguous(), y


VEGETATED = (1, 4)
"""The Statlog classes with vegetation (cotton crop, vegetation stubble): the ``vegetated`` task."""


class _TwoTasks(Dataset):
    """``(x, {"landcover": y, "vegetated": 0/1 or MISSING})``; ``missing`` of the vegetated labels removed (seeded)."""

    def __init__(self, base: TensorDataset, missing: float, seed: int) -> None:
        from lightning_ft.batch import MISSING

        self.base = base
        y = base.tensors[1]
        vegetated = torch.isin(y, torch.tensor(VEGETATED)).long()
        drop = torch.from_numpy(np.random.default_rng(seed + 2).random(len(y)) < missing)
        self.vegetated = torch.where(drop, torch.full_like(vegetated, MISSING), vegetated)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = self.base[index]
        return x, {"landcover": y, "vegetated": self.vegetated[index]}


def _loader(datamodule: Any, split: str, shuffle: bool) -> DataLoader:
    """A loader of one split of ``datamodule._sets``, with its batch size and workers."""
    name = type(datamodule).__name__
    if not datamodule._sets:
        raise RuntimeError(f"{name}.setup() has not run; call it or pass the datamodule to a Trainer.")
    dataset = datamodule._sets[split]
    if len(dataset) == 0:
        raise ValueError(f"{name}: the {split} split is empty; raise {split}_fraction.")
    return DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=shuffle, num_workers=datamodule.num_workers)


class _SplitLoaders:
    """The loaders of ``self._sets``: train shuffled, val and test in order, predict on test."""

    def train_dataloader(self) -> DataLoader:
        return _loader(self, "train", True)

    def val_dataloader(self) -> DataLoader:
        return _loader(self, "val", False)

    def test_dataloader(self) -> DataLoader:
        return _loader(self, "test", False)

    def predict_dataloader(self) -> DataLoader:
        return _loader(self, "test", False)


def _check_split_name(split: str) -> None:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}.")


class StatlogLandsatDataModule(_SplitLoaders, L.LightningDataModule):
    """The Statlog Landsat patches as images for a CNN/ViT: ``(x, y)`` batches, ``x`` float32
    ``(B, 4, image_size, image_size)``, ``y`` int64.

    Each 3x3 patch (uint8, bands green, red, nir1, nir2) is resized bilinearly (antialiased, on the
    8-bit values, then divided by 255: exactly what ``ImageTransform(self.transform_config())`` and so
    the trained model's ``model.transform()`` do to a patch) and normalised per band. Splits are
    stratified (:func:`lightning_ft.data.stratified_split`). The data must be installed first
    (``scripts/fetch_statlog_landsat.py``); :meth:`raw_features` gives the same splits as 36 raw pixel
    values for classical baselines.

    Args:
        batch_size: samples per batch.
        image_size: side of the images the model sees: the 3x3 patch upsampled bilinearly (a pretrained
            CNN needs a few pixels per stride); ``3`` keeps the raw patch.
        val_fraction: stratified validation split size.
        test_fraction: stratified test split size.
        seed: seed of the splits (and of ``limit``'s subset).
        limit: keep a random (seeded) ``limit`` samples of each split (quick runs); the statistics come
            from the kept training samples.
        num_workers: DataLoader workers.
        mean: per-band normalisation mean of pixel/255; ``None`` computes it on the training split's
            raw pixels. ImageNet statistics are never used: these are not RGB bands.
        std: per-band normalisation std, likewise.
        augment: random flips and right-angle rotations of the training patches, drawn per sample and
            epoch (land cover has no orientation). Validation and test are never augmented.
        shots: few shots: keep ``shots`` training samples per class (a seeded draw), the support set;
            validation and test stay whole.
        two_tasks: several tasks: targets become ``{"landcover": class, "vegetated": 0 or 1}`` (vegetated:
            cotton crop and vegetation stubble), for ``FineTuneModule(tasks={"landcover": 6, "vegetated": 2})``.
        missing: with ``two_tasks``, the fraction of training samples whose ``vegetated`` label is removed
            (set to ``MISSING``; a seeded draw).
    """

    bands: tuple[str, ...] = ("green", "red", "nir1", "nir2")
    """Landsat MSS bands 4-7 (0.5-0.6, 0.6-0.7, 0.7-0.8, 0.8-1.1 um), in channel order."""
    sensor: str = "landsat_mss"
    num_classes: int = 6

    def __init__(
        self,
        batch_size: int = 128,
        image_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.3,
        seed: int = 0,
        limit: int | None = None,
        num_workers: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
        shots: int | None = None,
        two_tasks: bool = False,
        missing: float = 0.0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if shots is not None and shots < 1:
            raise ValueError(f"shots is the number of training samples per class (>= 1), got {shots}.")
        if not 0.0 <= missing < 1.0:
            raise ValueError(f"missing is a fraction of the training labels in [0, 1), got {missing}.")
        if missing and not two_tasks:
            raise ValueError("missing= removes labels of the second task: set two_tasks=True as well.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._sets: dict[str, Dataset] = {}
        if image_size < 3:
            raise ValueError(f"image_size must be >= 3 (the patches are 3x3; 3 keeps them raw), got {image_size}.")
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != len(self.bands):
                raise ValueError(f"{name} needs one value per band ({', '.join(self.bands)}), got {list(value)}.")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std values must be > 0, got {list(std)}.")
        self.save_hyperparameters()
        self.cfg = SimpleNamespace(image_size=image_size, val_fraction=val_fraction, test_fraction=test_fraction,
                                   seed=seed, limit=limit, mean=mean, std=std, augment=augment, shots=shots,
                                   two_tasks=two_tasks, missing=missing)
        self.split_indices: dict[str, np.ndarray] = {}
        self._data: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self._data is None:
            self._data = load_statlog_landsat()
        return self._data

    @property
    def classes(self) -> list[str]:
        """The class names in label order (reads the installed data)."""
        return list(self._arrays()[2])

    def _splits(self) -> dict[str, np.ndarray]:
        if not self.split_indices:
            hp = self.cfg
            labels = self._arrays()[1]
            train, val, test = stratified_split(labels, hp.val_fraction, hp.test_fraction, hp.seed)
            if hp.limit is not None:
                rng = np.random.default_rng(hp.seed)
                train, val, test = (np.sort(rng.permutation(idx)[: hp.limit]) for idx in (train, val, test))
            if hp.shots is not None:
                rng = np.random.default_rng(hp.seed + 1)
                present = np.unique(labels[train])
                per_class = [rng.permutation(train[labels[train] == c])[: hp.shots] for c in present]
                short = [int(c) for c, idx in zip(present, per_class) if len(idx) < hp.shots]
                if short:
                    raise ValueError(f"shots={hp.shots}: the training split has fewer samples of classes {short}.")
                train = np.sort(np.concatenate(per_class))
            self.split_indices = {"train": train, "val": val, "test": test}
        return self.split_indices

    def band_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-band ``(mean, std)`` of pixel/255: the given ``mean``/``std``, else the training split's."""
        if self._stats is None:
            hp = self.cfg
            pixels = self._arrays()[0][self._splits()["train"]].astype(np.float64) / 255.0  # (n, 4, 3, 3)
            mean = tuple(hp.mean) if hp.mean is not None else tuple(pixels.mean(axis=(0, 2, 3)).tolist())
            std = tuple(hp.std) if hp.std is not None else tuple(pixels.std(axis=(0, 2, 3)).tolist())
            self._stats = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        return self._stats

    def transform_config(self) -> dict[str, Any]:
        """The preparation of a patch as a data config (bilinear resize of the whole patch, no crop, the
        per-band statistics): the model records it, so ``model.transform()`` prepares a uint8 patch
        ``(4, 3, 3)`` as training did."""
        mean, std = self.band_statistics()
        size = self.cfg.image_size
        return {"input_size": (len(self.bands), size, size), "mean": mean, "std": std,
                "interpolation": "bilinear", "crop_pct": 1.0}

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 patches ``(N, 4, 3, 3)`` -> normalised float32 ``(N, 4, image_size, image_size)``."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        size = self.cfg.image_size
        if size != x.shape[-1]:
            x = (TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True) if len(x)
                 else x.new_zeros((0, x.shape[1], size, size)))
        mean, std = self.band_statistics()
        x = x.float() / 255.0
        return ((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)).contiguous()

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        images, labels, _ = self._arrays()
        self._sets = {name: TensorDataset(self.preprocess(images[idx]), torch.as_tensor(labels[idx], dtype=torch.long))
                      for name, idx in self._splits().items()}
        if self.cfg.two_tasks:
            self._sets = {name: _TwoTasks(data, self.cfg.missing if name == "train" else 0.0, self.cfg.seed)
                          for name, data in self._sets.items()}
        if self.cfg.augment:
            self._sets["train"] = _RandomDihedral(self._sets["train"])

    def raw_features(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """The samples of a split as raw pixel values, for classical baselines (logistic regression, kNN,
        random forest).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"`` (the same samples as the loaders'; ``setup`` need
                not have run).

        Returns:
            ``(features, labels)``: float32 ``(n, 36)`` pixel values 0-255 in UCI's column order (pixels
            left to right, top to bottom, 4 bands each; columns 16-19 are the centre pixel), int64 ``(n,)``.
        """
        _check_split_name(split)
        idx = self._splits()[split]
        images, labels, _ = self._arrays()
        features = images[idx].transpose(0, 2, 3, 1).reshape(len(idx), -1).astype(np.float32)
        return features, labels[idx].copy()


# ====================================================================== crop time series
_DAYS_IN_YEAR = 365
_SOIL = np.array([0.08, 0.12, 0.20, 0.28])  # green, red, nir, swir reflectance of bare soil
_CANOPY = np.array([0.06, 0.04, 0.45, 0.16])  # of full canopy (swir: the class's own value replaces it)


def _bilinear_matrix(size: int, knots: int = 3) -> np.ndarray:
    """``(size, knots)`` weights that interpolate ``knots`` values linearly across ``size`` pixels."""
    pos = np.linspace(0.0, knots - 1.0, size)[:, None]
    return np.clip(1.0 - np.abs(pos - np.arange(knots)[None]), 0.0, 1.0)


class SyntheticCropTimeSeries:
    """Synthetic crop-field image time series whose classes differ mainly in the timing of the season.

    The generating process, per sample (one field, label ``k`` drawn uniformly):

    1. **Vegetation curve.** A double logistic in day of year ``t``,
       ``v(t) = a * (sigmoid((t - g) / 8) - sigmoid((t - g - L) / 8))``: green-up at day ``g``, senescence
       ``L`` days later, transitions of ~8 days. Class ``k`` has green-up day ``green_up[k]`` (evenly
       spaced over days 60-240) plus N(0, 8) days of jitter; season length ``L`` = 110 + N(0, 8) days
       and amplitude ``a`` ~ U(0.85, 1.15) are the same for every class: the classes' curves share shape
       and amplitude and differ only in their timing.
    2. **Dates.** ``T`` ~ U{min_dates..max_dates} distinct days of year, uniform over 1-365, sorted: every
       sample has its own irregular acquisition calendar.
    3. **Reflectance.** 4 bands (green, red, nir, swir), a linear mix of soil and canopy per pixel:
       ``soil * b * (1 - f) + canopy * f`` with the vegetation fraction ``f = clip(v(t) * (1 + 0.15 z), 0, 1)``,
       where ``z`` is a smooth random spatial texture (3x3 Gaussian knots upsampled bilinearly to the
       image, fixed over the season), and the soil brightness ``b`` ~ U(0.8, 1.2) per field. Vegetation
       raises nir (0.20 -> 0.45) and lowers red (0.12 -> 0.04). Plus N(0, 0.01) noise per pixel and date.
    4. **A weak second cue.** The canopy's swir reflectance (leaf water) differs a little by class: evenly
       spaced over 0.10-0.22, with N(0, 0.02) per field. It shows only in season, so a temporal mean
       carries some information (the swir/nir mix of the in-season dates), a single date rarely any.
    5. **Clouds.** Each date is cloudy with probability ``cloud_fraction`` (at least one clear date is
       kept per sample): its pixels become bright cloud, U(0.4, 0.7) in every band plus N(0, 0.02)
       noise, and its mask is ``False``; a model that ignores the mask sees a vegetation-free bright
       date.

    What that makes of the task (2,000 samples, defaults; logistic regression on hand-made features,
    trained on 1,500 samples and scored on 500, seeds 0-2), with 4 classes (chance 25%): the last clear
    date's band means (one date: mostly after every season, or inside only the late classes' season)
    46-55%; the mean over clear dates of the band means 69-71%; the NDVI profile binned by month (12
    bins of day of year, with a presence flag per bin) 93-95%. With 5 classes: 37-45%, 55-62%, 85-87%.
    The timing, which needs each date's day of year, is what separates the classes.

    Args:
        num_classes: number of classes (2-12); their green-up days are spread over days 60-240.
        max_dates: dates per sample at most (the padded length ``T``).
        min_dates: dates per sample at least.
        image_size: side of the square images.
        cloud_fraction: probability that a date is cloudy.
        seed: the random seed: the same seed gives the same samples.
    """

    bands: tuple[str, ...] = ("green", "red", "nir", "swir")

    def __init__(
        self,
        num_classes: int = 4,
        max_dates: int = 12,
        min_dates: int = 4,
        image_size: int = 8,
        cloud_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        if not 2 <= num_classes <= 12:
            raise ValueError(
                f"num_classes must be in 2..12 (green-up days 60-240 at least ~15 days apart), got {num_classes}."
            )
        if not 1 <= min_dates <= max_dates <= _DAYS_IN_YEAR:
            raise ValueError(f"Need 1 <= min_dates <= max_dates <= 365, got min_dates={min_dates}, max_dates={max_dates}.")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}.")
        if not 0.0 <= cloud_fraction < 1.0:
            raise ValueError(f"cloud_fraction must be in [0, 1), got {cloud_fraction}.")
        self.num_classes = num_classes
        self.max_dates = max_dates
        self.min_dates = min_dates
        self.image_size = image_size
        self.cloud_fraction = cloud_fraction
        self.seed = seed
        self.green_up = np.linspace(60.0, 240.0, num_classes)
        """Mean green-up day of each class."""
        self.canopy_swir = np.linspace(0.10, 0.22, num_classes)
        """Mean in-season swir reflectance of each class's canopy."""

    @property
    def classes(self) -> list[str]:
        """Class names: ``greenup_DDD``, the class's mean green-up day of year."""
        return [f"greenup_{int(round(g)):03d}" for g in self.green_up]

    def generate(self, num_samples: int) -> dict[str, np.ndarray]:
        """Draw ``num_samples`` samples (the same ones for the same seed and arguments).

        Args:
            num_samples: how many samples.

        Returns:
            ``images`` float32 ``(N, T, 4, S, S)`` reflectance (0 at padding), ``mask`` bool ``(N, T)``
            (``True``: a clear date; ``False``: cloudy or padding), ``doy`` int64 ``(N, T)`` (day of year
            1-365, sorted, 0 at padding), ``cloud`` bool ``(N, T)``, ``labels`` int64 ``(N,)``, with
            ``T = max_dates``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        rng = np.random.default_rng(self.seed)
        n, t_max, size, k = num_samples, self.max_dates, self.image_size, self.num_classes
        labels = rng.integers(0, k, n)
        # irregular calendars: the first T of a random permutation of the year, sorted; padding after
        count = rng.integers(self.min_dates, t_max + 1, n)
        days = np.argsort(rng.random((n, _DAYS_IN_YEAR)), axis=1)[:, :t_max] + 1
        real = np.arange(t_max)[None] < count[:, None]
        doy = np.sort(np.where(real, days, _DAYS_IN_YEAR + 1), axis=1)
        doy = np.where(real, doy, 0).astype(np.int64)
        # the vegetation curve at each date
        green_up = self.green_up[labels] + rng.normal(0.0, 8.0, n)
        length = 110.0 + rng.normal(0.0, 8.0, n)
        amplitude = rng.uniform(0.85, 1.15, n)
        t = doy.astype(np.float64)
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
        curve = amplitude[:, None] * (sig((t - green_up[:, None]) / 8.0) - sig((t - (green_up + length)[:, None]) / 8.0))
        # spatial texture of the field, fixed over the season
        interp = _bilinear_matrix(size)
        texture = np.einsum("ia,nab,jb->nij", interp, rng.standard_normal((n, 3, 3)), interp)
        fraction = np.clip(curve[:, :, None, None] * (1.0 + 0.15 * texture[:, None]), 0.0, 1.0)  # (n, T, S, S)
        soil = _SOIL[None] * rng.uniform(0.8, 1.2, (n, 1))  # (n, 4)
        canopy = np.broadcast_to(_CANOPY, (n, 4)).copy()
        canopy[:, 3] = self.canopy_swir[labels] + rng.normal(0.0, 0.02, n)
        f = fraction[:, :, None].astype(np.float32)  # (n, T, 1, S, S)
        soil_px, canopy_px = (v[:, None, :, None, None].astype(np.float32) for v in (soil, canopy))
        images = soil_px * (1.0 - f) + canopy_px * f
        images += np.float32(0.01) * rng.standard_normal(images.shape, dtype=np.float32)
        # clouds: bright in every band, masked; at least one clear date per sample
        cloud = (rng.random((n, t_max)) < self.cloud_fraction) & real
        keep = rng.integers(0, count)  # a date kept clear where every date came out cloudy
        all_cloudy = cloud.sum(axis=1) == count
        cloud[np.nonzero(all_cloudy)[0], keep[all_cloudy]] = False
        brightness = rng.uniform(0.4, 0.7, int(cloud.sum())).astype(np.float32)[:, None, None, None]
        haze = rng.standard_normal((len(brightness), 4, size, size), dtype=np.float32)
        images[cloud] = brightness + np.float32(0.02) * haze
        images[~real] = 0.0
        return {"images": images, "mask": real & ~cloud, "doy": doy, "cloud": cloud, "labels": labels.astype(np.int64)}


class _SeriesDataset(Dataset):
    """``({"images": (T, C, H, W), "mask": (T,), "doy": (T,)}, label)`` samples; the default collate stacks
    them into the batch dict."""

    def __init__(self, images: torch.Tensor, mask: torch.Tensor, doy: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.mask, self.doy, self.labels = images, mask, doy, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"images": self.images[index], "mask": self.mask[index], "doy": self.doy[index]}, self.labels[index]


class CropTimeSeriesDataModule(_SplitLoaders, L.LightningDataModule):
    """Synthetic crop time series (:class:`SyntheticCropTimeSeries`) as batches ``(inputs, y)`` for
    ``FineTuneModule(head="temporal")``.

    ``inputs`` is ``{"images": float32 (B, T, 4, S, S), "mask": bool (B, T), "doy": int64 (B, T)}``,
    padded to ``T = max_dates``: ``mask`` is ``False`` at padding and at cloudy dates, ``doy`` is the day
    of year (1-365, sorted) and 0 at padding, padded images are 0. Images are normalised per band with
    the mean and std of the clear dates of the training split (clouds and padding not counted); cloudy
    dates keep their (normalised, bright) pixels.

    Args:
        num_samples: samples generated (all splits together).
        num_classes: number of classes.
        max_dates: dates per sample at most (the padded length).
        min_dates: dates per sample at least.
        image_size: side of the square images.
        cloud_fraction: probability that a date is cloudy.
        batch_size: samples per batch.
        val_fraction: stratified validation split size.
        test_fraction: stratified test split size.
        seed: seed of the generator and of the splits.
        num_workers: DataLoader workers.
        limit: keep a random (seeded) ``limit`` samples of each split (quick runs).
    """

    bands: tuple[str, ...] = SyntheticCropTimeSeries.bands

    def __init__(
        self,
        num_samples: int = 2000,
        num_classes: int = 4,
        max_dates: int = 12,
        min_dates: int = 4,
        image_size: int = 8,
        cloud_fraction: float = 0.2,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        seed: int = 0,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._sets: dict[str, Dataset] = {}
        self.generator = SyntheticCropTimeSeries(num_classes, max_dates, min_dates, image_size, cloud_fraction, seed)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.cfg = SimpleNamespace(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, limit=limit)
        self.split_indices: dict[str, np.ndarray] = {}
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None

    @property
    def classes(self) -> list[str]:
        """Class names in label order (see :attr:`SyntheticCropTimeSeries.classes`)."""
        return self.generator.classes

    def transform_config(self) -> dict[str, Any]:
        """The per-date image recipe (size, per-band statistics) as a data config; needs ``setup``."""
        if self.mean is None or self.std is None:
            raise RuntimeError(
                "CropTimeSeriesDataModule.setup() has not run: the band statistics come from its training split. "
                "Call setup() first."
            )
        size = self.generator.image_size
        return {"input_size": (len(self.bands), size, size), "mean": self.mean, "std": self.std,
                "interpolation": "bilinear", "crop_pct": 1.0}

    def setup(self, stage: str | None = None) -> None:
        if self._sets:
            return
        data = self.generator.generate(self.num_samples)
        hp = self.cfg
        train, val, test = stratified_split(data["labels"], hp.val_fraction, hp.test_fraction, hp.seed)
        if hp.limit is not None:
            rng = np.random.default_rng(hp.seed)
            train, val, test = (np.sort(rng.permutation(idx)[: hp.limit]) for idx in (train, val, test))
        self.split_indices = {"train": train, "val": val, "test": test}
        images, mask = data["images"], data["mask"]
        clear = images[train][mask[train]]  # (dates, C, H, W): clear training dates only
        mean = clear.mean(axis=(0, 2, 3), dtype=np.float64)
        std = clear.std(axis=(0, 2, 3), dtype=np.float64)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        real = (data["doy"] > 0)[:, :, None, None, None]
        normalised = (images - mean.astype(np.float32)[:, None, None]) / std.astype(np.float32)[:, None, None]
        normalised = np.where(real, normalised, np.float32(0.0)).astype(np.float32)
        tensors = (torch.from_numpy(normalised), torch.from_numpy(mask), torch.from_numpy(data["doy"]),
                   torch.from_numpy(data["labels"]))
        self._sets = {name: _SeriesDataset(*(v[torch.from_numpy(idx)] for v in tensors))
                      for name, idx in self.split_indices.items()}
