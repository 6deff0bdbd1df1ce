"""Self-training losses on unlabelled target predictions: entropy, MCC, confidence-thresholded pseudo-labels.

Each is a pure function plus a thin ``nn.Module``; all compute in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ft.losses.label_free import entropy

__all__ = [
    "EntropyLoss",
    "MCCLoss",
    "PseudoLabelLoss",
    "minimum_class_confusion",
    "pseudo_label_loss",
]


def minimum_class_confusion(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum Class Confusion (Jin et al., ECCV 2020).

    Probabilities ``p = softmax(logits / T)``; examples are weighted by ``w = N * s / sum(s)`` with
    ``s = 1 + exp(-H(p))`` (certain examples count more); the class confusion ``C = p^T diag(w) p``
    is row-normalised and the loss is the mean off-diagonal mass, ``(sum(C) - trace(C)) / K``.
    The weights are constants for the gradient (computed from detached probabilities), as in the
    authors' released code (thuml/Versatile-Domain-Adaptation), pytorch-adapt's ``MCCLoss`` and
    tllib: the gradient reaches the logits through the confusion matrix only.

    Shape:
        logits ``(N, K)`` -> scalar
    """
    n, k = logits.shape
    p = F.softmax(logits.float() / temperature, dim=-1)
    q = p.detach()
    h = entropy(q, probs=True, eps=1e-5, reduction="none")
    s = 1.0 + torch.exp(-h)
    w = (n * s / s.sum()).unsqueeze(1)
    confusion = (p * w).t() @ p
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / k


def pseudo_label_loss(
    logits: torch.Tensor,
    threshold: float = 0.9,
    teacher_logits: torch.Tensor | None = None,
    class_balance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on confident pseudo-labels (Lee, ICML-W 2013; FixMatch-style threshold).

    Pseudo-labels are the argmax of ``teacher_logits`` (detached; default: ``logits`` itself);
    only examples whose confidence reaches ``threshold`` count. ``class_balance`` weights each
    kept example by the inverse frequency of its pseudo-class in the batch, so one dominant class
    cannot take over. Returns ``(loss, mask)``; the loss is the sum over kept examples divided by N.

    Shape:
        logits ``(N, C)`` -> scalar, mask ``(N,)``
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
    teacher = (logits if teacher_logits is None else teacher_logits).detach().float()
    conf, labels = F.softmax(teacher, dim=-1).max(dim=-1)
    mask = conf >= threshold
    per_example = F.cross_entropy(logits.float(), labels, reduction="none")
    weight = mask.float()
    if class_balance and mask.any():
        counts = torch.bincount(labels[mask], minlength=logits.shape[1]).float()
        inverse = counts.sum() / (counts.clamp_min(1.0) * (counts > 0).sum())
        weight = weight * inverse[labels]
    return (per_example * weight).sum() / len(logits), mask


class EntropyLoss(nn.Module):
    """Target prediction entropy; see :func:`entropy`."""

    needs = ("target_logits",)

    def forward(self, target_logits: torch.Tensor) -> torch.Tensor:
        return entropy(target_logits)


class MCCLoss(nn.Module):
    """Minimum class confusion on target predictions; see :func:`minimum_class_confusion`."""

    needs = ("target_logits",)
    batch_statistic = True  # under DDP: computed on the batch gathered from all ranks

    def __init__(self, temperature: float = 2.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, target_logits: torch.Tensor) -> torch.Tensor:
        return minimum_class_confusion(target_logits, self.temperature)


class PseudoLabelLoss(nn.Module):
    """Confidence-thresholded pseudo-label cross-entropy on target predictions; see :func:`pseudo_label_loss`."""

    needs = ("target_logits",)

    def __init__(self, threshold: float = 0.9, class_balance: bool = False) -> None:
        super().__init__()
        self.threshold = threshold
        self.class_balance = class_balance
        self.last_mask_rate = torch.zeros(())

    @property
    def batch_statistic(self) -> bool:  # class frequencies are batch statistics; the plain loss is a mean
        return self.class_balance

    def forward(self, target_logits: torch.Tensor) -> torch.Tensor:
        loss, mask = pseudo_label_loss(target_logits, self.threshold, class_balance=self.class_balance)
        self.last_mask_rate = mask.float().mean().detach()  # no device sync here
        return loss
