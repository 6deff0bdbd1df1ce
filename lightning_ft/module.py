"""FineTuneModule: a pretrained backbone plus a swappable head, as a LightningModule.

Every step -- training, validation, test, predict -- goes through one shared step on the
inputs/targets contract of :mod:`lightning_ft.batch`:

* a batch is ``(inputs, targets)``, ``{"inputs": ..., "targets": ...}``, inputs alone (predict), or
  ``{"source": batch, "target": batch}`` (domain adaptation, with a ``DomainAdaptation`` callback);
* inputs are a tensor ``(B, C, H, W)`` or a dict of tensors with the batch first (a time series with
  its mask and dates, text tokens) that the backbone takes as keyword arguments;
* targets are a tensor ``(B,)`` of class indices, ``MISSING`` (-100) marking a sample without a label
  (skipped by the loss and the metrics, never dropped from the batch); per-task dicts are refused
  until the module has one head per task.

The module knows nothing of the callbacks: a ``FeatureCache`` batch is an ordinary batch (the
callback runs the model from the cached cut around the step), ``GradualUnfreezing`` and
``LayerwiseLRDecay`` find layers through :mod:`lightning_ft.groups`, and domain adaptation meets the
module through :mod:`lightning_ft.losses.adaptation`.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassF1Score

from lightning_ft.backbones import feature_dim as backbone_feature_dim
from lightning_ft.batch import MISSING, Inputs, check_class_targets, is_domain_batch, labelled, split_batch
from lightning_ft.backbones import (
    backbone_features,
    create_backbone,
    is_timm_model,
    pool_features,
    to_tokens,
)
from lightning_ft.groups import format_layer_groups, layer_groups
from lightning_ft.heads import build_head
from lightning_ft.inputs import TRANSFORM_KEYS, ImageTransform, band_mean_std
from lightning_ft.losses.adaptation import LOSSES_ATTRIBUTE, adaptation_of, domain_forward, drop_adaptation_state
from lightning_ft.losses.label_free import information_maximization, prediction_sums
from lightning_ft.optim import WarmupCosine, align_scheduler, build_scheduler, check_layer_decay, param_groups_layer_decay

__all__ = ["FineTuneModule"]

HeadName = Literal["linear", "mlp", "attention", "prototype"]


class FineTuneModule(L.LightningModule):
    """Fine-tune a pretrained backbone with a classification head.

    Args:
        backbone: a timm model name (``"resnet50"``, ``"tf_efficientnet_lite0"``, ``"vit_small_patch16_224"``)
            or an ``nn.Module`` that maps images to features (then give ``feature_dim`` unless it has
            ``num_features``).
        num_classes: number of classes (>= 2).
        head: ``"linear"``, ``"mlp"``, ``"attention"`` (pooling over tokens / spatial positions),
            ``"prototype"`` (cosine classifier) or an ``nn.Module`` mapping features to logits.
        head_kwargs: extra arguments of the named head (e.g. ``{"hidden_dim": 256}`` for ``mlp``).
        pretrained: ``None`` (random init), ``True`` (the offline weights shipped for this backbone),
            an offline asset name (``"efficientnet_lite0"``) or a ``.safetensors`` / torch weights file.
        in_chans: input channels (bands); the pretrained stem is adapted by timm (13 for Sentinel-2).
        img_size: input size for models with a fixed size (ViT position embeddings are resampled);
            for CNNs it is recorded in :attr:`data_config` so datamodules resize to it.
        feature_dim: feature width of an ``nn.Module`` backbone without ``num_features``.
        channels_last: keep the backbone's 4-D weights and its image inputs in channels-last memory
            format (``torch.channels_last``): about 2x faster training of EfficientNet/ResNet-style CNNs
            on CPU (oneDNN) and faster convolutions under mixed precision on GPU. Values are unchanged.
        freeze_backbone: linear probing: backbone weights frozen for the whole run, its BatchNorm
            kept in eval mode, no graph kept through it, and it is left out of the optimizer (use
            GradualUnfreezing, not this flag, for a backbone that thaws later).
        lr: the head's learning rate (peak of the schedule).
        weight_decay: decoupled weight decay (none on biases, norms, position embeddings, tokens).
        layer_decay: layer-wise lr decay: the group ``k`` levels below the head gets ``lr * layer_decay**k``.
            ``None`` gives every group ``lr``.
        label_smoothing: cross-entropy label smoothing.
        warmup: fraction of the optimizer steps spent in linear warm-up (default schedule only).
        min_lr_ratio: final lr of the default cosine schedule as a fraction of the peak.
        optimizer: optimizer factory taking param groups (LightningCLI: ``class_path`` + ``init_args``);
            its ``lr`` / ``weight_decay`` come from this module, not from ``init_args``.
        lr_scheduler: scheduler factory taking the optimizer. ``None``: linear warm-up then cosine over
            ``trainer.estimated_stepping_batches``. Unset ``total_steps``/``T_max``/``max_lr`` are filled in.
        scheduler_interval: ``"step"`` or ``"epoch"`` for a custom ``lr_scheduler``.
        scheduler_monitor: metric for ``ReduceLROnPlateau``.
        class_names: the classes' names, in label order. Left ``None``, they are taken at fit time from
            the datamodule's ``classes`` (``ImageFolderDataModule`` has them); either way they are saved
            in the checkpoint and restored with it, and prediction files use them.
        input_config: how inputs are prepared (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``, ``scale``), over the backbone's own data config. Left ``None``, it is taken at
            fit time from a datamodule that has ``transform_config()`` (``ImageFolderDataModule``), so
            the checkpoint prepares images for prediction exactly as they were prepared in training.
    """

    METRIC_BUFFER = 16  # training/validation batches buffered per torchmetrics update

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 10,
        head: HeadName | nn.Module = "linear",
        head_kwargs: dict[str, Any] | None = None,
        pretrained: bool | str | None = None,
        in_chans: int = 3,
        img_size: int | None = None,
        feature_dim: int | None = None,
        channels_last: bool = False,
        freeze_backbone: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        label_smoothing: float = 0.0,
        warmup: float = 0.1,
        min_lr_ratio: float = 0.01,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        scheduler_monitor: str = "val/loss",
        class_names: list[str] | None = None,
        input_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes must be an integer >= 2, got {num_classes!r}. For one binary target use num_classes=2."
            )
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the training steps in [0, 1), got {warmup}.")
        check_layer_decay(layer_decay)
        _check_class_names(class_names, num_classes)
        _check_input_config(input_config)
        # module-valued arguments cannot live in a checkpoint's hparams; checkpoints of string
        # backbones rebuild alone, nn.Module ones need backbone=/head= again at load time
        ignore = ["optimizer", "lr_scheduler"]
        ignore += [k for k, v in (("backbone", backbone), ("head", head)) if isinstance(v, nn.Module)]
        self.save_hyperparameters(ignore=ignore)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

        if isinstance(backbone, str):
            self.backbone = create_backbone(backbone, pretrained, in_chans=in_chans, img_size=img_size)
        elif isinstance(backbone, nn.Module):
            if pretrained not in (None, False):
                raise ValueError(
                    "pretrained= applies to timm backbone names; this backbone is an nn.Module. "
                    "Load its weights before passing it (or use lightning_ft.weights.load_weights_file)."
                )
            self.backbone = backbone
        else:
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}.")
        self.num_features = backbone_feature_dim(self.backbone, feature_dim)
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.num_classes = num_classes
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        self.head = self._make_head(head, head_kwargs)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=MISSING),
                "f1": MulticlassF1Score(num_classes, average="macro", ignore_index=MISSING),
                "ece": MulticlassCalibrationError(num_classes, ignore_index=MISSING),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        # epoch means of the loss, synced across ranks. A NaN loss must stay NaN: the default drops it,
        # and "disable" ignores the weights (torchmetrics 1.9), so NaN is "replaced" by NaN
        self.train_loss = MeanMetric(nan_strategy=float("nan"))
        self.val_loss = MeanMetric(nan_strategy=float("nan"))
        self.test_loss = MeanMetric(nan_strategy=float("nan"))
        self.val_metrics = metrics.clone(prefix="val/")
        self.val_target_metrics = metrics.clone(prefix="val_target/")  # domain adaptation: reporting only
        self.test_metrics = metrics.clone(prefix="test/")
        self._target_probs: list[torch.Tensor] = []
        self._pending: dict[int, list[tuple[torch.Tensor, ...]]] = {}  # batches waiting for a metric update

    # ------------------------------------------------------------------ model
    def _make_head(self, head: str | nn.Module, head_kwargs: dict[str, Any] | None) -> nn.Module:
        if isinstance(head, nn.Module):
            if head_kwargs:
                raise ValueError("head_kwargs only apply to a head given by name; this head is an nn.Module.")
            return head
        return build_head(head, self.num_features, self.num_classes, **(head_kwargs or {}))

    def replace_head(self, head: str | nn.Module, **head_kwargs: Any) -> nn.Module:
        """Swap the head (by name or module); returns the new head. Rebuild optimizers afterwards."""
        self.head = self._make_head(head, head_kwargs or None)
        if isinstance(head, str):
            self.hparams["head"] = head
            self.hparams["head_kwargs"] = head_kwargs or None
        return self.head

    @property
    def data_config(self) -> dict[str, Any]:
        """How inputs are prepared: timm's data config of the backbone (input_size, mean, std,
        interpolation, crop_pct) for ``in_chans`` bands and ``img_size``, overlaid with ``input_config``."""
        chans = self.hparams.get("in_chans", 3)
        size = self.hparams.get("img_size")
        if is_timm_model(self.backbone):
            from timm.data import resolve_model_data_config

            config = dict(resolve_model_data_config(self.backbone))
        else:
            config = {"input_size": (chans, 224, 224), "mean": (0.5,) * chans, "std": (0.5,) * chans, "crop_pct": 1.0}
        if size:
            config["input_size"] = (chans, size, size)
        config["input_size"] = (chans, *config["input_size"][1:])
        config["mean"], config["std"] = band_mean_std(chans, config)  # per band, as timm's adapt_input_conv maps the RGB kernels
        config.update(self.hparams.get("input_config") or {})
        return config

    def transform(self, training: bool = False) -> ImageTransform:
        """How this model's inputs are prepared: a path, PIL image, array or tensor in, a normalised tensor
        ``(C, H, W)`` out (the evaluation recipe; ``training=True`` for the random one). After a fit on
        ``ImageFolderDataModule`` or the in-memory datamodules it is the recipe they used (their
        ``transform_config()`` is recorded in ``input_config``); otherwise timm's for the backbone.

        ``torch.stack([model.transform()(p) for p in paths])`` is a batch for ``model(...)``.
        """
        return ImageTransform(self.data_config, training=training)

    def features(self, x: Inputs) -> torch.Tensor:
        """Unpooled backbone features (no graph through a frozen backbone).

        ``x`` is an image tensor, or a dict of tensors for a backbone module that takes them as keyword
        arguments (see :mod:`lightning_ft.batch`).
        """
        if self.channels_last and isinstance(x, torch.Tensor) and x.ndim == 4 and x.stride(0) != 0:
            # (a broadcast input, stride 0, is a constant placeholder: converting would only materialise it)
            x = x.contiguous(memory_format=torch.channels_last)
        if self.freeze_backbone:
            with torch.no_grad():
                return backbone_features(self.backbone, x)
        return backbone_features(self.backbone, x)

    def forward_features(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled features (B, D), logits (B, C))`` -- what domain-adaptation losses need."""
        feats = self.features(x)
        pooled = pool_features(self.backbone, feats)
        logits = self.head(to_tokens(feats) if getattr(self.head, "wants_tokens", False) else pooled)
        return pooled, logits

    def forward(self, x: Inputs) -> torch.Tensor:
        """Logits ``(B, C)`` of the inputs (a tensor, or a dict of tensors: :mod:`lightning_ft.batch`)."""
        return self.forward_features(x)[1]

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        if self.freeze_backbone and mode:
            self.backbone.eval()  # frozen BatchNorm keeps its statistics
        return self

    def on_fit_start(self) -> None:
        if self.freeze_backbone:  # its BatchNorm in eval is by design: one line of ours, not Lightning's warning
            from lightning_ft import modes

            modes.hold(self.trainer, "FineTuneModule", lambda: (
                list(self.backbone.modules()),
                "the backbone is frozen (freeze_backbone=True), so its BatchNorm keeps the pretrained statistics",
            ))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores each submodule's mode by attribute after validation, bypassing train():
        # a frozen backbone is put back in eval here so its BatchNorm statistics never move
        if self.freeze_backbone and self.backbone.training:
            self.backbone.eval()

    def layer_groups(self):
        """The ordered layer groups (stem first, head last) used for layer decay and unfreezing."""
        return layer_groups(self)

    def describe_layer_groups(self) -> str:
        """The depth map as a table: group, parameter count, trainable or not, member names."""
        return format_layer_groups(self)

    # --------------------------------------------------------------- training
    def _targets(self, targets: Any) -> torch.Tensor:
        """Checked class-index targets of one task (``MISSING`` marks a sample without a label)."""
        if targets is None:
            raise ValueError(
                "This batch has no targets: training, validation and test batches are (inputs, targets) or "
                "{'inputs': ..., 'targets': ...} (lightning_ft.batch). Unlabelled data belongs in predict, or in "
                "the 'target' part of a domain-adaptation batch."
            )
        if isinstance(targets, dict):
            raise ValueError(
                f"The targets come per task ({', '.join(sorted(map(str, targets)))}), but FineTuneModule has one "
                "classification head: give one tensor of class indices per batch."
            )
        return check_class_targets(targets, self.num_classes)

    def _step(self, batch: Any, stage: Literal["train", "val", "test"]) -> torch.Tensor:
        """The one step behind training, validation and test, on a batch of the :mod:`lightning_ft.batch` contract."""
        if is_domain_batch(batch):
            if stage != "train":
                raise ValueError(
                    f"A {{'source', 'target'}} batch reached the {stage} step; validate and test on (inputs, targets)."
                )
            return self._adaptation_step(batch)
        inputs, targets = split_batch(batch)
        y = self._targets(targets)
        return self._score(self(inputs), y, stage)

    def _score(self, logits: torch.Tensor, y: torch.Tensor, stage: Literal["train", "val", "test"]) -> torch.Tensor:
        """Cross-entropy over the labelled rows; metrics and the epoch loss updated (logged once, at the epoch's end)."""
        logits = logits.float()
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        # the mean over the labelled rows (MISSING is cross-entropy's ignore_index); a batch without any label
        # gives 0 with a graph, not NaN. The count stays a tensor: no device sync on the training hot path
        count = labelled(y).sum()
        loss = F.cross_entropy(logits, y, ignore_index=MISSING, label_smoothing=smoothing, reduction="sum")
        loss = loss / count.clamp_min(1)
        metrics = {"train": self.train_metrics, "val": self.val_metrics, "test": self.test_metrics}[stage]
        self._buffered_update(metrics, logits.detach().softmax(-1), y)
        if stage == "train":
            self._log_train_loss(loss, count, len(y))
        else:
            self._update_loss(self.val_loss if stage == "val" else self.test_loss, loss, count)
        return loss

    def _log_train_loss(self, loss: torch.Tensor, weight: torch.Tensor | int, batch_size: int) -> None:
        """``train/loss_step`` when the loggers write (every ``log_every_n_steps``), ``train/loss_epoch`` at the end.

        Lightning's ``self.log`` costs about a millisecond per call on CPU -- as much as a head-only
        step on cached features -- so the step value is logged only on the steps the loggers record.
        """
        self._update_loss(self.train_loss, loss, weight)
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        if connector is None or getattr(connector, "should_update_logs", True):
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True,
                     batch_size=batch_size)

    def _buffered_update(self, target: MetricCollection | MeanMetric, *tensors: torch.Tensor) -> None:
        """Buffer a few batches and update ``target`` on their concatenation: one torchmetrics update per
        ``METRIC_BUFFER`` steps instead of one (or three) per step; the states come out the same."""
        pending = self._pending.setdefault(id(target), [])
        pending.append(tensors)
        if len(pending) >= self.METRIC_BUFFER:
            self._flush(target)

    def _flush(self, target: MetricCollection | MeanMetric) -> None:
        pending = self._pending.pop(id(target), [])
        if pending:
            target.update(*(torch.cat(parts) for parts in zip(*pending)))

    def _update_loss(self, meter: MeanMetric, loss: torch.Tensor, weight: torch.Tensor | int) -> None:
        """The epoch mean of the loss, weighted by each batch's labelled samples."""
        value = loss.detach().float().reshape(1)
        self._buffered_update(meter, value, torch.as_tensor(weight, dtype=value.dtype, device=value.device).reshape(1))

    def _epoch_loss(self, meter: MeanMetric) -> torch.Tensor | None:
        self._flush(meter)
        if not meter.update_count or not float(meter.weight):  # no batch, or not one labelled sample
            meter.reset()
            return None
        value = meter.compute()
        meter.reset()
        return value

    def _log_epoch_metrics(self, metrics: MetricCollection, prog_bar: bool) -> dict[str, torch.Tensor]:
        """Compute (synced across ranks by torchmetrics), log and reset: one log call per epoch, not per step."""
        self._flush(metrics)
        if not any(m.update_count for m in metrics.values()):
            return {}
        values = metrics.compute()
        self.log_dict(values, prog_bar=prog_bar, add_dataloader_idx=False)
        metrics.reset()
        return values

    def on_train_epoch_end(self) -> None:
        value = self._epoch_loss(self.train_loss)
        if value is not None:
            self.log("train/loss_epoch", value)
            self.log("train/loss", value, logger=False)  # for monitors: callback metrics only
        self._log_epoch_metrics(self.train_metrics, prog_bar=False)

    def on_test_epoch_end(self) -> None:
        value = self._epoch_loss(self.test_loss)
        if value is not None:
            self.log("test/loss", value, prog_bar=True)
        self._log_epoch_metrics(self.test_metrics, prog_bar=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def _adaptation_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Source cross-entropy plus the attached DomainAdaptation's losses (:mod:`lightning_ft.losses.adaptation`)."""
        adaptation = adaptation_of(self)
        if adaptation is None:
            raise ValueError(
                "The training batch holds 'source' and 'target' data but no DomainAdaptation callback is attached. "
                "Add lightning_ft.callbacks.DomainAdaptation(...) to the Trainer's callbacks."
            )
        xs, ys = split_batch(batch["source"])
        xt, _ = split_batch(batch["target"])
        ys = self._targets(ys)
        fs, logits_s, ft, logits_t = domain_forward(self.forward_features, xs, xt, adaptation.forward_mode)
        loss = self._score(logits_s, ys, "train")
        extra = adaptation(self, source_features=fs, target_features=ft, source_logits=logits_s, target_logits=logits_t)
        self.log("train/total_loss", loss + extra, on_step=True, on_epoch=False, batch_size=len(ys))
        return loss + extra

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor | None:
        if dataloader_idx == 1:  # the target domain: labels for reporting only, and label-free monitors
            inputs, targets = split_batch(batch)
            probs = self(inputs).float().softmax(-1)
            self._target_probs.append(probs.detach())
            if targets is not None:
                self._buffered_update(self.val_target_metrics, probs.detach(), self._targets(targets))
            return None
        return self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        value = self._epoch_loss(self.val_loss)
        if value is not None:
            self.log("val/loss", value, prog_bar=True)
        source = self._log_epoch_metrics(self.val_metrics, prog_bar=True)
        self._log_epoch_metrics(self.val_target_metrics, prog_bar=False)
        if not self._target_probs:
            return
        sums = prediction_sums(torch.cat(self._target_probs))
        self._target_probs = []
        if self._trainer is not None and self.trainer.world_size > 1:  # IM's marginal needs the whole target split
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        ent, im = information_maximization(sums)
        # label-free: mean target entropy (low = confident), information maximisation (high = confident
        # and diverse), and source accuracy + IM, the default label-free model-selection score
        self.log("val/target_entropy", ent, sync_dist=True)  # the same on every rank already
        self.log("val/target_im", im, sync_dist=True)
        source_acc = source.get("val/acc")
        if source_acc is not None:
            self.log("val/label_free", source_acc.to(im.device) + im, sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        inputs, _ = split_batch(batch)
        return self(inputs).float().softmax(dim=-1)

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups_layer_decay(
            self, layer_groups(self), lr=hp.lr, weight_decay=hp.weight_decay, layer_decay=hp.layer_decay
        )
        if self.freeze_backbone:  # frozen for the whole run: per-step optimizer work only for what trains
            groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        optimizer = self.optimizer(groups)
        _check_optimizer_defaults(optimizer, hp.lr)
        interval = hp.scheduler_interval
        if self.lr_scheduler is None:
            total = int(self.trainer.estimated_stepping_batches)
            schedule = WarmupCosine(total, int(hp.warmup * total), hp.min_lr_ratio)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            interval = "step"
        else:
            length = int(self.trainer.estimated_stepping_batches) if interval == "step" else int(self.trainer.max_epochs)
            scheduler = build_scheduler(self.lr_scheduler, optimizer, length)
        align_scheduler(scheduler, optimizer)
        config = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = hp.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    # -------------------------------------------------------------- datamodule
    def setup(self, stage: str) -> None:
        """At fit time, take the class names and the input preparation from the datamodule (if it has them)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if stage != "fit" or datamodule is None:
            return
        classes = getattr(datamodule, "classes", None)
        if classes:
            classes = [str(c) for c in classes]
            if self.class_names is not None and self.class_names != classes:
                raise ValueError(
                    f"The model's class_names ({_short(self.class_names)}) differ from the datamodule's classes "
                    f"({_short(classes)}). Drop class_names= (they are taken from the data) or make them agree."
                )
            _check_class_names(classes, self.num_classes, source=f"{type(datamodule).__name__}.classes")
            self.class_names = classes
            self.hparams["class_names"] = classes
        config = getattr(datamodule, "transform_config", None)
        if callable(config):
            config = {k: v for k, v in config().items() if k in TRANSFORM_KEYS}
            _check_input_config(config)
            self.hparams["input_config"] = config

    # ------------------------------------------------------------- checkpoint
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # class names and input preparation come back with the weights (a model built from a config
        # for predict has none of its own)
        saved = checkpoint.get("hyper_parameters") or {}
        if self.class_names is not None and saved.get("class_names") and list(saved["class_names"]) != self.class_names:
            raise ValueError(
                f"The checkpoint's class_names ({_short(list(saved['class_names']))}) differ from this model's "
                f"({_short(self.class_names)}, from the data). Resume with the data the checkpoint was trained on."
            )
        if self.class_names is None and saved.get("class_names") is not None:
            self.class_names = list(saved["class_names"])
            self.hparams["class_names"] = self.class_names
        if not self.hparams.get("input_config") and saved.get("input_config"):
            self.hparams["input_config"] = dict(saved["input_config"])
        # domain-adaptation losses (e.g. DANN's discriminator) live on the module only while their
        # callback is attached: a checkpoint loaded without it keeps the model, not the losses
        if not hasattr(self, LOSSES_ATTRIBUTE):
            drop_adaptation_state(checkpoint.get("state_dict", {}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the weights are in the checkpoint: rebuilding it must not need the pretrained file
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and "pretrained" in hparams:
            hparams = dict(hparams)
            hparams["pretrained"] = None
            checkpoint["hyper_parameters"] = hparams


def _short(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_class_names(names: Any, num_classes: int, source: str = "class_names") -> None:
    if names is None:
        return
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source} must be a list of strings, got {names!r}.")
    if len(names) != num_classes:
        raise ValueError(
            f"{source} has {len(names)} names ({_short(list(names))}) but num_classes={num_classes}. "
            f"Set num_classes={len(names)}, or give one name per class."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{source} repeats a name: {_short(list(names))}.")


def _check_input_config(config: dict[str, Any] | None) -> None:
    if config is None:
        return
    unknown = sorted(set(config) - set(TRANSFORM_KEYS))
    if unknown:
        raise ValueError(f"input_config has unknown keys {unknown}; known: {', '.join(TRANSFORM_KEYS)}.")


def _check_optimizer_defaults(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The module's lr is the truth; an lr set in the optimizer's own arguments would be overridden."""
    try:
        default = inspect.signature(type(optimizer).__init__).parameters["lr"].default
    except (KeyError, ValueError, TypeError):
        return
    given = optimizer.defaults.get("lr")
    if isinstance(default, (int, float)) and given not in (default, lr) and given is not None:
        raise ValueError(
            f"The optimizer was given lr={given}, but FineTuneModule sets each param group's lr from its own "
            f"lr={lr} (times the layer decay). Set model.lr (init_args of the model), not the optimizer's lr."
        )

