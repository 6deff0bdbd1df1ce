"""FeatureCache: while part of the model is frozen, compute it once and train the rest on its outputs.

A linear probe (or the head-only phase of gradual unfreezing) recomputes the same backbone outputs
every epoch. This callback computes them once -- the physical limit -- and serves them, with the
batches of the loader's own sampler (same order, same random stream: the model ends where the
uncached run ends, to float tolerance).

* **Works on any LightningModule whose steps call** ``self(x)``. The cut is found by tracing the
  module's own forward pass (:mod:`lightning_ft.prefix`): the input of its first trainable (or
  training-mode BatchNorm/dropout/drop-path) layer -- the head, while the whole backbone is frozen.
  A cached batch is an ordinary ``[inputs, targets]`` batch (:mod:`lightning_ft.batch`) whose inputs
  are a placeholder of the right shape (one broadcast NaN: no memory); around each training and
  validation step the callback runs the model from the cut with the cached rows
  (``PrefixCut.inject``: the frozen modules return placeholders, the cut module gets the rows), and
  leaves it on the step's end or on an exception.
* Built in ``on_train_start`` for the training and validation loaders, in the precision context
  of the run (bf16-mixed features are bf16, as uncached). Under DDP each rank computes a strided
  share of the samples and the shares are gathered, so the table costs one forward pass in total
  and serves any shuffle of ``DistributedSampler``.
* In memory on the model's device when the estimate (printed before building) fits under
  ``max_memory_gb``; otherwise memory-mapped files under ``cache_dir``, deleted at teardown.
* When more layers train (a ``GradualUnfreezing`` transition, say), the tables move to the new cut.
  Batches fetched before the cut moved are served from the new table.
* Off for good when nothing before a trainable layer stays frozen (or no cut verifies): batches
  already fetched are re-loaded as images, nothing stale is trained on. Rebuilt when the frozen
  weights change (``restore_best``) or the dataset does (another object, length or first/last
  sample).
* Refuses random training transforms (it loads samples twice under two seeds to find them):
  cached features would freeze one augmentation draw. ``allow_random_transforms=True`` accepts
  exactly that (one draw per sample, for all epochs), with a warning.
* Time series: inputs may be a dict of batch-first tensors (``{"images": (B, T, C, H, W), "mask":
  (B, T), "doy": (B, T)}``). The largest floating-point entry is what the frozen part consumes: a
  cached batch has a NaN placeholder there, and the other entries (``mask``, ``doy``) are stored per
  sample and served as loaded, since the part after the cut reads them. A cut that sees ``k`` rows
  per sample (each date's image through the backbone) stores them as one row ``(k, ...)`` per sample.
* Says so when it did not serve: ``served`` counts, per epoch, the training batches served from
  each cut and those loaded as images; an epoch that ran on images while the cache was on (the
  loader was not served through the cache: a Lightning or torch change, say) ends with a warning
  that says how many batches and why it matters.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from lightning_ft.callbacks._common import check_strategy
from lightning_ft.distributed import gather_with_grad
from lightning_ft.feature_tables import (
    CachedIterator,
    FeatureTable,
    check_cacheable,
    fetch_inputs,
    fetch_samples,
    random_transform_report,
    sample_fingerprint,
)
from lightning_ft.prefix import Inputs, PrefixCut, changes_in_training_mode, find_cut, inputs_to, placeholder_key

__all__ = ["FeatureCache"]

IMAGES = "images"  # the key of ``FeatureCache.served`` for batches loaded from the data


class _Watch:
    """What decides the cut, collected once: a check per batch then costs microseconds."""

    def __init__(self, module: nn.Module) -> None:
        self.params = [p for _, p in module.named_parameters()]
        self.stateful = [m for m in module.modules() if changes_in_training_mode(m)]

    def signature(self) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
        """Which parameters train, which stateful layers run in training mode."""
        return tuple(p.requires_grad for p in self.params), tuple(m.training for m in self.stateful)


class _Served:
    """A batch served from a table: its placeholder inputs (the placeholder tensor of dict inputs), the rows
    for them and where they came from."""

    __slots__ = ("placeholder", "features", "index", "generation", "loader")

    def __init__(self, placeholder: torch.Tensor, features: torch.Tensor, index: list[int], generation: int,
                 loader: DataLoader) -> None:
        # the table's generation, not the table: a rebuild must be able to free the old one
        self.placeholder, self.features, self.index, self.generation, self.loader = (
            placeholder, features, index, generation, loader)


def _main_tensor(inputs: Any) -> torch.Tensor | None:
    """The placeholder of a cached batch's inputs: the tensor, or the entry of a dict the prefix consumes."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    try:
        key = placeholder_key(inputs)
    except ValueError:
        return None
    return inputs[key] if key is not None else None


