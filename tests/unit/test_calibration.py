"""Calibration errors, reliability bins and temperature scaling (lightning_ft.analysis.calibration).

The calibration errors are compared with a numpy reference written here for equal-width bins (with
torchmetrics' bin of its own for a confidence of exactly 1.0, pinned down by a hand-computed case);
the temperature fit with a known temperature (logits ``true_logits * k`` whose labels are drawn from
``softmax(true_logits)``: the NLL-optimal ``T`` is ``k``, up to sampling noise).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ft.analysis.calibration import calibration_errors, fit_temperature, reliability_bins
from lightning_ft.batch import MISSING


def _reference(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> dict[str, float]:
    """ECE / RMS-CE / MCE of the top-1 confidence over bins [k/n, (k+1)/n), and [1, 1] apart (torchmetrics)."""
    conf = probs.max(1).astype(np.float64)
    correct = (probs.argmax(1) == targets).astype(np.float64)
    bins = np.minimum(np.floor(conf * n_bins).astype(int), n_bins)  # conf == 1.0 -> bin n_bins
    gaps, weights = [], []
    for b in range(n_bins + 1):
        inside = bins == b
        if inside.any():
            gaps.append(abs(correct[inside].mean() - conf[inside].mean()))
            weights.append(inside.mean())
    gaps_, weights_ = np.array(gaps), np.array(weights)
    return {"ece": float((weights_ * gaps_).sum()), "rms_ce": float(np.sqrt((weights_ * gaps_**2).sum())),
            "mce": float(gaps_.max())}


def _sampled(n: int = 4000, classes: int = 10, k: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``true * k`` and labels drawn from ``softmax(true)``: the best temperature is ``k``."""
    g = torch.Generator().manual_seed(seed)
    true = 2.0 * torch.randn(n, classes, generator=g)
    y = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    return true * k, y


@pytest.mark.parametrize("n_bins", [5, 15])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_calibration_errors_equal_a_numpy_reference_for_equal_width_bins(n_bins, scale):
    logits, y = _sampled(n=3000, k=scale, seed=1)
    probs = logits.softmax(1)
    expected = _reference(probs.numpy(), y.numpy(), n_bins)
    got = calibration_errors(logits, y, n_bins=n_bins)
    assert set(got) == {"ece", "rms_ce", "mce"} and all(isinstance(v, float) for v in got.values())
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert calibration_errors(probs, y, n_bins=n_bins, probs=True) == pytest.approx(got, rel=1e-6)
    assert got["ece"] <= got["rms_ce"] <= got["mce"]


def test_a_confidence_of_exactly_one_has_a_bin_of_its_own_as_in_torchmetrics():
    """Two underconfident right answers (0.6, 0.7) and a wrong one at exactly 1.0, two bins:
    torchmetrics' bins [0.5, 1) and [1, 1] give ECE 2/3 * 0.35 + 1/3 * 1; the reliability diagram
    draws all three in its last bin (accuracy 2/3, confidence 2.3/3)."""
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    got = calibration_errors(probs, y, n_bins=2, probs=True)
    assert got["ece"] == pytest.approx(2 / 3 * 0.35 + 1 / 3, abs=1e-6)
    assert got["mce"] == pytest.approx(1.0, abs=1e-6)
    assert got["rms_ce"] == pytest.approx(math.sqrt(2 / 3 * 0.35**2 + 1 / 3), abs=1e-6)
    assert got == pytest.approx(_reference(probs.numpy(), y.numpy(), 2), abs=1e-6)
    bins = reliability_bins(probs, y, n_bins=2)
    assert bins["count"].tolist() == [0, 3]
    assert np.isnan(bins["confidence"][0]) and np.isnan(bins["accuracy"][0])
    assert bins["confidence"][1] == pytest.approx(2.3 / 3, abs=1e-6)
    assert bins["accuracy"][1] == pytest.approx(2 / 3)


def test_reliability_bins_are_the_bins_of_the_ece():
    logits, y = _sampled(n=2000, k=2.5, seed=2)
    probs = logits.softmax(1)
    assert float(probs.max(1).values.max()) < 1.0  # no confidence of exactly 1.0: the same bins as the ECE
    bins = reliability_bins(probs, y, n_bins=10)
    assert bins["edges"] == pytest.approx(np.linspace(0, 1, 11))
    assert bins["count"].sum() == len(y) and bins["count"].dtype == np.int64
    conf, correct = probs.max(1).values.double().numpy(), (probs.argmax(1) == y).double().numpy()
    for k in range(10):
        inside = (conf >= k / 10) & (conf < (k + 1) / 10)
        assert bins["count"][k] == inside.sum()
        if inside.any():
            assert bins["confidence"][k] == pytest.approx(conf[inside].mean(), abs=1e-6)
            assert bins["accuracy"][k] == pytest.approx(correct[inside].mean())
    full = bins["count"] > 0
    ece = (bins["count"][full] * np.abs(bins["accuracy"][full] - bins["confidence"][full])).sum() / len(y)
    assert ece == pytest.approx(calibration_errors(logits, y, n_bins=10)["ece"], abs=1e-6)


def test_rows_marked_missing_are_left_out():
    logits, y = _sampled(n=600, k=2.0, seed=3)
    extra = torch.randn(50, 10) * 10
    more, more_y = torch.cat([logits, extra]), torch.cat([y, torch.full((50,), MISSING)])
    assert calibration_errors(more, more_y) == pytest.approx(calibration_errors(logits, y), rel=1e-6)
    assert fit_temperature(more, more_y) == pytest.approx(fit_temperature(logits, y), rel=1e-9)
    bins, bins_all = reliability_bins(more.softmax(1), more_y), reliability_bins(logits.softmax(1), y)
    assert bins["count"].tolist() == bins_all["count"].tolist()


