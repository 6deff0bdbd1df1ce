"""Several tasks under 2-rank CPU DDP when one rank has no label of a task (see scripts/ddp_tasks.py):
no hang, the ranks stay identical, and both tasks are logged from the labels that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_tasks.py"

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_a_rank_without_labels_of_a_task_neither_hangs_nor_drifts(tmp_path):
    r0, r1 = run_ddp_script(SCRIPT, tmp_path, timeout=240)
    assert len(r0["epochs"]) == len(r1["epochs"]) == 2
    assert r0["epochs"] == r1["epochs"], "parameters differ between ranks"
    for record in (r0, r1):
        for key in ("val/a/loss", "val/b/loss", "val/a/acc", "val/b/acc", "val/loss", "val/acc", "train/b/weight"):
            assert key in record["metrics"], (key, sorted(record["metrics"]))
    # synced: the same epoch values on both ranks, from rank 0's b labels only
    for key in ("val/b/loss", "val/b/acc", "val/loss"):
        assert r0["metrics"][key] == pytest.approx(r1["metrics"][key], rel=1e-6), key
