"""Calibration of a classifier: calibration errors, reliability bins, temperature scaling.

torch, numpy and torchmetrics only (no Lightning): :class:`lightning_ft.callbacks.TemperatureScaling`
runs these on the validation logits of a run.

* :func:`calibration_errors`: ECE (L1), RMS calibration error (L2) and MCE (max) of the top-1
  confidence, computed by torchmetrics (``multiclass_calibration_error``, the functional form of
  ``MulticlassCalibrationError(norm="l1" | "l2" | "max")``) over **equal-width** confidence bins.
* :func:`reliability_bins`: the per-bin confidence, accuracy and count behind a reliability diagram.
* :func:`fit_temperature`: temperature scaling (Guo et al., *On Calibration of Modern Neural
  Networks*, ICML 2017): one scalar ``T > 0`` that minimises the negative log-likelihood of
  ``softmax(logits / T)`` on held-out data. It changes no prediction (argmax is invariant to a
  positive scale), only the confidences.

Rows whose target is :data:`lightning_ft.batch.MISSING` (``-100``) are left out everywhere.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_ft.batch import MISSING

__all__ = ["calibration_errors", "fit_temperature", "reliability_bins"]

# the range T is kept in: beyond it, the data say "as confident as possible" (every labelled row
# right: the NLL falls as T -> 0) or "know nothing", and neither is a useful temperature
T_MIN, T_MAX = 1e-2, 1e2


def _check_rows(scores: torch.Tensor, targets: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, targets)`` of the labelled rows, after checking shapes, dtypes and label range."""
    scores = torch.from_numpy(scores) if isinstance(scores, np.ndarray) else scores
    targets = torch.from_numpy(targets) if isinstance(targets, np.ndarray) else targets
    if not isinstance(scores, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{who} takes tensors, got {type(scores).__name__} and {type(targets).__name__}.")
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"{who} takes scores of shape (N, C) with C >= 2 classes, got shape {tuple(scores.shape)}. "
            "For a binary classifier with one logit z, pass torch.stack([-z / 2, z / 2], dim=1) (or [0, z])."
        )
    if not scores.is_floating_point():
        raise ValueError(f"{who} takes floating-point scores, got dtype {scores.dtype}.")
    if targets.ndim != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"{who} takes targets as a 1-D integer tensor of class indices, got dtype {targets.dtype} and shape "
            f"{tuple(targets.shape)}."
        )
    if len(targets) != len(scores):
        raise ValueError(f"{who}: {len(scores)} rows of scores but {len(targets)} targets; they must pair up.")
    targets = targets.to(scores.device)
    keep = targets != MISSING
    scores, targets = scores[keep], targets[keep]
    classes = scores.shape[1]
    bad = (targets < 0) | (targets >= classes)
    if bool(bad.any()):
        raise ValueError(
            f"{who}: target {int(targets[bad][0])} is outside [0, {classes - 1}] for scores of {classes} classes. "
            f"Mark a row without a label with {MISSING} (lightning_ft.batch.MISSING)."
        )
    if len(targets) == 0:
        raise ValueError(f"{who}: no labelled row (every target is {MISSING}, or there are no rows).")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{who}: the scores contain NaN or infinite values.")
    return scores, targets


def _looks_like_probabilities(scores: torch.Tensor) -> bool:
    """Every value in [0, 1] and every row summing to 1: softmax outputs, not logits."""
    s = scores.detach().double()
    return bool(((s >= 0) & (s <= 1)).all()) and bool(torch.allclose(s.sum(1), torch.ones_like(s[:, 0]), atol=1e-3))


def _probabilities(scores: torch.Tensor, probs: bool, who: str) -> torch.Tensor:
    if probs:
        s = scores.detach().double()
        if bool((s < 0).any()) or bool((s > 1).any()) or not torch.allclose(s.sum(1), torch.ones_like(s[:, 0]),
                                                                             atol=1e-3):
            raise ValueError(
                f"{who}(probs=True) takes probabilities (rows in [0, 1] summing to 1); these are not. Pass logits "
                "with probs=False (the default), or softmax them first."
            )
        return scores.detach().float()
    if _looks_like_probabilities(scores):
        raise ValueError(
            f"{who} takes logits by default, but these rows are in [0, 1] and sum to 1: probabilities. "
            "Pass probs=True (softmaxing probabilities again would flatten every confidence towards 1/C)."
        )
    return scores.detach().float().softmax(dim=1)


