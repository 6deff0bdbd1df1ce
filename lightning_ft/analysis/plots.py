"""Pictures of a fine-tuning study, written as PNG files: learning curves, confusion matrix,
reliability diagram, PCA / t-SNE projections, per-layer change.

Each function takes plain data (dicts, lists, numpy arrays or tensors), writes a PNG to ``path``
(parent folders are created) and returns the path. Missing entries and NaN values are skipped,
never plotted as zeros.

matplotlib is needed (``pip install 'lightning_ft[analysis]'``, or ``pip install matplotlib``) and
imported only when a plot is drawn. Figures are ``matplotlib.figure.Figure`` objects drawn on an
Agg canvas: pyplot is never imported, so no window opens, and the user's backend and pyplot state
are left as they were.

Colours: strategies take the ``tab10`` colours in the order they are given; pass the same
``colors={strategy: colour}`` (see :func:`strategy_colors`) to several plots to keep them equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "plot_confusion",
    "plot_layer_change",
    "plot_learning_curves",
    "plot_projections",
    "plot_reliability",
    "project",
    "strategy_colors",
]

DPI = 120
_HINT = "pip install 'lightning_ft[analysis]' (or pip install matplotlib)"


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"lightning_ft.analysis plots need matplotlib, which is not installed: {_HINT}.") from err
    return Figure, FigureCanvasAgg


def _figure(figsize: tuple[float, float]):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _num(x: Any) -> float:
    """A float, NaN for None or anything that is not a number."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def strategy_colors(names: Sequence[str], colors: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{name: colour}``: the ``tab10`` colours (then ``tab20``) in order, ``colors`` taking precedence."""
    palette = [f"C{i}" for i in range(10)]
    extra = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
             "#dbdb8d", "#9edae5"]
    palette = palette + extra
    out, i = {}, 0
    for name in names:
        if colors and name in colors:
            out[name] = colors[name]
        else:
            out[name] = palette[i % len(palette)]
            i += 1
    return out


# ----------------------------------------------------------------------------- learning curves

def _metric(entry: Mapping[str, Any], split: str, metric: str) -> float:
    for key in (f"{split}/{metric}", f"{split}_{metric}", f"{metric}/{split}"):
        if key in entry:
            return _num(entry[key])
    return math.nan


def _runs(history: Sequence[Any]) -> list[list[Mapping[str, Any]]]:
    """One run (a list of per-epoch dicts) or several (a list of such lists) -> a list of runs."""
    history = list(history)
    if not history:
        return []
    if all(isinstance(h, Mapping) for h in history):
        return [history]
    if all(isinstance(h, Sequence) and not isinstance(h, (str, bytes)) for h in history):
        return [list(h) for h in history]
    raise TypeError("A history is a list of per-epoch dicts ({'epoch': 0, 'val/loss': ...}), "
                    "or a list of such lists (one per seed).")


def _curve(runs: list[list[Mapping[str, Any]]], split: str, metric: str):
    """Epochs, and mean/min/max over the runs (NaN where no run has the value)."""
    table: dict[float, list[float]] = {}
    for run in runs:
        for i, entry in enumerate(run):
            epoch = _num(entry.get("epoch", i))
            if not math.isfinite(epoch):
                epoch = float(i)
            value = _metric(entry, split, metric)
            table.setdefault(epoch, [])
            if math.isfinite(value):
                table[epoch].append(value)
    epochs = np.array(sorted(table), dtype=np.float64)
    mean = np.array([np.mean(table[e]) if table[e] else np.nan for e in epochs])
    low = np.array([np.min(table[e]) if table[e] else np.nan for e in epochs])
    high = np.array([np.max(table[e]) if table[e] else np.nan for e in epochs])
    return epochs, mean, low, high


def _marks(marks: Any) -> list[float]:
    """Phase epochs: a list of epochs, or one list per seed (merged)."""
    out: set[float] = set()
    for m in marks or []:
        if isinstance(m, Sequence) and not isinstance(m, (str, bytes)):
            out.update(_num(x) for x in m)
        else:
            out.add(_num(m))
    return sorted(x for x in out if math.isfinite(x))


_METRIC_LABELS = {"loss": "loss", "acc": "accuracy", "accuracy": "accuracy", "f1": "F1"}


