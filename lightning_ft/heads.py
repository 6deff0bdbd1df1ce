"""Classification heads. Each takes the backbone's features and returns logits.

A head with ``wants_tokens = False`` (the default) gets pooled features ``(B, D)``; one with
``wants_tokens = True`` gets unpooled tokens ``(B, N, D)`` (spatial maps are flattened to
``N = H * W`` positions). Everything here imports torch only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEADS", "AttentionPoolHead", "LinearHead", "MLPHead", "PrototypeHead", "build_head"]


class LinearHead(nn.Module):
    """Dropout then one linear layer: the linear probe.

    Shape:
        features ``(B, in_features)`` -> logits ``(B, num_classes)``
    """

    wants_tokens = False

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class MLPHead(nn.Module):
    """``Linear -> norm -> GELU -> dropout`` blocks, then a linear classifier.

    Shape:
        features ``(B, in_features)`` -> logits ``(B, num_classes)``
    """

    wants_tokens = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.1,
        norm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLPHead needs num_layers >= 1 hidden layers, got {num_layers}; use LinearHead for none.")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim) if norm else nn.Identity(), nn.GELU()]
            layers.append(nn.Dropout(dropout))
            width = hidden_dim
        self.mlp = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mlp(features))


class AttentionPoolHead(nn.Module):
    """Attention pooling: learned queries attend over all tokens / spatial positions, then a classifier.

    Useful when the object is small in the image (remote sensing, lesions): average pooling dilutes
    it, attention pooling can find it.

    Shape:
        tokens ``(B, N, in_features)`` -> logits ``(B, num_classes)``
    """

    wants_tokens = True

    def __init__(
        self, in_features: int, num_classes: int, num_heads: int = 4, num_queries: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if in_features % num_heads:
            raise ValueError(
                f"AttentionPoolHead: in_features={in_features} is not divisible by num_heads={num_heads}. "
                f"Pick num_heads among the divisors of {in_features}."
            )
        self.query = nn.Parameter(torch.zeros(1, num_queries, in_features))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(in_features)
        self.attn = nn.MultiheadAttention(in_features, num_heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features * num_queries, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), kv, kv, need_weights=False)
        return self.fc(self.dropout(pooled.flatten(1)))


class PrototypeHead(nn.Module):
    """Cosine classifier: logits are scaled cosine similarities to one learned prototype per class.

    Shape:
        features ``(B, in_features)`` -> logits ``(B, num_classes)``
    """

    wants_tokens = False

    def __init__(self, in_features: int, num_classes: int, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"PrototypeHead temperature must be > 0, got {temperature}.")
        self.prototypes = nn.Parameter(torch.randn(num_classes, in_features) * 0.02)
        self.temperature = temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) @ F.normalize(self.prototypes, dim=-1).t() / self.temperature


HEADS: dict[str, Callable[..., nn.Module]] = {
    "attention": AttentionPoolHead,
    "linear": LinearHead,
    "mlp": MLPHead,
    "prototype": PrototypeHead,
}
"""Head classes by the name ``FineTuneModule(head=...)`` and ``build_head`` accept."""


def build_head(name: str, in_features: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a head by name (``linear``, ``mlp``, ``attention``, ``prototype``)."""
    if name not in HEADS:
        close = difflib.get_close_matches(name, list(HEADS), n=2)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"Unknown head '{name}'. Known heads: {', '.join(sorted(HEADS))}.{hint} Or pass an nn.Module as head=."
        )
    return HEADS[name](in_features, num_classes, **kwargs)
