"""Linear CKA between two sets of activations, streamed over batches.

Centred kernel alignment (Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network
Representations Revisited", ICML 2019) with the linear kernel ``K = X X^T``, ``L = Y Y^T``::

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

``debiased=True`` (the default) uses the unbiased HSIC estimator of Song, Smola, Gretton, Bedo &
Borgwardt ("Feature Selection via Dependence Maximization", JMLR 2012), as Kornblith's colab does
with ``feature_space_linear_cka(x, y, debiased=True)`` / ``cka(gram_linear(x), gram_linear(y),
debiased=True)``; ``debiased=False`` is the usual biased estimator ``tr(KHLH) / (n-1)^2``.

Everything is computed in feature space from float64 sums over the samples (``X^T Y``, ``X^T X``,
``Y^T Y``, column sums, squared row norms), so :class:`LinearCKA` takes the data batch by batch and
its result over the whole set does not depend on the batch size. Averaging a CKA computed on each
batch is a different (and biased) quantity: do not.

Imports torch and numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["LinearCKA", "linear_cka"]

ArrayLike = Any  # a torch.Tensor or a numpy array


def _as_matrix(value: ArrayLike, name: str) -> torch.Tensor:
    """``value`` as a 2-D tensor, checked: shape ``(B, D)``, finite."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        t = torch.from_numpy(np.asarray(value, dtype=np.float64))
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or a numpy array of shape (batch, features); got {type(value).__name__}."
        )
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (batch, features); got shape {tuple(t.shape)}. Pool or flatten the activations "
            "first: x.mean(dim=(2, 3)) for (B, C, H, W), x.mean(dim=1) for (B, N, D) tokens, or x.flatten(1)."
        )
    if t.is_complex():
        raise TypeError(f"{name} is complex ({t.dtype}); CKA takes real activations.")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(
            f"{name} holds NaN or inf ({int(bad.sum())} of {t.numel()} values, shape {tuple(t.shape)}). "
            "Find where the activations overflow (e.g. fp16 without scaling) or drop those samples."
        )
    return t