def plot_learning_curves(histories: Mapping[str, Sequence[Any]], path: str | Path,
                         phase_marks: Mapping[str, Sequence[Any]] | None = None,
                         metrics: Sequence[str] = ("loss", "acc"), title: str | None = "Learning curves",
                         colors: Mapping[str, Any] | None = None, figsize: tuple[float, float] | None = None,
                         dpi: int = DPI) -> Path:
    """Train/val curves over epochs, one panel per metric, one colour per strategy.

    Args:
        histories: ``{strategy: history}``; a history is a list of per-epoch dicts
            ``{"epoch": 0, "train/loss": ..., "val/loss": ..., "train/acc": ..., "val/acc": ...}``
            (``train_loss``-style keys work too; missing keys and NaN are skipped; without
            ``"epoch"`` the position is the epoch), or a list of such lists, one per seed: then the
            mean over seeds is drawn with a shaded min--max band.
        path: the PNG to write.
        phase_marks: ``{strategy: [epoch, ...]}``: epochs where more of the model started training
            (or one list per seed, merged). Drawn as vertical dashed lines in the strategy's colour,
            at ``epoch - 0.5``: between the last epoch of the old phase and the first of the new.
        metrics: one panel per metric name, found as ``train/<m>`` and ``val/<m>``.
        colors: ``{strategy: colour}`` overriding the default order-based colours.

    Train is drawn dotted, val solid with markers.
    """
    from matplotlib.lines import Line2D

    names = list(histories)
    cols = strategy_colors(names, colors)
    figsize = figsize or (5.2 * len(metrics) + 2.2, 4.4)
    fig = _figure(figsize)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    runs = {name: _runs(histories[name]) for name in names}
    seeds = max((len(r) for r in runs.values()), default=0)
    any_mark = False
    for ax, metric in zip(axes, metrics):
        drawn = False
        for name in names:
            for split, style in (("train", dict(ls=":", lw=1.6)), ("val", dict(ls="-", lw=1.8, marker="o", ms=3.5))):
                epochs, mean, low, high = _curve(runs[name], split, metric)
                ok = np.isfinite(mean)  # epochs without the value are skipped (val every n epochs)
                if not ok.any():
                    continue
                epochs, mean, low, high = epochs[ok], mean[ok], low[ok], high[ok]
                drawn = True
                ax.plot(epochs, mean, color=cols[name], **style)
                if len(runs[name]) > 1:
                    ax.fill_between(epochs, low, high, color=cols[name], alpha=0.15 if split == "val" else 0.08,
                                    lw=0)
            for e in _marks((phase_marks or {}).get(name)):
                ax.axvline(e - 0.5, color=cols[name], ls="--", lw=1.1, alpha=0.8)
                any_mark = True
        label = _METRIC_LABELS.get(metric, metric)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"train / val {label}")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"no train/{metric} or val/{metric} logged", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=cols[n], lw=2.5, label=n) for n in names]
    handles += [Line2D([], [], color="0.35", ls=":", lw=1.6, label="train"),
                Line2D([], [], color="0.35", ls="-", marker="o", ms=3.5, lw=1.8, label="val")]
    if any_mark:
        handles.append(Line2D([], [], color="0.35", ls="--", lw=1.1, label="phase change\n(more trainable)"))
    if seeds > 1:
        from matplotlib.patches import Patch

        handles.append(Patch(color="0.35", alpha=0.2, label="min–max over seeds\n(line: mean)"))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------- confusion matrix