@pytest.mark.parametrize("k", [0.5, 2.0, 3.0])
def test_fit_temperature_recovers_a_known_temperature(k):
    logits, y = _sampled(n=5000, k=k, seed=4)
    assert fit_temperature(logits, y) == pytest.approx(k, rel=0.05)


def test_fit_temperature_lowers_nll_and_ece_on_an_overconfident_set():
    logits, y = _sampled(n=3000, k=3.0, seed=5)
    t = fit_temperature(logits, y)
    assert t > 2.5
    assert F.cross_entropy(logits / t, y) < 0.9 * F.cross_entropy(logits, y)
    before, after = calibration_errors(logits, y)["ece"], calibration_errors(logits / t, y)["ece"]
    assert before > 0.15 and after < 0.3 * before
    # the optimum: a few per cent either side is worse
    for other in (0.95 * t, 1.05 * t):
        assert F.cross_entropy(logits.double() / t, y) < F.cross_entropy(logits.double() / other, y)


def test_fit_temperature_is_deterministic_and_the_same_in_float32_and_float64():
    logits, y = _sampled(n=2000, k=1.7, seed=6)
    first = fit_temperature(logits, y)
    assert fit_temperature(logits, y) == first
    assert fit_temperature(logits.double(), y) == pytest.approx(first, rel=1e-6)
    assert isinstance(first, float)


def test_fit_temperature_works_inside_inference_mode_and_no_grad():
    logits, y = _sampled(n=1000, k=2.0, seed=7)
    expected = fit_temperature(logits, y)
    with torch.inference_mode():
        inference_logits, inference_y = logits.clone(), y.clone()  # inference tensors, as in Lightning's validation
        assert inference_logits.is_inference()
        assert fit_temperature(inference_logits, inference_y) == expected
        assert calibration_errors(inference_logits, inference_y)["ece"] >= 0
    with torch.no_grad():
        assert fit_temperature(logits, y) == expected
    assert fit_temperature(logits.requires_grad_(), y) == expected  # a tensor with a graph: detached


def test_log_probabilities_give_the_temperature_of_their_logits():
    logits, y = _sampled(n=1000, k=2.0, seed=8)
    assert fit_temperature(logits.log_softmax(1), y) == pytest.approx(fit_temperature(logits, y), rel=1e-6)


def test_probabilities_are_refused_where_logits_are_expected():
    logits, y = _sampled(n=200, k=2.0, seed=9)
    probs = logits.softmax(1)
    with pytest.raises(ValueError, match=r"temperature_scaling#29"):
        fit_temperature(probs, y)
    with pytest.raises(ValueError, match="probs=True"):
        calibration_errors(probs, y)
    with pytest.raises(ValueError, match="not"):
        calibration_errors(logits, y, probs=True)
    with pytest.raises(ValueError, match="probabilities"):
        reliability_bins(logits, y)


@pytest.mark.parametrize("logits, targets, match", [
    (torch.randn(8), torch.zeros(8, dtype=torch.long), r"\(N, C\)"),
    (torch.randn(8, 1), torch.zeros(8, dtype=torch.long), r"C >= 2"),
    (torch.randint(0, 3, (8, 3)), torch.zeros(8, dtype=torch.long), "floating-point"),
    (torch.randn(8, 3), torch.zeros(8), "integer"),
    (torch.randn(8, 3), torch.zeros(8, 1, dtype=torch.long), "1-D"),
    (torch.randn(8, 3), torch.zeros(7, dtype=torch.long), "pair up"),
    (torch.randn(8, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]), r"target 3 is outside \[0, 2\]"),
    (torch.randn(8, 3), torch.tensor([0, 1, -1, 0, 0, 1, 2, 0]), r"target -1 is outside"),
    (torch.randn(4, 3), torch.full((4,), MISSING), "no labelled row"),
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), torch.tensor([0, 1]), "NaN"),
])
def test_bad_shapes_and_targets_are_refused_with_the_reason(logits, targets, match):
    for fn in (fit_temperature, calibration_errors):
        with pytest.raises(ValueError, match=match):
            fn(logits, targets)


def test_bad_arguments_are_refused():
    logits, y = _sampled(n=50)
    with pytest.raises(ValueError, match="n_bins"):
        calibration_errors(logits, y, n_bins=0)
    with pytest.raises(ValueError, match="max_iter"):
        fit_temperature(logits, y, max_iter=0)
    with pytest.raises(TypeError):
        fit_temperature([[0.0, 1.0]], [1])


def test_numpy_arrays_are_accepted():
    logits, y = _sampled(n=500, k=2.0, seed=10)
    assert fit_temperature(logits.numpy(), y.numpy()) == fit_temperature(logits, y)
    assert calibration_errors(logits.numpy(), y.numpy()) == calibration_errors(logits, y)


def test_a_set_predicted_all_right_sets_no_temperature_and_says_so():
    """Every row right: the NLL keeps falling as T -> 0; T = 1 (no scaling) and a warning why."""
    y = torch.arange(60) % 3
    logits = F.one_hot(y, 3).float() * 2.0
    with pytest.warns(UserWarning, match="all 60 labelled rows are predicted right"):
        assert fit_temperature(logits, y) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_temperature(*_sampled(n=500, k=2.0))  # no warning in the ordinary case


def test_uninformative_logits_stop_at_the_upper_bound_with_a_warning():
    """Logits that always point at a wrong class: the NLL keeps falling as T grows (towards uniform)."""
    y = torch.arange(60) % 3
    logits = F.one_hot((y + 1) % 3, 3).float() * 2.0
    with pytest.warns(UserWarning, match="bound 100"):
        assert fit_temperature(logits, y) == pytest.approx(100.0)
