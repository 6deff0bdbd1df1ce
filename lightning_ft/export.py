"""Export a fine-tuned model (a checkpoint or a live :class:`~lightning_ft.module.FineTuneModule`) for inference.

:func:`export_checkpoint` (or :func:`export_model` for a model in hand) writes into one folder:

* ``config.json``: what rebuilds the model without Lightning's checkpoint machinery::

      {"format": "lightning_ft.export", "version": 1, "lightning_ft_version": "...",
       "model": {"backbone", "num_classes", "head", "head_kwargs", "in_chans", "img_size",
                 "feature_dim", "channels_last"},
       "class_names": [...] or null,
       "data_config": {"input_size": [C, H, W], "mean", "std", "interpolation", "crop_pct", ...},
       "files": {"safetensors": "model.safetensors", ...}}

* ``model.safetensors`` (format ``"safetensors"``): the weights of ``backbone.*`` and ``head.*`` only
  (no metrics, no domain-adaptation losses, no optimizer state). :func:`load_exported` rebuilds the
  :class:`~lightning_ft.module.FineTuneModule` from it and ``config.json``, with its class names and
  its input preparation (``load_exported(folder).transform()``).
* ``model.torchscript.pt`` (format ``"torchscript"``): the model traced with ``torch.jit.trace``;
  ``torch.jit.load(path)(x)`` gives the logits of a float batch ``x`` of shape ``(B, C, H, W)`` at the
  exported ``input_size`` (any ``B``). Needs only torch to run, not timm nor this package. TorchScript
  is deprecated in recent PyTorch releases; prefer ONNX for new deployments.
* ``model.onnx`` (format ``"onnx"``): the torch.export-based ONNX exporter's graph, input ``"image"``
  ``(batch, C, H, W)`` float32 with a dynamic batch axis, output ``"logits"`` ``(batch, num_classes)``.
  Needs ``onnx`` and ``onnxscript`` (``pip install 'lightning_ft[export]'``). Models of more than
  about 2 GB keep their weights in ``model.onnx.data`` beside it (ONNX's protobuf limit).

Both traced formats are checked against the model on a second batch of another size before they are
kept: a graph that does not reproduce the model's logits is an error, never a silent file. (Tracer
warnings about Python values, e.g. timm's shape asserts, are dropped when that check passes: they
only mean the graph is fixed to the exported image size.) The ONNX check runs when ``onnxruntime``
is installed.

Inputs are the normalised images ``model.transform()`` produces (``config.json``'s ``data_config``
says how: resize, centre crop, per-band mean and std).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_ft.inputs import TRANSFORM_KEYS
from lightning_ft.module import FineTuneModule

__all__ = ["EXPORT_FORMATS", "export_checkpoint", "export_model", "load_exported"]

EXPORT_FORMAT = "lightning_ft.export"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
EXPORT_FORMATS: dict[str, str] = {
    "safetensors": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
}
"""The export formats and the file each one writes in the output folder."""
MODEL_KEYS = ("backbone", "num_classes", "head", "head_kwargs", "in_chans", "img_size", "feature_dim", "channels_last")
WEIGHT_PREFIXES = ("backbone.", "head.")
_ONNX_EXTERNAL_BYTES = 1_800_000_000  # protobuf files stop at 2 GiB
_HINT_EXTRA = "pip install 'lightning_ft[export]'"


# ------------------------------------------------------------------------------------------ export
def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    formats: Sequence[str] = ("safetensors", "torchscript", "onnx"),
) -> dict[str, Path]:
    """Export the model of a Lightning checkpoint of :class:`FineTuneModule` (see the module docstring).

    Args:
        ckpt_path: a ``.ckpt`` written by the Trainer (``ModelCheckpoint`` or ``trainer.save_checkpoint``).
        out_dir: the folder to write (created; files of the same names are replaced).
        formats: any of ``"safetensors"``, ``"torchscript"``, ``"onnx"``.

    Returns:
        ``{format: path}`` of the files written, ``"config"`` included.
    """
    formats = _check_formats(formats)
    if "onnx" in formats:
        _require_onnx()  # before the checkpoint is read
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"Checkpoint '{ckpt_path}' does not exist (or is not a file).")
    _check_checkpoint_hparams(ckpt_path)
    model = FineTuneModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    return export_model(model, out_dir, formats)


def export_model(
    model: FineTuneModule,
    out_dir: str | Path,
    formats: Sequence[str] = ("safetensors", "torchscript", "onnx"),
) -> dict[str, Path]:
    """Export a live :class:`FineTuneModule` (see the module docstring); returns ``{format: path}`` incl. ``"config"``.

    The model is exported in eval mode (BatchNorm with its running statistics, no dropout), on its own
    device and dtype; each submodule's train/eval mode is restored afterwards. A model whose backbone or
    head is an ``nn.Module`` exports too, but :func:`load_exported` cannot rebuild it: build the module
    again and load ``model.safetensors`` into it with ``load_state_dict(..., strict=False)``.
    """
    if not isinstance(model, FineTuneModule):
        raise TypeError(f"export_model takes a lightning_ft FineTuneModule, got {type(model).__name__}.")
    formats = _check_formats(formats)
    if "onnx" in formats:
        _require_onnx()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir '{out}' exists and is not a folder; give a folder to write the export into.")
    config = _export_config(model, formats)  # before any file: a config that cannot be written stops here
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # an export that fails midway leaves no config over new weights

    modes = {m: m.training for m in model.modules()}
    model.eval()
    written: dict[str, Path] = {}
    try:
        for fmt in formats:
            path = out / EXPORT_FORMATS[fmt]
            if fmt == "safetensors":
                _save_safetensors(model, path)
            elif fmt == "torchscript":
                _save_torchscript(model, path)
            else:
                _save_onnx(model, path)
            written[fmt] = path
    finally:
        for module, mode in modes.items():
            module.training = mode
    config_path = out / CONFIG_FILE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    written["config"] = config_path
    if "safetensors" in written:  # safetensors writes 0600; give it the permissions of any new file (umask)
        shutil.copymode(config_path, written["safetensors"])
    return written


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(
            f"Unknown export format(s) {', '.join(map(repr, unknown))}; known: {', '.join(EXPORT_FORMATS)}."
        )
    if not formats:
        raise ValueError(f"No export format given; choose from {', '.join(EXPORT_FORMATS)}.")
    return tuple(dict.fromkeys(formats))


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"Exporting to ONNX needs {' and '.join(missing)} (PyTorch's ONNX exporter uses them): "
            f"{_HINT_EXTRA}. Or leave 'onnx' out of formats."
        )


def _check_checkpoint_hparams(ckpt_path: Path) -> None:
    """Refuse checkpoints whose backbone or head was an nn.Module before building anything from them."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) serialisation cannot be memory-mapped
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"'{ckpt_path}' is not a Lightning checkpoint (no 'state_dict'); export a .ckpt the Trainer wrote."
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    reasons = []
    if not isinstance(hparams.get("backbone"), str):
        reasons.append("backbone")
    if not isinstance(hparams.get("head"), str):
        reasons.append("head")
    if reasons:
        raise ValueError(
            f"'{ckpt_path}' was saved from a FineTuneModule whose {' and '.join(reasons)} "
            f"{'was an nn.Module' if len(reasons) == 1 else 'were nn.Modules'} (its hyper-parameters do not name "
            "them), so it cannot be rebuilt from the checkpoint alone. Export needs a checkpoint whose backbone is "
            "a timm name and whose head is a head name; otherwise build the model with the same modules, load the "
            "checkpoint into it, and call lightning_ft.export.export_model(model, out_dir) from Python."
        )


