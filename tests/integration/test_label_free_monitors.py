"""The label-free validation monitors equal their definitions, computed here from the target probabilities.

``FineTuneModule`` logs, when a second (target) validation loader is present:

* ``val/target_entropy``: mean over target samples of the prediction entropy ``-sum_c p log p``;
* ``val/target_im``: information maximisation ``(H(mean_i p_i) - mean_i H(p_i)) / log C``;
* ``val/label_free``: source ``val/acc`` + ``val/target_im``.

The references below are numpy (float64) on the softmax of the fitted model over the whole target
validation split. The target labels must not matter: permuting them changes ``val_target/acc`` and
nothing label-free. Under DDP the monitors must be those of the whole target split, not a mean of
per-rank scores.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import fast_trainer
from tests.helpers import run_ddp_script

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_label_free.py"
LABEL_FREE = ("val/target_entropy", "val/target_im", "val/label_free")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _script() -> dict:
    """The DDP script's data and model (not run as __main__); it sets torch threads to 1: restore them."""
    threads = torch.get_num_threads()
    try:
        return runpy.run_path(str(SCRIPT))
    finally:
        torch.set_num_threads(threads)


def reference(probs: np.ndarray, source_acc: float) -> dict[str, float]:
    """The three monitors from target probabilities ``(N, C)``, in float64."""
    probs = probs.astype(np.float64)
    entropy = float(np.mean(-np.sum(probs * np.log(probs), axis=1)))
    marginal = probs.mean(axis=0)
    diversity = float(-np.sum(marginal * np.log(marginal)))
    im = (diversity - entropy) / np.log(probs.shape[1])
    return {"val/target_entropy": entropy, "val/target_im": im, "val/label_free": source_acc + im}


@torch.no_grad()
def _probs_and_acc(model, target_x, source_x, source_y) -> tuple[np.ndarray, float]:
    model.eval()
    probs = model(target_x).double().softmax(-1).numpy()
    acc = float((model(source_x).argmax(-1) == source_y).double().mean())
    return probs, acc


def _values(metrics) -> dict[str, float]:
    return {k: float(metrics[k]) for k in (*LABEL_FREE, "val/acc", "val_target/acc")}


def test_label_free_monitors_equal_their_definition_and_ignore_target_labels():
    script = _script()
    data = script["make_data"]()
    model = script["make_model"]()
    (xs, ys), (xt, yt) = data["val"], data["target_val"]
    loader = lambda x, y: DataLoader(TensorDataset(x, y), batch_size=4)  # noqa: E731
    trainer = fast_trainer(max_epochs=2)
    trainer.fit(model, loader(*data["train"]), [loader(xs, ys), loader(xt, yt)])
    logged = _values(trainer.callback_metrics)

    probs, source_acc = _probs_and_acc(model, xt, xs, ys)
    expected = reference(probs, source_acc)
    # the check is only worth something if the scores are far from their trivial values
    assert 0.1 < expected["val/target_im"] < 0.9 and expected["val/target_entropy"] < 0.8 * np.log(3)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert logged["val/acc"] == pytest.approx(source_acc)

    # the same weights validated against permuted target labels: only the labelled target metric moves
    permuted = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))]
    assert (permuted != yt).any()
    trainer.validate(model, [loader(xs, ys), loader(xt, permuted)], verbose=False)
    relabelled = _values(trainer.callback_metrics)
    assert relabelled["val_target/acc"] != pytest.approx(logged["val_target/acc"], abs=0.05)
    for key in (*LABEL_FREE, "val/acc"):
        assert relabelled[key] == pytest.approx(logged[key], rel=1e-6, abs=1e-7), key
    # and the target labels alone: the monitors did not read them
    assert relabelled["val_target/acc"] == pytest.approx(float((probs.argmax(1) == permuted.numpy()).mean()))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-rank fit (both DDP tests read it): what each rank logged, the whole-split reference, source accuracy."""
    r0, r1 = run_ddp_script(SCRIPT, tmp_path_factory.mktemp("ddp_label_free"))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["state"] == r1["state"]  # one model
    script = _script()
    model = script["make_model"]()
    model.load_state_dict({k: torch.tensor(v) for k, v in r0["state"].items()}, strict=False)
    data = script["make_data"]()
    (xs, ys), (xt, _) = data["val"], data["target_val"]
    # the ranks validated disjoint halves that together are the whole target split
    assert len(r0["seen_target"]) == len(r1["seen_target"]) == len(xt) // 2
    assert sorted(map(tuple, r0["seen_target"] + r1["seen_target"])) == sorted(map(tuple, xt.tolist()))
    probs, source_acc = _probs_and_acc(model, xt, xs, ys)
    return (r0["metrics"], r1["metrics"]), reference(probs, source_acc), source_acc


@pytest.mark.slow
@pytest.mark.ddp
def test_label_free_entropy_under_ddp_is_the_whole_target_splits(ddp_run):
    ranks, expected, source_acc = ddp_run
    for logged in ranks:
        assert logged["val/acc"] == pytest.approx(source_acc)  # torchmetrics syncs the source accuracy
        assert logged["val/target_entropy"] == pytest.approx(expected["val/target_entropy"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.ddp
def test_information_maximisation_under_ddp_is_the_whole_target_splits(ddp_run):
    ranks, expected, _ = ddp_run
    for logged in ranks:
        for key in ("val/target_im", "val/label_free"):
            assert logged[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
