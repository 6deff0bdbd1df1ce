"""lightning_ft.analysis.stats and .metrics against independent references (scipy, sklearn, hand values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as st
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from lightning_ft.analysis.metrics import confusion, per_class_metrics
from lightning_ft.analysis.stats import Summary, bootstrap_interval, iqm, paired_differences, summarize


def test_t_interval_matches_scipy_and_hand_value():
    values = [0.912, 0.925, 0.901, 0.918, 0.909]
    s = summarize(values)
    low, high = st.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=st.sem(values))
    assert s.n == 5 and s.dropped == 0
    assert s.mean == pytest.approx(np.mean(values))
    assert s.std == pytest.approx(np.std(values, ddof=1))
    assert (s.low, s.high) == (pytest.approx(low), pytest.approx(high))
    # by hand: [1, 2, 3] -> mean 2, s = 1, t_{0.975, 2} = 4.302653 -> 2 -+ 4.302653 / sqrt(3)
    h = summarize([1.0, 2.0, 3.0])
    assert h.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert "±" in h.format()


def test_summary_one_value_none_and_nan():
    one = summarize([0.9])
    assert one.mean == 0.9 and one.n == 1
    assert math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.std)
    assert "n/a" in one.format()
    empty = summarize([])
    assert empty.n == 0 and math.isnan(empty.mean) and "n/a" in str(empty)
    with_nan = summarize([0.9, float("nan"), 0.92, 0.91])
    assert with_nan.n == 3 and with_nan.dropped == 1
    assert with_nan.mean == pytest.approx(0.91)
    same = summarize(torch.tensor([0.5, 0.5, 0.5]))
    assert (same.low, same.high) == (0.5, 0.5)
    assert isinstance(same, Summary)


def test_bootstrap_deterministic_and_covers_the_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(0.8, 0.05, 40)
    a = bootstrap_interval(values, n_boot=2000, seed=3)
    b = bootstrap_interval(values, n_boot=2000, seed=3)
    c = bootstrap_interval(values, n_boot=2000, seed=4)
    assert a == b and a != c
    assert a[0] < values.mean() < a[1]
    # the percentile bootstrap of the mean is close to the t interval for 40 normal values
    t = summarize(values)
    assert a[0] == pytest.approx(t.low, abs=0.01) and a[1] == pytest.approx(t.high, abs=0.01)
    # a statistic without axis= runs once per resample, with the same resamples
    loop = bootstrap_interval(values, n_boot=500, seed=3, statistic=lambda x: float(np.median(x)))
    vec = bootstrap_interval(values, n_boot=500, seed=3, statistic=np.median)
    assert loop == pytest.approx(vec)
    assert all(math.isnan(x) for x in bootstrap_interval([1.0]))


def test_iqm_is_trimmed_mean():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0]  # 2 cut from each end -> mean of 3..6
    assert iqm(values) == pytest.approx(4.5)
    assert iqm([1.0, 2.0, 9.0]) == pytest.approx(4.0)  # fewer than 4 values: the mean
    assert iqm([1.0, float("nan"), 2.0, 3.0, 4.0]) == pytest.approx(2.5)
    low, high = bootstrap_interval(values, n_boot=500, statistic=iqm)
    assert low <= iqm(values) <= high


def test_paired_differences_with_a_missing_seed():
    a = {0: 0.91, 1: 0.93, 2: 0.90, 3: 0.95}
    b = {0: 0.89, 1: 0.92, 3: float("nan"), 4: 0.90}
    d = paired_differences(a, b)
    assert d.keys == [0, 1] and d.differences == pytest.approx([0.02, 0.01])
    assert d.only_a == [2, 3] and d.only_b == [4] and d.excluded == 3
    ref = st.t.interval(0.95, 1, loc=0.015, scale=st.sem([0.02, 0.01]))
    assert d.mean == pytest.approx(0.015) and (d.low, d.high) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert "3 unpaired" in d.format()
    # sequences aligned with keys
    s = paired_differences([1.0, 2.0, 3.0], [0.5, float("nan"), 2.0], keys=[10, 11, 12])
    assert s.keys == [10, 12] and s.differences == [0.5, 1.0] and s.only_a == [11]
    with pytest.raises(TypeError, match="keys="):
        paired_differences([1.0], [2.0])


def _random_outputs(n=300, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), targets] += 1.0
    return logits, targets


@pytest.mark.parametrize("as_probs", [False, True])
def test_per_class_metrics_match_sklearn(as_probs):
    logits, targets = _random_outputs()
    scores = logits.softmax(1) if as_probs else logits
    rows = per_class_metrics(scores, targets, class_names=list("abcde"))
    y, pred = targets.numpy(), logits.argmax(1).numpy()
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=range(5), zero_division=np.nan)
    probs = logits.softmax(1).numpy()
    assert [row["class"] for row in rows] == list("abcde")
    for k, row in enumerate(rows):
        assert row["index"] == k and row["support"] == support[k]
        assert row["precision"] == pytest.approx(p[k]) and row["recall"] == pytest.approx(r[k])
        assert row["f1"] == pytest.approx(f[k])
        assert row["auroc"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))


def test_per_class_metrics_undefined_are_nan_and_missing_rows_left_out():
    logits, targets = _random_outputs(n=60, c=4, seed=2)
    logits[:, 3] = -10  # class 3 never predicted
    targets[targets == 3] = 0  # and absent
    targets[:5] = -100  # unlabelled rows (lightning_ft.batch.MISSING)
    rows = per_class_metrics(logits.numpy(), targets.numpy())
    last = rows[3]
    assert last["support"] == 0 and all(math.isnan(last[k]) for k in ("precision", "recall", "f1", "auroc"))
    keep = targets != -100
    y, pred = targets[keep].numpy(), logits[keep].argmax(1).numpy()
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=np.nan)
    for k in range(3):
        assert rows[k]["support"] == support[k] and rows[k]["recall"] == pytest.approx(r[k])


def test_confusion_matches_sklearn():
    logits, targets = _random_outputs(n=200, c=6, seed=5)
    m = confusion(logits, targets)
    ref = confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=range(6))
    assert m.dtype == np.int64 and m.shape == (6, 6)
    np.testing.assert_array_equal(m, ref)
    np.testing.assert_array_equal(confusion(logits.argmax(1).numpy(), targets.numpy(), num_classes=6), ref)
    with pytest.raises(ValueError, match="num_classes"):
        confusion(logits.argmax(1), targets)


def test_per_class_auroc_of_logits_in_the_unit_interval_is_that_of_their_softmax():
    """Logits that happen to lie in [0, 1] are logits: the same ranking as their softmax and as shifted logits
    (torchmetrics alone would rank the raw values)."""
    import torch

    from lightning_ft.analysis.metrics import per_class_metrics

    g = torch.Generator().manual_seed(0)
    z = torch.rand(200, 3, generator=g) * 0.9
    y = torch.randint(0, 3, (200,), generator=g)
    auroc = [r["auroc"] for r in per_class_metrics(z, y)]
    assert auroc == [r["auroc"] for r in per_class_metrics(z.softmax(1), y)]
    assert auroc == [r["auroc"] for r in per_class_metrics(z + 5, y)]
