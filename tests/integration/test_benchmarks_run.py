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


@pytest.mark.slow
def test_linear_probe_benchmark_quick():
    out = _run("linear_probe.py", "--quick", "--tools", "ours", "plain")
    assert "| 1x | ours |" in out and "| 1x | plain |" in out and "one no-grad forward pass" in out


@pytest.mark.slow
def test_overhead_benchmark_quick():
    out = _run("overhead.py", "--quick")
    assert "step-time ratio callbacks / plain" in out


@pytest.mark.slow
@pytest.mark.ddp
def test_memory_benchmark_quick():
    out = _run("memory.py", "--quick")
    assert "1 process" in out and "DDP, 2 CPU ranks" in out
    assert "| 0 |" in out  # the head-only row


def test_every_benchmark_has_a_quick_run():
    assert {p.name for p in (REPO / "benchmarks").glob("*.py")} <= {
        "unfreezing.py", "recipes.py", "adaptation.py", "linear_probe.py", "overhead.py", "memory.py"}
