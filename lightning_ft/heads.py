"""Classification heads. Each takes the backbone's features and returns logits.

A head with ``wants_tokens = False`` (the default) gets pooled features ``(B, D)``; one with
``wants_tokens = True`` gets unpooled tokens ``(B, N, D)`` (spatial maps are flattened to
``N = H * W`` positions). A head with ``wants_dates = True`` (:class:`TemporalHead`) gets a time
series of features ``(B, T, D)`` with its validity mask and days of year. :class:`TaskHeads` holds one
head per task. Everything here imports torch only.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HEADS",
    "AttentionPoolHead",
    "LinearHead",
    "MLPHead",
    "PrototypeHead",
    "TaskHeads",
    "TemporalHead",
    "build_head",
]


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


_POOLINGS = ("mean", "max", "last", "attention")


def _sum_over_dates(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over the dates one date at a time, in order. Invalid dates hold exact zeros, and ``a + 0 == a``,
    so padding a series changes the sum by nothing at all (a vectorised ``sum`` regroups the additions
    with the length, which moves the last bit). ``T`` is small (tens of dates): ``T`` additions."""
    dates = x.unbind(dim)
    total = dates[0]
    for date in dates[1:]:
        total = total + date
    return total


class TemporalHead(nn.Module):
    """Classify a satellite image time series: pool the per-date features over the valid dates, then classify.

    The backbone embeds each date of a series; this head pools the ``T`` dates into one vector and
    classifies it. Dates that are padding (series of different lengths) or clouded are marked
    ``False`` in ``mask`` and never reach the output: appending padding dates, whatever their
    features and days of year, does not change the logits.

    Poolings:

    - ``mean``: mean of the valid dates; ``max``: their element-wise maximum; ``last``: the last valid
      date by position (dates are sorted in time; holes in the mask are fine). Then
      ``dropout -> linear``.
    - ``attention``: a lightweight temporal attention encoder in the manner of L-TAE (Garnot &
      Landrieu, "Lightweight Temporal Self-Attention for Classifying Satellite Images Time Series",
      AALTD 2020). The inputs go through ``LayerNorm -> Linear`` to ``hidden_dim`` channels, plus a
      sinusoidal encoding of the **day of year** (not of the position in the sequence, so that
      irregular acquisition dates are encoded as they are). Each of ``num_heads`` heads has a learned
      master query (``key_dim`` values) that scores the keys (a linear layer of the encoded inputs)
      of the valid dates; a softmax over the valid dates (the others score ``-inf``) weighs the
      head's values, which are its own group of ``hidden_dim / num_heads`` channels of the encoded
      inputs, as in L-TAE. The heads are concatenated, then ``Linear -> LayerNorm -> GELU`` (L-TAE
      uses BatchNorm; LayerNorm keeps every sample independent of the rest of the batch), then
      ``dropout -> linear``.

    Positional encoding: with ``d = hidden_dim / num_heads`` channels per head and ``T = max_period``,
    ``PE(t, 2i) = sin(t / T^(2i/d))`` and ``PE(t, 2i+1) = cos(t / T^(2i/d))`` for the day of year
    ``t``, the same ``d`` values repeated for each head (L-TAE's table; L-TAE takes ``T = 1000`` for
    days counted from the first acquisition). The default ``T = 365`` matches days of the year: the
    fastest channel pair turns once every ``2 pi`` days and the slowest once in about ``2 pi T`` days,
    so no two days of a year share an encoding.

    Args:
        in_features: channels ``D`` of each date's features.
        num_classes: number of classes.
        pooling: ``"mean"``, ``"max"``, ``"last"`` or ``"attention"``.
        num_heads: attention heads (``attention`` only); must divide ``hidden_dim``.
        key_dim: size of each head's master query and keys (``attention`` only).
        hidden_dim: width of the encoded inputs and of the MLP after the heads (``attention`` only).
        dropout: dropout before the final linear layer.
        max_period: ``T`` of the positional encoding, in days (``attention`` only).

    Shape:
        features ``(B, T, in_features)``, mask ``(B, T)`` bool (``True`` = a valid date), doy
        ``(B, T)`` day of year -> logits ``(B, num_classes)``
    """

    wants_tokens = False
    wants_dates = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pooling: Literal["mean", "max", "last", "attention"] = "attention",
        num_heads: int = 4,
        key_dim: int = 8,
        hidden_dim: int = 128,
        dropout: float = 0.0,
        max_period: float = 365.0,
    ) -> None:
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"TemporalHead pooling must be one of {', '.join(_POOLINGS)}; got {pooling!r}.")
        self.pooling = pooling
        self.num_heads = num_heads
        self.key_dim = key_dim
        if pooling == "attention":
            if num_heads < 1 or hidden_dim % num_heads:
                raise ValueError(
                    f"TemporalHead: hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}. "
                    f"Pick num_heads among the divisors of {hidden_dim}, or change hidden_dim."
                )
            if key_dim < 1:
                raise ValueError(f"TemporalHead key_dim must be >= 1, got {key_dim}.")
            if max_period <= 1:
                raise ValueError(
                    f"TemporalHead max_period is in days and must be > 1, got {max_period}; 365 suits days of year."
                )
            head_dim = hidden_dim // num_heads
            self.in_norm = nn.LayerNorm(in_features)
            self.proj = nn.Linear(in_features, hidden_dim)
            self.query = nn.Parameter(torch.empty(num_heads, key_dim))
            nn.init.normal_(self.query, std=math.sqrt(2.0 / key_dim))
            self.key = nn.Linear(hidden_dim, num_heads * key_dim)
            self.mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU())
            exponent = 2 * (torch.arange(head_dim) // 2) / head_dim
            self.register_buffer("inv_freq", float(max_period) ** -exponent.float(), persistent=False)
            self.out_features = hidden_dim
        else:
            self.out_features = in_features
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.out_features, num_classes)

    def positional_encoding(self, doy: torch.Tensor) -> torch.Tensor:
        """The sinusoidal encoding of days of year, repeated for each head (``attention`` pooling only).

        Args:
            doy: days of year (any real dtype).

        Shape:
            doy ``(B, T)`` -> ``(B, T, hidden_dim)``
        """
        if self.pooling != "attention":
            raise RuntimeError(
                f"TemporalHead(pooling={self.pooling!r}) has no positional encoding; only 'attention' uses one."
            )
        angles = doy.float().unsqueeze(-1) * self.inv_freq
        even = torch.arange(angles.shape[-1], device=angles.device) % 2 == 0
        pe = torch.where(even, angles.sin(), angles.cos())
        return pe.repeat(1, 1, self.num_heads)

    def _check(self, features: torch.Tensor, mask: torch.Tensor, doy: torch.Tensor) -> None:
        if features.dim() != 3:
            raise ValueError(
                f"TemporalHead expects features (B, T, D), got shape {tuple(features.shape)}. "
                "Embed each date with the backbone and stack the dates along dim 1."
            )
        if mask.shape != features.shape[:2] or doy.shape != features.shape[:2]:
            raise ValueError(
                f"TemporalHead: mask {tuple(mask.shape)} and doy {tuple(doy.shape)} must both be (B, T) = "
                f"{tuple(features.shape[:2])}, one entry per date of features {tuple(features.shape)}."
            )
        if mask.dtype != torch.bool:
            raise TypeError(
                f"TemporalHead mask must be bool with True = a valid date, got {mask.dtype}. Pass mask.bool() "
                "(note: this is the opposite of nn.MultiheadAttention's key_padding_mask, where True = padding)."
            )
        empty = ~mask.any(dim=1)
        if bool(empty.any()):  # one host sync: a series without any valid date has nothing to classify
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"TemporalHead: sample(s) {rows[:10]} of the batch have no valid date (mask all False), so there is "
                "nothing to pool. Drop such series from the dataset, or mark at least one date valid (True = valid)."
            )

    def pool(self, features: torch.Tensor, mask: torch.Tensor, doy: torch.Tensor) -> torch.Tensor:
        """Pool the valid dates of each series into one vector (the head before dropout and the classifier).

        Args:
            features: per-date features.
            mask: ``True`` where a date is valid (not padding, not clouded).
            doy: day of year of each date (used by ``attention`` pooling only).

        Returns:
            One vector per series: ``in_features`` wide for ``mean``/``max``/``last``, ``hidden_dim``
            wide (the output of the MLP after the heads) for ``attention``.

        Raises:
            ValueError: a series has no valid date, or the shapes disagree.

        Shape:
            features ``(B, T, D)``, mask ``(B, T)``, doy ``(B, T)`` -> ``(B, out_features)``
        """
        self._check(features, mask, doy)
        valid = mask.unsqueeze(-1)
        # Invalid dates are replaced by zeros first: garbage there (even NaN or inf) cannot leak through 0 * x.
        features = torch.where(valid, features, torch.zeros((), dtype=features.dtype, device=features.device))
        if self.pooling == "mean":
            return _sum_over_dates(features, 1) / mask.sum(1, keepdim=True).to(features.dtype)
        if self.pooling == "max":
            lowest = torch.full((), -math.inf, dtype=features.dtype, device=features.device)
            return torch.where(valid, features, lowest).amax(1)
        if self.pooling == "last":
            position = torch.arange(1, mask.shape[1] + 1, device=mask.device) * mask  # 0 on invalid dates
            last = position.argmax(1)
            return features[torch.arange(features.shape[0], device=features.device), last]
        doy = torch.where(mask, doy, torch.zeros((), dtype=doy.dtype, device=doy.device))
        x = self.proj(self.in_norm(features)) + self.positional_encoding(doy).to(features.dtype)
        b, t, width = x.shape
        keys = self.key(x).view(b, t, self.num_heads, self.key_dim)
        scores = torch.einsum("btnk,nk->bnt", keys, self.query.to(keys.dtype)) / math.sqrt(self.key_dim)
        # softmax over the valid dates, written out so that invalid dates weigh exactly 0 and the sums run in
        # date order (the output does not move by one bit when padding is appended)
        scores = scores.masked_fill(~mask.unsqueeze(1), -math.inf)  # (B, heads, T); exp(-inf) = 0, gradient 0
        weights = (scores - scores.amax(-1, keepdim=True).detach()).exp()
        attention = weights / _sum_over_dates(weights, -1).unsqueeze(-1)  # (B, heads, T)
        values = x.view(b, t, self.num_heads, width // self.num_heads).permute(0, 2, 1, 3)  # (B, heads, T, C)
        heads = _sum_over_dates(attention.unsqueeze(-1) * values, 2)  # (B, heads, C)
        return self.mlp(heads.reshape(b, width))

    def forward(self, features: torch.Tensor, mask: torch.Tensor, doy: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(features, mask, doy)))


