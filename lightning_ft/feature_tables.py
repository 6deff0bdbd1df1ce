"""Feature tables for the frozen part of a model, and data loading that serves them.

The pieces :class:`lightning_ft.callbacks.FeatureCache` is built from (torch only, no Lightning).
"Cache" in this package means this and nothing else: the frozen part's outputs, computed once.

* :class:`FeatureTable`: one row per dataset sample -- the input of the cut module of a
  :class:`lightning_ft.prefix.PrefixCut` (the head's inputs when the cut is at the head) -- in memory
  on the model's device or memory-mapped on disk, with the labels and, for dict inputs (an image time
  series), the *extras*: the entries other than the one the frozen part consumes (``mask``, ``doy``),
  stored as loaded and served for real (:meth:`lightning_ft.prefix.PrefixCut.placeholder_input`).
* :class:`CachedIterator`: iterates a ``DataLoader``'s own batch sampler -- so the batches and the
  random number stream are exactly those of the uncached loader -- and hands each index batch to a
  function that serves it (rows of a table, or the samples loaded as the loader would).
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

from lightning_ft.batch import split_batch
from lightning_ft.prefix import PrefixCut

__all__ = [
    "CachedIterator",
    "FeatureTable",
    "cached_iterator",
    "check_cacheable",
    "fetch_inputs",
    "fetch_samples",
    "random_transform_report",
    "sample_fingerprint",
]

_RANDOM_NAMES = ("Random", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix", "ColorJitter", "Mixup", "CutMix")


class FeatureTable:
    """Rows of the frozen part's output for every sample of one dataset, plus the labels and the extras.

    ``features`` hold one row per sample: ``(n, *shape)``, where ``shape`` starts with ``k`` when
    the cut sees ``k`` rows per sample (``(n, T, ...)`` for the dates of a time series).
    ``extras`` (a dict of ``(n, ...)`` tensors, in memory even when the features are memory-mapped)
    are the inputs' other entries, served as they were loaded.
    """

    def __init__(self, features: torch.Tensor | np.memmap, labels: torch.Tensor, dtype: torch.dtype,
                 path: Path | None = None, cut: PrefixCut | None = None, generation: int = 0,
                 extras: dict[str, torch.Tensor] | None = None) -> None:
        self.features = features
        self.extras = extras or {}
        self.generation = generation  # which build this is (a rebuilt table has a new one)
        self.cut = cut
        self.labels = labels
        self.dtype = dtype  # the dtype the features were computed in (a memmap may hold a wider one)
        self.path = path

    def rows(self, index: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)`` of the samples ``index`` (memory-mapped rows come as a CPU tensor)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.features, torch.Tensor):
            rows = self.features[idx.to(self.features.device)]
        else:  # memmap: read the rows
            rows = torch.from_numpy(np.ascontiguousarray(self.features[idx.numpy()])).to(self.dtype)
        return rows, self.labels[idx.to(self.labels.device)]

    def extra_rows(self, index: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The extras of the samples ``index`` (``{}`` for tensor inputs)."""
        if not self.extras:
            return {}
        idx = torch.as_tensor(index, dtype=torch.long)
        return {k: v[idx.to(v.device)] for k, v in self.extras.items()}

    def close(self) -> None:
        if self.path is not None:
            del self.features
            self.path.unlink(missing_ok=True)
            self.path = None


class CachedIterator:
    """Yields ``serve(indices)`` for the index batches of ``loader``'s batch sampler.

    ``serve`` is called at every batch, not bound to one table: a table rebuilt or dropped in the
    middle of an epoch is never read after that. No sample is loaded, no worker started.
    """

    def __init__(self, loader: DataLoader, serve: Callable[[list[int]], Any]) -> None:
        # the same draws from the same generators as torch's _BaseDataLoaderIter.__init__, in the same
        # order: the sampler iterator (lazy) and then one int64 for the worker base seed
        self._sampler_iter = iter(loader.batch_sampler)
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        self._serve = serve
        self._length = len(loader)

    @classmethod
    def continuing(cls, sampler_iter: Iterator[Any], serve: Callable[[list[int]], Any], length: int) -> CachedIterator:
        """Serve the remaining index batches of an iterator that already started (no new random draws)."""
        it = cls.__new__(cls)
        it._sampler_iter, it._serve, it._length = sampler_iter, serve, length
        return it

    def __iter__(self) -> CachedIterator:
        return self

    def __len__(self) -> int:
        return self._length

    def __next__(self) -> Any:
        return self._serve(next(self._sampler_iter))


def cached_iterator(loader: DataLoader, source: FeatureTable | Callable[[list[int]], Any]) -> CachedIterator:
    """An iterator over ``loader``'s batches served by ``source``: a table (``(features, labels)``
    batches) or a function of the index batch."""
    return CachedIterator(loader, source.rows if isinstance(source, FeatureTable) else source)


def check_cacheable(loader: DataLoader, what: str) -> None:
    """A loader the cache can serve: a map-style dataset, batched by a sampler (indices exist)."""
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            f"FeatureCache: the {what} dataset is an IterableDataset; the cache looks samples up by index. "
            "Use a map-style Dataset (with __getitem__ and __len__), or drop FeatureCache."
        )
    if loader.batch_sampler is None:
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


def _input_tensors(sample: Any) -> list[torch.Tensor]:
    """The tensors of a sample's inputs: the first item of a pair, every tensor of a dict of inputs."""
    if isinstance(sample, torch.Tensor):
        return [sample]
    if isinstance(sample, (list, tuple)) and sample:
        return _input_tensors(sample[0])
    if isinstance(sample, dict) and sample:
        values = sample["inputs"] if "inputs" in sample else sample
        if isinstance(values, dict):
            return [v for v in values.values() if isinstance(v, torch.Tensor)]
        return _input_tensors(values)
    return []


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
                loads.append(_input_tensors(dataset[i]))
            a, b = loads
            if len(a) != len(b) or any(u.shape != v.shape or not torch.equal(u, v) for u, v in zip(a, b)):
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
            for x in _input_tensors(dataset[i]):
                total += float(x.double().sum()) + float(x.double().abs().sum()) * 1e-3
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    return id(dataset), n, total


def fetch_samples(dataset: Dataset, index: list[int], collate: Callable[[list[Any]], Any]) -> Any:
    """The batch of the samples ``index``, collated as the loader would."""
    return collate([dataset[i] for i in index])


def fetch_inputs(dataset: Dataset, index: list[int], collate: Callable[[list[Any]], Any]) -> tuple[Any, Any]:
    """``(inputs, targets)`` of the samples ``index``, collated as the loader would (:func:`lightning_ft.batch.split_batch`)."""
    return split_batch(fetch_samples(dataset, index, collate))
