"""The installed ``lightning-ft`` console script, run as a subprocess the way shells, CI jobs and
sweep agents run it: its exit status and what it prints.

The script must exist next to the test interpreter (``scripts/setup.sh`` installs the package into
``.venv``); a missing script is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("lightning-ft")

pytestmark = pytest.mark.slow


def lightning_ft(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    assert EXE.is_file(), f"console script not installed next to {sys.executable}: run scripts/setup.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tiny(root: Path) -> list[str]:
    return [
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.init_args.limit=64", "--data.init_args.batch_size=16",
    ]


def test_successful_fit_exits_zero_and_prints_the_test_accuracy(tmp_path: Path) -> None:
    result = lightning_ft("fit", "--config", str(REPO / "configs" / "demo.yaml"), *tiny(tmp_path / "run"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit status {result.returncode}:\n{output[-3000:]}"
    assert "test accuracy: " in result.stdout
    acc = float(result.stdout.split("test accuracy:")[1].split()[0])
    assert 0.0 <= acc <= 1.0
    assert "FineTuneCLI object" not in output  # the entry point's return value is not printed
    assert list((tmp_path / "run").rglob("*.ckpt")), "no checkpoint written under the run root"


def test_landsat_bands_config_says_where_each_band_came_from(tmp_path: Path) -> None:
    """Multispectral data through the installed command: the band report is printed, the fit tests."""
    result = lightning_ft("fit", "--config", str(REPO / "configs" / "landsat_bands.yaml"), *tiny(tmp_path / "run"),
                          cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit status {result.returncode}:\n{output[-3000:]}"
    assert "the stem takes 4 bands (match, band_noise=0.5)" in output, output[-3000:]
    assert "green (550 nm) <- copied green (560 nm)" in output and "nir2 (950 nm) <- interpolated" in output
    assert "test accuracy: " in result.stdout


def test_unknown_config_key_exits_nonzero_with_the_key_named(tmp_path: Path) -> None:
    result = lightning_ft("fit", "--config", str(REPO / "configs" / "demo.yaml"), "--model.lerning_rate=0.1",
                          cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "unrecognized arguments: --model.lerning_rate=0.1" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_invalid_model_argument_exits_nonzero_with_the_message(tmp_path: Path) -> None:
    result = lightning_ft("fit", "--config", str(REPO / "configs" / "demo.yaml"), "--model.layer_decay=3",
                          cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: layer_decay must be in (0, 1], got 3.0"), result.stderr[-2000:]


def test_missing_config_file_exits_nonzero(tmp_path: Path) -> None:
    result = lightning_ft("fit", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "does not exist" in result.stderr


def test_help_lists_the_options(tmp_path: Path) -> None:
    result = lightning_ft("fit", "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--test_after_fit" in result.stdout
    assert "--model.layer_decay" in result.stdout


def test_da_config_reports_the_adabn_accuracy_of_the_label_free_checkpoint(tmp_path: Path) -> None:
    """configs/dann.yaml (DomainAdaptation + AdaptBatchNorm + ModelCheckpoint on val/label_free) through
    the console script: the printed test accuracy is that of the label-free checkpoint, whose BatchNorm
    statistics are AdaBN's on the target training inputs."""
    import torch

    from lightning_ft import FineTuneModule
    from lightning_ft.adabn import adapt_batchnorm
    from lightning_ft.data import DigitsDataModule, MNISTSubsetDataModule, SourceTargetDataModule

    root = tmp_path / "run"
    result = lightning_ft("fit", "--config", str(REPO / "configs" / "dann.yaml"), *tiny(root), cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    printed = float(result.stdout.split("test accuracy:")[1].split()[0])
    (best,) = [p for p in root.rglob("*.ckpt") if p.name != "last.ckpt"]  # one validation: one best checkpoint
    ckpt = torch.load(best, weights_only=True)
    assert any("label_free" in str(k) for k in ckpt["callbacks"])  # chosen by the label-free monitor
    train_stats = next(v for k, v in ckpt["callbacks"].items() if k.startswith("AdaptBatchNorm"))["train_stats"]

    model = FineTuneModule.load_from_checkpoint(best, weights_only=True).eval()
    cfg = model.data_config
    fixed = dict(image_size=cfg["input_size"][-1], channels=cfg["input_size"][0], mean=cfg["mean"], std=cfg["std"])
    dm = SourceTargetDataModule(MNISTSubsetDataModule(**fixed), DigitsDataModule(mnist_frame=True, **fixed),
                                batch_size=16, limit=64)
    dm.setup("fit")
    # the checkpoint's statistics are AdaBN's: recompute them from the training statistics it also keeps
    adapted = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    norms = dict(model.named_modules())
    for name, buffers in train_stats.items():
        if name in norms:
            norms[name].load_state_dict({**norms[name].state_dict(), **buffers})
    assert any(not torch.equal(adapted[k], model.state_dict()[k]) for k in adapted)  # they were other statistics
    target = [dm.target_train[i][0] for i in range(len(dm.target_train))]
    adapt_batchnorm(model, [torch.stack(target[i:i + 16]) for i in range(0, len(target), 16)])
    for k, v in adapted.items():
        assert torch.allclose(model.state_dict()[k], v, rtol=1e-4, atol=1e-5), k
    # and the printed accuracy is that model's on the target test split ("1" parses as 1.0: every test batch)
    x, y = (torch.stack(t) for t in zip(*[dm.target.test_set[i] for i in range(len(dm.target.test_set))]))
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert printed == pytest.approx(acc, abs=5e-5)
