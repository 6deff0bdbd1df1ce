"""Feature tables for the frozen part of a model, and data loading that serves them.

The pieces :class:`lightning_ft.callbacks.FeatureCache` is built from (torch only, no Lightning):

* :class:`FeatureBatch`: what a cached loader yields in place of ``(images, labels)``: the head's
  inputs for the batch (or the input of the first trainable layer, with the
  :class:`lightning_ft.prefix.PrefixCut` to run from), the labels and the dataset indices.
* :class:`FeatureTable`: one row per dataset sample, in memory (on the model's device) or
  memory-mapped on disk.
* :func:`cached_iterator`: iterates a ``DataLoader``'s own (batch) sampler -- so the batches and
  the random number stream are exactly those of the uncached loader -- and looks the rows up.
* :func:`random_transform_report`: finds random augmentation by loading samples twice under
  different seeds (the global random states are restored afterwards).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_ft.prefix import PrefixCut

__all__ = ["FeatureBatch", "FeatureTable", "cached_iterator", "random_transform_report", "sample_fingerprint"]

_RANDOM_NAMES = ("Random", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix", "ColorJitter", "Mixup", "CutMix")


class FeatureBatch:
    """A training or validation batch served from the cache.

    ``features`` are the head's inputs (what the frozen part outputs). ``images`` is set instead
    when the cache was switched off after this batch had been fetched (a layer thawed mid-epoch):
    the module then runs the whole model on them. A plain class on purpose: Lightning's generic
    batch transfer (a deep copy per dataclass) passes it through untouched; the step moves what
    it uses (tables on the device are there already).
    """

    __slots__ = ("features", "target", "index", "images", "cut", "table")

    def __init__(self, features: torch.Tensor | None, target: torch.Tensor, index: torch.Tensor,
                 images: torch.Tensor | None = None, cut: PrefixCut | None = None,
                 table: FeatureTable | None = None) -> None:
        self.features, self.target, self.index, self.images = features, target, index, images
        self.cut = cut  # None: features are the head's inputs; else the input of cut.module (run from there)
        self.table = table  # where the features came from (a rebuilt table is another object)

    def __len__(self) -> int:
        return len(self.target)

    def __repr__(self) -> str:
        kind = "features" if self.features is not None else "images"
        return f"FeatureBatch({len(self)} samples, {kind})"


class FeatureTable:
    """Rows of the frozen part's output for every sample of one dataset, plus the labels."""

    def __init__(self, features: torch.Tensor | np.memmap, labels: torch.Tensor, dtype: torch.dtype,
                 path: Path | None = None, cut: PrefixCut | None = None) -> None:
        self.features = features
        self.cut = cut
        self.labels = labels
        self.dtype = dtype  # the dtype the features were computed in (a memmap may hold a wider one)
        self.path = path

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes)

    def batch(self, index: list[int] | torch.Tensor) -> FeatureBatch:
        idx = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.features, torch.Tensor):
            rows = self.features[idx.to(self.features.device)]
        else:  # memmap: read the rows, hand a CPU tensor to Lightning's device transfer
            rows = torch.from_numpy(np.ascontiguousarray(self.features[idx.numpy()])).to(self.dtype)
        return FeatureBatch(rows, self.labels[idx.to(self.labels.device)], idx, cut=self.cut, table=self)

    def close(self) -> None:
        if self.path is not None:
            del self.features
            self.path.unlink(missing_ok=True)
            self.path = None


class _CachedIterator:
    """Yields ``serve(indices)`` for the index batches of ``loader``'s sampler.

    ``serve`` is looked up at every batch, not bound to one table: a table rebuilt or dropped in the
    middle of an epoch is never read after that.
    """

    def __init__(self, loader: DataLoader, serve: Callable[[list[int]], FeatureBatch]) -> None:
        # the same draws from the same generators as torch's _BaseDataLoaderIter.__init__, in the same
        # order: the sampler iterator (lazy) and then one int64 for the worker base seed
        self._sampler_iter = iter(loader._index_sampler)
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        self._serve = serve
        self._length = len(loader)

    @classmethod
    def continuing(cls, sampler_iter: Iterator[Any], serve: Callable[[list[int]], FeatureBatch],
                   length: int) -> _CachedIterator:
        """Serve the remaining index batches of an iterator that already started (no new random draws)."""
        it = cls.__new__(cls)
        it._sampler_iter, it._serve, it._length = sampler_iter, serve, length
        return it

    def __iter__(self) -> _CachedIterator:
        return self

    def __len__(self) -> int:
        return self._length

    def __next__(self) -> FeatureBatch:
        return self._serve(next(self._sampler_iter))


