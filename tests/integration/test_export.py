"""Export of a trained checkpoint: safetensors + config.json, TorchScript and ONNX give the checkpoint's logits.

One small model is trained once (a real Trainer fit, so BatchNorm statistics moved and eval mode matters)
and exported once per module; the tests compare every format against the checkpoint.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.export import export_checkpoint, export_model, load_exported
from lightning_ft.module import FineTuneModule

CLASSES = ["a", "b", "c"]
INPUT_CONFIG = {"mean": (0.1, 0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7, 0.8), "crop_pct": 1.0}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAS_ONNX = _importable("onnx") and _importable("onnxscript")
FORMATS = ("safetensors", "torchscript", "onnx") if HAS_ONNX else ("safetensors", "torchscript")


def _fit(model: L.LightningModule, root, chans: int = 4) -> L.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, chans, 32, 32, generator=g) * 2 + 1, torch.arange(16) % 3)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    return trainer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread (as conftest's one_thread, for the whole module): on 2 shared cores, OpenMP threads
    competing with other processes make these tiny convolutions ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, in_chans=4, img_size=32, class_names=CLASSES,
                           input_config=INPUT_CONFIG, lr=1e-2)
    trainer = _fit(model, root)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    files = export_checkpoint(ckpt, root / "out", formats=FORMATS)
    reference = FineTuneModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    return ckpt, root / "out", files, reference


def _batch(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_checkpoint_has_trained_batchnorm(exported):
    reference = exported[3]
    bns = [m for m in reference.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and any(bn.running_mean.abs().sum() > 0 for bn in bns)  # the fit moved the statistics
    x = _batch(4, 3)
    training = copy.deepcopy(reference).train()  # a copy: a training forward moves the statistics again
    assert not torch.allclose(training(x), reference(x), atol=1e-3)  # so eval mode matters for the exports


def test_files_and_config(exported):
    _, out, files, reference = exported
    assert set(files) == {*FORMATS, "config"}
    assert all(p.is_file() and p.parent == out for p in files.values())
    config = json.loads(files["config"].read_text())
    assert config["format"] == "lightning_ft.export" and config["version"] == 1
    assert config["class_names"] == CLASSES
    assert config["data_config"]["input_size"] == [4, 32, 32]
    assert config["data_config"]["mean"] == list(INPUT_CONFIG["mean"])
    assert config["model"] == {"backbone": "test_resnet", "num_classes": 3, "head": "linear", "head_kwargs": None,
                               "in_chans": 4, "img_size": 32, "feature_dim": None, "channels_last": False}
    assert config["files"] == {"safetensors": "model.safetensors", "torchscript": "model.torchscript.pt",
                               **({"onnx": "model.onnx"} if HAS_ONNX else {})}
    state = load_file(files["safetensors"])
    assert state and all(k.startswith(("backbone.", "head.")) for k in state)
    expected = {k for k in reference.state_dict() if k.startswith(("backbone.", "head."))}
    assert set(state) == expected


@pytest.mark.parametrize("batch", [2, 5])
@torch.no_grad()
def test_load_exported_matches_checkpoint(exported, batch):
    _, out, _, reference = exported
    model = load_exported(out)
    assert not model.training
    x = _batch(batch, batch)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_load_exported_keeps_classes_and_transform(exported):
    _, _, files, reference = exported
    model = load_exported(files["safetensors"])  # a file inside the folder works too
    assert model.class_names == reference.class_names == CLASSES
    assert model.data_config == reference.data_config
    image = np.random.default_rng(0).integers(0, 255, size=(40, 48, 4), dtype=np.uint8)
    torch.testing.assert_close(model.transform()(image), reference.transform()(image), rtol=0, atol=0)


@pytest.mark.parametrize("batch", [2, 5])
@torch.no_grad()
def test_torchscript_matches_checkpoint(exported, batch):
    _, _, files, reference = exported
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        traced = torch.jit.load(str(files["torchscript"]))
    x = _batch(batch, batch)
    torch.testing.assert_close(traced(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 5])
@torch.no_grad()
def test_onnx_matches_checkpoint(exported, batch):
    ort = pytest.importorskip("onnxruntime")
    _, _, files, reference = exported
    if "onnx" not in files:
        pytest.skip("onnx/onnxscript not installed: pip install 'lightning_ft[export]'")
    session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = _batch(batch, batch)
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), reference(x), rtol=1e-4, atol=1e-4)


def test_unknown_format(exported, tmp_path):
    ckpt = exported[0]
    with pytest.raises(ValueError, match=r"'tflite'.*known: safetensors, torchscript, onnx"):
        export_checkpoint(ckpt, tmp_path / "out", formats=["safetensors", "tflite"])
    assert not (tmp_path / "out").exists()


def test_onnx_without_packages_names_the_extra(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'lightning_ft\[export\]'"):
        export_checkpoint(exported[0], tmp_path / "out", formats=["onnx"])
    assert not (tmp_path / "out").exists()


def test_load_exported_errors(exported, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_exported(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exported(tmp_path / "nowhere")

    files = exported[2]
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads(files["config"].read_text())
    del config["model"]["num_classes"]
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes(files["safetensors"].read_bytes())
    with pytest.raises(ValueError, match=r"lacks 'num_classes'"):
        load_exported(broken)

    (broken / "config.json").write_text(files["config"].read_text())
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        load_exported(broken)


class _Features(nn.Module):
    """A user backbone (not a timm name): images to 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_module_backbone(tmp_path):
    model = FineTuneModule(_Features(), num_classes=3, feature_dim=8, in_chans=4, img_size=32, lr=1e-2)
    trainer = _fit(model, tmp_path)
    ckpt = tmp_path / "module.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"backbone was an nn.Module.*timm name.*export_model"):
        export_checkpoint(ckpt, tmp_path / "out", formats=["safetensors"])

    # from Python, the live model exports; the folder cannot rebuild it alone
    model.train()
    model.head.eval()  # a mixed state, restored as it was
    files = export_model(model, tmp_path / "live", formats=["safetensors", "torchscript"])
    assert model.training and model.backbone.body[1].training and not model.head.training
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        traced = torch.jit.load(str(files["torchscript"]))
    x = torch.randn(3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"backbone was an nn.Module.*load_state_dict"):
        load_exported(tmp_path / "live")