def calibration_errors(logits_or_probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15,
                       probs: bool = False) -> dict[str, float]:
    """Top-label calibration errors: ``{"ece": ..., "rms_ce": ..., "mce": ...}`` (python floats).

    The numbers are torchmetrics' ``MulticlassCalibrationError(n_bins=n_bins, norm=...)`` with
    ``norm="l1"`` (ECE: the count-weighted mean of ``|accuracy - confidence|`` over the bins),
    ``"l2"`` (RMS-CE: the square root of the count-weighted mean of its square) and ``"max"`` (MCE:
    the largest gap over the bins), of the top-1 confidence ``max softmax`` in float32.

    **Binning**: ``n_bins`` equal-width bins over [0, 1], bin ``k`` holding confidences in
    ``[k / n_bins, (k + 1) / n_bins)`` (torchmetrics' ``torch.bucketize(..., right=True)``). As in
    torchmetrics, a confidence of exactly 1.0 (common in float32 for an overconfident model) falls in
    an extra bin ``[1, 1]`` of its own; :func:`reliability_bins` draws it in the last bin instead.
    Not adaptive (equal-mass) binning.

    Args:
        logits_or_probs: ``(N, C)`` logits (default), or probabilities with ``probs=True``. Logits that
            look like probabilities (rows in [0, 1] summing to 1) are refused: pass ``probs=True``.
        targets: ``(N,)`` class indices; rows with :data:`MISSING` (``-100``) are left out.
        n_bins: number of equal-width confidence bins.
        probs: the first argument holds probabilities, not logits.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    scores, targets = _check_rows(logits_or_probs, targets, "calibration_errors")
    p = _probabilities(scores, probs, "calibration_errors")
    classes = p.shape[1]
    names = {"ece": "l1", "rms_ce": "l2", "mce": "max"}
    return {name: float(multiclass_calibration_error(p, targets, num_classes=classes, n_bins=n_bins, norm=norm))
            for name, norm in names.items()}


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count of the top-1 prediction, for a reliability diagram.

    Returns numpy arrays: ``edges`` ``(n_bins + 1,)`` (``0, 1/n, ..., 1``), and ``confidence``,
    ``accuracy`` (float64, NaN for an empty bin) and ``count`` (int64), each ``(n_bins,)``. Bin ``k``
    holds confidences in ``[k / n_bins, (k + 1) / n_bins)``, the last bin also 1.0 (torchmetrics'
    bins, except that torchmetrics counts a confidence of exactly 1.0 in a bin of its own: the ECE
    ``sum(count * |accuracy - confidence|) / sum(count)`` of these bins equals
    :func:`calibration_errors`' ``"ece"`` when no confidence is exactly 1.0, and is at most it
    otherwise).

    Args:
        probs: ``(N, C)`` probabilities (``logits.softmax(1)``).
        targets: ``(N,)`` class indices; rows with :data:`MISSING` are left out.
        n_bins: number of equal-width bins.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    scores, targets = _check_rows(probs, targets, "reliability_bins")
    p = _probabilities(scores, True, "reliability_bins")
    confidence, predicted = p.max(dim=1)
    # torchmetrics' assignment (float32 confidences and edges, bucketize right=True), 1.0 into the last bin
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, n_bins - 1).cpu().numpy()
    correct = (predicted == targets).cpu().numpy().astype(np.float64)
    conf = confidence.cpu().numpy().astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.bincount(index, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    mean_conf[count == 0] = np.nan
    accuracy[count == 0] = np.nan
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` that minimises the NLL of ``softmax(logits / T)`` (Guo et al., 2017).

    Fitted on **logits** (or log-probabilities, which differ from logits by a per-row constant and
    give the same fit), never on softmax outputs: dividing probabilities by ``T`` and softmaxing
    them again is not temperature scaling (gpleiss/temperature_scaling#29), so rows that look like
    probabilities are refused. The fit runs ``torch.optim.LBFGS`` (strong-Wolfe line search) over
    ``log T`` (so ``T > 0``) in float64 on the CPU, from ``T = 1``: deterministic, and callable inside
    ``torch.inference_mode()`` or ``torch.no_grad()`` (Lightning's validation and test), whose tensors
    it copies out of inference mode. ``T`` is kept in ``[0.01, 100]``, with a warning when it ends on
    a bound (the NLL is quasi-convex in ``T``, so the bound is the best ``T`` in that range). When
    every labelled row is predicted right the NLL falls without end as ``T -> 0`` and the data set no
    temperature: ``T = 1`` (no scaling) is returned, with a warning.

    Args:
        logits: ``(N, C)`` logits of held-out data (validation, never the data the model trained on).
        targets: ``(N,)`` class indices; rows with :data:`MISSING` (``-100``) are left out.
        max_iter: LBFGS iterations.

    Returns:
        ``T`` as a python float (``> 1``: the model was overconfident; ``< 1``: underconfident).
    """
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    scores, targets = _check_rows(logits, targets, "fit_temperature")
    if _looks_like_probabilities(scores):
        raise ValueError(
            "fit_temperature takes logits, but these rows are in [0, 1] and sum to 1: softmax outputs. Temperature "
            "scaling divides the logits (softmax(logits / T)); fitted on probabilities it fits something else "
            "(gpleiss/temperature_scaling#29). Pass the model's logits, or log-probabilities (probs.log())."
        )
    with torch.inference_mode(False), torch.enable_grad():
        # clones: tensors made under inference mode cannot be saved for backward
        z = scores.detach().to("cpu", torch.float64).clone()
        y = targets.detach().to("cpu", torch.long).clone()
        if bool((z.argmax(1) == y).all()):
            warnings.warn(
                f"fit_temperature: all {len(y)} labelled rows are predicted right, so the NLL keeps falling as T -> 0 "
                "and the data set no temperature; T=1 (no scaling) is returned. Fit on more, or harder, held-out data.",
                stacklevel=2)
            return 1.0
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-10, tolerance_change=1e-12)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z * torch.exp(-log_t), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        value = float(log_t.detach())
    temperature = math.exp(value) if math.isfinite(value) else T_MIN
    if not T_MIN < temperature < T_MAX:
        bounded = min(max(temperature, T_MIN), T_MAX)
        why = ("the NLL keeps falling as T -> 0: nearly every labelled row is predicted right" if bounded == T_MIN
               else "the NLL keeps falling as T grows: the logits carry almost no information about the targets")
        warnings.warn(f"fit_temperature: T stops at the bound {bounded:g} ({why}). Fit on more, or harder, held-out data.",
                      stacklevel=2)
        temperature = bounded
    if _nll(z, y, temperature) > _nll(z, y, 1.0) + 1e-12:  # never worse than no scaling
        temperature = 1.0
    return float(temperature)
