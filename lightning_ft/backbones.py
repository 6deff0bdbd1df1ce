"""Backbones: create one, and get its features.

Everything here imports torch and timm only (no Lightning).

* :func:`create_backbone` takes a timm model name and returns a timm model (headless by default).
* ``pretrained`` is ``None`` (random init), ``True`` (the offline asset shipped for this
  architecture), the name of an offline asset (``"efficientnet_lite0"``) or a path to a
  ``.safetensors`` / torch weights file (resolved and read by :mod:`lightning_ft.weights`). Weights
  always go through timm's own loading path (``pretrained_cfg_overlay``), so checkpoint filters,
  ``in_chans`` adaptation (``adapt_input_conv``) and position-embedding resampling are timm's.
* :func:`feature_dim`, :func:`backbone_features`, :func:`pool_features` and :func:`to_tokens` give
  the feature width, the unpooled features, the pooled ``(B, D)`` features and the token view of
  a timm model or a plain ``nn.Module``.

The ordered layer groups (the depth map) live in :mod:`lightning_ft.groups`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_ft.weights import load_weights_file, mismatch_report, resolve_pretrained, strip_prefix

__all__ = [
    "backbone_features",
    "create_backbone",
    "feature_dim",
    "is_timm_model",
    "pool_features",
    "to_tokens",
]


# --------------------------------------------------------------------------------------------
# Creating a backbone
# --------------------------------------------------------------------------------------------


def _check_timm_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:
        close = [n for n in names if name.lower().replace("-", "_") in n][:5]
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"Unknown backbone '{name}': timm has no model of that name.{hint} "
        "List them with timm.list_models('<pattern>'), or pass an nn.Module."
    )


def create_backbone(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    *,
    in_chans: int = 3,
    img_size: int | Sequence[int] | None = None,
    num_classes: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model with ``num_classes`` outputs (0: headless) and load ``pretrained`` weights.

    ``in_chans`` other than 3 adapts the pretrained stem with timm's ``adapt_input_conv`` (e.g. 13
    Sentinel-2 bands: the RGB kernel is repeated and rescaled). ``img_size`` resizes models with a
    fixed input size (ViTs: position embeddings resampled by timm's ``set_input_size``); convolutional
    models take any size and only record it in their data config.
    """
    import timm

    _check_timm_name(name)
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}.")
    weights = resolve_pretrained(pretrained, name)
    state = None
    file_classes = 0
    if weights is not None:
        probe = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        state = strip_prefix(load_weights_file(weights), probe.state_dict())
        classifier = probe.pretrained_cfg.get("classifier")
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        rows = [state[f"{c}.weight"].shape[0] for c in classifier if f"{c}.weight" in state]
        file_classes = rows[0] if rows else 0
        overlay = dict(state_dict=state, num_classes=file_classes)
        try:
            model = timm.create_model(
                # offline: timm loads the in-memory state dict of the overlay, nothing is downloaded
                name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=file_classes,
                in_chans=in_chans, **kwargs,
            )
        except RuntimeError as err:  # strict load failed: say which keys
            first_conv = probe.pretrained_cfg.get("first_conv")
            skip = {f"{first_conv}.weight"} if (first_conv and in_chans != 3) else set()
            fresh = timm.create_model(name, pretrained=False, num_classes=file_classes, in_chans=in_chans, **kwargs)
            report = mismatch_report(state, fresh, skip) or str(err).splitlines()[0]
            raise ValueError(
                f"Weights in '{weights}' do not fit backbone '{name}': {report}. Use weights saved from "
                f"'{name}' (or set backbone= to the architecture they come from)."
            ) from err
        if file_classes != num_classes:
            model.reset_classifier(num_classes)
        model.pretrained_cfg = {**model.pretrained_cfg, "file": str(weights)}
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if img_size is not None:
        _set_input_size(model, name, img_size)
    return model


def _set_input_size(model: nn.Module, name: str, img_size: int | Sequence[int]) -> None:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=size)
    cfg = dict(model.pretrained_cfg)
    cfg["input_size"] = (cfg.get("input_size", (3,))[0], *size)
    model.pretrained_cfg = cfg


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def is_timm_model(module: nn.Module) -> bool:
    """Whether ``module`` has timm's model interface (``forward_features``/``forward_head``, ``group_matcher``)."""
    return all(hasattr(module, a) for a in ("forward_features", "forward_head", "group_matcher", "num_features"))


def feature_dim(backbone: nn.Module, given: int | None = None) -> int:
    """Feature width of a backbone: timm's ``num_features``, an attribute, or ``given``."""
    if given is not None:
        return int(given)
    for attr in ("num_features", "feature_dim", "embed_dim", "out_features", "hidden_size"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"Cannot tell the feature width of backbone {type(backbone).__name__}: it has no `num_features` "
        "attribute. Pass feature_dim=<width of its output features>."
    )


def backbone_features(backbone: nn.Module, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Unpooled features: (B, C, H, W) or (B, N, C) for timm models; whatever a plain module returns.

    ``x`` is a tensor, or a dict of tensors (:mod:`lightning_ft.batch`) that a plain module takes as
    keyword arguments (``backbone(**x)``); a timm model takes an image tensor only.
    """
    if isinstance(x, dict):
        if is_timm_model(backbone):
            raise ValueError(
                f"A timm backbone takes an image tensor, but the inputs are a dict ({sorted(x)}). Give image "
                "tensors, or a backbone module whose forward takes these names as keyword arguments."
            )
        return backbone(**x)
    if is_timm_model(backbone):
        return backbone.forward_features(x)
    return backbone(x)


def pool_features(backbone: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """(B, D) pooled features: timm's own pooling (``forward_head(pre_logits=True)``) or a mean."""
    if is_timm_model(backbone):
        return backbone.forward_head(features, pre_logits=True)
    if features.ndim == 2:
        return features
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    if features.ndim == 3:
        return features.mean(dim=1)
    raise ValueError(f"Backbone returned features of shape {tuple(features.shape)}; expected 2, 3 or 4 dims.")


def to_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); (B, N, C) unchanged."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 3:
        return features
    raise ValueError(
        f"This head pools over tokens or spatial positions, but the backbone gives pooled features of shape "
        f"{tuple(features.shape)}. Use head='linear' or 'mlp', or a backbone that returns (B, C, H, W) / (B, N, C)."
    )
