"""Adversarial domain adaptation: gradient reversal, a domain discriminator, DANN.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015; Ganin et al.,
"Domain-Adversarial Training of Neural Networks", JMLR 2016.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DANNLoss",
    "DomainDiscriminator",
    "GradientReversal",
    "dann_loss",
    "grl_coefficient",
    "reverse_gradient",
]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:  # noqa: ANN001
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return -ctx.coeff * grad, None


def reverse_gradient(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-coeff`` backward.

    Shape:
        any -> same
    """
    return _ReverseGradient.apply(x, float(coeff))


def grl_coefficient(progress: float, gamma: float = 10.0, high: float = 1.0) -> float:
    """DANN's schedule: ``high * (2 / (1 + exp(-gamma * p)) - 1)`` for training progress ``p`` in [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return high * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class GradientReversal(nn.Module):
    """Gradient reversal layer with a settable coefficient (``self.coeff``)."""

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__()
        self.coeff = coeff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(x, self.coeff)


class DomainDiscriminator(nn.Module):
    """MLP that predicts the domain of a feature vector (one logit: target = 1).

    Shape:
        features ``(N, in_features)`` -> logits ``(N,)``
    """

    def __init__(self, in_features: int, hidden_dim: int = 256, num_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def dann_loss(
    source: torch.Tensor, target: torch.Tensor, discriminator: nn.Module, coeff: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain-adversarial loss: binary cross-entropy of ``discriminator`` on reversed features.

    Minimising it trains the discriminator to tell the domains apart while, through the reversal
    layer, the feature extractor learns to confuse it. Returns ``(loss, discriminator accuracy)``.

    Shape:
        source ``(N, D)``, target ``(M, D)`` -> scalar, scalar
    """
    feats = reverse_gradient(torch.cat([source, target]).float(), coeff)
    labels = torch.cat([source.new_zeros(len(source)), target.new_ones(len(target))]).float()
    logits = discriminator(feats).float()
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    accuracy = ((logits > 0).float() == labels).float().mean().detach()
    return loss, accuracy


class DANNLoss(nn.Module):
    """DANN: a domain discriminator behind a gradient reversal layer; see :func:`dann_loss`.

    ``coeff`` (the reversal strength) is set by the caller each step, e.g. from
    :func:`grl_coefficient` of the training progress.
    """

    needs = ("source_features", "target_features")

    def __init__(self, in_features: int, discriminator: nn.Module | None = None, hidden_dim: int = 256) -> None:
        super().__init__()
        self.discriminator = discriminator if discriminator is not None else DomainDiscriminator(in_features, hidden_dim)
        self.coeff = 1.0
        self.last_accuracy = torch.zeros(())

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, accuracy = dann_loss(source, target, self.discriminator, self.coeff)
        self.last_accuracy = accuracy
        return loss
