"""Few-shot: prototypes by hand, imprinting a PrototypeHead, episodes, and the episodic evaluation on
separable and on pure-noise features (chance level: the labels are used, and only the support set)."""

import math

import numpy as np
import pytest
import torch

from lightning_ft.fewshot import (
    Episode,
    FewShotResult,
    class_prototypes,
    evaluate_few_shot,
    init_prototype_head,
    sample_episodes,
)
from lightning_ft.heads import LinearHead, PrototypeHead


def _clusters(n_classes=10, per_class=25, dim=32, spread=4.0, seed=0, noise_only=False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]  # classes interleaved, not in blocks
    noise = torch.randn(len(labels), dim, generator=g)
    if noise_only:
        return noise, labels
    centres = torch.randn(n_classes, dim, generator=g) * spread
    return centres[labels] + noise, labels


def test_prototypes_are_means_of_normalised_features():
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [-2.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 1])
    expected = torch.tensor([[(0.6 + 0.0) / 2, (0.8 + 1.0) / 2], [-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(class_prototypes(features, labels, 3), expected)
    raw = torch.tensor([[1.5, 3.0], [-2.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(class_prototypes(features, labels, 3, normalize=False), raw)
    with pytest.raises(ValueError, match=r"class\(es\) \[1, 3\] have no sample"):
        class_prototypes(features, torch.tensor([0, 0, 2, 2]), 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        class_prototypes(features, labels, 2)


def test_init_prototype_head_classifies_its_support_set_perfectly():
    features, labels = _clusters()
    head = PrototypeHead(32, 10)
    assert (head(features).argmax(-1) == labels).float().mean() < 0.5  # random prototypes
    assert init_prototype_head(head, features, labels) is head
    assert torch.equal(head(features).argmax(-1), labels)
    assert head.prototypes.requires_grad  # still a trainable parameter
    with pytest.raises(TypeError, match="prototypes parameter"):
        init_prototype_head(LinearHead(32, 10), features, labels)
    with pytest.raises(ValueError, match=r"must be \(N, 32\)"):
        init_prototype_head(head, features[:, :8], labels)


def test_episodes_have_disjoint_support_and_query_of_the_right_classes_and_are_deterministic():
    labels = np.repeat(np.arange(8), 12)
    labels[72:77] = 7  # class 6 keeps 7 samples: too few for k_shot + n_query = 8
    labels[:] = np.random.default_rng(1).permutation(labels)
    episodes = sample_episodes(labels, n_way=4, k_shot=5, n_query=3, n_episodes=50, seed=3)
    assert len(episodes) == 50
    for e in episodes:
        assert isinstance(e, Episode) and len(e.support) == 20 and len(e.query) == 12
        assert len(set(e.support) | set(e.query)) == 32  # disjoint, no repeats
        assert len(set(e.classes)) == 4 and 6 not in e.classes
        assert np.array_equal(labels[e.support], e.classes[e.support_labels])
        assert np.array_equal(labels[e.query], e.classes[e.query_labels])
    again = sample_episodes(torch.from_numpy(labels), 4, 5, 3, 50, seed=3)
    assert all(
        np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query) for a, b in zip(episodes, again)
    )
    other = sample_episodes(labels, 4, 5, 3, 50, seed=4)
    assert not all(np.array_equal(a.support, b.support) for a, b in zip(episodes, other))
    with pytest.raises(ValueError, match=r"only 7 have that.*\{6: 7\}.*Lower n_way"):
        sample_episodes(labels, 8, 5, 3, 10, seed=0)


@pytest.mark.parametrize("classifier", ["prototype", "linear"])
def test_separable_features_score_100_and_noise_scores_chance(classifier):
    episodes = 600 if classifier == "prototype" else 12  # a probe is fitted per episode: a few suffice
    features, labels = _clusters()
    result = evaluate_few_shot(features, labels, n_way=5, k_shot=1, n_episodes=episodes, classifier=classifier)
    assert result.mean == pytest.approx(1.0, abs=0.01)
    noise, labels = _clusters(noise_only=True)
    result = evaluate_few_shot(noise, labels, n_way=5, k_shot=5, n_episodes=episodes, classifier=classifier)
    assert result.accuracies.shape == (episodes,)
    assert abs(result.mean - 0.2) < max(0.05, 3 * result.ci95)


def test_confidence_interval_formula_and_printing():
    features, labels = _clusters(spread=0.6)
    result = evaluate_few_shot(features.numpy(), labels.numpy(), n_way=5, k_shot=1, n_query=5, n_episodes=200, seed=7)
    acc = result.accuracies
    assert 0.3 < result.mean < 0.95 and acc.std() > 0  # a hard enough case for a non-zero interval
    assert result.mean == pytest.approx(acc.mean())
    assert result.ci95 == pytest.approx(1.96 * np.std(acc, ddof=1) / math.sqrt(200))
    assert str(FewShotResult(mean=0.6321, ci95=0.0079, accuracies=acc)) == "63.2 ± 0.8 %"
    same = evaluate_few_shot(features, labels, n_way=5, k_shot=1, n_query=5, n_episodes=200, seed=7)
    assert np.array_equal(same.accuracies, acc)
    with pytest.raises(ValueError, match="classifier must be"):
        evaluate_few_shot(features, labels, 5, 1, classifier="knn")
