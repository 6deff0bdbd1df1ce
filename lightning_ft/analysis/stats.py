"""Summaries over seeds: a mean with its 95% interval, bootstrap intervals, IQM, paired differences.

numpy and scipy only (scipy comes with scikit-learn). A handful of seeds is the usual case, so the
default interval is Student's t: ``mean ± t_{0.975, n-1} · s / sqrt(n)`` with ``s`` the sample
standard deviation (``ddof=1``). With one value there is no interval: ``low`` and ``high`` are NaN,
and :meth:`Summary.format` writes ``n/a``.

Non-finite values (NaN, inf: a run that failed, a metric that was not logged) are left out of every
statistic here and counted (``Summary.dropped``), never silently averaged in.

* :func:`summarize` -- mean, t interval, n, std.
* :func:`bootstrap_interval` -- percentile bootstrap of any statistic, deterministic for a seed.
* :func:`iqm` -- interquartile mean (25% trimmed mean, ``scipy.stats.trim_mean``), as rliable and
  GEO-Bench aggregate scores.
* :func:`paired_differences` -- per-seed ``a - b`` over the seeds both runs have, with the mean
  difference and its t interval (pairing by seed removes the seed-to-seed variation both share).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "PairedDifferences",
    "Summary",
    "bootstrap_interval",
    "iqm",
    "paired_differences",
    "summarize",
    "t_interval",
]


def _finite(values: Any) -> tuple[np.ndarray, int]:
    """The values as a flat float64 array without non-finite entries, and how many were dropped."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(arr)
    return arr[keep], int(arr.size - keep.sum())


@dataclass(frozen=True)
class Summary:
    """A mean over ``n`` values with a confidence interval ``[low, high]`` and the sample std.

    ``low``/``high`` are NaN when there is no interval (``n < 2``); ``std`` is NaN for ``n < 2``;
    ``mean`` is NaN for ``n == 0``. ``dropped`` counts the non-finite values left out.
    """

    mean: float
    low: float
    high: float
    n: int
    std: float
    dropped: int = 0
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """``(high - low) / 2``: the ``±`` of ``mean ± half_width`` (NaN without an interval)."""
        return (self.high - self.low) / 2

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"0.912 ± 0.011 (n=3)"``, or ``"0.912 ± n/a (n=1)"`` without an interval.

        ``scale=100`` writes fractions as percentages.
        """
        if self.n == 0:
            return "n/a (n=0)"
        mean = f"{self.mean * scale:.{digits}f}"
        hw = self.half_width
        pm = "n/a" if not math.isfinite(hw) else f"{hw * scale:.{digits}f}"
        note = f", {self.dropped} non-finite left out" if self.dropped else ""
        return f"{mean} ± {pm} (n={self.n}{note})"

    def __str__(self) -> str:
        return self.format()


def t_interval(values: Any, confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval for the mean of ``values`` (non-finite left out); NaNs for fewer than 2."""
    s = summarize(values, confidence=confidence)
    return s.low, s.high


def summarize(values: Any, confidence: float = 0.95) -> Summary:
    """Mean of ``values`` (one per seed) with Student's t interval ``mean ± t_{(1+c)/2, n-1} s/sqrt(n)``.

    ``values``: anything ``np.asarray`` takes (list, array, tensor). Non-finite entries are left out
    and counted in ``dropped``. One value: ``low``/``high``/``std`` are NaN ("n/a" in tables).
    Identical values: a zero-width interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    arr, dropped = _finite(values)
    n = int(arr.size)
    nan = float("nan")
    if n == 0:
        return Summary(nan, nan, nan, 0, nan, dropped, confidence)
    mean = float(arr.mean())
    if n == 1:
        return Summary(mean, nan, nan, 1, nan, dropped, confidence)
    std = float(arr.std(ddof=1))
    from scipy import stats as st

    half = float(st.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(mean, mean - half, mean + half, n, std, dropped, confidence)


def iqm(values: Any, axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% (``scipy.stats.trim_mean(x, 0.25)``).

    As rliable (Agarwal et al., 2021) and GEO-Bench aggregate: ``int(0.25 * n)`` values are cut
    from each end, so for fewer than 4 values it is the plain mean. With ``axis=None`` non-finite
    values are left out; with an axis (used by :func:`bootstrap_interval`) values are taken as given.
    """
    from scipy import stats as st

    if axis is None:
        arr, _ = _finite(values)
        if arr.size == 0:
            return float("nan")
        return float(st.trim_mean(arr, proportiontocut=0.25))
    return st.trim_mean(np.asarray(values, dtype=np.float64), proportiontocut=0.25, axis=axis)