def _describe(model: FineTuneModule) -> str:
    backbone = model.hparams.get("backbone")
    head = model.hparams.get("head")
    backbone = backbone if isinstance(backbone, str) else type(model.backbone).__name__
    head = head if isinstance(head, str) else type(model.head).__name__
    return f"FineTuneModule(backbone={backbone!r}, head={head!r})"


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item(), where)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{where} holds {value!r} ({type(value).__name__}), which config.json cannot store.")


def _export_config(model: FineTuneModule, formats: Sequence[str]) -> dict[str, Any]:
    hp = model.hparams
    backbone = hp.get("backbone") if isinstance(hp.get("backbone"), str) else None
    head = hp.get("head") if isinstance(hp.get("head"), str) else None
    spec = {
        "backbone": backbone,  # None: an nn.Module, which load_exported cannot rebuild
        "num_classes": int(model.num_classes),
        "head": head,
        "head_kwargs": hp.get("head_kwargs") if head is not None else None,
        "in_chans": int(hp.get("in_chans", 3)),
        "img_size": hp.get("img_size"),
        "feature_dim": hp.get("feature_dim"),
        "channels_last": bool(model.channels_last),
    }
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "lightning_ft_version": _version(),
        "model": _jsonable(spec, "model"),
        "class_names": list(model.class_names) if model.class_names is not None else None,
        "data_config": _jsonable(dict(model.data_config), "data_config"),
        "files": {fmt: EXPORT_FORMATS[fmt] for fmt in formats},
    }


