"""FeatureCache: while the backbone is frozen, run it once per split and train the head on its outputs.

A linear probe (or the head-only phase of gradual unfreezing) recomputes the same backbone outputs
every epoch. This callback computes them once -- the physical limit -- and serves them in place of
the images, with the batches of the loader's own sampler (same order, same random stream: the
head ends where the uncached run ends, to float tolerance).

* Built in ``on_train_start`` for the training and validation loaders, in the precision context
  of the run (bf16-mixed features are bf16, as uncached). Under DDP each rank computes a strided
  share of the samples and the shares are gathered, so the table costs one forward pass in total
  and serves any shuffle of ``DistributedSampler``.
* In memory on the model's device when the estimate (printed before building) fits under
  ``max_memory_gb``; otherwise memory-mapped files under ``cache_dir``, deleted at teardown.
* When layers of the backbone train (a ``GradualUnfreezing`` transition, say), the tables move to
  the frozen prefix: they hold the input of the first trainable (or training-mode BatchNorm/
  dropout/drop-path) layer, and each step runs the model from there
  (:mod:`lightning_ft.prefix`: the cut is traced and verified against the full forward pass).
  Batches fetched before the cut moved are served from the new table.
* Off for good when nothing before a trainable layer stays frozen (or no cut verifies): batches
  already fetched are re-loaded as images, nothing stale is trained on. Rebuilt when the frozen
  weights change (``restore_best``) or the dataset does (another object, length or first/last
  sample).
* Refuses random training transforms (it loads samples twice under two seeds to find them):
  cached features would freeze one augmentation draw. ``allow_random_transforms=True`` accepts
  exactly that (one draw per sample, for all epochs), with a warning.

The module must say what the cached part is and take cached batches:
``cache_inputs(x) -> head inputs`` and a training/validation step that accepts a
:class:`lightning_ft.cache.FeatureBatch`. ``FineTuneModule`` does both.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from lightning_ft.cache import (
    FeatureBatch,
    FeatureTable,
    _CachedIterator,
    cached_iterator,
    check_cacheable,
    fetch_inputs,
    random_transform_report,
    sample_fingerprint,
)
from lightning_ft.callbacks._common import check_strategy
from lightning_ft.distributed import gather_with_grad
from lightning_ft.prefix import PrefixCut, changes_in_training_mode, find_cut

__all__ = ["FeatureCache"]


class _Watch:
    """What the validity check looks at, collected once: a check per epoch then costs microseconds."""

    def __init__(self, module: nn.Module) -> None:
        self.params = list(module.named_parameters())
        self.tensors = [*module.parameters(), *module.buffers()]
        self.stateful = [(name, m) for name, m in module.named_modules() if changes_in_training_mode(m)]

    def reason(self) -> str | None:
        for name, p in self.params:
            if p.requires_grad:
                return f"backbone parameter '{name}' is trainable"
        for name, m in self.stateful:
            if m.training:
                return f"backbone layer '{name}' ({type(m).__name__}) runs in training mode, so its output changes"
        return None

    def state(self) -> tuple[tuple[int, int], ...]:
        return tuple((t.data_ptr(), t._version) for t in self.tensors)

    def grads(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for _, p in self.params)

    def signature(self) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
        """What decides the cut: which parameters train, which stateful layers run in training mode."""
        return self.grads(), tuple(m.training for _, m in self.stateful)


class _NoRoom(ValueError):
    """The memory-mapped tables would not fit on the disk."""


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
    """Train the head (and any trainable top of the backbone) on cached outputs of the frozen part.

    ``cut`` is ``None`` while the tables hold the head's inputs, else the
    :class:`lightning_ft.prefix.PrefixCut` whose input they hold. ``stats`` counts builds, build
    seconds, cached batches, batches moved to a new table and batches re-loaded as images.

    Args:
        max_memory_gb: tables above this go to memory-mapped files (default: half the free GPU memory
            on CUDA, a quarter of the RAM on CPU).
        cache_dir: where memory-mapped tables go (default: ``<trainer.default_root_dir>/feature_cache``).
        allow_random_transforms: cache one draw of a random training transform per sample instead of
            refusing (augmentation is then frozen for the whole run).
        build_batch_size: batch size of the build pass (default: the loader's).
    """

    def __init__(
        self,
        max_memory_gb: float | None = None,
        cache_dir: str | Path | None = None,
        allow_random_transforms: bool = False,
        build_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if max_memory_gb is not None and max_memory_gb < 0:
            raise ValueError(f"max_memory_gb must be >= 0, got {max_memory_gb}.")
        self.max_memory_gb = max_memory_gb
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.allow_random_transforms = allow_random_transforms
        self.build_batch_size = build_batch_size
        self.active = False
        self.tables: dict[tuple[int, int, float], FeatureTable] = {}
        self.stats: dict[str, float] = {"builds": 0, "build_seconds": 0.0, "cached_batches": 0,
                                        "moved_batches": 0, "reloaded_batches": 0}
        self._patched: dict[int, tuple[DataLoader, str]] = {}
        self._keys: dict[int, tuple[int, int, float]] = {}
        self._train_loader: DataLoader | None = None
        self._state: tuple[tuple[int, int], ...] | None = None
        self._watch: _Watch | None = None
        self._signature: tuple[tuple[bool, ...], tuple[bool, ...]] | None = None
        self.cut: PrefixCut | None = None  # None: the table holds the head's inputs (the whole backbone is frozen)
        self._dirty = False
        self._trainer: L.Trainer | None = None
        self._module: L.LightningModule | None = None

    # ------------------------------------------------------------------ checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        if not callable(getattr(pl_module, "cache_inputs", None)) or not isinstance(
            getattr(pl_module, "backbone", None), nn.Module
        ):
            raise ValueError(
                f"FeatureCache needs a module with a `backbone` and `cache_inputs(x)` (the head's inputs, computed "
                f"by the frozen part) whose steps accept lightning_ft.cache.FeatureBatch; {type(pl_module).__name__} "
                "lacks them. FineTuneModule has both."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer, self._module = trainer, pl_module
        self._watch = _Watch(pl_module.backbone)
        loaders = self._loaders(trainer)
        for split, loader in loaders:
            self._check_loader(split, loader)
        cut, why = self._choose_cut()
        if why:
            raise ValueError(
                f"FeatureCache needs a frozen backbone, or a frozen prefix of it, at the start of training, but {why}. "
                "Freeze it (FineTuneModule(freeze_backbone=True), LinearProbing or GradualUnfreezing), or drop "
                "FeatureCache."
            )
        self.cut, self._signature = cut, self._watch.signature()
        self._state = self._weights_state()
        self._estimate_and_build(trainer, pl_module, loaders)
        self.active = True
        for split, loader in loaders:
            self._patch(loader, split)
        self._take_over_live_iterators(trainer)
        # callbacks whose on_train_start runs after this one may change frozen weights or statistics
        # (GradualUnfreezing(frozen_bn="recalibrate")): check again before the first step
        self._dirty = True

    def _choose_cut(self) -> tuple[PrefixCut | None, str]:
        """``(None, "")``: cache the head's inputs; ``(cut, "")``: cache the frozen prefix up to ``cut``;
        ``(None, why)``: nothing can be cached."""
        assert self._watch is not None and self._module is not None and self._trainer is not None
        reason = self._watch.reason()
        if reason is None:
            return None, ""
        loader = self._train_loader
        assert loader is not None
        x, _ = fetch_inputs(loader.dataset, list(range(min(3, len(loader.dataset)))), loader.collate_fn)
        try:
            with torch.inference_mode(False), self._trainer.precision_plugin.forward_context():
                cut, why = find_cut(self._module.backbone, self._module.cache_inputs, x.to(self._module.device))
        except Exception as error:  # a model find_cut cannot trace: train uncached rather than fail mid-run
            return None, f"{reason}, and tracing the backbone for its frozen prefix failed ({type(error).__name__}: {error})"
        return cut, "" if cut is not None else f"{reason}, and {why}"

    def _weights_state(self) -> tuple[tuple[int, int], ...]:
        assert self._watch is not None
        return self.cut.state() if self.cut is not None else self._watch.state()

    def _loaders(self, trainer: L.Trainer) -> list[tuple[str, DataLoader]]:
        train = trainer.fit_loop._combined_loader
        loaders = list(train.flattened) if train is not None else []
        if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
            raise ValueError(
                "FeatureCache serves one training DataLoader of (inputs, labels) batches; this run trains on "
                f"{len(loaders)} loader(s) ({', '.join(type(x).__name__ for x in loaders)}). Train on one DataLoader "
                "(e.g. concatenate the datasets), or drop FeatureCache for this fit."
            )
        self._train_loader = loaders[0]
        out = [("train", loaders[0])]
        val = trainer.fit_loop.epoch_loop.val_loop._combined_loader
        if val is not None:
            out += [(f"val{i}" if i else "val", dl) for i, dl in enumerate(val.flattened) if isinstance(dl, DataLoader)]
        return out

    def _datamodule_hint(self, option: str, value: Any) -> str:
        """`` (<DataModule>(option=value))`` when the trainer's datamodule takes that argument, else nothing."""
        import inspect

        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if datamodule is None or option not in inspect.signature(type(datamodule)).parameters:
            return ""
        return f": {type(datamodule).__name__}({option}={value!r})"

    def _check_loader(self, split: str, loader: DataLoader) -> None:
        check_cacheable(loader, split)
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
        shapes = []
        for split, loader, _ in todo:
            x, _ = fetch_inputs(loader.dataset, [0], loader.collate_fn)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                probe = self._compute(pl_module, x.to(device))
            shapes.append((tuple(probe.shape[1:]), probe.dtype))
        sizes = [len(loader.dataset) * math.prod(s) * torch.empty((), dtype=d).element_size()
                 for (_, loader, _), (s, d) in zip(todo, shapes)]
        limit = int(self.max_memory_gb * (1 << 30)) if self.max_memory_gb is not None else _default_limit_bytes(device)
        on_disk = sum(sizes) > limit
        if on_disk:
            self._check_disk(trainer, [len(loader.dataset) * math.prod(s) * (2 if d == torch.float16 else 4)
                                       for (_, loader, _), (s, d) in zip(todo, shapes)])
        where = (f"memory-mapped under {self._dir(trainer)}" if on_disk else f"in memory on {device}")
        parts = ", ".join(f"{split}: {len(loader.dataset):,} x {s} {str(d).replace('torch.', '')} = {_human(b)}"
                          for (split, loader, _), (s, d), b in zip(todo, shapes, sizes))
        what = "head inputs" if self.cut is None else f"inputs of '{self.cut.name}' (the frozen prefix)"
        rank_zero_info(f"FeatureCache, {what}: {parts}; total {_human(sum(sizes))} -> {where} (limit {_human(limit)})")
        start = time.perf_counter()
        for (split, loader, key), (shape, dtype) in zip(todo, shapes):
            self.tables[key] = self._build(trainer, pl_module, loader, split, shape, dtype, on_disk)
        self.stats["build_seconds"] += time.perf_counter() - start

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

    def _compute(self, pl_module: L.LightningModule, x: torch.Tensor) -> torch.Tensor:
        if self.cut is None:
            return pl_module.cache_inputs(x)
        return self.cut.capture(pl_module.cache_inputs, x)

    def _dir(self, trainer: L.Trainer) -> Path:
        return self.cache_dir or Path(trainer.default_root_dir) / "feature_cache"

    @torch.inference_mode(False)  # a rebuild may start inside Lightning's evaluation loop: real tensors
    @torch.no_grad()
    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader, split: str,
               shape: tuple[int, ...], dtype: torch.dtype, on_disk: bool) -> FeatureTable:
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
        mine = list(range(rank, n, world))
        chunks = math.ceil(math.ceil(n / world) / bs)
        for c in range(chunks):
            idx = mine[c * bs:(c + 1) * bs]
            if idx:
                x, y = fetch_inputs(dataset, idx, loader.collate_fn)
                with trainer.precision_plugin.forward_context():
                    f = self._compute(pl_module, x.to(device))
                y = torch.as_tensor(y, device=device).long()
            else:
                f = torch.empty((0, *shape), dtype=dtype, device=device)
                y = torch.empty(0, dtype=torch.long, device=device)
            i = torch.as_tensor(idx, dtype=torch.long, device=device)
            if world > 1:
                f, y, i = gather_with_grad(f.contiguous()), gather_with_grad(y), gather_with_grad(i)
            if isinstance(features, torch.Tensor):
                features[i] = f.to(dtype)
            else:
                features[i.cpu().numpy()] = f.float().cpu().numpy().astype(features.dtype)
            labels[i] = y
        if isinstance(features, np.memmap):
            features.flush()
        self.stats["builds"] += 1
        return FeatureTable(features, labels, dtype, path, cut=self.cut)

    # ------------------------------------------------------------------ serve
    def _usable(self, training: bool = True) -> bool:
        """Is the cache right for the model as it is now? Move the cut, rebuild, or switch off if not.

        The cut is chosen in training context only: validation runs every layer in eval mode, which
        says nothing about which layers train.
        """
        if not self.active or self._module is None or self._trainer is None or self._watch is None:
            return False
        signature = self._watch.signature()
        if signature != self._signature and not training:
            if self._signature is None or signature[0] != self._signature[0]:
                return False  # the trainable set changed since the last training check: validate uncached
        elif signature != self._signature:
            self._signature = signature
            cut, why = self._choose_cut()
            if why:
                self._switch_off(why)
                return False
            if (cut.name if cut else None) != (self.cut.name if self.cut else None):
                where = "head inputs" if cut is None else f"input of '{cut.name}'"
                rank_zero_info(f"FeatureCache: the trainable part changed; caching the {where} from here on.")
                self.cut = cut
                return self._rebuild()
        state = self._weights_state()
        stale_data = any(sample_fingerprint(dl.dataset) != self._keys.get(i) for i, (dl, _) in self._patched.items())
        if state != self._state or stale_data:
            why = "the frozen weights changed" if state != self._state else "the data changed"
            rank_zero_info(f"FeatureCache: {why}; rebuilding the tables.")
            return self._rebuild()
        return True

    def _rebuild(self) -> bool:
        assert self._trainer is not None and self._module is not None
        self._drop_tables()
        self._state = self._weights_state()
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
        if id(loader) in self._patched:
            return
        original = loader._get_iterator

        def _get_iterator() -> Any:
            training = self._trainer is not None and self._trainer.training  # not validation, even on a shared loader
            if self._usable(training=training):
                return cached_iterator(loader, self._server(loader))
            return original()

        loader._get_iterator = _get_iterator  # type: ignore[method-assign]
        self._patched[id(loader)] = (loader, split)

    def _table(self, loader: DataLoader) -> FeatureTable | None:
        return self.tables.get(self._keys.get(id(loader))) if self.active else None  # type: ignore[arg-type]

    def _server(self, loader: DataLoader) -> Any:
        """What a cached iterator calls per index batch: rows of the current table, or -- the cache went
        off during the epoch -- the samples loaded as the loader would."""
        def serve(index: list[int]) -> FeatureBatch:
            table = self._table(loader)
            if table is not None:
                return table.batch(index)
            x, y = fetch_inputs(loader.dataset, list(index), loader.collate_fn)
            return FeatureBatch(None, torch.as_tensor(y), torch.as_tensor(index), images=x)

        return serve

    def _take_over_live_iterators(self, trainer: L.Trainer) -> None:
        """The first epoch's iterator exists already (Lightning prefetches): serve its remaining batches."""
        fetcher = trainer.fit_loop._data_fetcher
        combined = getattr(fetcher, "iterator", None) if fetcher is not None else None
        mode_iterator = getattr(combined, "_iterator", None)
        iterators = getattr(mode_iterator, "iterators", None)
        if not iterators:
            return
        for i, live in enumerate(iterators):
            sampler_iter = getattr(live, "_sampler_iter", None)
            if type(live).__name__ != "_SingleProcessDataLoaderIter" or sampler_iter is None:
                continue  # worker processes hold prefetched indices: this epoch stays uncached
            iterators[i] = _CachedIterator.continuing(sampler_iter, self._server(self._train_loader),
                                                      len(self._train_loader))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dirty = True  # a callback may thaw layers here: check before the next training batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.active and (self._dirty or self._watch is not None and self._watch.signature() != self._signature):
            self._dirty = False  # a layer thawed (or a callback ran after validation): check before this step
            self._usable()
        if not isinstance(batch, FeatureBatch) or batch.features is None:
            return
        loader = self._train_loader
        assert loader is not None
        current = self._table(loader)
        if current is not None and batch.table is current:
            self.stats["cached_batches"] += 1
            return
        if current is not None:  # fetched before the table was rebuilt (the cut moved): the same rows of the new one
            fresh = current.batch(batch.index)
            batch.features, batch.cut, batch.table = fresh.features, fresh.cut, fresh.table
            self.stats["moved_batches"] += 1
            return
        # fetched from the cache before it went off: load the images of these samples instead
        x, _ = fetch_inputs(loader.dataset, batch.index.tolist(), loader.collate_fn)
        batch.images, batch.features, batch.cut, batch.table = x.to(pl_module.device), None, None, None
        self.stats["reloaded_batches"] += 1

    # ---------------------------------------------------------------- cleanup
    def _drop_tables(self) -> None:
        for table in self.tables.values():
            table.close()
        self.tables = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for loader, _ in self._patched.values():
            loader.__dict__.pop("_get_iterator", None)
        self._patched = {}
        self._drop_tables()
        self.active = False
        self._trainer = self._module = None