HEADS: dict[str, Callable[..., nn.Module]] = {
    "attention": AttentionPoolHead,
    "linear": LinearHead,
    "mlp": MLPHead,
    "prototype": PrototypeHead,
    "temporal": TemporalHead,
}
"""Head classes by the name ``FineTuneModule(head=...)`` and ``build_head`` accept."""


def build_head(name: str, in_features: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a head by name (``linear``, ``mlp``, ``attention``, ``prototype``, ``temporal``)."""
    if name not in HEADS:
        close = difflib.get_close_matches(name, list(HEADS), n=2)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"Unknown head '{name}'. Known heads: {', '.join(sorted(HEADS))}.{hint} Or pass an nn.Module as head=."
        )
    return HEADS[name](in_features, num_classes, **kwargs)


class TaskHeads(nn.Module):
    """One head per task on the same features: ``{task: logits}``.

    Each task gets its own head of the named kind (``build_head(head, in_features, classes,
    **head_kwargs)``). The call takes what that kind of head takes: pooled features ``(B, D)``,
    tokens ``(B, N, D)`` when ``wants_tokens``, or ``(features, mask, doy)`` when ``wants_dates``
    (:class:`TemporalHead`); this module copies both flags from its heads.

    Args:
        in_features: width of the features the heads receive.
        tasks: class count of each task, e.g. ``{"crop": 12, "irrigated": 2}``. Task names become
            metric names (``val/<task>/acc``) and module names, so they are non-empty and contain
            neither ``/`` nor ``.``.
        head: a name in ``HEADS``: the kind of head every task gets.
        head_kwargs: extra arguments of that head (the same for every task).

    Shape:
        features ``(B, in_features)`` (or what the head kind takes) -> ``{task: (B, classes)}``
    """

    def __init__(
        self, in_features: int, tasks: dict[str, int], head: str = "linear", head_kwargs: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if not isinstance(tasks, dict) or not tasks:
            raise ValueError(f"TaskHeads needs tasks as a non-empty dict of task name -> class count, got {tasks!r}.")
        reserved = set(dir(nn.ModuleDict()))
        for name, classes in tasks.items():
            if not isinstance(name, str) or not name or "/" in name or "." in name:
                raise ValueError(
                    f"TaskHeads: task name {name!r} is not usable: names become metric names (val/<task>/acc) and "
                    "module names, so they must be non-empty strings without '/' or '.'. Rename it, e.g. 'land_cover'."
                )
            if name in reserved:
                raise ValueError(
                    f"TaskHeads: task name {name!r} is taken by an attribute of nn.ModuleDict. "
                    f"Rename it, e.g. '{name}_'."
                )
            if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
                raise ValueError(
                    f"TaskHeads: task {name!r} has {classes!r} classes; give an int >= 2 "
                    "(a yes/no task has 2 classes, trained with cross-entropy like the others)."
                )
        self.num_classes: dict[str, int] = dict(tasks)
        self.heads = nn.ModuleDict(
            {name: build_head(head, in_features, classes, **(head_kwargs or {})) for name, classes in tasks.items()}
        )
        first = next(iter(self.heads.values()))
        self.wants_tokens: bool = bool(getattr(first, "wants_tokens", False))
        self.wants_dates: bool = bool(getattr(first, "wants_dates", False))

    def forward(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(*args) for name, head in self.heads.items()}
