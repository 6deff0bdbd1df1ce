"""Batch-statistic adaptation losses under real 2-process CPU DDP equal the global-batch loss.

One SGD step with MMD + CORAL + mean alignment + MCC on 2 ranks must leave the weights that one
process gets by stepping on the two ranks' batches (as each rank recorded them) concatenated (the reference below, written
directly with torch). With gathering switched off, each rank computes the losses on its own half,
which gives other weights: the same comparison catches it.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_ft.losses import coral, mean_alignment, minimum_class_confusion, mmd
from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_adaptation.py"

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def reference_weights(r0: dict, r1: dict) -> dict[str, torch.Tensor]:
    """One process, one SGD step on the two ranks' batches concatenated (as the ranks recorded them)."""
    script = runpy.run_path(str(SCRIPT))  # the same module and constants (not run as __main__)
    model, weights = script["Model"](), script["LOSSES"]
    xs, ys, xt = (torch.tensor(r0["seen"][k] + r1["seen"][k]) for k in ("source", "source_labels", "target"))
    fs, ft = model.encoder(xs), model.encoder(xt)
    logits_s, logits_t = model.classifier(fs), model.classifier(ft)
    loss = (F.cross_entropy(logits_s, ys) + weights["mmd"] * mmd(fs, ft) + weights["coral"] * coral(fs, ft)
            + weights["mean"] * mean_alignment(fs, ft) + weights["mcc"] * minimum_class_confusion(logits_t))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= script["LR"] * p.grad
    return {k: v.detach() for k, v in model.state_dict().items()}


def _max_diff(record: dict, reference: dict[str, torch.Tensor]) -> float:
    diffs = [float((torch.tensor(record["params"][k]) - v).abs().max()) for k, v in reference.items()]
    return float("inf") if any(d != d for d in diffs) else max(diffs)  # a NaN anywhere is no match (max() skips it)


def test_gathered_losses_give_the_global_batch_step_on_every_rank(tmp_path):
    r0, r1 = run_ddp_script(SCRIPT, tmp_path, ["gather"])
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["params"] == r1["params"]  # the ranks agree bitwise
    assert r0["seen"]["source"] != r1["seen"]["source"]  # ...having trained on different samples
    reference = reference_weights(r0, r1)
    assert _max_diff(r0, reference) < 1e-5
    # gather_with_grad with unequal lengths: rank order, padding trimmed, own rows get world x upstream grad
    rows = [[2 * i, 2 * i + 1] for i in range(3)] + [[100 + 2 * i, 101 + 2 * i] for i in range(5)]
    assert r0["gathered"] == r1["gathered"] == [[float(v) for v in row] for row in rows]
    upstream = torch.arange(16, dtype=torch.float32).view(8, 2)
    assert torch.equal(torch.tensor(r0["gathered_grad"]), 2 * upstream[:3])
    assert torch.equal(torch.tensor(r1["gathered_grad"]), 2 * upstream[3:])


def test_per_rank_losses_are_not_the_global_batch_step(tmp_path):
    r0, r1 = run_ddp_script(SCRIPT, tmp_path, ["per_rank"])
    assert r0["params"] == r1["params"]  # DDP still keeps the ranks together...
    assert _max_diff(r0, reference_weights(r0, r1)) > 1e-3  # ...but on another quantity than the global batch's
