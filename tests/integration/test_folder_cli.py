"""Your own image folder through the installed ``lightning-ft`` command, as a subprocess: fit on folders
of grayscale PNG, RGB JPEG and 4-band TIFF (``configs/image_folder.yaml`` as the README shows it),
predict with class names, export, and an interrupted run resumed with ``--ckpt_path last``."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ft import FineTuneModule
from lightning_ft.data import DIGIT_NAMES, write_digits_folder

REPO = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("lightning-ft")
CONFIG = REPO / "configs" / "image_folder.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def lightning_ft(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    assert EXE.is_file(), f"console script not installed next to {sys.executable}: run scripts/setup.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return result


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit status {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}"
    return result.stdout


def quick(root: Path, data: Path, in_chans: int) -> list[str]:
    """The README's config on a test folder, a few steps of a tiny timm model (the config's own backbone runs
    in test_cli_configs.py)."""
    return [
        "--config", str(CONFIG), f"--data.root={data}", f"--model.in_chans={in_chans}", "--model.img_size=32",
        "--model.backbone=test_efficientnet", "--model.pretrained=null",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.batch_size=8",
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("folders")
    return {
        "png": write_digits_folder(base / "png", fmt="png", size=24, per_class=3),
        "jpeg": write_digits_folder(base / "jpeg", fmt="jpeg", size=24, per_class=3),
        "tif": write_digits_folder(base / "tif", fmt="tif", bands=4, size=24, per_class=3),
    }


@pytest.mark.parametrize(("kind", "in_chans"), [("jpeg", 3), ("tif", 4)])
def test_fit_on_rgb_jpeg_and_four_band_tiff_folders(tmp_path: Path, folders: dict[str, Path], kind: str,
                                                    in_chans: int) -> None:
    out = ok(lightning_ft("fit", *quick(tmp_path / "run", folders[kind], in_chans), cwd=tmp_path))
    assert "test accuracy: " in out
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == sorted(DIGIT_NAMES)
    assert ckpt["hyper_parameters"]["input_config"]["input_size"] == (in_chans, 32, 32)


def test_fit_predict_and_export_on_a_grayscale_png_folder(tmp_path: Path, folders: dict[str, Path]) -> None:
    run = tmp_path / "run"
    out = ok(lightning_ft("fit", *quick(run, folders["png"], 1), cwd=tmp_path))
    assert "test accuracy: " in out and f"checkpoints: {run / 'checkpoints'}" in out
    last = run / "checkpoints" / "last.ckpt"

    # predict new, unlabelled images (a flat folder of files) from `last`: the model is built from the config, so
    # its class names and input recipe come back from the checkpoint
    new = tmp_path / "new"
    new.mkdir()
    for i, path in enumerate(sorted((folders["png"] / "test").rglob("*.png"))[::3]):
        shutil.copy(path, new / f"img{i:02d}.png")
    out = ok(lightning_ft("predict", "--config", str(CONFIG), f"--data.root={folders['png']}", f"--data.predict={new}",
                          "--model.in_chans=1", "--model.backbone=test_efficientnet", "--model.pretrained=null", f"--trainer.default_root_dir={run}", "--ckpt_path=last",
                          "--predictions", str(tmp_path / "preds.csv"), "--top_k=3",
                          "--trainer.enable_progress_bar=false", cwd=tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    files = sorted(str(p) for p in new.iterdir())
    assert f"predictions: {len(files)} rows written to {tmp_path / 'preds.csv'}" in out
    assert [r["path"] for r in rows] == files
    assert list(rows[0]) == ["path", "prediction", "probability", "top2", "top2_probability", "top3", "top3_probability"]

    # the same images through the checkpoint in Python, the README's three lines
    model = FineTuneModule.load_from_checkpoint(last, weights_only=True).eval()
    with torch.no_grad():
        probs = model(torch.stack([model.transform()(p) for p in files])).softmax(-1)
    assert model.class_names == sorted(DIGIT_NAMES)
    top = probs.topk(3)
    for row, values, indices in zip(rows, top.values, top.indices):
        assert row["prediction"] == model.class_names[int(indices[0])]
        assert [row["top2"], row["top3"]] == [model.class_names[int(i)] for i in indices[1:]]
        for got, want in zip((row["probability"], row["top2_probability"], row["top3_probability"]), values):
            assert abs(float(got) - float(want)) < 2e-6

    # export, then reload each format and compare with the checkpoint
    out = ok(lightning_ft("export", "--ckpt_path", str(last), "--output", str(tmp_path / "export"), cwd=tmp_path))
    assert f"config: {tmp_path / 'export' / 'config.json'}" in out
    from lightning_ft.export import load_exported

    x = torch.stack([model.transform()(p) for p in files[:4]])
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(load_exported(tmp_path / "export")(x), expected, rtol=0, atol=0)
        scripted = torch.jit.load(str(tmp_path / "export" / "model.torchscript.pt"))
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    (logits,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_an_interrupted_run_resumes_from_last_and_ends_where_the_uninterrupted_one_does(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    """Ctrl-C (a real SIGINT) at the start of epoch 2, then ``--ckpt_path last``: the final weights equal an
    uninterrupted run's bitwise (the folder's shuffle is a function of seed and epoch)."""
    def args(root: Path) -> list[str]:
        return [*quick(root, folders["png"], 1), "--trainer.max_epochs=3", "--test_after_fit=false"]

    ok(lightning_ft("fit", *args(tmp_path / "straight"), cwd=tmp_path))
    broken = lightning_ft("fit", *args(tmp_path / "resumed"), "--trainer.callbacks+=tests.helpers.SigintAt",
                          "--trainer.callbacks.epoch=2", cwd=tmp_path)
    assert broken.returncode == 1 and "Detected KeyboardInterrupt" in broken.stderr, broken.stderr[-3000:]
    interrupted = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert interrupted["epoch"] == 1 and interrupted["global_step"] == 4  # two epochs of two steps

    ok(lightning_ft("fit", *args(tmp_path / "resumed"), "--ckpt_path=last", cwd=tmp_path))
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 6
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