class LinearCKA:
    """Linear CKA (Kornblith et al. 2019) accumulated over batches; debiased HSIC (Song et al. 2012) by default.

    Call :meth:`update` with the activations of the same samples in the two representations, batch by
    batch, then :meth:`compute`. The state is a few float64 sums (``O(Dx Dy + Dx^2 + Dy^2)`` memory, on
    the device of the first batch), so the result is that of the whole set at once, whatever the
    batch sizes (to rounding).

    Args:
        debiased: the unbiased HSIC estimator (needs ``n >= 4`` samples); ``False``: the biased
            centred estimator ``tr(KHLH)/(n-1)^2`` (needs ``n >= 2``).

    Shape:
        - x: ``(B, Dx)``, activations of ``B`` samples in the first representation.
        - y: ``(B, Dy)``, the same samples in the second representation (``Dy`` may differ from ``Dx``).
        - output of :meth:`compute`: a float, 1 for representations equal up to an orthogonal map and
          an isotropic scale; the debiased value can be slightly negative for unrelated ones.

    Example::

        cka = LinearCKA()
        for xa, xb in pairs:
            cka.update(xa, xb)
        value = cka.compute()
    """

    def __init__(self, debiased: bool = True) -> None:
        self.debiased = bool(debiased)
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen."""
        self.n = 0
        self._dims: tuple[int, int] | None = None
        self._state: dict[str, torch.Tensor] = {}

    def _start(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dx, dy = x.shape[1], y.shape[1]
        opts = dict(dtype=torch.float64, device=x.device)
        self._dims = (dx, dy)
        # the estimators are invariant to a shift of either representation, so every batch is shifted by
        # the first batch's mean: uncentred sums of activations with a large mean (post-ReLU) would cancel
        s = self._state
        s["shift_x"] = x.to(**opts).mean(0)
        s["shift_y"] = y.to(**opts).mean(0)
        s["xty"] = torch.zeros(dx, dy, **opts)
        s["xtx"] = torch.zeros(dx, dx, **opts)
        s["yty"] = torch.zeros(dy, dy, **opts)
        s["sx"] = torch.zeros(dx, **opts)
        s["sy"] = torch.zeros(dy, **opts)
        if self.debiased:
            for key in ("sa", "sb", "sab", "saa", "sbb"):
                s[key] = torch.zeros((), **opts)
            s["xa"], s["xb"] = torch.zeros(dx, **opts), torch.zeros(dx, **opts)
            s["ya"], s["yb"] = torch.zeros(dy, **opts), torch.zeros(dy, **opts)

    @torch.no_grad()
    def update(self, x: ArrayLike, y: ArrayLike) -> None:
        """Add a batch: row ``i`` of ``x`` and row ``i`` of ``y`` are the same sample."""
        x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must hold the same samples: x has {x.shape[0]} rows, y has {y.shape[0]}. Pass the "
                "activations of both representations on the same batch."
            )
        if self._dims is not None and (x.shape[1], y.shape[1]) != self._dims:
            raise ValueError(
                f"Feature widths changed between batches: first (Dx, Dy) = {self._dims}, now "
                f"{(x.shape[1], y.shape[1])}. Use one LinearCKA per pair of layers, or reset() it."
            )
        if x.shape[0] == 0:
            return
        if self._dims is None:
            self._start(x, y)
        s = self._state
        device = s["sx"].device
        x = x.to(device=device, dtype=torch.float64) - s["shift_x"]
        y = y.to(device=device, dtype=torch.float64) - s["shift_y"]
        s["xty"] += x.T @ y
        s["xtx"] += x.T @ x
        s["yty"] += y.T @ y
        s["sx"] += x.sum(0)
        s["sy"] += y.sum(0)
        if self.debiased:
            a = (x * x).sum(1)  # K_ii
            b = (y * y).sum(1)  # L_ii
            s["sa"] += a.sum()
            s["sb"] += b.sum()
            s["sab"] += (a * b).sum()
            s["saa"] += (a * a).sum()
            s["sbb"] += (b * b).sum()
            s["xa"] += x.T @ a
            s["xb"] += x.T @ b
            s["ya"] += y.T @ a
            s["yb"] += y.T @ b
        self.n += int(x.shape[0])

    def _hsic_terms(self) -> tuple[float, float, float]:
        """``(HSIC(K, L), HSIC(K, K), HSIC(L, L))``, each times the same positive constant."""
        s, n = self._state, self.n
        if not self.debiased:
            cxy = s["xty"] - torch.outer(s["sx"], s["sy"]) / n
            cxx = s["xtx"] - torch.outer(s["sx"], s["sx"]) / n
            cyy = s["yty"] - torch.outer(s["sy"], s["sy"]) / n
            return float((cxy * cxy).sum()), float((cxx * cxx).sum()), float((cyy * cyy).sum())

        def hsic1(tr_kl: torch.Tensor, one_k: torch.Tensor, one_l: torch.Tensor, cross: torch.Tensor) -> float:
            # n (n - 3) HSIC_1 = tr(K~L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1
            return float(tr_kl + one_k * one_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross)

        xty, xtx, yty, sx, sy = s["xty"], s["xtx"], s["yty"], s["sx"], s["sy"]
        one_k = sx @ sx - s["sa"]  # 1'K~1 = |sum_i x_i|^2 - sum_i K_ii
        one_l = sy @ sy - s["sb"]
        kl = hsic1(
            (xty * xty).sum() - s["sab"],  # tr(K~L~) = ||X'Y||_F^2 - sum_i K_ii L_ii
            one_k, one_l,
            sx @ xty @ sy - sx @ s["xb"] - s["ya"] @ sy + s["sab"],  # 1'K~L~1 = sum_i (K~1)_i (L~1)_i
        )
        kk = hsic1((xtx * xtx).sum() - s["saa"], one_k, one_k, sx @ xtx @ sx - 2 * (sx @ s["xa"]) + s["saa"])
        ll = hsic1((yty * yty).sum() - s["sbb"], one_l, one_l, sy @ yty @ sy - 2 * (sy @ s["yb"]) + s["sbb"])
        return kl, kk, ll

    def compute(self) -> float:
        """CKA over every sample given to :meth:`update` since the last :meth:`reset`."""
        need = 4 if self.debiased else 2
        if self.n < need:
            kind = "Debiased" if self.debiased else "Biased"
            raise ValueError(
                f"{kind} CKA needs at least {need} samples; got {self.n}. Update with more samples"
                + (", or use debiased=False (n >= 2)." if self.debiased else ".")
            )
        kl, kk, ll = self._hsic_terms()
        s = self._state
        # scale of the terms that cancel in HSIC(K, K): below it, a representation is constant (0/0)
        for name, value, key in (("x", kk, "xtx"), ("y", ll, "yty")):
            trace = float(torch.diagonal(s[key]).sum())
            if not value > 1e-12 * trace * trace:
                raise ValueError(
                    f"{name} has (numerically) zero variance over the {self.n} samples: every row is the same, so "
                    "CKA is undefined (0/0). Check the activations (a dead layer, a constant input)."
                )
        return kl / float(np.sqrt(kk) * np.sqrt(ll))


def linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = True) -> float:
    """Linear CKA (Kornblith et al. 2019) of two whole sets of activations; debiased HSIC (Song et al. 2012) by default.

    The same value as :class:`LinearCKA` fed the rows in any batches, and as Kornblith's
    ``cka(gram_linear(x), gram_linear(y), debiased=debiased)``.

    Shape:
        - x: ``(n, Dx)`` torch tensor or numpy array; y: ``(n, Dy)``, the same ``n`` samples.
        - output: a float.
    """
    metric = LinearCKA(debiased=debiased)
    metric.update(x, y)
    return metric.compute()