def _gather(x: torch.Tensor) -> torch.Tensor:
    """:func:`gather_with_grad` for any dtype (bool through uint8: collectives may not take bool)."""
    if x.dtype == torch.bool:
        return gather_with_grad(x.to(torch.uint8).contiguous()).bool()
    return gather_with_grad(x.contiguous())


class _NoRoom(ValueError):
    """The memory-mapped tables would not fit on the disk."""


def _digest_dataset(dataset: Any, digest: Any, depth: int = 0) -> None:
    """Feed what a dataset holds into ``digest`` where that is cheap: a ``Subset``'s indices, a
    ``TensorDataset``'s tensors (inputs as prepared, labels), an image folder's ``(path, label)`` samples
    with their files' modification times; wrappers (``.dataset``, ``.base``) are followed."""
    from torch.utils.data import Subset, TensorDataset

    if depth > 8:
        return
    if isinstance(dataset, Subset):
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        _digest_dataset(dataset.dataset, digest, depth + 1)
    elif isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(getattr(dataset, "samples", None), list):
        for sample in dataset.samples:
            digest.update(repr(sample).encode())
            path = sample[0] if isinstance(sample, (tuple, list)) and sample else None
            if isinstance(path, (str, os.PathLike)) and os.path.exists(path):
                digest.update(str(os.stat(path).st_mtime_ns).encode())
    else:
        for attr in ("dataset", "base"):
            inner = getattr(dataset, attr, None)
            if inner is not None and hasattr(inner, "__getitem__"):
                _digest_dataset(inner, digest, depth + 1)
                return


