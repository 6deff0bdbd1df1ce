"""Few-shot learning with frozen features: class prototypes, episodes, and an episodic evaluation.

Given features of a labelled set (from :meth:`lightning_ft.FineTuneModule.features` or a feature
cache), :func:`evaluate_few_shot` draws ``n_way``-way ``k_shot``-shot episodes and reports the mean
query accuracy with its 95% confidence interval, the way few-shot papers do (e.g. "63.2 ± 0.8 %"
over 600 episodes). :func:`init_prototype_head` starts a :class:`~lightning_ft.heads.PrototypeHead`
from a support set before fine-tuning (imprinting). Imports torch, numpy and scikit-learn only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Episode",
    "FewShotResult",
    "class_prototypes",
    "evaluate_few_shot",
    "init_prototype_head",
    "sample_episodes",
]

_LINEAR_C = 1.0
_LINEAR_MAX_ITER = 1000


def _labels_numpy(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D array of integer class ids, got shape {array.shape}, {array.dtype}.")
    return array.astype(np.int64)


def class_prototypes(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, normalize: bool = True
) -> torch.Tensor:
    """The prototype of each class: the mean of its (L2-normalised) features.

    Args:
        features: one feature vector per sample.
        labels: the class of each sample, in ``[0, num_classes)``.
        num_classes: number of classes; every class needs at least one sample.
        normalize: L2-normalise each feature before the mean (cosine prototypes, as
            :class:`~lightning_ft.heads.PrototypeHead` compares); the mean itself is not re-normalised.

    Returns:
        The prototypes, one row per class.

    Raises:
        ValueError: a class has no sample, or a label is out of range.

    Shape:
        features ``(N, D)``, labels ``(N,)`` -> ``(num_classes, D)``
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"class_prototypes needs features (N, D) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}."
        )
    labels = labels.to(features.device).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"class_prototypes: labels must lie in [0, {num_classes}), got values from {int(labels.min())} to "
            f"{int(labels.max())}. Map the class ids to 0..num_classes-1 or raise num_classes."
        )
    x = F.normalize(features.float(), dim=-1) if normalize else features.float()
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"class_prototypes: class(es) {empty} have no sample in the support set, so they have no prototype. "
            "Give at least one sample of every class, or lower num_classes."
        )
    sums = torch.zeros(num_classes, x.shape[1], device=x.device).index_add_(0, labels, x)
    return (sums / counts.unsqueeze(1)).to(features.dtype)


