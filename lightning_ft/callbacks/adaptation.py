"""DomainAdaptation: bind domain-adaptation losses to a module, schedule their weights, log ``da/...``.

The callback owns the losses. Their parameters (DANN's discriminator, say) are registered on the
module as ``da_losses`` in ``setup``, before the optimizer is built, so they train and are
checkpointed with it, and the callback is the module's ``domain_adaptation`` while it is attached.
Those names, and the rest of what a module and this callback share, live in one torch-only place,
:mod:`lightning_ft.losses.adaptation`. A module's training step calls the callback with what the
losses need::

    from lightning_ft.losses import domain_forward

    def training_step(self, batch, batch_idx):
        (xs, ys), (xt, *_) = batch["source"], batch["target"]
        fs, logits_s, ft, logits_t = domain_forward(self.features_and_logits, xs, xt,
                                                    self.domain_adaptation.forward_mode)
        loss = F.cross_entropy(logits_s, ys)
        return loss + self.domain_adaptation(self, source_features=fs, target_features=ft,
                                             source_logits=logits_s, target_logits=logits_t)

with ``features_and_logits(x) -> (pooled features, logits)`` a method of the module
(``FineTuneModule.forward_features`` is one, and its training step does exactly this on a
``{"source", "target"}`` batch). The training batches must be ``{"source": ..., "target": ...}``
(:mod:`lightning_ft.batch`), checked when training starts.
Weights are computed from ``trainer.global_step / trainer.estimated_stepping_batches``, so a resumed
run continues the schedule with nothing extra to save.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_ft.batch import DOMAINS, split_batch
from lightning_ft.callbacks._common import check_strategy
from lightning_ft.losses import CDANLoss, DANNLoss, PseudoLabelLoss, entropy, gather_with_grad, grl_coefficient
from lightning_ft.losses.adaptation import ADAPTATION_LOSSES, ATTRIBUTE, LOSSES_ATTRIBUTE, adaptation_of

__all__ = ["DomainAdaptation"]

class DomainAdaptation(Callback):
    """Domain-adaptation losses with scheduled weights.

    Args:
        losses: ``{name: weight}``; names: cdan, coral, dann, entropy, mcc, mean, mmd, pseudo_label.
        loss_kwargs: extra constructor arguments per loss, e.g. ``{"pseudo_label": {"threshold": 0.95}}``.
        schedule: ``"dann"`` ramps every weight (and DANN's reversal strength) by
            ``2 / (1 + exp(-gamma p)) - 1`` with ``p`` the training progress; ``"constant"`` does not.
        gamma: steepness of the ``"dann"`` ramp.
        forward: ``"separate"`` (default): one forward per domain, so BatchNorm normalises each
            domain with its own statistics; ``"joint"``: source and target concatenated in one batch.
        feature_dim: width of the features the feature losses see (default: the module's ``num_features``).
        gather: under DDP, compute the batch-statistic losses (MMD, CORAL, mean, MCC, class-balanced
            pseudo-labels) on the features of all ranks, gathered with gradients, so the loss and its
            gradient are those of the global batch (see :mod:`lightning_ft.distributed`).
            ``False``: each rank computes them on its own batch (cheaper; a noisier estimate of a
            different quantity). Per-example losses (DANN, entropy, pseudo-labels) need no gathering:
            DDP's gradient average already makes them global.
    """

    def __init__(
        self,
        losses: dict[str, float] | None = None,
        loss_kwargs: dict[str, dict[str, Any]] | None = None,
        schedule: Literal["dann", "constant"] = "dann",
        gamma: float = 10.0,
        forward: Literal["separate", "joint"] = "separate",
        feature_dim: int | None = None,
        gather: bool = True,
    ) -> None:
        super().__init__()
        losses = dict(losses if losses is not None else {"dann": 1.0})
        if not losses:
            raise ValueError(f"DomainAdaptation needs at least one loss. Known: {', '.join(sorted(ADAPTATION_LOSSES))}.")
        for name, weight in losses.items():
            if name not in ADAPTATION_LOSSES:
                close = difflib.get_close_matches(name, list(ADAPTATION_LOSSES), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"Unknown domain-adaptation loss '{name}'. Known: {', '.join(sorted(ADAPTATION_LOSSES))}.{hint}")
            if weight < 0:
                raise ValueError(f"Loss weight for '{name}' must be >= 0, got {weight}.")
        unknown = set(loss_kwargs or {}) - set(losses)
        if unknown:
            raise ValueError(f"loss_kwargs for {sorted(unknown)}, which are not in losses={sorted(losses)}.")
        if schedule not in ("dann", "constant"):
            raise ValueError(f"schedule must be 'dann' or 'constant', got {schedule!r}.")
        self.weights = losses
        self.loss_kwargs = dict(loss_kwargs or {})
        self.schedule = schedule
        self.gamma = gamma
        self.forward_mode = forward
        self.feature_dim = feature_dim
        self.gather = gather
        self._trainer: L.Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(losses=sorted(self.weights))

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        self._trainer = trainer
        if not hasattr(pl_module, LOSSES_ATTRIBUTE):
            width = self.feature_dim or getattr(pl_module, "num_features", None)
            modules = {}
            for name in self.weights:
                kwargs = dict(self.loss_kwargs.get(name, {}))
                if name in ("dann", "cdan"):
                    if width is None:
                        raise ValueError(
                            f"The '{name}' loss needs the feature width: {type(pl_module).__name__} has no "
                            "`num_features`. Pass DomainAdaptation(feature_dim=...)."
                        )
                    kwargs.setdefault("in_features", int(width))
                if name == "cdan":
                    classes = getattr(pl_module, "num_classes", None)
                    if classes is None and "num_classes" not in kwargs:
                        raise ValueError(
                            f"The 'cdan' loss needs the number of classes: {type(pl_module).__name__} has no "
                            "`num_classes`. Pass loss_kwargs={'cdan': {'num_classes': ...}}."
                        )
                    kwargs.setdefault("num_classes", int(classes))
                modules[name] = ADAPTATION_LOSSES[name](**kwargs)
            pl_module.add_module(LOSSES_ATTRIBUTE, nn.ModuleDict(modules))
        setattr(pl_module, ATTRIBUTE, self)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _check_target_data(trainer.train_dataloader)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if adaptation_of(pl_module) is self:
            delattr(pl_module, ATTRIBUTE)

    # --------------------------------------------------------------- schedule
    def progress(self) -> float:
        trainer = self._trainer
        if trainer is None:
            return 1.0
        total = max(1, int(trainer.estimated_stepping_batches))
        return min(1.0, trainer.global_step / total)

    def ramp(self) -> float:
        return grl_coefficient(self.progress(), self.gamma) if self.schedule == "dann" else 1.0

    # ------------------------------------------------------------------- loss
    def __call__(
        self,
        pl_module: L.LightningModule,
        *,
        source_features: torch.Tensor | None = None,
        target_features: torch.Tensor | None = None,
        source_logits: torch.Tensor | None = None,
        target_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted sum of the losses for one training step; logs ``da/<loss>`` and ``da/<loss>_weight``."""
        given = {"source_features": source_features, "target_features": target_features,
                 "source_logits": source_logits, "target_logits": target_logits}
        modules: nn.ModuleDict = getattr(pl_module, LOSSES_ATTRIBUTE)
        ramp = self.ramp()
        total = None
        batch = len(source_features) if source_features is not None else None
        gathered: dict[str, torch.Tensor] = {}  # each input gathered at most once per step

        def global_batch(key: str) -> torch.Tensor:
            if key not in gathered:
                gathered[key] = gather_with_grad(given[key])
            return gathered[key]

        for name, weight in self.weights.items():
            loss_module = modules[name]
            missing = [k for k in loss_module.needs if given[k] is None]
            if missing:
                raise ValueError(
                    f"Domain-adaptation loss '{name}' needs {', '.join(missing)}, which the module did not pass. "
                    f"Call pl_module.domain_adaptation(pl_module, {', '.join(f'{k}=...' for k in loss_module.needs)})."
                )
            if isinstance(loss_module, (DANNLoss, CDANLoss)):  # the ramp is on the reversal strength
                loss_module.coeff = ramp
                scaled_weight = weight
            else:
                scaled_weight = weight * ramp
            if self.gather and getattr(loss_module, "batch_statistic", False):
                value = loss_module(*(global_batch(k) for k in loss_module.needs))
            else:
                value = loss_module(*(given[k] for k in loss_module.needs))
            pl_module.log(f"da/{name}", value.detach(), on_step=True, on_epoch=True, batch_size=batch)
            pl_module.log(f"da/{name}_weight", float(scaled_weight), on_step=True, on_epoch=False)
            if isinstance(loss_module, (DANNLoss, CDANLoss)):
                key = "da/discriminator_acc" if name == "dann" else f"da/{name}_discriminator_acc"
                pl_module.log(key, loss_module.last_accuracy, on_step=False, on_epoch=True, batch_size=batch)
            if isinstance(loss_module, PseudoLabelLoss):
                pl_module.log("da/pseudo_label_rate", loss_module.last_mask_rate, on_step=False, on_epoch=True,
                              batch_size=batch)
            total = scaled_weight * value if total is None else total + scaled_weight * value
        if target_logits is not None:
            pl_module.log("da/target_entropy", entropy(target_logits.detach()), on_step=False, on_epoch=True,
                          batch_size=len(target_logits))
        assert total is not None
        return total


def _check_target_data(loaders: Any) -> None:
    """The training batches are ``{"source": ..., "target": ...}``, with target data of the source's shape."""
    if not (isinstance(loaders, Mapping) and all(k in loaders for k in DOMAINS)):
        got = sorted(map(str, loaders)) if isinstance(loaders, Mapping) else type(loaders).__name__
        raise ValueError(
            f"DomainAdaptation needs target data: training batches {{'source': ..., 'target': ...}}, but the training "
            f"data is {got}. Use a datamodule with source and target splits (lightning_ft.data.SourceTargetDataModule, "
            "not source_only=True), or return {'source': loader, 'target': loader} from train_dataloader(); for a "
            "source-only baseline drop the DomainAdaptation callback."
        )
    source, target = (getattr(loaders[k], "dataset", None) for k in DOMAINS)
    if target is not None and hasattr(target, "__len__") and len(target) == 0:
        raise ValueError("The target training split is empty: DomainAdaptation has no target data to adapt to.")
    if source is None or target is None or not hasattr(source, "__getitem__") or not len(source):
        return
    xs, xt = (split_batch(sample)[0] for sample in (source[0], target[0]))  # a sample: (x, y), {"inputs": x}, or x
    if isinstance(xs, torch.Tensor) and isinstance(xt, torch.Tensor) and tuple(xs.shape) != tuple(xt.shape):
        raise ValueError(
            f"Source images have shape {tuple(xs.shape)} but target images {tuple(xt.shape)}. Resize both "
            "domains to the same size and channels (image_size=, channels= of the datamodule)."
        )
