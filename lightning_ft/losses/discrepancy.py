"""Distribution-discrepancy losses between source and target features: MMD, CORAL, mean alignment.

Each is a pure function plus a thin ``nn.Module``; all compute in float32 (also under bf16 autocast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "CORALLoss",
    "MMDLoss",
    "MeanAlignmentLoss",
    "coral",
    "gaussian_kernels",
    "mean_alignment",
    "mmd",
    "mmd_linear",
]

DEFAULT_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _f32(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.float().flatten(1) for x in xs)


def gaussian_kernels(
    x: torch.Tensor, y: torch.Tensor, bandwidth: float | torch.Tensor, multipliers: Sequence[float]
) -> torch.Tensor:
    """Sum over ``multipliers`` m of ``exp(-||x - y||^2 / (m * bandwidth))``; shape ``(len(x), len(y))``."""
    d2 = torch.cdist(x, y).pow(2)
    return sum(torch.exp(-d2 / (m * bandwidth)) for m in multipliers)


def median_bandwidth(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Median heuristic: the median squared distance among all pairs of the pooled sample (detached)."""
    z = torch.cat([source, target]).detach()
    d2 = torch.cdist(z, z).pow(2)
    n = len(z)
    off = d2[~torch.eye(n, dtype=torch.bool, device=z.device)]
    return off.median().clamp_min(1e-12)


def mmd(
    source: torch.Tensor,
    target: torch.Tensor,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    bandwidth: float | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """Squared multi-kernel MMD with Gaussian kernels (Gretton et al., JMLR 2012; Long et al., DAN, ICML 2015).

    ``MMD^2 = E k(s, s') + E k(t, t') - 2 E k(s, t)`` with ``k`` the sum of Gaussian kernels whose
    bandwidths are the median heuristic (or ``bandwidth``) times ``multipliers``. ``unbiased``
    drops the diagonal terms of the within-domain means (U-statistic).

    Shape:
        source ``(N, D)``, target ``(M, D)`` -> scalar
    """
    s, t = _f32(source, target)
    bw = median_bandwidth(s, t) if bandwidth is None else bandwidth
    k_ss = gaussian_kernels(s, s, bw, multipliers)
    k_tt = gaussian_kernels(t, t, bw, multipliers)
    k_st = gaussian_kernels(s, t, bw, multipliers)
    n, m = len(s), len(t)
    if unbiased:
        if n < 2 or m < 2:
            raise ValueError("The unbiased MMD needs at least 2 samples per domain.")
        e_ss = (k_ss.sum() - k_ss.diagonal().sum()) / (n * (n - 1))
        e_tt = (k_tt.sum() - k_tt.diagonal().sum()) / (m * (m - 1))
    else:
        e_ss, e_tt = k_ss.mean(), k_tt.mean()
    return e_ss + e_tt - 2 * k_st.mean()


def mmd_linear(
    source: torch.Tensor,
    target: torch.Tensor,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    bandwidth: float | None = None,
) -> torch.Tensor:
    """Linear-time unbiased MMD estimate (Gretton et al. 2012, Lemma 14) for large batches.

    Pairs consecutive samples: ``mean_i h(z_2i, z_2i+1)`` with
    ``h = k(s, s') + k(t, t') - k(s, t') - k(s', t)``. Uses ``min(N, M) // 2 * 2`` samples of each.

    Shape:
        source ``(N, D)``, target ``(M, D)`` -> scalar
    """
    s, t = _f32(source, target)
    n = min(len(s), len(t)) // 2 * 2
    if n < 2:
        raise ValueError("The linear-time MMD needs at least 2 samples per domain.")
    bw = median_bandwidth(s[:n], t[:n]) if bandwidth is None else bandwidth
    s1, s2, t1, t2 = s[0:n:2], s[1:n:2], t[0:n:2], t[1:n:2]

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a - b).pow(2).sum(-1)
        return sum(torch.exp(-d2 / (m * bw)) for m in multipliers)

    return (k(s1, s2) + k(t1, t2) - k(s1, t2) - k(s2, t1)).mean()


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko, ECCV-W 2016): ``||C_s - C_t||_F^2 / (4 d^2)``.

    ``C`` are the unbiased feature covariances of each domain.

    Shape:
        source ``(N, D)``, target ``(M, D)`` -> scalar
    """
    s, t = _f32(source, target)
    if len(s) < 2 or len(t) < 2:
        raise ValueError("CORAL needs at least 2 samples per domain to estimate covariances.")
    d = s.shape[1]
    cs, ct = torch.cov(s.T), torch.cov(t.T)
    return (cs - ct).pow(2).sum() / (4 * d * d)


def mean_alignment(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared distance between the domains' mean features (linear-kernel MMD).

    Shape:
        source ``(N, D)``, target ``(M, D)`` -> scalar
    """
    s, t = _f32(source, target)
    return (s.mean(0) - t.mean(0)).pow(2).sum()


class MMDLoss(nn.Module):
    """Multi-kernel Gaussian MMD between source and target features; see :func:`mmd` / :func:`mmd_linear`."""

    needs = ("source_features", "target_features")
    batch_statistic = True  # under DDP: computed on the batch gathered from all ranks

    def __init__(
        self, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, unbiased: bool = False, linear: bool = False
    ) -> None:
        super().__init__()
        self.multipliers = tuple(multipliers)
        self.unbiased = unbiased
        self.linear = linear

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return mmd_linear(source, target, self.multipliers)
        return mmd(source, target, self.multipliers, unbiased=self.unbiased)


class CORALLoss(nn.Module):
    """Deep CORAL between source and target features; see :func:`coral`."""

    needs = ("source_features", "target_features")
    batch_statistic = True  # under DDP: computed on the batch gathered from all ranks

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return coral(source, target)


class MeanAlignmentLoss(nn.Module):
    """Squared distance of the domains' mean features; see :func:`mean_alignment`."""

    needs = ("source_features", "target_features")
    batch_statistic = True  # under DDP: computed on the batch gathered from all ranks

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mean_alignment(source, target)