@torch.no_grad()
def init_prototype_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    """Set the prototypes of a :class:`~lightning_ft.heads.PrototypeHead` from a support set, in place.

    Each class's prototype becomes the mean of its L2-normalised support features (weight
    imprinting): the head then classifies by the nearest class mean in cosine, before any training.

    Args:
        head: a module with a ``prototypes`` parameter ``(num_classes, D)``, e.g. ``PrototypeHead``.
        features: support features.
        labels: their classes, in ``[0, num_classes)``; every class needs a sample.

    Returns:
        The same head.

    Shape:
        features ``(N, D)``, labels ``(N,)``
    """
    prototypes = getattr(head, "prototypes", None)
    if not isinstance(prototypes, torch.Tensor) or prototypes.dim() != 2:
        raise TypeError(
            f"init_prototype_head needs a head with a prototypes parameter (num_classes, D), such as "
            f"lightning_ft.heads.PrototypeHead; got {type(head).__name__}. Build it with head='prototype'."
        )
    if features.dim() != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"init_prototype_head: features {tuple(features.shape)} must be (N, {prototypes.shape[1]}), the "
            "width of the head's prototypes."
        )
    new = class_prototypes(features.to(prototypes.device), labels, prototypes.shape[0])
    prototypes.copy_(new.to(prototypes.dtype))
    return head


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: indices into the data set, grouped by class.

    ``support[i * k_shot:(i + 1) * k_shot]`` and ``query[i * n_query:(i + 1) * n_query]`` are samples
    of class ``classes[i]``; :attr:`support_labels` and :attr:`query_labels` give the episode's
    labels ``0..n_way-1``.

    Args:
        support: indices of the support samples ``(n_way * k_shot,)``.
        query: indices of the query samples ``(n_way * n_query,)``.
        classes: the class ids of the episode ``(n_way,)``.
    """

    support: np.ndarray
    query: np.ndarray
    classes: np.ndarray

    @property
    def support_labels(self) -> np.ndarray:
        """Episode labels ``0..n_way-1`` of the support samples."""
        return np.repeat(np.arange(len(self.classes)), len(self.support) // len(self.classes))

    @property
    def query_labels(self) -> np.ndarray:
        """Episode labels ``0..n_way-1`` of the query samples."""
        return np.repeat(np.arange(len(self.classes)), len(self.query) // len(self.classes))


def sample_episodes(
    labels: torch.Tensor | np.ndarray, n_way: int, k_shot: int, n_query: int, n_episodes: int, seed: int
) -> list[Episode]:
    """Draw few-shot episodes: ``n_way`` classes, ``k_shot`` support and ``n_query`` query samples each.

    Support and query are disjoint within an episode. Only classes with at least
    ``k_shot + n_query`` samples are drawn. The same ``seed`` gives the same episodes.

    Args:
        labels: the class of every sample of the data set.
        n_way: classes per episode (>= 2).
        k_shot: support samples per class (>= 1).
        n_query: query samples per class (>= 1).
        n_episodes: number of episodes (>= 1).
        seed: seed of the episode draw.

    Returns:
        The episodes.

    Raises:
        ValueError: fewer than ``n_way`` classes have enough samples.
    """
    y = _labels_numpy(labels)
    for name, value, least in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1),
                               ("n_episodes", n_episodes, 1)):
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"sample_episodes: {name} must be an int >= {least}, got {value!r}.")
    classes, counts = np.unique(y, return_counts=True)
    need = k_shot + n_query
    eligible = classes[counts >= need]
    if len(eligible) < n_way:
        skipped = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < need}
        raise ValueError(
            f"sample_episodes: a {n_way}-way episode needs {n_way} classes with at least k_shot + n_query = {need} "
            f"samples; only {len(eligible)} have that (classes with fewer, and their counts: {skipped}). "
            "Lower n_way, k_shot or n_query."
        )
    members = {int(c): np.flatnonzero(y == c) for c in eligible}
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(n_episodes):
        chosen = rng.choice(eligible, size=n_way, replace=False)
        picks = [rng.choice(members[int(c)], size=need, replace=False) for c in chosen]
        support = np.concatenate([p[:k_shot] for p in picks])
        query = np.concatenate([p[k_shot:] for p in picks])
        episodes.append(Episode(support=support, query=query, classes=chosen.astype(np.int64)))
    return episodes


@dataclass(frozen=True)
class FewShotResult:
    """Mean query accuracy over episodes, with its 95% confidence interval.

    ``mean`` and ``ci95`` are fractions (``0.632``); ``str()`` gives percent, ``"63.2 ± 0.8 %"``.

    Args:
        mean: mean accuracy over the episodes.
        ci95: ``1.96 * std(ddof=1) / sqrt(n_episodes)`` (NaN for one episode).
        accuracies: the accuracy of each episode ``(n_episodes,)``.
    """

    mean: float
    ci95: float
    accuracies: np.ndarray

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f} ± {100 * self.ci95:.1f} %"


def _prototype_accuracies(x: torch.Tensor, episodes: list[Episode], chunk_elements: int = 2**24) -> torch.Tensor:
    """Nearest-prototype accuracy of many episodes at once: a few batched ops per chunk of episodes."""
    n_way = len(episodes[0].classes)
    support = torch.from_numpy(np.stack([e.support for e in episodes])).to(x.device)  # (E, n_way * k)
    query = torch.from_numpy(np.stack([e.query for e in episodes])).to(x.device)  # (E, n_way * q)
    truth = torch.from_numpy(episodes[0].query_labels).to(x.device)  # the same layout in every episode
    per_episode = (support.shape[1] + query.shape[1]) * x.shape[1]
    step = max(1, chunk_elements // per_episode)
    accuracies = []
    for i in range(0, len(episodes), step):
        s, q = x[support[i : i + step]], x[query[i : i + step]]  # (e, n_way * k, D), (e, n_way * q, D)
        # support is grouped by class: the class means by a reshape
        prototypes = F.normalize(s.view(len(s), n_way, -1, x.shape[1]).mean(2), dim=-1)  # (e, n_way, D)
        predicted = torch.bmm(q, prototypes.transpose(1, 2)).argmax(-1)  # (e, n_way * q)
        accuracies.append((predicted == truth).float().mean(1))
    return torch.cat(accuracies)


def _linear_accuracy(x: np.ndarray, episode: Episode) -> float:
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=_LINEAR_C, solver="lbfgs", max_iter=_LINEAR_MAX_ITER)
    probe.fit(x[episode.support], episode.support_labels)
    return float((probe.predict(x[episode.query]) == episode.query_labels).mean())


def evaluate_few_shot(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    n_way: int,
    k_shot: int,
    n_query: int = 15,
    n_episodes: int = 600,
    seed: int = 0,
    classifier: Literal["prototype", "linear"] = "prototype",
) -> FewShotResult:
    """Episodic few-shot accuracy of frozen features.

    Draws episodes with :func:`sample_episodes` and classifies each episode's queries from its
    support set only. Features are L2-normalised first. ``prototype``: the nearest class prototype
    (mean support feature) by cosine. ``linear``: a linear probe, scikit-learn's
    ``LogisticRegression`` (``C=1.0``, lbfgs, ``max_iter=1000``) fitted on the same support set, with
    BLAS limited to one thread (the problems are tiny).

    Args:
        features: one feature vector per sample.
        labels: the class of each sample.
        n_way: classes per episode.
        k_shot: support samples per class.
        n_query: query samples per class.
        n_episodes: number of episodes (600 is customary).
        seed: seed of the episode draw; the same seed gives the same episodes for both classifiers.
        classifier: ``"prototype"`` or ``"linear"``.

    Returns:
        The mean accuracy, its 95% confidence interval and the per-episode accuracies.

    Shape:
        features ``(N, D)``, labels ``(N,)``
    """
    if classifier not in ("prototype", "linear"):
        raise ValueError(f"evaluate_few_shot classifier must be 'prototype' or 'linear', got {classifier!r}.")
    x = torch.as_tensor(features)
    y = _labels_numpy(labels)
    if x.dim() != 2 or len(x) != len(y):
        raise ValueError(
            f"evaluate_few_shot needs features (N, D) and labels (N,), got {tuple(x.shape)} and {y.shape}."
        )
    x = F.normalize(x.detach().float(), dim=-1)
    episodes = sample_episodes(y, n_way, k_shot, n_query, n_episodes, seed)
    if classifier == "prototype":
        accuracies = _prototype_accuracies(x, episodes).cpu().numpy().astype(np.float64)
    else:
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

        xn = x.cpu().numpy()
        # a probe on a few dozen samples: BLAS threads only spin (20x slower on 2 busy cores)
        with threadpool_limits(limits=1, user_api="blas"):
            accuracies = np.array([_linear_accuracy(xn, e) for e in episodes], dtype=np.float64)
    ci95 = 1.96 * float(accuracies.std(ddof=1)) / math.sqrt(len(accuracies)) if len(accuracies) > 1 else math.nan
    return FewShotResult(mean=float(accuracies.mean()), ci95=ci95, accuracies=accuracies)
