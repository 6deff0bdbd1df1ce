"""lightning_ft.analysis.plots: each plot writes a PNG of the expected size, NaN and missing entries
included; projections are deterministic and separate separable classes; pyplot state is untouched."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from lightning_ft.analysis.plots import (  # noqa: E402
    DPI,
    _merge_order,
    plot_confusion,
    plot_layer_change,
    plot_learning_curves,
    plot_projections,
    plot_reliability,
    project,
    strategy_colors,
)

NAN = float("nan")


def _png(path, figsize):
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(figsize[0] * DPI), round(figsize[1] * DPI))
        # not a blank canvas
        assert len(set(im.convert("L").getdata())) > 10


def _history(n=6, seed=0, phase=None):
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n):
        out.append({"epoch": e, "train/loss": 1 / (e + 1) + rng.normal(0, 0.01), "val/loss": 1.2 / (e + 1),
                    "train/acc": 0.5 + 0.07 * e, "val/acc": 0.45 + 0.06 * e + rng.normal(0, 0.01)})
    return out


def test_learning_curves_png_with_seeds_nan_and_missing_keys(tmp_path):
    one = _history()
    one[2]["val/acc"] = NAN
    del one[3]["train/loss"]
    seeds = [_history(seed=s) for s in range(3)]
    seeds[2] = seeds[2][:4]  # stopped early
    lightning_style = [{"epoch": e, "val_loss": 1 / (e + 1)} for e in range(5)]  # no acc at all
    path = plot_learning_curves({"linear probe": one, "gradual unfreezing": seeds, "plain": lightning_style},
                                tmp_path / "sub" / "curves.png", phase_marks={"gradual unfreezing": [[2, 4], [3]]},
                                figsize=(10, 4))
    assert path == tmp_path / "sub" / "curves.png"
    _png(path, (10, 4))
    # a panel for a metric nobody logged still renders (with a note)
    _png(plot_learning_curves({"a": one}, tmp_path / "f1.png", metrics=("f1",), figsize=(5, 4)), (5, 4))
    with pytest.raises(TypeError, match="per-epoch dicts"):
        plot_learning_curves({"a": [1, 2]}, tmp_path / "bad.png")


def test_confusion_png_with_an_empty_row(tmp_path):
    m = np.array([[50, 3, 2], [4, 40, 6], [0, 0, 0]])
    _png(plot_confusion(m, ["cat", "dog", "bird"], tmp_path / "cm.png", figsize=(6, 5)), (6, 5))
    with pytest.raises(ValueError, match="class names"):
        plot_confusion(m, ["cat", "dog"], tmp_path / "cm2.png")


def _bins(ece=None, seed=0):
    rng = np.random.default_rng(seed)
    conf = (np.arange(10) + 0.5) / 10
    count = rng.integers(0, 50, 10)
    count[:2] = 0
    acc = np.clip(conf - 0.1 + rng.normal(0, 0.05, 10), 0, 1)
    acc[count == 0] = NAN
    conf = conf.copy()
    conf[count == 0] = NAN
    d = {"confidence": conf, "accuracy": acc, "count": count}
    if ece is not None:
        d["ece"] = ece
    return d


def test_reliability_png_before_after_and_ece_from_bins(tmp_path):
    after = _bins(seed=1)  # no "ece": computed from the bins (reliability_bins gives none)
    after["temperature"] = 1.7
    after["edges"] = np.linspace(0, 1, 11)
    _png(plot_reliability(_bins(0.08), after, tmp_path / "rel.png", figsize=(10, 5)), (10, 5))
    _png(plot_reliability(_bins(0.08), None, tmp_path / "one.png", figsize=(5, 5)), (5, 5))
    with pytest.raises(KeyError, match="reliability_bins"):
        plot_reliability({"confidence": [0.5]}, None, tmp_path / "bad.png")


def test_reliability_accepts_calibration_reliability_bins(tmp_path):
    calibration = pytest.importorskip("lightning_ft.analysis.calibration")
    import torch

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(200, 4, generator=g) * 3, torch.randint(0, 4, (200,), generator=g)
    b = calibration.reliability_bins(logits.softmax(1), targets, 10)
    a = calibration.reliability_bins((logits / 3).softmax(1), targets, 10)
    _png(plot_reliability(b, a, tmp_path / "rel.png", figsize=(9, 5)), (9, 5))


def _blobs(n=150, c=3, d=16, seed=0, spread=8.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centers = rng.normal(0, spread, (c, d))
    return centers[y] + rng.normal(0, 1, (n, d)), y


def test_pca_separates_separable_blobs():
    x, y = _blobs()
    xy = project(x, "pca")
    assert xy.shape == (150, 2)
    centroids = np.stack([xy[y == k].mean(0) for k in range(3)])
    nearest = np.argmin(((xy[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() == 1.0
    # and a random projection of the same points does not (the check can fail)
    noise, _ = _blobs(spread=0.0)
    xy = project(noise, "pca")
    centroids = np.stack([xy[y == k].mean(0) for k in range(3)])
    nearest = np.argmin(((xy[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() < 0.8


def test_projections_deterministic_for_a_seed():
    x, _ = _blobs(n=90)
    np.testing.assert_array_equal(project(x, "pca"), project(x, "pca"))
    a = project(x, "tsne", seed=0, max_iter=250)
    np.testing.assert_array_equal(a, project(x, "tsne", seed=0, max_iter=250))
    assert a.shape == (90, 2) and np.isfinite(a).all()
    # (with init="pca" sklearn's t-SNE hardly depends on the seed: no check that seeds differ)
    with pytest.raises(ValueError, match="NaN"):
        project(np.full((5, 3), np.nan), "pca")
    with pytest.raises(ValueError, match="Unknown projection"):
        project(x, "umap")


def test_projections_png_subsampled_with_nan_rows(tmp_path):
    x, y = _blobs(n=200)
    tuned = x * 2
    tuned[3, 0] = np.nan
    path = plot_projections({"pretrained": x, "fine-tuned": tuned}, y, tmp_path / "proj.png",
                            class_names=["a", "b", "c"], max_points=120, figsize=(9, 8))
    _png(path, (9, 8))
    with pytest.raises(ValueError, match="same samples"):
        plot_projections({"a": x, "b": x[:10]}, y, tmp_path / "bad.png")


def test_layer_change_png_with_missing_groups(tmp_path):
    stats = {
        "full": {"cka": {"stem": 0.99, "block1": 0.9, "block2": 0.6},
                 "weight_change": {"stem": 0.01, "block1": 0.05, "block2": 0.2, "head": 1.3}},
        "gradual": {"cka": {"stem": 1.0, "block1": NAN, "block2": 0.8},
                    "weight_change": {"stem": 0.0, "block2": 0.1, "head": 1.1}},
        "probe": {"weight_change": {"head": 1.0}},
    }
    _png(plot_layer_change(stats, tmp_path / "layers.png", figsize=(9, 6)), (9, 6))
    _png(plot_layer_change(stats, tmp_path / "linear.png", log_weight_change=False, figsize=(9, 6)), (9, 6))
    assert _merge_order([["stem", "block2", "head"], ["stem", "block1", "block2"]]) == ["stem", "block1", "block2", "head"]


def test_colours_follow_order_and_overrides():
    cols = strategy_colors(["a", "b", "c"], {"b": "black"})
    assert cols == {"a": "C0", "b": "black", "c": "C1"}


def test_plots_leave_pyplot_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend() if "matplotlib.pyplot" in sys.modules else None
    plot_confusion(np.eye(2) * 5, None, tmp_path / "cm.png")
    if backend is None:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        assert matplotlib.get_backend() == backend