def cached_iterator(loader: DataLoader, source: FeatureTable | Callable[[list[int]], FeatureBatch]
                    ) -> Iterator[FeatureBatch]:
    """An iterator over ``loader``'s batches, served from a table (or a function of the index batch):
    no images loaded, no workers."""
    return _CachedIterator(loader, source.batch if isinstance(source, FeatureTable) else source)


def check_cacheable(loader: DataLoader, what: str) -> None:
    """A loader the cache can serve: a map-style dataset, batched by a sampler (indices exist)."""
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            f"FeatureCache: the {what} dataset is an IterableDataset; the cache looks samples up by index. "
            "Use a map-style Dataset (with __getitem__ and __len__), or drop FeatureCache."
        )
    if not loader._auto_collation:
        raise ValueError(f"FeatureCache: the {what} DataLoader has batch_size=None; give it a batch_size or batch_sampler.")


def _transform_names(obj: Any, depth: int = 0) -> list[str]:
    """Class names of the transforms reachable from a dataset (through Subset/ConcatDataset/Compose)."""
    if obj is None or depth > 6:
        return []
    names: list[str] = []
    for attr in ("transform", "transforms"):
        t = getattr(obj, attr, None)
        if t is None or t is obj:
            continue
        if isinstance(t, (list, tuple)):
            for item in t:
                names += [type(item).__name__, *_transform_names(item, depth + 1)]
        elif not isinstance(t, (str, int, float)):
            names += [type(t).__name__, *_transform_names(t, depth + 1)]
    for attr in ("dataset", "datasets"):
        inner = getattr(obj, attr, None)
        for item in inner if isinstance(inner, (list, tuple)) else [inner]:
            if isinstance(item, Dataset):
                names += _transform_names(item, depth + 1)
    return names


def _first_tensor(sample: Any) -> torch.Tensor | None:
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(sample, (list, tuple)) and sample:
        return _first_tensor(sample[0])
    if isinstance(sample, dict) and sample:
        return _first_tensor(next(iter(sample.values())))
    return None


def random_transform_report(dataset: Dataset, probes: int = 2) -> str | None:
    """``None`` if loading a sample twice under different seeds gives the same input; else what differs.

    Samples ``0`` and ``len // 2`` are loaded under seeds 1 and 2 (torch, numpy, random); the
    global random states are restored afterwards, so training sees the same random stream as
    without the check. Transform classes whose names say random (RandomResizedCrop, RandAugment,
    ColorJitter, ...) are named in the report.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return None
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    differs = []
    try:
        for i in sorted({0, n // 2})[:probes]:
            loads = []
            for seed in (1, 2):
                torch.default_generator.manual_seed(seed)  # the CPU generator only: GPU streams untouched
                np.random.seed(seed)
                random.seed(seed)
                loads.append(_first_tensor(dataset[i]))
            a, b = loads
            if a is not None and b is not None and (a.shape != b.shape or not torch.equal(a, b)):
                differs.append(i)
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    if not differs:
        return None
    random_names = sorted({n for n in _transform_names(dataset) if any(k in n for k in _RANDOM_NAMES)})
    named = f" (random transforms: {', '.join(random_names)})" if random_names else ""
    return f"sample {differs[0]} loads differently under two seeds{named}"


def sample_fingerprint(dataset: Dataset) -> tuple[int, int, float]:
    """``(id, length, checksum of the first and last inputs)``: a changed dataset gets a new table.

    The samples are loaded under a fixed seed (the global random states are restored afterwards), so
    a randomly transformed dataset cached with ``allow_random_transforms`` keeps its fingerprint.
    """
    n = len(dataset)  # type: ignore[arg-type]
    total = 0.0
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        for i in sorted({0, n - 1}) if n else ():
            torch.default_generator.manual_seed(0)  # the CPU generator only: GPU streams untouched
            np.random.seed(0)
            random.seed(0)
            x = _first_tensor(dataset[i])
            if x is not None:
                total += float(x.double().sum()) + float(x.double().abs().sum()) * 1e-3
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    return id(dataset), n, total


def fetch_inputs(dataset: Dataset, index: list[int], collate: Callable[[list[Any]], Any]) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of ``index``, collated as the loader would."""
    batch = collate([dataset[i] for i in index])
    return batch[0], batch[1]
