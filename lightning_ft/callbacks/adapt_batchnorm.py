"""AdaptBatchNorm: AdaBN for the weights that are validated, checkpointed and tested.

AdaBN (Li et al., ICLR-W 2017) re-estimates every BatchNorm layer's statistics on unlabelled target
data, weights untouched. On MNIST -> digits it adds 12-38 points to every adaptation method here
(see the README), but a fit that only calls :func:`lightning_ft.adabn.adapt_batchnorm` afterwards
validates, selects and checkpoints the unadapted model. This callback does it inside the fit:

* before each validation, the statistics are re-estimated on the target training inputs (no labels,
  no gradient, in order, random state untouched; averaged over DDP ranks);
* the target validation loader runs with the adapted statistics, the source one with the
  training statistics, so label-free monitors (``val/label_free`` = source accuracy + target
  information maximisation) score the model that would be deployed;
* after validation the adapted statistics stay in the module: the checkpoint written then (e.g.
  the best ``val/label_free`` one) and a test after the fit see the adapted model;
* training continues from the training statistics (swapped back at the next training batch), so
  the optimisation is exactly that of a fit without the callback; the training statistics of a
  checkpoint holding adapted ones are kept in the callback's state, so a resumed fit continues
  from them too.

The sanity check is left alone. Outside ``fit`` (``trainer.validate``/``test``) every loader runs
with the statistics the weights hold: the adapted ones for a checkpoint written at validation.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ft.adabn import batchnorm_modules
from lightning_ft.callbacks._common import check_strategy, reestimate_batchnorm

__all__ = ["AdaptBatchNorm"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
Stats = dict[str, dict[str, torch.Tensor]]


class AdaptBatchNorm(Callback):
    """Re-estimate BatchNorm statistics on unlabelled target data before each validation (AdaBN).

    Args:
        data: where the adaptation inputs come from. ``"target"``: the datamodule's unlabelled
            target training split (its ``target_train`` dataset, as
            :class:`lightning_ft.data.SourceTargetDataModule` has; labels are never read).
            ``"train"``: the training inputs themselves (exact statistics of the data trained on,
            instead of running averages).
        val_loaders: indices of the validation loaders that run with the adapted statistics; the
            others use the training statistics. ``None``: the target loader (index 1) with
            ``data="target"``, every loader with ``data="train"``.
        batch_size: batch size of the adaptation pass (default: the datamodule's, else 64).
        max_batches: use at most this many batches per pass (per rank).
        verbose: print a line on rank zero after the first pass.
    """

    def __init__(
        self,
        data: Literal["target", "train"] = "target",
        val_loaders: list[int] | None = None,
        batch_size: int | None = None,
        max_batches: int | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if data not in ("target", "train"):
            raise ValueError(f"data must be 'target' or 'train', got {data!r}.")
        if batch_size is not None and batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm needs two samples), got {batch_size}.")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}.")
        self.data = data
        self.val_loaders = None if val_loaders is None else [int(i) for i in val_loaders]
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.verbose = verbose
        self.passes = 0
        self._norms: list[tuple[str, nn.Module]] = []
        self._train_stats: Stats | None = None  # while the module holds the adapted statistics
        self._adapted: Stats | None = None
        self._current = "train"  # which statistics the module holds: "train" or "adapted"
        self._stale = True  # trained since the last pass
        self._pending: Stats | None = None  # training statistics from a checkpoint, restored at train start

    @property
    def state_key(self) -> str:
        return self._generate_state_key(data=self.data)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # a checkpoint written while the module holds the adapted statistics (after validation)
        # keeps the training ones here, for a resumed fit
        held = self._train_stats if self._current == "adapted" else None
        return {"passes": self.passes, "train_stats": held}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.passes = int(state_dict.get("passes", 0))
        self._pending = state_dict.get("train_stats")

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        from lightning_ft.callbacks.feature_cache import FeatureCache
        from lightning_ft.callbacks.unfreezing import GradualUnfreezing

        if any(isinstance(cb, FeatureCache) for cb in trainer.callbacks):
            raise ValueError(
                "AdaptBatchNorm swaps BatchNorm statistics between validation loaders, but FeatureCache serves "
                "features computed with one set of statistics. Drop one of the two callbacks."
            )
        if any(isinstance(cb, GradualUnfreezing) and cb.restore_best for cb in trainer.callbacks):
            raise ValueError(
                "GradualUnfreezing(restore_best=True) restores weights captured after validation, which hold "
                "AdaptBatchNorm's adapted statistics, and training would go on from those. Set restore_best=False "
                "or drop AdaptBatchNorm."
            )
        self._norms = list(batchnorm_modules(pl_module))
        if not self._norms:
            raise ValueError(f"AdaptBatchNorm: {type(pl_module).__name__} has no BatchNorm layer, so AdaBN has "
                             "nothing to adapt. Drop the callback.")
        if self.data == "target":
            self._dataset(trainer)  # fail now, not at the first validation

    def _dataset(self, trainer: L.Trainer) -> tuple[Dataset, int, Any, int]:
        """``(dataset, batch size, collate_fn, workers)`` of the adaptation inputs."""
        if self.data == "train":
            loader = trainer.train_dataloader
            if not isinstance(loader, DataLoader):
                raise ValueError(
                    "AdaptBatchNorm(data='train') reads the inputs of one training DataLoader; this fit trains on "
                    f"{type(loader).__name__}. Use data='target' with a SourceTargetDataModule."
                )
            return loader.dataset, self.batch_size or loader.batch_size or 64, loader.collate_fn, loader.num_workers
        dm = trainer.datamodule
        target = getattr(dm, "target_train", None) if dm is not None else None
        if target is None:
            raise ValueError(
                "AdaptBatchNorm(data='target') needs unlabelled target data: a datamodule with a `target_train` "
                f"dataset (lightning_ft.data.SourceTargetDataModule); this fit has "
                f"{type(dm).__name__ if dm is not None else 'no datamodule'}. Or use data='train'."
            )
        if len(target) == 0:
            raise ValueError("AdaptBatchNorm: the target training split is empty; there is nothing to adapt to.")
        return target, self.batch_size or getattr(dm, "batch_size", None) or 64, None, 0

    def _adapted_loader(self, dataloader_idx: int) -> bool:
        if self.val_loaders is not None:
            return dataloader_idx in self.val_loaders
        return self.data == "train" or dataloader_idx == 1

    # ---------------------------------------------------------- statistics
    def _snapshot(self) -> Stats:
        return {name: {k: getattr(bn, k).detach().clone() for k in _BUFFERS if getattr(bn, k, None) is not None}
                for name, bn in self._norms}

    def _load(self, stats: Stats) -> None:
        with torch.no_grad():
            for name, bn in self._norms:
                for key, value in stats[name].items():
                    getattr(bn, key).copy_(value)

    def _hold(self, which: str) -> None:
        if which == self._current:
            return
        self._load(self._adapted if which == "adapted" else self._train_stats)  # type: ignore[arg-type]
        self._current = which

    def _adapt(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Re-estimate on the current weights; the module holds the adapted statistics afterwards."""
        self._hold("train")
        self._train_stats = self._snapshot()
        dataset, batch_size, collate_fn, workers = self._dataset(trainer)
        used = reestimate_batchnorm(
            trainer, pl_module, dataset, [bn for _, bn in self._norms], type(self).__name__,
            batch_size=batch_size, collate_fn=collate_fn, num_workers=workers, max_batches=self.max_batches,
        )
        self._adapted = self._snapshot()
        self._current = "adapted"
        self._stale = False
        self.passes += 1
        if self.verbose and self.passes == 1:
            rank_zero_info(
                f"AdaptBatchNorm: statistics of {len(self._norms)} BatchNorm layers re-estimated on {used} batch(es) "
                f"of the {self.data} data before each validation."
            )

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:  # resumed from a checkpoint that holds adapted statistics
            self._train_stats, self._adapted = self._pending, self._snapshot()
            self._current, self._pending = "adapted", None
        self._hold("train")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._hold("train")
        self._stale = True

    def _in_fit_validation(self, trainer: L.Trainer) -> bool:
        # not the sanity check: it runs before on_train_start, where other callbacks (GradualUnfreezing's
        # recalibration) may still set statistics, and before the training loader exists
        return trainer.state.fn == "fit" and not trainer.sanity_checking

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._in_fit_validation(trainer):
            self._adapt(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._in_fit_validation(trainer) and self._adapted is not None:
            self._hold("adapted" if self._adapted_loader(dataloader_idx) else "train")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # checkpoint callbacks run after this one: what they save, and what a test after the fit
        # sees, is the adapted model
        if self._in_fit_validation(trainer) and self._adapted is not None:
            self._hold("adapted")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stale:  # trained after the last validation: adapt the final weights
            self._adapt(trainer, pl_module)
        else:
            self._hold("adapted")
