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


# script -> (quick-mode arguments, strings its output must hold)
BENCHMARKS = {
    "unfreezing.py": (["--quick"], ["ratio to ours", "no-grad forward", "lightning_ft GradualUnfreezing",
                                    "Lightning BackboneFinetuning"]),
    "recipes.py": (["--quick"], [f"| {r} |" for r in ("linear probe", "gradual unfreezing", "full fine-tuning",
                                                       "full + LLRD")]),
    "adaptation.py": (["--quick"], ["| source only |", "vs source only", "| val/label_free |", "best epoch (oracle)"]),
    "linear_probe.py": (["--quick", "--tools", "ours", "plain"], ["| 1x | ours |", "| 1x | plain |",
                                                                  "one no-grad forward pass", "hand-written PyTorch head loop", "Lightning floor"]),
    "overhead.py": (["--quick"], ["step-time ratio callbacks / plain"]),
    "prefix_cache.py": (["--quick"], ["| 0 | head |", "| 3 | head, blocks.6.0, blocks.5.3, blocks.5.0", "final weights"]),
    "memory.py": (["--quick"], ["1 process", "DDP, 2 CPU ranks", "| 0 |"]),  # "| 0 |": the head-only row
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", [pytest.param(name, marks=[pytest.mark.ddp] if name == "memory.py" else []) for name in BENCHMARKS]
)
def test_benchmark_quick_mode_runs(script):
    args, expected = BENCHMARKS[script]
    out = _run(script, *args)
    missing = [text for text in expected if text not in out]
    assert not missing, f"{script} output lacks {missing}:\n{out[-3000:]}"


def test_every_benchmark_has_a_quick_run():
    assert {p.name for p in (REPO / "benchmarks").glob("*.py")} <= set(BENCHMARKS), "add it to BENCHMARKS"
