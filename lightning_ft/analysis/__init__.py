"""Why one fine-tuning run differs from another: which layers moved, how calibrated it is, what it confuses.

* :mod:`~lightning_ft.analysis.cka`: linear CKA (debiased HSIC, float64 accumulators over the whole set);
* :mod:`~lightning_ft.analysis.layers`: per layer group, CKA between two models' activations and the
  relative weight change ``||W - W0|| / ||W0||``;
* :mod:`~lightning_ft.analysis.calibration`: ECE / RMS-CE / MCE, reliability bins, temperature scaling;
* :mod:`~lightning_ft.analysis.metrics`: per-class precision, recall, F1, AUROC and the confusion matrix;
* :mod:`~lightning_ft.analysis.stats`: mean and 95% interval over seeds, paired differences, IQM, bootstrap;
* :mod:`~lightning_ft.analysis.plots`: PNGs of all of it (matplotlib, ``pip install 'lightning_ft[analysis]'``).

A leaf package: torch, numpy, torchmetrics, scipy/scikit-learn and (lazily) matplotlib; no Lightning.
``lightning-ft compare`` (:mod:`lightning_ft.compare`) puts them together into a report.
"""

from lightning_ft.analysis.calibration import calibration_errors, fit_temperature, reliability_bins
from lightning_ft.analysis.cka import LinearCKA, linear_cka
from lightning_ft.analysis.layers import group_activations, group_modules, layer_cka, snapshot, weight_change
from lightning_ft.analysis.metrics import confusion, per_class_metrics
from lightning_ft.analysis.plots import (
    plot_confusion,
    plot_layer_change,
    plot_learning_curves,
    plot_projections,
    plot_reliability,
    project,
    strategy_colors,
)
from lightning_ft.analysis.stats import (
    PairedDifferences,
    Summary,
    bootstrap_interval,
    iqm,
    paired_differences,
    summarize,
    t_interval,
)

__all__ = [
    "LinearCKA",
    "PairedDifferences",
    "Summary",
    "bootstrap_interval",
    "calibration_errors",
    "confusion",
    "fit_temperature",
    "group_activations",
    "group_modules",
    "iqm",
    "layer_cka",
    "linear_cka",
    "paired_differences",
    "per_class_metrics",
    "plot_confusion",
    "plot_layer_change",
    "plot_learning_curves",
    "plot_projections",
    "plot_reliability",
    "project",
    "reliability_bins",
    "snapshot",
    "strategy_colors",
    "summarize",
    "t_interval",
    "weight_change",
]
