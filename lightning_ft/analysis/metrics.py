"""Per-class metrics and the confusion matrix of a classifier's outputs (torchmetrics functional).

* :func:`per_class_metrics` -- precision, recall, F1, support and one-vs-rest AUROC for each class,
  one dict a class (a table row).
* :func:`confusion` -- the confusion matrix as a numpy array, rows = true class, columns = predicted.

Inputs are probabilities or logits ``(N, C)`` (rows that are not probabilities -- outside ``[0, 1]``
or not summing to 1 -- get a softmax here, so logits that happen to lie in ``[0, 1]`` are treated as
logits) and integer targets ``(N,)``, as torch tensors or numpy arrays.

Rows whose target is :data:`lightning_ft.batch.MISSING` (``-100``) are left out.

Undefined values are NaN, not 0: precision of a class never predicted, recall of a class absent
from the targets, F1 when both, AUROC of a class with no positives or no negatives (these are
``sklearn.metrics`` with ``zero_division=np.nan``).
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from lightning_ft.batch import MISSING

__all__ = ["confusion", "per_class_metrics"]


def _tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def _labelled(preds: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with a label (target != MISSING)."""
    if targets.ndim != 1:
        raise ValueError(f"targets must be class indices of shape (N,), got shape {tuple(targets.shape)}.")
    if preds.shape[0] != targets.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions for {targets.shape[0]} targets.")
    keep = targets != MISSING
    return preds[keep], targets[keep]


def _check(preds: torch.Tensor, targets: torch.Tensor, num_classes: int | None) -> int:
    if num_classes is None:
        if preds.ndim != 2:
            raise ValueError("Give num_classes= when the predictions are class indices (N,), "
                             "or pass probabilities/logits of shape (N, C).")
        num_classes = int(preds.shape[1])
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{int(targets.min())}, {int(targets.max())}].")
    return num_classes


def _are_probabilities(preds: torch.Tensor) -> bool:
    return bool(((preds >= 0) & (preds <= 1)).all()) and bool(torch.allclose(preds.sum(dim=1),
                                                                                torch.ones((), dtype=preds.dtype),
                                                                                atol=1e-4))


def per_class_metrics(probs_or_logits: Any, targets: Any, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Precision, recall, F1, support and one-vs-rest AUROC for each class.

    Args:
        probs_or_logits: ``(N, C)`` probabilities or logits.
        targets: ``(N,)`` integer class indices.
        class_names: ``C`` names (default: ``"0"``, ``"1"``, ...).

    Returns:
        One dict per class, in class order: ``{"class": name, "index": c, "precision", "recall",
        "f1", "auroc"`` (floats, NaN where undefined) ``, "support"`` (int: targets of class c)``}``.
    """
    preds = _tensor(probs_or_logits, torch.float64)
    target = _tensor(targets, torch.long)
    if preds.ndim != 2:
        raise ValueError(f"probs_or_logits must have shape (N, C), got {tuple(preds.shape)}.")
    preds, target = _labelled(preds, target)
    c = _check(preds, target, None)
    if preds.numel() and not _are_probabilities(preds):
        preds = preds.softmax(dim=1)  # AUROC ranks probabilities: torchmetrics would skip the softmax in [0, 1]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for {c} classes.")
    kw = dict(num_classes=c, average=None, validate_args=False)
    precision = multiclass_precision(preds, target, **kw)
    recall = multiclass_recall(preds, target, **kw)
    f1 = multiclass_f1_score(preds, target, **kw)
    support = torch.bincount(target, minlength=c)
    predicted = torch.bincount(preds.argmax(dim=1), minlength=c)
    n = target.numel()
    has_both = (support > 0) & (support < n)
    if bool(has_both.any()):
        with warnings.catch_warnings():  # "no positive samples": such classes get NaN below
            warnings.filterwarnings("ignore", message=".*(positive|negative) samples.*")
            auroc = multiclass_auroc(preds, target, num_classes=c, average=None, thresholds=None,
                                     validate_args=False)
    else:
        auroc = torch.zeros(c, dtype=torch.float64)
    nan = float("nan")
    rows = []
    for k in range(c):
        rows.append({
            "class": str(class_names[k]) if class_names is not None else str(k),
            "index": k,
            "precision": float(precision[k]) if predicted[k] > 0 else nan,
            "recall": float(recall[k]) if support[k] > 0 else nan,
            "f1": float(f1[k]) if (support[k] > 0 or predicted[k] > 0) else nan,
            "support": int(support[k]),
            "auroc": float(auroc[k]) if has_both[k] else nan,
        })
    return rows


def confusion(probs: Any, targets: Any, num_classes: int | None = None) -> np.ndarray:
    """Confusion matrix ``(C, C)`` of counts (int64): ``m[i, j]`` = samples of true class ``i`` predicted ``j``.

    ``probs``: ``(N, C)`` probabilities or logits (the argmax is the prediction), or ``(N,)`` predicted
    class indices (then ``num_classes`` is required). ``num_classes`` defaults to ``C``.
    """
    preds = _tensor(probs)
    target = _tensor(targets, torch.long)
    preds, target = _labelled(preds, target)
    c = _check(preds, target, num_classes)
    if preds.ndim == 2:
        if preds.shape[1] != c:
            raise ValueError(f"probs has {preds.shape[1]} columns for num_classes={c}.")
        preds = preds.argmax(dim=1)
    m = multiclass_confusion_matrix(preds.long(), target, num_classes=c, validate_args=False)
    return m.numpy().astype(np.int64)
