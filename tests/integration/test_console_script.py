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
