"""Inputs of any band count: reading image files, and the transform a model's data config prescribes.

One transform serves training, validation, prediction and standalone use (``model.transform()``), so
an image is prepared the same way wherever it comes from.

* :func:`read_image`: a file (PNG/JPEG/... via Pillow, ``.npy``, multi-band ``.tif``/``.tiff`` via
  tifffile) as a float tensor ``(C, H, W)``. Integer pixels are divided by ``scale`` (default: the
  largest value of their type, 255 for 8-bit, 65535 for 16-bit); float pixels are kept as they are.
  With ``channels`` given, Pillow images are converted to it (RGB -> luma for 1 channel, grayscale ->
  RGB for 3) and a 1-band array is repeated; any other mismatch is an error naming both counts.
* :class:`ImageTransform`: timm's evaluation recipe (resize the shorter side to
  ``size / crop_pct``, centre crop ``size``) or training recipe (random resized crop, horizontal
  flip), then per-band normalisation, on tensors of any band count.

The data config is timm's (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``),
plus an optional ``scale``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "ARRAY_SUFFIXES",
    "IMAGE_SUFFIXES",
    "SUFFIXES",
    "TIFF_SUFFIXES",
    "TRANSFORM_KEYS",
    "ImageTransform",
    "band_mean_std",
    "per_band",
    "pil_to_chw",
    "read_image",
    "to_chw",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm")
"""File suffixes read with Pillow."""
ARRAY_SUFFIXES = (".npy",)
"""File suffixes read as NumPy arrays, ``(C, H, W)`` or ``(H, W, C)``."""
TIFF_SUFFIXES = (".tif", ".tiff")
"""File suffixes read with ``tifffile`` (any band count)."""
SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES + TIFF_SUFFIXES
"""Every suffix an image folder is scanned for."""
TRANSFORM_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "scale")
"""The ``data_config`` keys that make up the input recipe (kept with the checkpoint and the export)."""


_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # one band of more than 8 bits: never convert()


def pil_to_chw(img: Any, channels: int | None) -> np.ndarray:
    """A Pillow image as ``(C, H, W)``: converted to luma for 1 band or RGB for 3 (8-bit modes only), palettes
    expanded; 16-bit and float images kept as one band of their own values (``convert`` would clip them)."""
    if img.mode in _HIGH_DEPTH:
        array = np.array(img)
        if img.mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
            array = array.astype(np.uint16)  # 16-bit PNG/PGM that Pillow opened as 32-bit integers
        return array[None]
    if img.mode == "1":
        img = img.convert("L")
    if channels == 1 and img.mode != "L":
        img = img.convert("L")  # luma, as a grayscale model sees a colour picture
    elif channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")  # grayscale repeated, palette expanded, alpha dropped
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    array = np.array(img)
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def _read_pil(path: Path, channels: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return pil_to_chw(img, channels)


def _read_tiff(path: Path) -> np.ndarray:
    try:
        import tifffile
    except ImportError as err:  # pragma: no cover - tifffile is a dependency of the tiff extra
        raise ImportError(
            f"Reading '{path}' needs tifffile: pip install 'lightning_ft[tiff]' (or pip install tifffile)."
        ) from err
    return np.asarray(tifffile.imread(path))


def to_chw(array: np.ndarray, channels: int | None = None, path: str | Path = "array") -> np.ndarray:
    """``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` as ``(C, H, W)``.

    A 3-D array is band-first when its first axis has ``channels`` entries, band-last when its last
    one has; without ``channels`` (or when neither matches), the shorter of the two end axes holds the
    bands (band-first on a tie).
    """
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"'{path}' holds an array of shape {tuple(array.shape)}; expected (H, W), (C, H, W) or (H, W, C).")
    first, last = array.shape[0], array.shape[-1]
    if channels is not None and first == channels:
        return array
    if channels is not None and last == channels:
        return np.moveaxis(array, -1, 0)
    return array if first <= last else np.moveaxis(array, -1, 0)


def _read_array(path: Path, channels: int | None) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return to_chw(np.load(path, allow_pickle=False), channels, path)
    if suffix in TIFF_SUFFIXES:
        return to_chw(_read_tiff(path), channels, path)
    if suffix in IMAGE_SUFFIXES:
        return _read_pil(path, channels)
    raise ValueError(f"'{path}': unknown image type '{suffix}'. Supported: {', '.join(SUFFIXES)}.")


def read_image(path: str | Path, channels: int | None = None, scale: float | None = None) -> torch.Tensor:
    """The file at ``path`` as a float32 tensor ``(C, H, W)`` (see the module docstring for the rules)."""
    path = Path(path)
    return _as_float(_read_array(path, channels), channels, scale, path)


def _raw(array: np.ndarray, channels: int | None, scale: float | None, path: Any) -> tuple[torch.Tensor, float]:
    """``(pixels, divisor)``: 8-bit pixels stay uint8 (resized as such, like Pillow and timm do, which is
    faster), anything else float32; the divisor turns them into the values the model sees."""
    if array.dtype == np.bool_:
        array = array.astype(np.float32)  # masks: 0 and 1
    divisor = scale
    if divisor is None and np.issubdtype(array.dtype, np.integer):
        if np.iinfo(array.dtype).bits > 16:
            raise ValueError(
                f"'{path}' has {array.dtype} pixels: their scale cannot be told from the type (dividing by its largest "
                "value would leave ~0). Set scale= (e.g. scale=255 for 8-bit values, 10000 for Sentinel-2 reflectances)."
            )
        divisor = float(np.iinfo(array.dtype).max)
    dtype = np.uint8 if array.dtype == np.uint8 else np.float32
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
    if channels is not None and x.shape[0] not in (1, channels):
        raise ValueError(
            f"'{path}' has {x.shape[0]} bands (shape {tuple(x.shape)}) but the model takes {channels} "
            f"(in_chans={channels}). Set the model's in_chans={x.shape[0]} (timm adapts the pretrained stem "
            "to any band count), or give files with the model's band count."
        )
    return x, float(divisor or 1.0)


def _finish(x: torch.Tensor, divisor: float, channels: int | None) -> torch.Tensor:
    x = x.float()
    if divisor != 1.0:
        x = x / divisor
    if channels is not None and x.shape[0] == 1 and channels > 1:
        x = x.expand(channels, -1, -1).contiguous()  # one band into a model of several
    return x


def _as_float(array: np.ndarray, channels: int | None, scale: float | None, path: Any) -> torch.Tensor:
    return _finish(*_raw(array, channels, scale, path), channels)


def _interpolation(name: str | None) -> Any:
    from torchvision.transforms import InterpolationMode

    name = (name or "bilinear").lower()
    if name == "lanczos":  # Pillow-only in torchvision; tensors of any band count get the nearest relative
        import warnings

        warnings.warn("interpolation 'lanczos' is done as 'bicubic' on tensors (torchvision resizes tensors with "
                      "bilinear, bicubic or nearest only).", stacklevel=3)
        name = "bicubic"
    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
             "nearest": InterpolationMode.NEAREST}
    if name not in modes:
        raise ValueError(f"interpolation '{name}' is not one of {', '.join(sorted(modes))}.")
    return modes[name]


class ImageTransform:
    """Image (path, PIL image, array or tensor) -> normalised float tensor ``(C, size, size)``.

    Args:
        data_config: timm's data config (``input_size`` ``(C, H, W)``, ``mean``, ``std``, and optionally
            ``interpolation``, ``crop_pct``, ``scale``), e.g. ``FineTuneModule.data_config``.
        training: the training recipe (random resized crop of 8-100% of the area with aspect ratio
            3/4-4/3, horizontal flip) instead of the evaluation one (resize, centre crop).
    """

    def __init__(self, data_config: dict[str, Any], training: bool = False) -> None:
        missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
        if missing:
            hint = ""
            if {"mean", "std"} & set(missing):
                hint = (" Bands other than red, green and blue have no ImageNet statistics: give mean= and std= per band "
                        "(lightning_ft.bands.band_statistics computes them over a loader of the data read with mean 0 "
                        "and std 1, e.g. ImageFolderDataModule(root, mean=[0.0] * C, std=[1.0] * C)).")
            raise ValueError(f"The data config lacks {', '.join(missing)}; it has {', '.join(sorted(data_config))}.{hint}")
        self.channels, height, width = (int(v) for v in data_config["input_size"])
        self.size = (height, width)
        self.mean = torch.tensor([float(v) for v in data_config["mean"]]).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in data_config["std"]]).view(-1, 1, 1)
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ValueError(
                    f"The data config's {key} has {len(values)} values but input_size has {self.channels} bands. "
                    f"Give one {key} per band."
                )
        self.interpolation = _interpolation(data_config.get("interpolation"))
        self.crop_pct = float(data_config.get("crop_pct") or 1.0)
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")
        self.scale = data_config.get("scale")
        self.training = training

    def _load_raw(self, image: Any) -> tuple[torch.Tensor, float]:
        if isinstance(image, (str, Path)):
            return _raw(_read_array(Path(image), self.channels), self.channels, self.scale, image)
        if isinstance(image, torch.Tensor):
            x = image.detach().cpu()
            x = x if x.ndim == 3 else x[None]
            x = x.float() if x.dtype.is_floating_point else x  # bf16/fp16 have no numpy type
            return _raw(x.numpy(), self.channels, self.scale, "tensor")
        from PIL import Image

        if isinstance(image, Image.Image):
            return _raw(pil_to_chw(image, self.channels), self.channels, self.scale, "PIL image")
        return _raw(to_chw(np.asarray(image), self.channels), self.channels, self.scale, "array")

    def load(self, image: Any) -> torch.Tensor:
        """A path, PIL image, array ``(H, W[, C])`` / ``(C, H, W)`` or tensor ``(C, H, W)`` as float ``(C, H, W)``."""
        return _finish(*self._load_raw(image), self.channels)

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        x, divisor = self._load_raw(image)  # geometry first, on 8-bit pixels where they are 8-bit
        if self.training:
            from torchvision.transforms.v2 import RandomResizedCrop

            top, left, h, w = RandomResizedCrop.get_params(x, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
            x = TF.resized_crop(x, top, left, h, w, list(self.size), interpolation=self.interpolation, antialias=True)
            if torch.rand(()) < 0.5:
                x = TF.horizontal_flip(x)
        else:
            short = math.floor(min(self.size) / self.crop_pct)
            x = TF.resize(x, [short], interpolation=self.interpolation, antialias=True)
            x = TF.center_crop(x, list(self.size))
        x = _finish(x, divisor, self.channels)
        return ((x - self.mean) / self.std).contiguous()

    def __repr__(self) -> str:
        mode = "training" if self.training else "eval"
        return (f"ImageTransform({mode}, bands={self.channels}, size={self.size}, crop_pct={self.crop_pct}, "
                f"interpolation={self.interpolation.value}, scale={self.scale})")


def per_band(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Statistics of ``len(values)`` bands for ``channels`` bands, as timm's ``adapt_input_conv`` maps kernels:
    averaged into one band, repeated cyclically into more."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(channels))


def band_mean_std(
    channels: int,
    config: Mapping[str, Any],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    default: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation ``(mean, std)`` of ``channels`` bands.

    ``mean`` and ``std`` where given, else the data config's (e.g. the model's ``data_config``), else
    ``default``; each is then mapped to ``channels`` bands by :func:`per_band`. A value that is in none
    of them is a ``KeyError``.
    """
    picked = []
    for key, given in (("mean", mean), ("std", std)):
        if given is None:
            given = config[key] if key in config or default is None else default
        picked.append(per_band(given, channels))
    return picked[0], picked[1]