def plot_confusion(matrix: Any, class_names: Sequence[str] | None, path: str | Path,
                   title: str = "Confusion matrix (rows normalised by true class)", annotate: bool | None = None,
                   figsize: tuple[float, float] | None = None, dpi: int = DPI) -> Path:
    """The confusion matrix of counts ``matrix[true, predicted]``, coloured by the fraction of each
    true class (row), each cell annotated with its count (and row percentage).

    Rows without samples are left blank. ``annotate`` defaults to ``True`` up to 25 classes.
    """
    m = _np(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square (C, C), got shape {m.shape}.")
    k = m.shape[0]
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} matrix.")
    counts = np.where(np.isfinite(m), m, 0)
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(rows > 0, counts / rows, np.nan)
    annotate = k <= 25 if annotate is None else annotate
    side = min(max(4.5, 0.55 * k + 2.5), 24)
    fig = _figure(figsize or (side + 1.2, side))
    ax = fig.subplots()
    import matplotlib

    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.92")
    im = ax.imshow(np.ma.masked_invalid(frac), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("fraction of the true class")
    ax.set_xticks(range(k), names, rotation=45 if k > 4 or max(map(len, names)) > 6 else 0, ha="right"
                  if k > 4 or max(map(len, names)) > 6 else "center", rotation_mode="anchor")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if annotate:
        fontsize = 9 if k <= 10 else 7
        for i in range(k):
            for j in range(k):
                if rows[i, 0] == 0:
                    continue
                f = frac[i, j]
                text = f"{int(counts[i, j])}" + (f"\n{100 * f:.0f}%" if k <= 12 else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                        color="white" if f > 0.55 else "0.15")
        for i in range(k):
            if rows[i, 0] == 0:
                ax.text(k / 2 - 0.5, i, "no samples of this class", ha="center", va="center", fontsize=8, color="0.4")
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------- reliability diagram

def _bins(d: Any) -> dict[str, Any]:
    def get(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if isinstance(d, Mapping) and k in d:
                return d[k]
            if not isinstance(d, Mapping) and hasattr(d, k):
                return getattr(d, k)
        return None

    conf, acc, count = get("confidence"), get("accuracy"), get("count", "counts")
    if conf is None or acc is None or count is None:
        raise KeyError("A reliability input needs 'confidence', 'accuracy' and 'count' (per bin) and 'ece': "
                       "the output of lightning_ft.analysis.reliability_bins(probs, targets, n_bins).")
    conf, acc, count = _np(conf), _np(acc), _np(count)
    if not conf.shape == acc.shape == count.shape or conf.ndim != 1:
        raise ValueError(f"confidence, accuracy and count must be 1-D of one length, got "
                         f"{conf.shape}, {acc.shape}, {count.shape}.")
    edges = get("edges", "bin_edges")
    edges = _np(edges) if edges is not None else np.linspace(0, 1, conf.size + 1)
    if edges.size != conf.size + 1:
        raise ValueError(f"{edges.size} bin edges for {conf.size} bins.")
    ece = _num(get("ece"))
    if get("ece") is None:  # reliability_bins gives none: the count-weighted mean gap of these bins
        ok = (count > 0) & np.isfinite(conf) & np.isfinite(acc)
        ece = float((count[ok] * np.abs(acc[ok] - conf[ok])).sum() / count[ok].sum()) if ok.any() else math.nan
    return dict(confidence=conf, accuracy=acc, count=count, edges=edges, ece=ece, temperature=_num(get("temperature")))


def plot_reliability(before: Any, after: Any, path: str | Path,
                     labels: tuple[str, str] = ("Before temperature scaling", "After temperature scaling"),
                     title: str | None = "Reliability diagram", figsize: tuple[float, float] | None = None,
                     dpi: int = DPI) -> Path:
    """Reliability diagrams before and after temperature scaling, side by side.

    ``before``/``after``: dicts (or objects with these attributes) with per-bin arrays
    ``"confidence"`` (mean confidence in the bin), ``"accuracy"``, ``"count"``, and ``"ece"``
    (a fraction; computed from the bins when absent) -- :func:`lightning_ft.analysis.reliability_bins`
    gives all but ``"ece"``; optional ``"edges"`` (``n_bins + 1``, default equal-width over [0, 1]) and
    ``"temperature"`` (shown in the title). ``after=None`` draws one diagram.

    Bars: accuracy per confidence bin; diagonal: perfect calibration; red hatched: the gap between
    the bin's accuracy and its mean confidence (above the bar: overconfident, inside it: underconfident). Below: the fraction of samples per bin. Empty bins
    (count 0 or NaN) have no bar.
    """
    sets = [(labels[0], _bins(before))] + ([(labels[1], _bins(after))] if after is not None else [])
    fig = _figure(figsize or (5.0 * len(sets) + 0.6, 5.6))
    grid = fig.add_gridspec(2, len(sets), height_ratios=[3.2, 1])
    first_hist = None
    for col, (label, b) in enumerate(sets):
        ax = fig.add_subplot(grid[0, col])
        hist = fig.add_subplot(grid[1, col], sharex=ax, sharey=first_hist)  # one scale: compare the panels
        first_hist = first_hist or hist
        edges = b["edges"]
        left, width = edges[:-1], np.diff(edges)
        count = np.where(np.isfinite(b["count"]), b["count"], 0)
        ok = (count > 0) & np.isfinite(b["accuracy"]) & np.isfinite(b["confidence"])
        acc, conf = b["accuracy"], b["confidence"]
        ax.bar(left[ok], acc[ok], width[ok], align="edge", color="C0", edgecolor="white", lw=0.8, label="accuracy")
        # the gap: hatched, unfilled, so that it reads on the bar (underconfident) and above it (overconfident)
        ax.bar(left[ok], (conf - acc)[ok], width[ok], bottom=acc[ok], align="edge", facecolor="none",
               edgecolor="C3", hatch="///", lw=0.8, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], ls="--", color="0.3", lw=1.2, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("auto")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.25)
        ax.tick_params(labelbottom=False)
        ece = b["ece"]
        t = b["temperature"]
        head = label + (f" (T = {t:.2f})" if math.isfinite(t) else "")
        ax.set_title(f"{head}\nECE = {ece:.3f}" if math.isfinite(ece) else f"{head}\nECE = n/a", fontsize=11)
        if col == 0:
            ax.legend(loc="upper left", fontsize=8.5)
        total = count.sum()
        hist.bar(left, count / total if total > 0 else count, width, align="edge", color="0.55", edgecolor="white", lw=0.8)
        hist.set_xlabel("confidence (max probability)")
        hist.set_ylabel("fraction\nof samples", fontsize=9)
        hist.grid(alpha=0.25)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------- projections

def _flat_features(features: Any) -> np.ndarray:
    x = _np(features)
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(x.shape[0], -1)


def _pca(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    if x.shape[1] < 2:  # one feature: a second, constant axis
        x = np.concatenate([x, np.zeros_like(x)], axis=1)
    k = min(2, x.shape[0])
    pca = PCA(n_components=k, random_state=seed)
    out = pca.fit_transform(x)
    ratio = pca.explained_variance_ratio_
    if k < 2:
        out = np.concatenate([out, np.zeros_like(out)], axis=1)
        ratio = np.concatenate([ratio, [0.0]])
    return out, ratio


def project(features: Any, method: str = "pca", seed: int = 0, perplexity: float | None = None,
            max_iter: int | None = None) -> np.ndarray:
    """2-D coordinates ``(N, 2)`` of ``features`` ``(N, ...)`` (flattened per sample).

    ``method="pca"``: ``sklearn.decomposition.PCA`` (deterministic, signs fixed by sklearn).
    ``method="tsne"``: ``sklearn.manifold.TSNE(init="pca", perplexity=min(30, (N-1)/3),
    random_state=seed)``: deterministic for a seed on one machine. Features must be finite.
    """
    x = _flat_features(features)
    if x.shape[0] < 2:
        raise ValueError(f"Projecting needs at least 2 samples, got {x.shape[0]}.")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf: drop those rows first (plot_projections does).")
    method = method.lower().replace("-", "")
    if method == "pca":
        return _pca(x, seed)[0]
    if method == "tsne":
        from sklearn.manifold import TSNE

        n = x.shape[0]
        perplexity = min(30.0, (n - 1) / 3) if perplexity is None else perplexity
        kw = {} if max_iter is None else {"max_iter": max_iter}
        if x.shape[1] < 2:
            x = np.concatenate([x, np.zeros_like(x)], axis=1)
        tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed, **kw)
        return tsne.fit_transform(x.astype(np.float32))
    raise ValueError(f"Unknown projection method '{method}': use 'pca' or 'tsne'.")


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def plot_projections(features_by_name: Mapping[str, Any], labels: Any, path: str | Path,
                     class_names: Sequence[str] | None = None, seed: int = 0, max_points: int = 2000,
                     methods: Sequence[str] = ("pca", "tsne"), title: str | None = None,
                     figsize: tuple[float, float] | None = None, dpi: int = DPI) -> Path:
    """One row per feature set (e.g. ``"pretrained"``, ``"fine-tuned"``), one panel per method
    (PCA, t-SNE), points coloured by class.

    Args:
        features_by_name: ``{name: (N, ...) features}``, all with the same ``N`` samples in the same order.
        labels: ``(N,)`` integer classes (or ``None``: one colour).
        class_names: names of the classes (legend); default the label values.
        seed: the subsample and t-SNE seed.
        max_points: at most this many samples, one deterministic subset shared by all feature sets.

    Rows with a non-finite feature in any set are dropped (the count is in the title).
    """
    names = list(features_by_name)
    if not names:
        raise ValueError("features_by_name is empty: give {'pretrained': features, 'fine-tuned': features}.")
    feats = {k: _flat_features(features_by_name[k]) for k in names}
    n = feats[names[0]].shape[0]
    for k, x in feats.items():
        if x.shape[0] != n:
            raise ValueError(f"'{k}' has {x.shape[0]} samples, '{names[0]}' has {n}: all sets need the same samples.")
    y = None if labels is None else _np(labels, np.int64).ravel()
    if y is not None and y.size != n:
        raise ValueError(f"{y.size} labels for {n} samples.")
    finite = np.ones(n, dtype=bool)
    for x in feats.values():
        finite &= np.isfinite(x).all(axis=1)
    dropped = int((~finite).sum())
    keep = np.flatnonzero(finite)
    keep = keep[_subsample(keep.size, max_points, seed)]
    if keep.size < 2:
        raise ValueError(f"Only {keep.size} samples with finite features: nothing to project.")
    classes = np.unique(y[keep]) if y is not None else np.array([0])
    cols = strategy_colors([str(c) for c in classes]) if len(classes) <= 20 else None
    import matplotlib

    fig = _figure(figsize or (4.6 * len(methods) + 2.0, 4.3 * len(names) + 0.4))
    axes = fig.subplots(len(names), len(methods), squeeze=False)
    method_titles = {"pca": "PCA", "tsne": "t-SNE"}
    for r, name in enumerate(names):
        x = feats[name][keep]
        for c, method in enumerate(methods):
            ax = axes[r, c]
            m = method.lower().replace("-", "")
            if m == "pca":
                xy, ratio = _pca(x, seed)
                ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.0f}% of variance)")
                ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.0f}%)")
            else:
                xy = project(x, method, seed)
                ax.set_xlabel(f"{method_titles.get(m, method)} 1")
                ax.set_ylabel(f"{method_titles.get(m, method)} 2")
                ax.set_xticks([])
                ax.set_yticks([])
            if y is None:
                ax.scatter(xy[:, 0], xy[:, 1], s=8, color="C0", alpha=0.7, lw=0)
            elif cols is not None:
                yk = y[keep]
                for cls in classes:
                    sel = yk == cls
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cols[str(cls)], alpha=0.75, lw=0)
            else:
                ax.scatter(xy[:, 0], xy[:, 1], s=8, c=y[keep], cmap=matplotlib.colormaps["turbo"], alpha=0.75, lw=0)
            ax.set_title(f"{name} — {method_titles.get(m, method)}")
            ax.grid(alpha=0.2)
    if y is not None and cols is not None:
        from matplotlib.lines import Line2D

        def cname(cls: int) -> str:
            if class_names is not None and 0 <= cls < len(class_names):
                return str(class_names[cls])
            return str(cls)

        handles = [Line2D([], [], ls="", marker="o", ms=7, color=cols[str(cls)], label=cname(int(cls)))
                   for cls in classes]
        fig.legend(handles=handles, loc="outside right upper", frameon=False, title="class", fontsize=9)
    note = f"{keep.size} samples" + (f", {dropped} with NaN features dropped" if dropped else "")
    fig.suptitle(f"{title} ({note})" if title else f"Feature projections ({note})")
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------- per-layer change

