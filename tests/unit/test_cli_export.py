"""``lightning-ft export``'s command line (the export itself is tested in tests/integration/test_export.py and,
through the installed command, in test_folder_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_ft.cli import main


def test_a_missing_checkpoint_exits_2_and_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert exit_info.value.code == 2
    assert f"--ckpt_path {tmp_path / 'nope.ckpt'}: no such file" in capsys.readouterr().err


def test_an_unknown_format_exits_2_listing_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(tmp_path / "m.ckpt"), "--formats", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
