"""BatchNorm re-estimation under 2-rank CPU DDP: GradualUnfreezing(frozen_bn="recalibrate") and
AdaptBatchNorm leave both ranks with the same statistics, those of the whole data (each rank reads
its share, ``rank::2`` in order; the average over the ranks is the average over all batches),
computed here in numpy."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_reestimate.py"

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def whole_data_statistics(x: np.ndarray, w: np.ndarray, b: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    a = x @ w.T + b
    batches = [a[r::2][i:i + batch] for r in (0, 1) for i in range(0, len(a[r::2]), batch)]
    return np.mean([t.mean(0) for t in batches], 0), np.mean([t.var(0, ddof=1) for t in batches], 0)


def test_ranks_hold_the_whole_datas_statistics(tmp_path):
    threads = torch.get_num_threads()
    try:
        script = runpy.run_path(str(SCRIPT))
    finally:
        torch.set_num_threads(threads)
    r0, r1 = run_ddp_script(SCRIPT, tmp_path)
    train, target, _ = script["datasets"]()
    net = script["Net"]()  # the initial weights (seeded): the recalibration runs before any step
    w0, b0 = net.body[0].weight.detach().double().numpy(), net.body[0].bias.detach().double().numpy()

    # frozen_bn="recalibrate": before the first step, on the training inputs
    assert r0["first_step"] == r1["first_step"]
    mean, var = whole_data_statistics(train.tensors[0].double().numpy(), w0, b0, script["BATCH"])
    assert np.allclose(r0["first_step"]["mean"], mean, atol=1e-5) and np.allclose(r0["first_step"]["var"], var, rtol=1e-4)
    assert r0["first_step"]["training"] is False  # frozen: eval mode
    a = train.tensors[0].double().numpy()[0::2] @ w0.T + b0  # rank 0's share alone gives other statistics
    rank0_only = np.mean([a[i:i + script["BATCH"]].mean(0) for i in range(0, len(a), script["BATCH"])], 0)
    assert not np.allclose(mean, rank0_only, atol=1e-3)

    # AdaptBatchNorm: before each validation, on the target inputs, with the weights of that moment
    assert len(r0["validations"]) == len(r1["validations"]) == 2
    for v0, v1 in zip(r0["validations"], r1["validations"]):
        assert v0 == v1
        mean, var = whole_data_statistics(target.tensors[0].double().numpy(), np.array(v0["w"]), np.array(v0["b"]),
                                          script["BATCH"])
        assert np.allclose(v0["mean"], mean, atol=1e-5) and np.allclose(v0["var"], var, rtol=1e-4)
