"""FineTuneModule: a pretrained backbone plus a swappable head, as a LightningModule.

Every step -- training, validation, test, predict -- goes through one shared step on the
inputs/targets contract of :mod:`lightning_ft.batch`:

* a batch is ``(inputs, targets)``, ``{"inputs": ..., "targets": ...}``, inputs alone (predict), or
  ``{"source": batch, "target": batch}`` (domain adaptation, with a ``DomainAdaptation`` callback);
* inputs are a tensor ``(B, C, H, W)`` or a dict of tensors with the batch first (a time series with
  its mask and dates, text tokens) that the backbone takes as keyword arguments;
* targets are a tensor ``(B,)`` of class indices, ``MISSING`` (-100) marking a sample without a label
  (skipped by the loss and the metrics, never dropped from the batch), or -- with ``tasks=`` -- a dict
  of such tensors, one per task (a task left out of a batch has no label there);
* a satellite image time series is the inputs dict ``{"images": (B, T, C, H, W), "mask": (B, T),
  "doy": (B, T)}``: the backbone runs on every date with shared weights and a temporal head
  (``head="temporal"``) pools the per-date features, masked dates never counted.

The module knows nothing of the callbacks: a ``FeatureCache`` batch is an ordinary batch (the
callback runs the model from the cached cut around the step), ``GradualUnfreezing`` and
``LayerwiseLRDecay`` find layers through :mod:`lightning_ft.groups`, and domain adaptation meets the
module through :mod:`lightning_ft.losses.adaptation`.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Union

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
from lightning_ft.heads import TaskHeads, build_head
from lightning_ft.inputs import TRANSFORM_KEYS, ImageTransform, band_mean_std
from lightning_ft.losses.adaptation import LOSSES_ATTRIBUTE, adaptation_of, domain_forward, drop_adaptation_state
from lightning_ft.losses.label_free import information_maximization, prediction_sums
from lightning_ft.losses.multitask import TaskWeighting
from lightning_ft.optim import WarmupCosine, align_scheduler, build_scheduler, check_layer_decay, param_groups_layer_decay

__all__ = ["FineTuneModule"]

HeadName = Literal["linear", "mlp", "attention", "prototype", "temporal"]
BandSpec = Union[str, list[str], dict[str, float]]
BandMethod = Literal["match", "interpolation", "averaging", "random", "tile"]
SERIES_KEYS = ("images", "mask", "doy")
"""The keys of a satellite-image-time-series input: images ``(B, T, C, H, W)``, valid dates ``(B, T)``,
day of year ``(B, T)``."""


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
        tasks: several classification tasks on one backbone, ``{task: number of classes}`` (e.g.
            ``{"landcover": 10, "crop": 5}``): one head per task (``head`` names the kind), targets
            a dict of ``(B,)`` tensors per task (``MISSING`` or a task left out: no label), metrics
            ``<stage>/<task>/acc``, and the combined ``val/loss`` (mean of the task losses) and
            ``val/acc`` (mean task accuracy) to monitor. ``num_classes`` is then not used.
        task_weighting: ``"fixed"`` (``task_weights``, default 1 each) or ``"uncertainty"`` (learned by
            homoscedastic uncertainty, Kendall et al. 2018, with bounded log-variances).
        task_weights: the fixed weight of each task.
        data_bands: the bands of the data, e.g. ``"sentinel2"`` (all 13), ``"landsat_mss"``,
            ``["B02", "B03", "B04", "B08"]`` or ``{"my_band": 705.0}`` (name: centre wavelength, nm). The
            pretrained stem (found through timm's ``pretrained_cfg``, or ``stem_layer``) is adapted
            from ``pretrained_bands`` by ``band_method`` (:mod:`lightning_ft.bands`); ``in_chans`` is
            then the number of data bands. Each band's source is logged and kept in :attr:`band_report`.
        pretrained_bands: the bands the pretrained weights were trained on (``"rgb"``: red, green, blue).
        band_method: ``"match"`` (shared bands copied, others interpolated by wavelength),
            ``"interpolation"``, ``"averaging"``, ``"random"`` or ``"tile"`` (timm's ``adapt_input_conv``).
        band_noise: noise added to the kernels of bands that are not copied (relative to the kernel's
            std), so every band stays distinguishable: bands interpolated from the same pretrained
            kernels (two near-infrared bands beyond red, say) are otherwise identical to a frozen stem.
            ``None``: 0.5 for ``match``, ``interpolation`` and ``averaging``, 0 for ``random`` and ``tile``.
            A stem that still has two identical band kernels is warned about.
        band_seed: seed of the band adaptation's random draws (``band_noise``, ``random``). ``None``
            draws one from torch's random stream (so ``seed_everything`` decides it) and records it in
            the hyperparameters, so a checkpoint rebuilds the same stem.
        stem_layer: the dotted name of the first layer of an ``nn.Module`` backbone (timm models name
            their own).
        patch_size: a new patch size for a timm ViT (patch embedding and position embedding resampled,
            FlexiViT-style).
        mixup_alpha: Mixup's Beta(alpha, alpha) (0 = off), through timm's ``Mixup`` with ``label_smoothing``;
            training then uses soft-target cross-entropy (validation and test are never mixed).
        cutmix_alpha: CutMix's Beta(alpha, alpha) (0 = off); with both on, each batch uses one or the other.
        mix_prob: probability that a training batch is mixed at all.
        mix_switch_prob: with both on, the probability of CutMix rather than Mixup.
        mix_mode: timm's ``mode``: one draw per ``"batch"``, per ``"pair"`` or per element (``"elem"``).
            Mixing draws from numpy's random stream (``seed_everything`` seeds it).
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
        tasks: dict[str, int] | None = None,
        task_weighting: Literal["fixed", "uncertainty"] = "fixed",
        task_weights: dict[str, float] | None = None,
        data_bands: BandSpec | None = None,
        pretrained_bands: BandSpec = "rgb",
        band_method: BandMethod = "match",
        band_noise: float | None = None,
        band_seed: int | None = None,
        stem_layer: str | None = None,
        patch_size: int | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
        mix_mode: Literal["batch", "pair", "elem"] = "batch",
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
        _check_mixing(mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, mix_mode, tasks)
        _check_class_names(class_names, num_classes)
        _check_input_config(input_config)
        # module-valued arguments cannot live in a checkpoint's hparams; checkpoints of string
        # backbones rebuild alone, nn.Module ones need backbone=/head= again at load time
        ignore = ["optimizer", "lr_scheduler"]
        ignore += [k for k, v in (("backbone", backbone), ("head", head)) if isinstance(v, nn.Module)]
        self.save_hyperparameters(ignore=ignore)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

        if data_bands is not None:
            in_chans = _band_count(data_bands, in_chans)
            self.hparams["in_chans"] = in_chans
        if tasks is not None:
            _check_tasks(tasks, task_weights, task_weighting)
        elif task_weights is not None or task_weighting != "fixed":
            raise ValueError("task_weights/task_weighting apply to several tasks: give tasks={'name': classes, ...}.")
        self.tasks: dict[str, int] | None = dict(tasks) if tasks is not None else None
        self.band_report: list[Any] = []
        if isinstance(backbone, str):
            # band-aware adaptation starts from the stem of the pretrained bands, then adapts it
            stem_chans = len(_resolve(pretrained_bands)) if data_bands is not None else in_chans
            self.backbone = create_backbone(backbone, pretrained, in_chans=stem_chans, img_size=img_size)
        elif isinstance(backbone, nn.Module):
            if pretrained not in (None, False):
                raise ValueError(
                    "pretrained= applies to timm backbone names; this backbone is an nn.Module. "
                    "Load its weights before passing it (or use lightning_ft.weights.load_weights_file)."
                )
            self.backbone = backbone
        else:
            raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}.")
        if data_bands is not None:
            from lightning_ft.bands import adapt_input_bands

            if band_noise is None:
                band_noise = 0.5 if band_method in ("match", "interpolation", "averaging") else 0.0
            if band_seed is None:
                band_seed = int(torch.randint(0, 2**31 - 1, ()).item())
            self.hparams["band_noise"], self.hparams["band_seed"] = band_noise, band_seed
            self.band_report = adapt_input_bands(
                self.backbone, pretrained_bands, data_bands, band_method, layer=stem_layer, noise=band_noise,
                seed=band_seed,
            )
            _warn_identical_bands(self.backbone, stem_layer, self.band_report, band_method)
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"FineTuneModule: the stem takes {len(self.band_report)} bands ({band_method}, band_noise="
                           f"{band_noise}):\n  " + "\n  ".join(map(str, self.band_report)))
        if patch_size is not None:
            from lightning_ft.bands import set_patch_size

            set_patch_size(self.backbone, patch_size)
        self.num_features = backbone_feature_dim(self.backbone, feature_dim)
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.num_classes = num_classes
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        self.head = self._make_head(head, head_kwargs)
        self.task_weighting = (
            TaskWeighting(list(self.tasks), mode=task_weighting, weights=task_weights) if self.tasks else None
        )
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

        metrics = _metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        # epoch means of the loss, synced across ranks. A NaN loss must stay NaN: the default drops it,
        # and "disable" ignores the weights (torchmetrics 1.9), so NaN is "replaced" by NaN
        self.train_loss = MeanMetric(nan_strategy=float("nan"))
        self.val_loss = MeanMetric(nan_strategy=float("nan"))
        self.test_loss = MeanMetric(nan_strategy=float("nan"))
        self.val_metrics = metrics.clone(prefix="val/")
        self.val_target_metrics = metrics.clone(prefix="val_target/")  # domain adaptation: reporting only
        self.test_metrics = metrics.clone(prefix="test/")
        if self.tasks:  # one collection and one loss mean per task and stage: <stage>/<task>/acc, .../loss
            # (keys "train_", ...: nn.Module has a train attribute)
            self.task_metrics = nn.ModuleDict({
                f"{stage}_": nn.ModuleDict({t: _metrics(n).clone(prefix=f"{stage}/{t}/") for t, n in self.tasks.items()})
                for stage in ("train", "val", "test")
            })
            self.task_losses = nn.ModuleDict({
                f"{stage}_": nn.ModuleDict({t: MeanMetric(nan_strategy=float("nan")) for t in self.tasks})
                for stage in ("train", "val", "test")
            })
        self.mixup_fn = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(
                mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mix_prob, switch_prob=mix_switch_prob,
                mode=mix_mode, label_smoothing=label_smoothing, num_classes=num_classes,
            )
        self._target_probs: list[torch.Tensor] = []
        self._pending: dict[int, list[tuple[torch.Tensor, ...]]] = {}  # batches waiting for a metric update

    # ------------------------------------------------------------------ model
    def _make_head(self, head: str | nn.Module, head_kwargs: dict[str, Any] | None) -> nn.Module:
        if isinstance(head, nn.Module):
            if head_kwargs:
                raise ValueError("head_kwargs only apply to a head given by name; this head is an nn.Module.")
            return head
        if self.tasks:
            return TaskHeads(self.num_features, self.tasks, head=head, head_kwargs=head_kwargs)
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
        bands = self.hparams.get("data_bands")
        if bands is None:
            config["mean"], config["std"] = band_mean_std(chans, config)  # per band, as timm's adapt_input_conv maps the RGB kernels
        else:
            # ImageNet statistics describe red, green and blue only: other bands need their own
            # (lightning_ft.bands.band_statistics), from input_config or the datamodule
            from lightning_ft.bands import imagenet_stats_for

            try:
                config["mean"], config["std"] = imagenet_stats_for(_resolve(bands))
            except ValueError:
                config.pop("mean", None)
                config.pop("std", None)
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

    def forward_features(self, x: Inputs) -> tuple[torch.Tensor, Any]:
        """``(pooled features (B, D), logits (B, C))`` -- what domain-adaptation losses need.

        With ``tasks`` the logits are a dict per task; for a time series (:data:`SERIES_KEYS`) the
        features are per date, ``(B, T, D)``.
        """
        if _is_series(x):
            return self._series_forward(x)
        feats = self.features(x)
        pooled = pool_features(self.backbone, feats)
        if getattr(self.head, "wants_dates", False):
            raise ValueError(
                "The head pools over dates (head='temporal') but the inputs are not a time series. Give inputs "
                "{'images': (B, T, C, H, W), 'mask': (B, T), 'doy': (B, T)}, or another head."
            )
        logits = self.head(to_tokens(feats) if getattr(self.head, "wants_tokens", False) else pooled)
        return pooled, logits

    def _series_forward(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Every date through the backbone (shared weights, one batch of ``B*T`` images), then the temporal head."""
        if not getattr(self.head, "wants_dates", False):
            raise ValueError(
                "The inputs are a time series (images (B, T, C, H, W)) but the head does not pool over dates. Use "
                "head='temporal' (head_kwargs={'pooling': 'attention' | 'mean' | 'max' | 'last'})."
            )
        images = x["images"]
        b, t = images.shape[:2]
        mask = x.get("mask")
        mask = torch.ones(b, t, dtype=torch.bool, device=images.device) if mask is None else mask.bool()
        doy = x.get("doy")
        if doy is None:
            doy = torch.arange(1, t + 1, device=images.device).expand(b, t)
        pooled = pool_features(self.backbone, self.features(images.flatten(0, 1))).unflatten(0, (b, t))
        return pooled, self.head(pooled, mask, doy)

    def forward(self, x: Inputs) -> Any:
        """Logits ``(B, C)`` of the inputs (a tensor, or a dict of tensors: :mod:`lightning_ft.batch`); with
        ``tasks``, a dict of logits per task."""
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
    def _targets(self, targets: Any) -> Any:
        """Checked class-index targets of one task (``MISSING`` marks a sample without a label)."""
        if targets is None:
            raise ValueError(
                "This batch has no targets: training, validation and test batches are (inputs, targets) or "
                "{'inputs': ..., 'targets': ...} (lightning_ft.batch). Unlabelled data belongs in predict, or in "
                "the 'target' part of a domain-adaptation batch."
            )
        if self.tasks:
            if not isinstance(targets, dict):
                raise ValueError(
                    f"The model has tasks {sorted(self.tasks)}, so targets are a dict of class indices per task "
                    "({'task': (B,) tensor}, MISSING where a sample has no label); got one tensor."
                )
            unknown = sorted(set(map(str, targets)) - set(self.tasks))
            if unknown:
                raise ValueError(f"The targets name tasks {unknown} that the model lacks; its tasks: {sorted(self.tasks)}.")
            return {t: check_class_targets(targets[t], n, task=t) for t, n in self.tasks.items() if t in targets}
        if isinstance(targets, dict):
            raise ValueError(
                f"The targets come per task ({', '.join(sorted(map(str, targets)))}), but FineTuneModule has one "
                "classification head: give tasks={'task': classes, ...} for one head per task, or one tensor of "
                "class indices per batch."
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
        if self.tasks:
            return self._score_tasks(self(inputs), y, stage)
        if stage == "train" and self.mixup_fn is not None:
            return self._mixed_step(inputs, y)
        return self._score(self(inputs), y, stage)

    @property
    def mixes_inputs(self) -> bool:
        """Whether training batches are mixed (Mixup/CutMix): cached features cannot serve them."""
        return self.mixup_fn is not None

    def _mixed_step(self, inputs: Any, y: torch.Tensor) -> torch.Tensor:
        """Mixup/CutMix (timm's ``Mixup``, label smoothing included) on a training batch, soft-target
        cross-entropy; train metrics count the dominant class of each mixed target. An odd batch mixes its
        first ``B - 1`` images (timm pairs images with the reversed batch) and keeps the last as it is."""
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
            raise ValueError(
                "Mixup/CutMix mix image batches (B, C, H, W); these inputs are "
                f"{type(inputs).__name__ if not isinstance(inputs, torch.Tensor) else tuple(inputs.shape)}. "
                "Set mixup_alpha=0 and cutmix_alpha=0 for this data."
            )
        if not bool(labelled(y).all()):
            raise ValueError("Mixup/CutMix need a label for every training sample; this batch has MISSING labels. "
                             "Set mixup_alpha=0 and cutmix_alpha=0, or drop the unlabelled samples from training.")
        x = inputs.clone()  # timm mixes in place: the loader's tensors stay as they were
        n = len(y) - len(y) % 2
        smoothing = self.hparams.label_smoothing
        soft = torch.full((len(y), self.num_classes), smoothing / self.num_classes, device=x.device)
        soft.scatter_(1, y[:, None], 1.0 - smoothing + smoothing / self.num_classes)
        if n >= 2:
            mixed, soft[:n] = self.mixup_fn(x[:n], y[:n])
            x[:n] = mixed
        logits = self(x).float()
        loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        self._buffered_update(self.train_metrics, logits.detach().softmax(-1), soft.argmax(-1))
        self._log_train_loss(loss, len(y), len(y))
        return loss

    def _score_tasks(self, logits: dict[str, torch.Tensor], ys: dict[str, torch.Tensor],
                     stage: Literal["train", "val", "test"]) -> torch.Tensor:
        """Per task: cross-entropy over its labelled rows, its metrics and epoch loss; the tasks combined by
        :class:`~lightning_ft.losses.multitask.TaskWeighting` (a task without a label in the batch left out)."""
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        losses, present = {}, {}
        rows = 0
        for task in self.tasks:
            out = logits[task].float()
            y = ys.get(task)
            if y is None:  # no label of this task in the batch: all MISSING, so its head stays in the graph (DDP)
                y = torch.full(out.shape[:1], MISSING, dtype=torch.long, device=out.device)
            count = labelled(y).sum()
            loss = F.cross_entropy(out, y, ignore_index=MISSING, label_smoothing=smoothing, reduction="sum")
            losses[task] = loss / count.clamp_min(1)
            present[task] = count > 0
            rows = len(y)
            self._buffered_update(self.task_metrics[f"{stage}_"][task], out.detach().softmax(-1), y)
            self._update_loss(self.task_losses[f"{stage}_"][task], losses[task], count)
        if not ys:
            raise ValueError(f"A {stage} batch has targets for none of the tasks {sorted(self.tasks)}.")
        total = self.task_weighting(losses, present)
        if stage == "train":
            self._log_step_loss(total, rows)
        return total

    def _log_task_epoch(self, stage: Literal["train", "val", "test"]) -> None:
        """Per task ``<stage>/<task>/loss`` and metrics; combined ``<stage>/loss`` (mean of the task losses) and
        ``<stage>/acc`` (mean task accuracy), the monitors for checkpointing and unfreezing."""
        losses, accs = [], []
        for task in self.tasks:
            value = self._epoch_loss(self.task_losses[f"{stage}_"][task])
            if value is not None:
                self.log(f"{stage}/{task}/loss", value)
                losses.append(value)
            acc = self._log_epoch_metrics(self.task_metrics[f"{stage}_"][task], prog_bar=False).get(f"{stage}/{task}/acc")
            if acc is not None:
                accs.append(acc)
        if losses:
            mean = torch.stack(losses).mean()
            if stage == "train":  # as with one task: the epoch value to the loggers, train/loss for monitors only
                self.log("train/loss_epoch", mean)
                self.log("train/loss", mean, logger=False)
            else:
                self.log(f"{stage}/loss", mean, prog_bar=True)
        if accs:
            self.log(f"{stage}/acc", torch.stack(accs).mean(), prog_bar=stage != "train")
        if stage == "train" and self.task_weighting is not None:
            for task, weight in self.task_weighting.weights_dict().items():
                self.log(f"train/{task}/weight", weight)

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
        self._log_step_loss(loss, batch_size)

    def _log_step_loss(self, loss: torch.Tensor, batch_size: int) -> None:
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
        labelled = bool(meter.update_count) and bool(float(meter.weight))  # not one labelled sample: no loss
        if self._trainer is not None and self.trainer.world_size > 1:
            # compute() gathers across ranks: every rank must take the same branch
            labelled = self.trainer.strategy.reduce_boolean_decision(labelled, all=False)
        if not labelled:
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
        if self.tasks:
            self._log_task_epoch("train")
            return
        value = self._epoch_loss(self.train_loss)
        if value is not None:
            self.log("train/loss_epoch", value)
            self.log("train/loss", value, logger=False)  # for monitors: callback metrics only
        self._log_epoch_metrics(self.train_metrics, prog_bar=False)

    def on_test_epoch_end(self) -> None:
        if self.tasks:
            self._log_task_epoch("test")
            return
        value = self._epoch_loss(self.test_loss)
        if value is not None:
            self.log("test/loss", value, prog_bar=True)
        self._log_epoch_metrics(self.test_metrics, prog_bar=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def _adaptation_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Source cross-entropy plus the attached DomainAdaptation's losses (:mod:`lightning_ft.losses.adaptation`)."""
        adaptation = adaptation_of(self)
        if self.tasks:
            raise ValueError("Domain adaptation trains one classification task; this model has tasks= (several heads).")
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
        if self.tasks:
            self._log_task_epoch("val")
            return
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

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Class probabilities ``(B, C)``; with ``tasks``, a dict of them per task."""
        inputs, _ = split_batch(batch)
        logits = self(inputs)
        if isinstance(logits, dict):
            return {t: v.float().softmax(dim=-1) for t, v in logits.items()}
        return logits.float().softmax(dim=-1)

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
        classes = getattr(datamodule, "classes", None) if not self.tasks else None  # with tasks: per task, not one list
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


def _is_series(x: Any) -> bool:
    """A time-series input: a dict whose ``images`` are ``(B, T, C, H, W)``."""
    return isinstance(x, dict) and isinstance(x.get("images"), torch.Tensor) and x["images"].ndim == 5


def _metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=MISSING),
            "f1": MulticlassF1Score(num_classes, average="macro", ignore_index=MISSING),
            "ece": MulticlassCalibrationError(num_classes, ignore_index=MISSING),
        }
    )


def _resolve(spec: Any) -> list[Any]:
    from lightning_ft.bands import resolve_bands

    return resolve_bands(spec)


def _band_count(data_bands: Any, in_chans: int) -> int:
    count = len(_resolve(data_bands))
    if in_chans not in (3, count):
        raise ValueError(
            f"in_chans={in_chans} but data_bands names {count} bands. Leave in_chans out (it is the number of "
            "data bands), or name every band of the data."
        )
    return count


def _warn_identical_bands(backbone: nn.Module, layer: str | None, report: list[Any], method: str) -> None:
    """Two data bands with the same stem kernel are one band to a frozen stem: say so."""
    import warnings

    from lightning_ft.bands import find_input_layer

    weight = find_input_layer(backbone, layer)[1].weight.detach()
    names = [str(r.target.name) for r in report]
    same = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
            if torch.equal(weight[:, i], weight[:, j])]
    if same:
        pairs = ", ".join(f"{a} = {b}" for a, b in same[:4])
        fix = ("band_method='tile' repeats the pretrained kernels; use band_method='match' (band noise on by default) "
               "or 'random'" if method == "tile" else "Set band_noise > 0 (e.g. 0.5)")
        warnings.warn(
            f"The adapted stem gives identical kernels to bands {pairs}: a frozen stem cannot tell them apart. "
            f"{fix} to keep every band distinguishable.", stacklevel=3)


def _check_tasks(tasks: Any, weights: Any, weighting: str) -> None:
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"tasks must be a non-empty dict {{task: number of classes}}, got {tasks!r}.")
    if weights is not None and weighting != "fixed":
        raise ValueError(
            "task_weights are fixed weights, but task_weighting='uncertainty' learns them. Use one or the other."
        )


def _short(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_mixing(mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, mode: str,
                  tasks: Any) -> None:
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 = off), got {mixup_alpha} and {cutmix_alpha}.")
    if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0):
        raise ValueError(f"mix_prob and mix_switch_prob are probabilities in [0, 1], got {prob} and {switch_prob}.")
    if mode not in ("batch", "pair", "elem"):
        raise ValueError(f"mix_mode must be 'batch', 'pair' or 'elem' (timm's Mixup modes), got {mode!r}.")
    if (mixup_alpha > 0 or cutmix_alpha > 0) and tasks is not None:
        raise ValueError("Mixup/CutMix mix one set of class targets; this model has tasks= (several heads). "
                         "Set mixup_alpha=0 and cutmix_alpha=0.")


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