def _apply(statistic: Callable[..., Any], samples: np.ndarray) -> np.ndarray:
    """``statistic`` over the rows of ``samples`` (vectorised when it takes ``axis=``)."""
    try:
        out = np.asarray(statistic(samples, axis=1), dtype=np.float64)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(statistic(row)) for row in samples], dtype=np.float64)


def bootstrap_interval(values: Any, n_boot: int = 10000, seed: int = 0,
                       statistic: Callable[..., Any] = np.mean, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)``: deterministic for a ``seed``.

    ``n_boot`` resamples of ``values`` with replacement (``numpy.random.default_rng(seed)``), the
    statistic of each, and the ``(1-c)/2`` and ``(1+c)/2`` quantiles of those. ``statistic`` is
    called as ``statistic(samples, axis=1)`` when it accepts ``axis`` (``np.mean``, ``np.median``,
    :func:`iqm`), else once per resample. Non-finite values are left out; fewer than 2 values: NaNs.
    With few seeds the percentile bootstrap is too narrow (it cannot see beyond the values drawn):
    prefer :func:`summarize`'s t interval below ~10 values.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}.")
    arr, _ = _finite(values)
    n = arr.size
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 4_000_000 // n))  # bound memory for long value lists
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        stats[start:stop] = _apply(statistic, arr[idx])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDifferences:
    """Per-key (per-seed) differences ``a - b`` and their :class:`Summary`.

    ``keys``/``differences``: the keys both sides have (with finite values), in order.
    ``only_a``/``only_b``: keys with a finite value on one side only -- left out.
    """

    keys: list[Hashable]
    differences: list[float]
    summary: Summary
    only_a: list[Hashable] = field(default_factory=list)
    only_b: list[Hashable] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.summary.mean

    @property
    def low(self) -> float:
        return self.summary.low

    @property
    def high(self) -> float:
        return self.summary.high

    @property
    def n(self) -> int:
        return self.summary.n

    @property
    def excluded(self) -> int:
        """How many keys were left out because one side lacks them."""
        return len(self.only_a) + len(self.only_b)

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        text = self.summary.format(digits, scale)
        if self.excluded:
            text += f" [{self.excluded} unpaired left out]"
        return text

    def __str__(self) -> str:
        return self.format()


def _as_mapping(values: Mapping[Hashable, float] | Sequence[float], keys: list[Hashable] | None,
                name: str) -> Mapping[Hashable, float]:
    if isinstance(values, Mapping):
        return values
    if keys is None:
        raise TypeError(f"paired_differences: {name} is a sequence; give keys= (one per value, e.g. the seeds) "
                        "or pass a dict {seed: value}.")
    values = list(values)
    if len(values) != len(keys):
        raise ValueError(f"paired_differences: {name} has {len(values)} values for {len(keys)} keys.")
    return dict(zip(keys, values))


def _is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def paired_differences(values_a: Mapping[Hashable, float] | Sequence[float],
                       values_b: Mapping[Hashable, float] | Sequence[float],
                       keys: Iterable[Hashable] | None = None, confidence: float = 0.95) -> PairedDifferences:
    """Per-seed differences ``a[k] - b[k]`` over the keys both have, with the mean and its t interval.

    ``values_a``/``values_b``: ``{seed: value}`` dicts, or sequences aligned with ``keys``.
    ``keys``: the keys to compare, in order (default: the keys of ``a`` then the new keys of ``b``).
    A key missing on one side, or whose value there is non-finite, is left out and listed in
    ``only_a``/``only_b``; keys neither side has are ignored.

    >>> d = paired_differences({0: 0.91, 1: 0.93, 2: 0.90}, {0: 0.89, 1: 0.92})
    >>> d.keys, d.only_a
    ([0, 1], [2])
    """
    key_list = list(keys) if keys is not None else None
    a = _as_mapping(values_a, key_list, "values_a")
    b = _as_mapping(values_b, key_list, "values_b")
    if key_list is None:
        key_list = list(a) + [k for k in b if k not in a]
    common, diffs, only_a, only_b = [], [], [], []
    for k in key_list:
        in_a = k in a and _is_finite(a[k])
        in_b = k in b and _is_finite(b[k])
        if in_a and in_b:
            common.append(k)
            diffs.append(float(a[k]) - float(b[k]))
        elif in_a:
            only_a.append(k)
        elif in_b:
            only_b.append(k)
    return PairedDifferences(common, diffs, summarize(diffs, confidence), only_a, only_b)
