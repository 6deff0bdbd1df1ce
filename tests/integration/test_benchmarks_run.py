"""Benchmarks are not tests, but each runs in its quick mode here so it cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script, *args, timeout=600):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_unfreezing_benchmark_quick():
    out = _run("unfreezing.py", "--quick")
    assert "ratio to ours" in out and "no-grad forward" in out
    assert "lightning_ft GradualUnfreezing" in out and "Lightning BackboneFinetuning" in out


@pytest.mark.slow
def test_recipes_benchmark_quick():
    out = _run("recipes.py", "--quick")
    for recipe in ("linear probe", "gradual unfreezing", "full fine-tuning", "full + LLRD"):
        assert f"| {recipe} |" in out


@pytest.mark.slow
def test_adaptation_benchmark_quick():
    out = _run("adaptation.py", "--quick")
    assert "| source only |" in out and "vs source only" in out
    assert "| val/label_free |" in out and "best epoch (oracle)" in out


def test_every_benchmark_has_a_quick_run():
    assert {p.name for p in (REPO / "benchmarks").glob("*.py")} <= {"unfreezing.py", "recipes.py", "adaptation.py"}