def _version() -> str:
    import lightning_ft

    return str(getattr(lightning_ft, "__version__", "unknown"))


def _export_weights(model: FineTuneModule) -> dict[str, torch.Tensor]:
    """``backbone.*`` / ``head.*`` tensors on the CPU, contiguous, no two sharing storage (safetensors refuses that)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if not key.startswith(WEIGHT_PREFIXES):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:  # tied weights or views of one buffer: store a copy
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    return state


def _save_safetensors(model: FineTuneModule, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_export_weights(model), str(path), metadata={"format": "pt", "exporter": EXPORT_FORMAT})


class _Logits(nn.Module):
    """Images in, logits out: the model's own ``forward`` with only ``backbone`` and ``head`` as submodules.

    Tracing the LightningModule itself would walk its attributes (metrics, the ``trainer`` property, which
    raises when no Trainer is attached); the wrapper holds just the inference parts.
    """

    def __init__(self, model: FineTuneModule) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        object.__setattr__(self, "_forward", model.forward)  # a plain attribute, not a submodule

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._forward(image)


def _example_inputs(model: FineTuneModule, batch: int, seed: int) -> torch.Tensor:
    size = tuple(int(v) for v in model.data_config["input_size"])
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype if param.dtype.is_floating_point else torch.float32
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *size, generator=g).to(device=device, dtype=dtype)


def _check_close(fmt: str, model: FineTuneModule, got: torch.Tensor, expected: torch.Tensor) -> None:
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    scale = max(1.0, float(expected.abs().max()))
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * scale):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise RuntimeError(
            f"The {fmt} export of {_describe(model)} does not reproduce the model's logits on a batch of "
            f"{len(expected)} (shapes {tuple(got.shape)} vs {tuple(expected.shape)}, max abs diff {diff:.3g}): "
            f"its graph does not generalise beyond the traced example (data-dependent control flow?). Export "
            f"without it: formats={[f for f in EXPORT_FORMATS if f != fmt]}."
        )


def _save_torchscript(model: FineTuneModule, path: Path) -> None:
    wrapper = _Logits(model).eval()
    example = _example_inputs(model, batch=2, seed=0)  # batch 2: a size-1 batch invites broadcasting shortcuts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, example, check_trace=False)
        except Exception as err:
            raise RuntimeError(
                f"TorchScript tracing of {_describe(model)} failed: {type(err).__name__}: {err}. Export the other "
                f"formats without it: formats=('safetensors', 'onnx')."
            ) from err
        check = _example_inputs(model, batch=3, seed=1)
        with torch.no_grad():
            _check_close("torchscript", model, traced(check), model(check))
        torch.jit.save(traced, str(path))
    _reemit(caught, drop_tracer=True)


def _reemit(caught: list[warnings.WarningMessage], drop_tracer: bool) -> None:
    """Warn again what the export raised, less torch.jit's deprecation notices (this module chose TorchScript
    knowingly) and, when the traced graph was verified, the tracer's notes about Python values."""
    for w in caught:
        message = str(w.message)
        if issubclass(w.category, FutureWarning) and "torch.jit" in message and "deprecated" in message:
            continue
        if drop_tracer and issubclass(w.category, torch.jit.TracerWarning):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _save_onnx(model: FineTuneModule, path: Path) -> None:
    _require_onnx()
    wrapper = _Logits(model).eval()
    example = _example_inputs(model, batch=2, seed=0)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                 if isinstance(t, torch.Tensor))
    quiet = _DropMessages("Skipping constant folding")  # onnxscript's optimizer leaving a node as it is
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    folding.addFilter(quiet)
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=nbytes > _ONNX_EXTERNAL_BYTES,
            verbose=False,
        )
    except Exception as err:
        raise RuntimeError(
            f"ONNX export of {_describe(model)} failed: {type(err).__name__}: {err}. Export the other formats "
            f"without it: formats=('safetensors', 'torchscript')."
        ) from err
    finally:
        folding.removeFilter(quiet)
    try:
        import onnxruntime
    except ImportError:  # the check needs onnxruntime; the file is written either way
        return
    if example.dtype != torch.float32:  # numpy has no bfloat16; the check covers float32 models
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = _example_inputs(model, batch=3, seed=1)
    (logits,) = session.run(["logits"], {"image": check.float().cpu().numpy()})
    with torch.no_grad():
        _check_close("onnx", model, torch.from_numpy(logits), model(check))