def _default_limit_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class FeatureCache(Callback):
    """Train the trainable part of a model on cached outputs of its frozen part.

    ``cut`` is the :class:`lightning_ft.prefix.PrefixCut` whose input the tables hold (``cut.name`` is
    ``"head.fc"`` for ``FineTuneModule`` with a frozen backbone and a linear head). ``serving`` is the cut name while a
    step runs from the tables, else ``None``. ``served[epoch]`` counts the training batches served
    per cut name, and those loaded from the data under ``"images"``. ``stats`` counts builds, build
    seconds, cached batches, batches moved to a new table and batches re-loaded as images.

    Args:
        max_memory_gb: tables above this go to memory-mapped files (default: half the free GPU memory
            on CUDA, a quarter of the RAM on CPU).
        cache_dir: where memory-mapped tables go (default: ``<trainer.default_root_dir>/feature_cache``).
        allow_random_transforms: cache one draw of a random training transform per sample instead of
            refusing (augmentation is then frozen for the whole run).
        build_batch_size: batch size of the build pass (default: the loader's).
        share_dir: a folder where in-memory tables are also saved, keyed by what they depend on (the cut,
            every frozen parameter and buffer, the dataset's length and sampled inputs, the shape,
            dtype and precision); a later fit (another seed or strategy, another process) with the same
            key loads the table instead of computing it (``weights_only``). ``lightning-ft compare``
            shares one folder between its runs. Single-process runs only: under DDP the folder is not
            used (said once).
    """

    def __init__(
        self,
        max_memory_gb: float | None = None,
        cache_dir: str | Path | None = None,
        allow_random_transforms: bool = False,
        build_batch_size: int | None = None,
        share_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if max_memory_gb is not None and max_memory_gb < 0:
            raise ValueError(f"max_memory_gb must be >= 0, got {max_memory_gb}.")
        self.max_memory_gb = max_memory_gb
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.allow_random_transforms = allow_random_transforms
        self.build_batch_size = build_batch_size
        self.share_dir = Path(share_dir) if share_dir is not None else None
        self.active = False
        self.tables: dict[tuple[int, int, float], FeatureTable] = {}
        self.stats: dict[str, float] = {"builds": 0, "build_seconds": 0.0, "cached_batches": 0,
                                        "moved_batches": 0, "reloaded_batches": 0, "shared_loads": 0}
        self.served: dict[int, Counter[str]] = {}
        self.serving: str | None = None
        self.cut: PrefixCut | None = None
        self._patched: dict[int, tuple[DataLoader, str]] = {}
        self._keys: dict[int, tuple[int, int, float]] = {}
        self._records: dict[int, _Served] = {}  # id(placeholder) -> what was served with it
        self._train_loader: DataLoader | None = None
        self._state: tuple[tuple[int, int], ...] | None = None
        self._watch: _Watch | None = None
        self._signature: tuple[tuple[bool, ...], tuple[bool, ...]] | None = None
        self._step: contextlib.ExitStack | None = None
        self._unserved: Counter[int] = Counter()  # per epoch: batches run on images while the cache was on
        self._images_epoch: int | None = None  # an epoch known to run on images (its workers started first)
        self._dirty = False
        self._generation = 0
        self._trainer: L.Trainer | None = None
        self._module: L.LightningModule | None = None

    # ------------------------------------------------------------------ checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        if getattr(pl_module, "mixes_inputs", False):
            raise ValueError(
                "FeatureCache: this module mixes its training images (Mixup/CutMix), so no cached feature matches a "
                "mixed batch. Set mixup_alpha=0 and cutmix_alpha=0 for a cached run, or drop FeatureCache."
            )
        precision = str(trainer.precision)
        if precision.endswith("-true") and precision != "32-true":
            raise ValueError(
                f"FeatureCache supports precision='32-true' and the mixed precisions ('bf16-mixed', '16-mixed'); this "
                f"Trainer uses {precision!r}, whose input conversion would materialise the cached batches' "
                "placeholder inputs. Use a mixed precision, or drop FeatureCache."
            )
        # counts are per fit
        self.served, self._unserved, self._images_epoch = {}, Counter(), None
        self.stats = {k: 0 if k != "build_seconds" else 0.0 for k in self.stats}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer, self._module = trainer, pl_module
        self._watch = _Watch(pl_module)
        loaders = self._loaders(trainer)
        for split, loader in loaders:
            self._check_loader(split, loader)
        cut, why = self._choose_cut()
        if cut is None:
            raise ValueError(
                f"FeatureCache needs a frozen part before the first trainable layer at the start of training, but "
                f"{why}. Freeze the backbone (FineTuneModule(freeze_backbone=True), LinearProbing or "
                "GradualUnfreezing), or drop FeatureCache."
            )
        self.cut, self._signature = cut, self._watch.signature()
        self._state = cut.state()
        self._estimate_and_build(trainer, pl_module, loaders)
        self.active = True
        for split, loader in loaders:
            self._patch(loader, split)
        self._take_over_first_epoch(trainer)
        # callbacks whose on_train_start runs after this one may change frozen weights or statistics
        # (GradualUnfreezing(frozen_bn="recalibrate")): check again before the first step
        self._dirty = True

    def _choose_cut(self) -> tuple[PrefixCut | None, str]:
        """``(cut, "")``: cache the input of ``cut``; ``(None, why)``: nothing can be cached."""
        assert self._module is not None and self._trainer is not None and self._train_loader is not None
        self._end()
        loader = self._train_loader
        x, _ = fetch_inputs(loader.dataset, list(range(min(3, len(loader.dataset)))), loader.collate_fn)
        try:
            placeholder_key(x)
        except ValueError as error:
            return None, str(error)
        try:
            with torch.inference_mode(False), self._trainer.precision_plugin.forward_context():
                return find_cut(self._module, self._module, inputs_to(x, self._module.device))
        except Exception as error:  # a model find_cut cannot trace: train uncached rather than fail mid-run
            return None, f"tracing the model's forward pass for its frozen prefix failed ({type(error).__name__}: {error})"

    def _loaders(self, trainer: L.Trainer) -> list[tuple[str, DataLoader]]:
        train = trainer.train_dataloader
        if not isinstance(train, DataLoader):
            kind = type(train).__name__ + (f" of {len(train)} loaders" if isinstance(train, (dict, list, tuple)) else "")
            raise ValueError(
                f"FeatureCache serves one training DataLoader of (inputs, targets) batches; this run trains on a {kind}. "
                "Train on one DataLoader (e.g. concatenate the datasets), or drop FeatureCache for this fit."
            )
        self._train_loader = train
        val = trainer.val_dataloaders
        vals = [val] if isinstance(val, DataLoader) else list(val or [])
        return [("train", train)] + [(f"val{i}" if i else "val", dl) for i, dl in enumerate(vals)
                                     if isinstance(dl, DataLoader)]

    def _datamodule_hint(self, option: str, value: Any) -> str:
        """`` (<DataModule>(option=value))`` when the trainer's datamodule takes that argument, else nothing."""
        import inspect

        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if datamodule is None or option not in inspect.signature(type(datamodule)).parameters:
            return ""
        return f": {type(datamodule).__name__}({option}={value!r})"

    def _check_loader(self, split: str, loader: DataLoader) -> None:
        check_cacheable(loader, split)
        if len(loader.dataset):  # type: ignore[arg-type]
            sample = fetch_samples(loader.dataset, [0], loader.collate_fn)
            inputs = sample[0] if isinstance(sample, (list, tuple)) and sample else None
            dict_of_tensors = (isinstance(inputs, dict) and bool(inputs)
                               and all(isinstance(v, torch.Tensor) and v.ndim >= 1 for v in inputs.values()))
            if not (isinstance(sample, (list, tuple)) and len(sample) == 2 and isinstance(sample[1], torch.Tensor)
                    and (isinstance(inputs, torch.Tensor) or dict_of_tensors)):
                kind = type(sample).__name__ + (f" of {len(sample)} items" if isinstance(sample, (list, tuple, dict)) else "")
                if isinstance(sample, (list, tuple)) and len(sample) == 2 and isinstance(inputs, dict):
                    kind += " whose inputs are a dict of " + ", ".join(sorted({type(v).__name__ for v in inputs.values()}))
                raise ValueError(
                    f"FeatureCache serves (inputs, targets) batches of tensors; the {split} loader's batches are a {kind}. "
                    "Return (inputs, targets) from the Dataset (inputs a tensor or a dict of batch-first tensors), or "
                    "drop FeatureCache for this fit."
                )
            targets = sample[1]
            if targets.ndim != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
                raise ValueError(
                    f"FeatureCache stores class-index targets (a 1-D integer tensor per batch); the {split} loader's "
                    f"targets have dtype {targets.dtype} and shape {tuple(targets.shape)}. Drop FeatureCache for "
                    "regression, soft or multi-label targets."
                )
        if loader.persistent_workers and loader.num_workers > 0:
            raise ValueError(
                f"FeatureCache: the {split} DataLoader has persistent_workers=True; its iterator is reused across "
                "epochs and cannot be served from the cache. Make the DataLoader with persistent_workers=False"
                f"{self._datamodule_hint('persistent_workers', False)} (cached epochs use no workers)."
            )
        if split == "train":
            report = random_transform_report(loader.dataset)
            if report is not None and not self.allow_random_transforms:
                raise ValueError(
                    f"FeatureCache: the training data is randomly augmented ({report}). Cached features would "
                    "freeze one augmentation draw per sample. Use deterministic training transforms for a linear "
                    f"probe{self._datamodule_hint('augment', False)}, or pass "
                    "FeatureCache(allow_random_transforms=True) to train on one fixed draw per sample."
                )
            if report is not None:
                rank_zero_warn(f"FeatureCache: random training transforms ({report}); caching one draw per sample.")

    # ------------------------------------------------------------------ build
    def _estimate_and_build(self, trainer: L.Trainer, pl_module: L.LightningModule,
                            loaders: list[tuple[str, DataLoader]]) -> None:
        todo = []
        for split, loader in loaders:
            key = sample_fingerprint(loader.dataset)
            self._keys[id(loader)] = key
            if key not in self.tables and all(key != k for _, _, k in todo):
                todo.append((split, loader, key))
        if not todo:
            return
        device = pl_module.device
        assert self.cut is not None
        shapes, extras = [], []
        for split, loader, _ in todo:
            x, _ = fetch_inputs(loader.dataset, [0], loader.collate_fn)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                probe = self._compute(pl_module, inputs_to(x, device))
            shapes.append((tuple(probe.shape[1:]), probe.dtype))  # per sample: (k, ...) for k rows a sample
            extras.append({k: (tuple(v.shape[1:]), v.dtype) for k, v in self.cut.extras(x).items()})
        extra_bytes = [sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in e.values()) for e in extras]
        sizes = [len(loader.dataset) * (math.prod(s) * torch.empty((), dtype=d).element_size() + e)
                 for (_, loader, _), (s, d), e in zip(todo, shapes, extra_bytes)]
        limit = int(self.max_memory_gb * (1 << 30)) if self.max_memory_gb is not None else _default_limit_bytes(device)
        on_disk = sum(sizes) > limit
        if on_disk:
            self._check_disk(trainer, [len(loader.dataset) * math.prod(s) * (2 if d == torch.float16 else 4)
                                       for (_, loader, _), (s, d) in zip(todo, shapes)])
        where = (f"memory-mapped under {self._dir(trainer)}" if on_disk else f"in memory on {device}")
        parts = ", ".join(f"{split}: {len(loader.dataset):,} x {s} {str(d).replace('torch.', '')}"
                          f"{' + ' + ', '.join(e) if e else ''} = {_human(b)}"
                          for (split, loader, _), (s, d), e, b in zip(todo, shapes, extras, sizes))
        what = f"inputs of '{self.cut.name}' (the frozen part's output)"
        rank_zero_info(f"FeatureCache, {what}: {parts}; total {_human(sum(sizes))} -> {where} (limit {_human(limit)})")
        start = time.perf_counter()
        for (split, loader, key), (shape, dtype), extra in zip(todo, shapes, extras):
            self.tables[key] = self._shared_or_built(trainer, pl_module, loader, split, shape, dtype, on_disk, extra)
        self.stats["build_seconds"] += time.perf_counter() - start

    def _shared_or_built(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader, split: str,
                         shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool,
                         extra: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> FeatureTable:
        """The table from ``share_dir`` when one with the same key is there, else built (and saved there)."""
        if self.share_dir is None or on_disk:
            return self._build(trainer, pl_module, loader, split, shape, dtype, on_disk, extra)
        if trainer.world_size > 1:
            rank_zero_info("FeatureCache: share_dir is not used under DDP (each fit builds its own tables).")
            return self._build(trainer, pl_module, loader, split, shape, dtype, on_disk, extra)
        path = self.share_dir / f"{self._share_key(trainer, pl_module, loader, shape, dtype)}.pt"
        device = pl_module.device
        if path.is_file():
            try:
                saved = torch.load(path, map_location=device, weights_only=True)
            except Exception as error:  # a truncated or foreign file: build again
                rank_zero_warn(f"FeatureCache: could not read the shared table {path} ({error}); building it again.")
            else:
                self.stats["shared_loads"] += 1
                self._generation += 1
                rank_zero_info(f"FeatureCache: {split} table loaded from {path}")
                return FeatureTable(saved["features"].to(dtype), saved["labels"], dtype, None, cut=self.cut,
                                    generation=self._generation, extras=dict(saved["extras"]))
        table = self._build(trainer, pl_module, loader, split, shape, dtype, on_disk, extra)
        self.share_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"features": table.features.cpu(), "labels": table.labels.cpu(),  # type: ignore[union-attr]
                    "extras": {k: v.cpu() for k, v in table.extras.items()}}, tmp)
        os.replace(tmp, path)  # atomic: parallel runs never read half a file
        return table

    def _share_key(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader,
                   shape: tuple[int, ...], dtype: torch.dtype) -> str:
        """A digest of everything a table depends on: the cut, the frozen weights and buffers, the data."""
        import hashlib

        assert self.cut is not None
        digest = hashlib.sha256()
        digest.update(repr((self.cut.name, shape, str(dtype), str(trainer.precision), type(pl_module).__name__)).encode())
        frozen = [(n, p) for n, p in pl_module.named_parameters() if not p.requires_grad]
        for name, tensor in [*frozen, *pl_module.named_buffers()]:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        digest.update(repr(pl_module).encode())  # the modules and their options (pooling, say), not only weights
        dataset = loader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        digest.update(repr((type(dataset).__name__, n)).encode())
        _digest_dataset(dataset, digest)  # every label (and input) where the dataset holds them
        for i in sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, 16))}) if n else ():
            x, y = fetch_inputs(dataset, [i], loader.collate_fn)
            for t in (x.values() if isinstance(x, dict) else [x]):
                digest.update(torch.as_tensor(t).detach().float().cpu().numpy().tobytes())
            digest.update(torch.as_tensor(y).cpu().numpy().tobytes())
        return digest.hexdigest()[:32]

    def _check_disk(self, trainer: L.Trainer, sizes: list[int]) -> None:
        folder = self._dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if not trainer.strategy.reduce_boolean_decision(sum(sizes) <= free, all=True):
            raise _NoRoom(
                f"FeatureCache: the tables need {_human(sum(sizes))} on disk under {folder}, which has "
                f"{_human(free)} free. Point cache_dir at a larger disk, raise max_memory_gb to keep them in "
                "memory, or drop FeatureCache."
            )

    def _compute(self, pl_module: L.LightningModule, x: Inputs) -> torch.Tensor:
        assert self.cut is not None
        return self.cut.capture(pl_module, x)

    def _dir(self, trainer: L.Trainer) -> Path:
        return self.cache_dir or Path(trainer.default_root_dir) / "feature_cache"

    @torch.inference_mode(False)  # a rebuild may start inside Lightning's evaluation loop: real tensors
    @torch.no_grad()
    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader, split: str,
               shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool,
               extra_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> FeatureTable:
        dataset, n = loader.dataset, len(loader.dataset)
        world, rank = trainer.world_size, trainer.global_rank
        device = pl_module.device
        bs = self.build_batch_size or loader.batch_size or 64
        path = None
        if on_disk:
            folder = self._dir(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"{split}_rank{rank}_", suffix=".f32", dir=folder)
            os.close(fd)
            path = Path(name)
            store_dtype = np.float16 if dtype == torch.float16 else np.float32
            features: torch.Tensor | np.memmap = np.memmap(path, dtype=store_dtype, mode="w+", shape=(n, *shape))
        else:
            features = torch.empty((n, *shape), dtype=dtype, device=device)
        labels = torch.empty(n, dtype=torch.long, device=device)
        # the inputs' other entries (mask, doy): tiny, in memory on the model's device even for a memmap table
        extras = {k: torch.empty((n, *s), dtype=d, device=device) for k, (s, d) in (extra_specs or {}).items()}
        assert self.cut is not None
        mine = list(range(rank, n, world))
        chunks = math.ceil(math.ceil(n / world) / bs)
        for c in range(chunks):
            idx = mine[c * bs:(c + 1) * bs]
            if idx:
                x, y = fetch_inputs(dataset, idx, loader.collate_fn)
                with trainer.precision_plugin.forward_context():
                    f = self._compute(pl_module, inputs_to(x, device))
                y = torch.as_tensor(y, device=device).long()
                e = {k: v.to(device) for k, v in self.cut.extras(x).items()}
            else:
                f = torch.empty((0, *shape), dtype=dtype, device=device)
                y = torch.empty(0, dtype=torch.long, device=device)
                e = {k: torch.empty((0, *v.shape[1:]), dtype=v.dtype, device=device) for k, v in extras.items()}
            i = torch.as_tensor(idx, dtype=torch.long, device=device)
            if world > 1:
                f, y, i = gather_with_grad(f.contiguous()), gather_with_grad(y), gather_with_grad(i)
                e = {k: _gather(v) for k, v in e.items()}
            for k, v in e.items():
                extras[k][i] = v.to(extras[k].dtype)
            if isinstance(features, torch.Tensor):
                features[i] = f.to(dtype)
            else:
                features[i.cpu().numpy()] = f.float().cpu().numpy().astype(features.dtype)
            labels[i] = y
        if isinstance(features, np.memmap):
            features.flush()
        self.stats["builds"] += 1
        self._generation += 1
        return FeatureTable(features, labels, dtype, path, cut=self.cut, generation=self._generation, extras=extras)

    # ------------------------------------------------------------------ serve
    def _usable(self, training: bool = True) -> bool:
        """Check the cache against the model as it is now; move the cut, rebuild or switch off if it is stale.
        ``True`` when the tables can serve.

        The cut is chosen in training context only: validation runs every layer in eval mode, which
        says nothing about which layers train.
        """
        self._end()  # never trace or build while a step's injection is still on (a skipped batch, say)
        if not self.active or self._module is None or self._trainer is None or self._watch is None:
            return False
        signature = self._watch.signature()
        if signature != self._signature and not training:
            if self._signature is None or signature[0] != self._signature[0]:
                return False  # the trainable set changed since the last training check: validate uncached
        elif signature != self._signature:
            self._signature = signature
            cut, why = self._choose_cut()
            if cut is None:
                self._switch_off(why)
                return False
            if self.cut is None or cut.name != self.cut.name:
                rank_zero_info(f"FeatureCache: the trainable part changed; caching the input of '{cut.name}' from here on.")
                self.cut = cut
                return self._rebuild()
            self.cut = cut  # the same place, traced again: its prefix tensors may differ
        assert self.cut is not None
        state = self.cut.state()
        stale_data = any(sample_fingerprint(dl.dataset) != self._keys.get(i) for i, (dl, _) in self._patched.items())
        if state != self._state or stale_data:
            why = "the frozen weights changed" if state != self._state else "the data changed"
            rank_zero_info(f"FeatureCache: {why}; rebuilding the tables.")
            return self._rebuild()
        return True

    def _rebuild(self) -> bool:
        assert self._trainer is not None and self._module is not None and self.cut is not None
        self._drop_tables()
        self._state = self.cut.state()
        try:
            self._estimate_and_build(self._trainer, self._module, [(s, dl) for dl, s in self._patched.values()])
        except _NoRoom as error:  # mid-run: train uncached rather than stop
            self._switch_off(str(error))
            return False
        return True

    def _switch_off(self, why: str) -> None:
        assert self._trainer is not None
        self.active = False
        self._drop_tables()
        rank_zero_info(f"FeatureCache off from epoch {self._trainer.current_epoch}: {why}. "
                       "Training runs through the whole model from here on.")

    def _patch(self, loader: DataLoader, split: str) -> None:
        """Serve ``loader``'s epochs from the tables: its iterator becomes a :class:`CachedIterator`.

        ``DataLoader._get_iterator`` is torch's one place where ``iter(loader)`` makes its iterator; it
        is private, so :meth:`on_train_epoch_end` checks that the epochs were served and says so if not.
        """
        if id(loader) in self._patched:
            return
        original = loader._get_iterator

        def _get_iterator() -> Any:
            for key in [k for k, r in self._records.items() if r.loader is loader]:
                del self._records[key]  # batches of the last iterator that were never run
            training = self._trainer is not None and self._trainer.training  # not validation, even on a shared loader
            if self._usable(training=training):
                return CachedIterator(loader, self._server(loader))
            return original()

        loader._get_iterator = _get_iterator  # type: ignore[method-assign]
        self._patched[id(loader)] = (loader, split)

    def _table(self, loader: DataLoader) -> FeatureTable | None:
        return self.tables.get(self._keys.get(id(loader))) if self.active else None  # type: ignore[arg-type]

    def _server(self, loader: DataLoader) -> Any:
        """What a cached iterator calls per index batch: ``[placeholder inputs, targets]`` with the rows
        remembered for the step, or -- the cache went off during the epoch -- the samples as the loader
        would load them."""
        def serve(index: list[int]) -> Any:
            table = self._table(loader)
            if table is None or table.cut is None or self._module is None:
                return fetch_samples(loader.dataset, list(index), loader.collate_fn)
            features, targets = table.rows(index)
            inputs = table.cut.placeholder_input(len(index), self._module.device, table.extra_rows(index))
            # a dict of inputs is rebuilt on its way to the step (batch transfer): its placeholder tensor is not
            placeholder = inputs if isinstance(inputs, torch.Tensor) else inputs[table.cut.input_key]
            self._records[id(placeholder)] = _Served(placeholder, features, list(index), table.generation, loader)
            return [inputs, targets]

        return serve

    def _take_over_first_epoch(self, trainer: L.Trainer) -> None:
        """The first epoch's iterator exists before ``on_train_start`` (Lightning makes it when it sets
        up the data): serve its remaining batches too. Lightning has no public handle on it; if the
        structure below changes, epoch 0 runs on images and :meth:`on_train_epoch_end` says so."""
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        combined = getattr(fetcher, "iterator", None) if fetcher is not None else None
        iterators = getattr(getattr(combined, "_iterator", None), "iterators", None)
        single = getattr(torch.utils.data.dataloader, "_SingleProcessDataLoaderIter", None)
        if not iterators or single is None:
            return
        for i, live in enumerate(iterators):
            sampler_iter = getattr(live, "_sampler_iter", None)
            if type(live) is not single or sampler_iter is None:  # worker processes hold prefetched indices
                self._images_epoch = trainer.current_epoch
                rank_zero_info(f"FeatureCache: epoch {trainer.current_epoch}'s loader worker processes started before "
                               "the tables were built; it trains on images, the epochs after it from the tables.")
                continue
            iterators[i] = CachedIterator.continuing(sampler_iter, self._server(self._train_loader),
                                                     len(self._train_loader))

    # --------------------------------------------------------------- per step
    def _loader_of(self, trainer: L.Trainer, training: bool, dataloader_idx: int) -> DataLoader | None:
        if training:
            return self._train_loader
        val = trainer.val_dataloaders
        vals = [val] if isinstance(val, DataLoader) else list(val or [])
        return vals[dataloader_idx] if dataloader_idx < len(vals) else None

    def _begin(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, training: bool,
               dataloader_idx: int = 0) -> None:
        """Before a step: run the model from the cut with this batch's rows (or load its images)."""
        self._end()
        inputs = batch[0] if isinstance(batch, (list, tuple)) and batch else None
        if isinstance(inputs, torch.Tensor):
            record = self._records.pop(id(inputs), None)
        elif isinstance(inputs, dict) and self._records:  # the placeholder inside dict inputs
            record = next((self._records.pop(id(v)) for v in inputs.values() if id(v) in self._records), None)
        else:
            record = None
        if record is None:
            loader = self._loader_of(trainer, training, dataloader_idx)
            waiting = any(r.loader is loader for r in self._records.values())  # this loader served from the tables
            main = _main_tensor(inputs) if waiting else None
            if (main is not None and main.numel() and main.is_floating_point()
                    and bool(torch.isnan(main.reshape(-1)[0]))):  # a placeholder, changed on its way to the step
                raise RuntimeError(
                    "FeatureCache served this batch from its tables, but its inputs were replaced before the step "
                    "(a transfer_batch_to_device or on_after_batch_transfer hook?). Leave a cached batch's inputs as "
                    "they are, or drop FeatureCache."
                )
            if training:
                self._count(trainer, IMAGES, cache_on=self.active)
            return
        current = self._table(record.loader)
        if current is None:  # fetched from the tables before the cache went off: the images of these samples
            if not isinstance(batch, list):
                raise RuntimeError("FeatureCache: a batch served from the tables became a tuple on its way to the step, "
                                   "so its inputs cannot be re-loaded after the cache went off. Keep batches as lists.")
            x, _ = fetch_inputs(record.loader.dataset, record.index, record.loader.collate_fn)
            batch[0] = inputs_to(x, pl_module.device)
            self.stats["reloaded_batches"] += 1
            if training:
                self._count(trainer, IMAGES, cache_on=False)
            return
        features = record.features
        if current.generation != record.generation:  # fetched before the table was rebuilt (the cut moved): the same rows of the new one
            features, _ = current.rows(record.index)
            if isinstance(inputs, dict):  # the extras too (the same samples: a rebuild may follow changed data)
                inputs.update({k: v.to(pl_module.device) for k, v in current.extra_rows(record.index).items()})
            self.stats["moved_batches"] += 1
        elif training:
            self.stats["cached_batches"] += 1
        assert current.cut is not None
        self._step = contextlib.ExitStack()
        self._step.enter_context(current.cut.inject(features.to(pl_module.device)))
        self.serving = current.cut.name
        if training:
            self._count(trainer, current.cut.name, cache_on=True)

    def _end(self) -> None:
        if self._step is not None:
            self._step.close()
            self._step = None
        self.serving = None

    def _count(self, trainer: L.Trainer, source: str, cache_on: bool) -> None:
        self.served.setdefault(trainer.current_epoch, Counter())[source] += 1
        if source == IMAGES and cache_on and trainer.current_epoch != self._images_epoch:
            self._unserved[trainer.current_epoch] += 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.active and (self._dirty or self._watch is not None and self._watch.signature() != self._signature):
            self._dirty = False  # a layer thawed (or a callback ran after validation): check before this step
            self._usable()
        self._begin(trainer, pl_module, batch, training=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._end()

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._begin(trainer, pl_module, batch, training=False, dataloader_idx=dataloader_idx)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._end()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._end()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dirty = True  # a callback may thaw layers here: check before the next training batch

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end()  # a training batch skipped by its module's hook (on_train_batch_start -> -1) has no end hook

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end()
        missed = self._unserved.pop(trainer.current_epoch, 0)
        if missed:
            total = sum(self.served.get(trainer.current_epoch, {}).values())
            rank_zero_warn(
                f"FeatureCache: {missed} of the {total} training batches of epoch {trainer.current_epoch} were loaded "
                "from the data and ran through the whole model although the cache was on: the training loader's "
                "iterator was not the cache's (torch's DataLoader._get_iterator or Lightning's first-epoch iterator "
                "changed?). The results are right but not faster; please report it with your torch and Lightning versions."
            )

    # ---------------------------------------------------------------- cleanup
    def _drop_tables(self) -> None:
        for table in self.tables.values():
            table.close()
        self.tables = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._end()
        for loader, _ in self._patched.values():
            loader.__dict__.pop("_get_iterator", None)
        self._patched = {}
        self._records = {}
        self._drop_tables()
        self.active = False
        self._trainer = self._module = None
