"""Label-free scores of predictions: entropy and information maximisation (torch only).

One entropy for the whole package: the entropy-minimisation loss, the entropy weights of MCC and
CDAN+E, and the label-free validation monitors of :class:`lightning_ft.FineTuneModule`
(``val/target_entropy``, ``val/target_im``) all call :func:`entropy`.

Information maximisation (Krause et al., NIPS 2010; SHOT, Liang et al., ICML 2020) scores a set of
predictions high when each is confident (low mean entropy) *and* they are diverse (high entropy of
the mean prediction): ``IM = H(mean p) - mean H(p)``, here divided by ``log K`` so it lies in
``[-1, 1]``. It is computed from sums (:func:`prediction_sums`), so that under DDP the sums of all
ranks can be added before the score is formed: the marginal of IM is not a mean of per-rank scores.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["entropy", "information_maximization", "prediction_sums"]


def entropy(
    x: torch.Tensor,
    *,
    probs: bool = False,
    eps: float = 0.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Shannon entropy (nats) of the predictions in the rows of ``x`` (Grandvalet & Bengio, NIPS 2004).

    Args:
        x: logits (default), or probabilities with ``probs=True``; classes in the last dimension.
        probs: ``x`` holds probabilities, not logits.
        eps: probabilities only: ``-sum p log(p + eps)``, the form of the authors' released code for
            MCC and CDAN+E (``eps=1e-5``); ``0`` gives the exact entropy with ``0 log 0 = 0``.
        reduction: ``"mean"`` or ``"sum"`` over the rows, or ``"none"`` for one value per row.

    Computed in float32. From logits it goes through ``log_softmax`` (no ``log(0)``, exact gradients).

    Shape:
        x ``(..., C)`` -> scalar, or ``(...)`` with ``reduction="none"``
    """
    if probs:
        p = x.float()
        per_row = -(p * torch.log(p + eps)).sum(-1) if eps else torch.special.entr(p).sum(-1)
    else:
        logp = F.log_softmax(x.float(), dim=-1)
        per_row = -(logp.exp() * logp).sum(-1)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


def prediction_sums(probs: torch.Tensor) -> torch.Tensor:
    """``[sum of row entropies, sum of the probability rows (C values), row count]``: what
    :func:`information_maximization` needs, as one vector that can be summed across ranks.

    Shape:
        probs ``(N, C)`` -> ``(C + 2,)``
    """
    p = probs.float()
    return torch.cat([entropy(p, probs=True, reduction="sum").reshape(1), p.sum(0), p.new_tensor([float(len(p))])])


def information_maximization(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean entropy, IM / log C)`` from :func:`prediction_sums` (of one rank or added over ranks).

    Low mean entropy: confident. High IM: confident and diverse (all predictions one class scores
    ``-mean H(p) / log C <= 0``, however confident).

    Shape:
        sums ``(C + 2,)`` -> two scalars
    """
    count = sums[-1].clamp_min(1.0)
    mean_entropy = sums[0] / count
    marginal = sums[1:-1] / count
    classes = marginal.numel()
    diversity = entropy(marginal, probs=True, reduction="sum")
    return mean_entropy, (diversity - mean_entropy) / math.log(classes)