# ------------------------------------------------------------------------------------------ load
def load_exported(path: str | Path) -> FineTuneModule:
    """Rebuild the :class:`FineTuneModule` of an export folder (``config.json`` + ``model.safetensors``), in eval mode.

    ``path`` is the folder or a file in it. The model comes back with its class names and its input
    preparation: ``model.transform()(image)`` prepares an image as in training, ``model(batch)`` gives
    logits. No pretrained weights are fetched: all weights come from ``model.safetensors``.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"Export folder '{folder}' does not exist. Give the out_dir of export_checkpoint.")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"'{folder}' has no {CONFIG_FILE} (it holds: {', '.join(present) or 'nothing'}); it is not a "
            "lightning_ft export. Write one with lightning_ft.export.export_checkpoint(ckpt, out_dir)."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{config_path}' is not valid JSON ({err}); export the checkpoint again.") from err
    spec = _check_config(config, config_path)

    weights_name = (config.get("files") or {}).get("safetensors", EXPORT_FORMATS["safetensors"])
    weights_path = folder / weights_name
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"'{folder}' lacks {weights_name}, the weights load_exported needs. Export with 'safetensors' in formats."
        )
    if spec.get("backbone") is None or spec.get("head") is None:
        which = " and ".join(k for k in ("backbone", "head") if spec.get(k) is None)
        raise ValueError(
            f"'{folder}' was exported from a model whose {which} was an nn.Module, which config.json cannot "
            "describe. Build the FineTuneModule with the same modules and load the weights into it: "
            f"model.load_state_dict(safetensors.torch.load_file('{weights_path}'), strict=False)."
        )

    data_config = config.get("data_config") or {}
    input_config = {
        k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in TRANSFORM_KEYS
    }
    kwargs = {k: spec[k] for k in MODEL_KEYS if k in spec}
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    model = FineTuneModule(
        **kwargs, pretrained=None, class_names=config.get("class_names"), input_config=input_config or None
    )

    from safetensors.torch import load_file

    state = load_file(str(weights_path))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"The weights in '{weights_path}' do not fit the model config.json describes: {err}") from err
    missing = [k for k in result.missing_keys if k.startswith(WEIGHT_PREFIXES)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"The weights in '{weights_path}' do not match the model config.json describes "
            f"({_describe(model)}): missing {_keys(missing)}; unexpected {_keys(unexpected)}. Were the files "
            "written by different exports? Export the checkpoint again."
        )
    return model.eval()


def _keys(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_config(config: Any, config_path: Path) -> dict[str, Any]:
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"'{config_path}' is not a lightning_ft export config (its \"format\" is not {EXPORT_FORMAT!r})."
        )
    version = config.get("version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise ValueError(
            f"'{config_path}' has export version {version!r}; this lightning_ft ({_version()}) reads version "
            f"{EXPORT_VERSION}. Upgrade lightning_ft (it was written by {config.get('lightning_ft_version', '?')})."
        )
    spec = config.get("model")
    if spec is None:
        raise ValueError(f"'{config_path}' lacks its \"model\" section; export the checkpoint again.")
    if not isinstance(spec, dict):
        raise TypeError(
            f"'{config_path}' \"model\" is a {type(spec).__name__}, not an object; export the checkpoint again."
        )
    missing = [k for k in ("backbone", "num_classes") if k not in spec]
    if missing:
        raise ValueError(
            f"'{config_path}' \"model\" lacks {', '.join(repr(k) for k in missing)}; it has "
            f"{', '.join(sorted(spec)) or 'nothing'}. Export the checkpoint again."
        )
    unknown = sorted(set(spec) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"'{config_path}' \"model\" has unknown keys {unknown}; known: {', '.join(MODEL_KEYS)}.")
    return spec
