"""Every script in examples/ runs (in its quick mode) and does what it says."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_drop_in_callbacks_example(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["drop_in_callbacks.py", "--quick"])
    namespace = runpy.run_path(str(EXAMPLES / "drop_in_callbacks.py"))
    result = namespace["main"](["--quick"])
    assert result["phase"] >= 1  # the plateau (patience 0) thawed groups of a module that is not ours
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--loss", "dann"], ["--loss", "none", "--adabn"]])
def test_domain_adaptation_example(args, capsys):
    namespace = runpy.run_path(str(EXAMPLES / "domain_adaptation.py"))
    result = namespace["main"](["--quick", *args])
    assert 0.0 <= result["test/acc"] <= 1.0
    out = capsys.readouterr().out
    assert "target test accuracy" in out
    # both the adapted run and the source-only baseline log the label-free and target monitors per epoch
    assert result["history"] and {"val/acc", "val/label_free", "val_target/acc"} <= set(result["history"][0])
    if "--adabn" in args:  # both numbers, from the same checkpoint
        assert 0.0 <= result["test/acc_adabn"] <= 1.0 and "+ AdaBN: target test accuracy" in out


def test_every_example_has_a_test():
    tested = {"drop_in_callbacks.py", "domain_adaptation.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested, "add a test for the new example"
