"""Adversarial domain adaptation: gradient reversal, a domain discriminator, DANN, CDAN.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015; Ganin et al.,
"Domain-Adversarial Training of Neural Networks", JMLR 2016; Long et al., "Conditional Adversarial
Domain Adaptation", NeurIPS 2018.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ft.losses.label_free import entropy

__all__ = [
    "CDANLoss",
    "DANNLoss",
    "DomainDiscriminator",
    "GradientReversal",
    "cdan_loss",
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


def cdan_loss(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    source_logits: torch.Tensor,
    target_logits: torch.Tensor,
    discriminator: nn.Module,
    coeff: float = 1.0,
    entropy_conditioning: bool = True,
    projection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional adversarial loss (CDAN, CDAN+E with ``entropy_conditioning``).

    The discriminator sees the multilinear map ``g (x) f`` of the (detached) class probabilities
    ``g`` and the features ``f``, flattened to ``C * D`` -- or, with ``projection = (R_f, R_g)``
    (``(D, d)`` and ``(C, d)`` fixed random matrices), the randomized map
    ``(f R_f) * (g R_g) / sqrt(d)``. Both go through the gradient reversal layer. With entropy
    conditioning, example ``i`` of domain ``k`` weighs ``w_i / sum_k(w)`` with ``w = 1 + exp(-H(g_i))``
    (confident predictions count more); the loss is the weighted binary cross-entropy divided by
    the sum of the weights. Returns ``(loss, discriminator accuracy)``.

    Shape:
        features ``(N, D)`` / ``(M, D)``, logits ``(N, C)`` / ``(M, C)`` -> scalar, scalar
    """
    f = torch.cat([source_features, target_features]).float()
    g = torch.cat([source_logits, target_logits]).float().softmax(-1).detach()
    if projection is None:
        joint = torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)
    else:
        r_f, r_g = projection
        joint = (f @ r_f) * (g @ r_g) / math.sqrt(r_f.shape[1])
    n = len(source_features)
    labels = torch.cat([f.new_zeros(n), f.new_ones(len(f) - n)])
    logits = discriminator(reverse_gradient(joint, coeff)).float()
    per_example = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if entropy_conditioning:
        h = entropy(g, probs=True, eps=1e-5, reduction="none")
        w = 1.0 + torch.exp(-h)
        w = torch.cat([w[:n] / w[:n].sum(), w[n:] / w[n:].sum()])
        loss = (w * per_example).sum() / w.sum()
    else:
        loss = per_example.mean()
    accuracy = ((logits > 0).float() == labels).float().mean().detach()
    return loss, accuracy


class CDANLoss(nn.Module):
    """CDAN(+E): a discriminator on features conditioned on predictions; see :func:`cdan_loss`.

    ``randomized_dim``: use the randomized multilinear map of that width (default: the exact
    ``C * D`` outer product when it has at most 4096 entries, else 1024). ``coeff`` is set by the
    caller each step, as for DANN.
    """

    needs = ("source_features", "target_features", "source_logits", "target_logits")

    def __init__(self, in_features: int, num_classes: int, discriminator: nn.Module | None = None,
                 hidden_dim: int = 256, entropy_conditioning: bool = True, randomized_dim: int | None = None) -> None:
        super().__init__()
        if randomized_dim is None and in_features * num_classes > 4096:
            randomized_dim = 1024
        self.randomized = randomized_dim is not None
        width = randomized_dim if randomized_dim is not None else in_features * num_classes
        self.discriminator = discriminator if discriminator is not None else DomainDiscriminator(width, hidden_dim)
        if randomized_dim is not None:  # fixed random maps, saved with the module (buffers)
            g = torch.Generator().manual_seed(0)
            self.register_buffer("r_f", torch.randn(in_features, randomized_dim, generator=g))
            self.register_buffer("r_g", torch.randn(num_classes, randomized_dim, generator=g))
        self.entropy_conditioning = entropy_conditioning
        self.coeff = 1.0
        self.last_accuracy = torch.zeros(())

    @property
    def batch_statistic(self) -> bool:  # entropy weights are normalised over each domain's batch
        return self.entropy_conditioning

    def forward(self, source_features: torch.Tensor, target_features: torch.Tensor, source_logits: torch.Tensor,
                target_logits: torch.Tensor) -> torch.Tensor:
        projection = (self.r_f, self.r_g) if self.randomized else None
        loss, accuracy = cdan_loss(source_features, target_features, source_logits, target_logits, self.discriminator,
                                   self.coeff, self.entropy_conditioning, projection)
        self.last_accuracy = accuracy
        return loss