def _merge_order(orders: list[list[str]]) -> list[str]:
    """Groups in depth order: each list is in depth order; a group new to the merged list goes right
    after the last group that precedes it in its own list."""
    merged: list[str] = []
    for order in orders:
        last = -1
        for g in order:
            if g in merged:
                last = merged.index(g)
            else:
                merged.insert(last + 1, g)
                last += 1
    return merged


def plot_layer_change(layer_stats: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path,
                      groups: Sequence[str] | None = None, title: str | None = "How much each layer group changed",
                      colors: Mapping[str, Any] | None = None, log_weight_change: bool | None = None,
                      figsize: tuple[float, float] | None = None, dpi: int = DPI) -> Path:
    """Per layer group (x axis, in depth order), one bar per strategy: linear CKA between pretrained
    and fine-tuned activations (top; 1 = unchanged) and the relative weight change
    ``||W - W0|| / ||W0||`` (bottom; 0 = unchanged, e.g. frozen).

    ``layer_stats``: ``{strategy: {"cka": {group: value}, "weight_change": {group: value}}}``. Groups
    may be missing for some strategies (CKA has no head group) and values may be NaN: no bar there.
    ``groups``: the x order (default: the groups in the order given, merged over strategies).
    ``log_weight_change``: a symmetric log scale for the bottom panel (zeros stay visible as 0);
    by default when the largest non-zero change is over 30x the smallest (a new head next to a
    barely moved stem). Exact zeros are labelled ``0``; missing values ``n/a``.
    """
    names = list(layer_stats)
    cols = strategy_colors(names, colors)
    panels = [("cka", "linear CKA\n(pretrained vs fine-tuned)", "representation similarity — 1 = unchanged"),
              ("weight_change", "‖W − W₀‖ / ‖W₀‖", "relative weight change — 0 = unchanged")]
    if groups is None:
        orders = []
        for name in names:
            for key, _, _ in panels[::-1]:  # weight change first: it usually has every group, head included
                orders.append([str(g) for g in (layer_stats[name].get(key) or {})])
        groups = _merge_order(orders)
    groups = list(groups)
    k, s = len(groups), max(1, len(names))
    width = 0.8 / s
    fig = _figure(figsize or (min(16.0, max(6.5, 0.32 * k * s + 0.6 * k + 2.5)), 6.8))  # wide sets: thinner bars
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(k)
    for ax, (key, ylabel, sub) in zip(axes, panels):
        table = np.array([[_num((layer_stats[name].get(key) or {}).get(g)) for g in groups] for name in names])
        table = table.reshape(len(names), k)
        for i, name in enumerate(names):
            v = table[i]
            ok = np.isfinite(v)
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(pos[ok], v[ok], width * 0.92, color=cols[name], label=name)
            for p, value, group_has_any in zip(pos, v, np.isfinite(table).any(axis=0)):
                if not group_has_any:
                    continue  # one "n/a" for the whole group below
                if not math.isfinite(value):
                    ax.text(p, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="0.45")
                elif value == 0 and key == "weight_change":  # unchanged (frozen): a bar one cannot see
                    ax.text(p, 0, "0", ha="center", va="bottom", fontsize=7, color=cols[name])
        for j in np.flatnonzero(~np.isfinite(table).any(axis=0)):
            ax.text(x[j], 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="0.45",
                    transform=ax.get_xaxis_transform())
        ax.set_ylabel(ylabel)
        ax.set_title(sub, fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        finite = table[np.isfinite(table)]
        positive = finite[finite > 0]
        ymax = float(finite.max()) if finite.size else 0.0
        if key == "cka":
            ax.set_ylim(0, 1.05)
            continue
        log = log_weight_change
        if log is None:  # auto: when the largest change dwarfs the smallest non-zero one (head vs stem)
            log = positive.size > 1 and positive.max() / positive.min() > 30
        if log and positive.size:
            ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(positive.min())), linscale=0.5)
            ax.set_ylim(0, ymax * 2)
            ax.set_title(sub + " (symmetric log scale)", fontsize=10, loc="left")
        else:
            ax.set_ylim(0, ymax * 1.12 if ymax > 0 else 1)
    axes[-1].set_xticks(x, groups, rotation=30 if k > 6 or max(map(len, groups), default=0) > 8 else 0,
                        ha="right" if k > 6 or max(map(len, groups), default=0) > 8 else "center",
                        rotation_mode="anchor")
    axes[-1].set_xlabel("layer group (input → output)")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=cols[n], label=n) for n in names], loc="outside right upper",
               frameon=False, title="strategy")
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)
