"""Linear CKA against an independent numpy reference (Kornblith et al.'s colab, gram-matrix form),
its invariances, and streaming over batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ft.analysis import LinearCKA, linear_cka


# ---------------------------------------------------------------- reference: Kornblith's colab, verbatim maths
def gram_linear(x: np.ndarray) -> np.ndarray:
    return x.dot(x.T)


def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    gram = gram.copy()
    if unbiased:
        # U-centering (Szekely & Rizzo 2014), as in the colab: <U(K), U(L)> = n(n-3) HSIC_1 (Song et al. 2012)
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def cka_reference(gram_x: np.ndarray, gram_y: np.ndarray, debiased: bool = False) -> float:
    gram_x = center_gram(gram_x, unbiased=debiased)
    gram_y = center_gram(gram_y, unbiased=debiased)
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    return float(scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y)))


def related(n: int = 60, dx: int = 12, dy: int = 7, seed: int = 0, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two representations sharing 3 latent directions, plus noise (CKA well inside (0, 1))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    x = z @ rng.normal(size=(3, dx)) + rng.normal(size=(n, dx)) + offset
    y = z @ rng.normal(size=(3, dy)) + 1.5 * rng.normal(size=(n, dy)) + offset
    return x, y


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("debiased", [True, False])
def test_matches_kornblith_gram_reference(debiased: bool) -> None:
    x, y = related()
    expected = cka_reference(gram_linear(x), gram_linear(y), debiased=debiased)
    assert 0.1 < expected < 0.95
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(expected, abs=1e-9)
    # torch input (float32 on the way in) gives the value of those float32 numbers
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    ref32 = cka_reference(gram_linear(xt.double().numpy()), gram_linear(yt.double().numpy()), debiased=debiased)
    assert linear_cka(xt, yt, debiased=debiased) == pytest.approx(ref32, abs=1e-9)


@pytest.mark.parametrize("debiased", [True, False])
def test_matches_reference_with_a_large_mean_like_post_relu_activations(debiased: bool) -> None:
    # uncentred one-pass sums would cancel here; the first-batch shift keeps the result exact
    x, y = related(n=300, offset=50.0, seed=3)
    expected = cka_reference(gram_linear(x), gram_linear(y), debiased=debiased)
    metric = LinearCKA(debiased=debiased)
    for i in range(0, 300, 1 if debiased else 50):
        metric.update(x[i:i + (1 if debiased else 50)], y[i:i + (1 if debiased else 50)])
    assert metric.compute() == pytest.approx(expected, abs=1e-8)


def test_debiased_removes_the_inflation_of_few_samples_in_many_dimensions() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 50)), rng.normal(size=(20, 50))  # independent
    biased, debiased = linear_cka(x, y, debiased=False), linear_cka(x, y, debiased=True)
    assert biased > 0.5
    assert abs(debiased) < 0.15


# ---------------------------------------------------------------- invariances
@pytest.mark.parametrize("debiased", [True, False])
def test_identical_activations_give_one(debiased: bool) -> None:
    x, _ = related()
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [True, False])
def test_invariant_to_orthogonal_map_and_isotropic_scale(debiased: bool) -> None:
    x, y = related()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(x.shape[1], x.shape[1])))
    base = linear_cka(x, y, debiased=debiased)
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, x @ q * 5.0, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x + 4.0, y - 2.0, debiased=debiased) == pytest.approx(base, abs=1e-10)  # shifts too


@pytest.mark.parametrize("debiased", [True, False])
def test_not_invariant_to_a_general_invertible_linear_map(debiased: bool) -> None:
    x, y = related()
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
    a = np.diag(np.logspace(-2, 1, x.shape[1])) @ q  # invertible, strongly anisotropic
    assert np.linalg.cond(a) < 1e4
    assert linear_cka(x, x @ a, debiased=debiased) < 0.9
    assert abs(linear_cka(x @ a, y, debiased=debiased) - linear_cka(x, y, debiased=debiased)) > 0.05


# ---------------------------------------------------------------- streaming
@pytest.mark.parametrize("debiased", [True, False])
def test_streaming_does_not_depend_on_the_batch_size(debiased: bool) -> None:
    x, y = related(n=128, dx=20, dy=9, seed=5, offset=3.0)
    whole = linear_cka(x, y, debiased=debiased)
    for size in (1, 7, 64, 128):
        metric = LinearCKA(debiased=debiased)
        for i in range(0, len(x), size):
            metric.update(torch.from_numpy(x[i:i + size]), torch.from_numpy(y[i:i + size]))
        assert metric.n == 128
        assert metric.compute() == pytest.approx(whole, abs=1e-10), size


def test_averaging_per_batch_cka_is_a_different_biased_quantity() -> None:
    rng = np.random.default_rng(0)
    n = 256
    z = rng.normal(size=(n, 4))
    x = np.hstack([z, rng.normal(size=(n, 28))])
    y = np.hstack([z @ rng.normal(size=(4, 4)), rng.normal(size=(n, 28))])

    def per_batch_mean(b: int, debiased: bool) -> float:
        return float(np.mean([linear_cka(x[i:i + b], y[i:i + b], debiased=debiased) for i in range(0, n, b)]))

    whole = linear_cka(x, y, debiased=False)
    # biased CKA on a batch of 8 in 32 dimensions is inflated: the average is far above the whole-set value
    # and moves with the batch size, which a streamed LinearCKA does not
    assert per_batch_mean(8, False) > whole + 0.3
    assert per_batch_mean(8, False) - per_batch_mean(32, False) > 0.1
    # the debiased estimator is unbiased for HSIC, not for the ratio: averaging still shifts it
    assert abs(per_batch_mean(8, True) - linear_cka(x, y, debiased=True)) > 0.01


def test_reset_forgets_the_samples_and_the_widths() -> None:
    x, y = related()
    metric = LinearCKA()
    metric.update(x, np.random.default_rng(9).normal(size=(60, 4)))
    metric.reset()
    metric.update(x, y)
    assert metric.n == 60
    assert metric.compute() == pytest.approx(linear_cka(x, y), abs=1e-12)


def test_empty_batches_are_skipped() -> None:
    x, y = related()
    metric = LinearCKA()
    metric.update(x[:0], y[:0])
    metric.update(x, y)
    assert metric.compute() == pytest.approx(linear_cka(x, y), abs=1e-12)


# ---------------------------------------------------------------- refusals
def test_too_few_samples() -> None:
    x, y = related(n=3)
    with pytest.raises(ValueError, match="at least 4 samples; got 3.*debiased=False"):
        linear_cka(x, y)
    assert np.isfinite(linear_cka(x, y, debiased=False))
    with pytest.raises(ValueError, match="at least 2 samples; got 1"):
        linear_cka(x[:1], y[:1], debiased=False)
    with pytest.raises(ValueError, match="got 0"):
        LinearCKA().compute()


def test_mismatched_batch_sizes() -> None:
    x, y = related()
    with pytest.raises(ValueError, match="same samples: x has 60 rows, y has 59"):
        LinearCKA().update(x, y[:59])


def test_feature_width_change_between_batches() -> None:
    x, y = related()
    metric = LinearCKA()
    metric.update(x[:10], y[:10])
    with pytest.raises(ValueError, match=r"first \(Dx, Dy\) = \(12, 7\), now \(11, 7\)"):
        metric.update(x[10:, :11], y[10:])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad: float) -> None:
    x, y = related()
    y = y.copy()
    y[3, 2] = bad
    with pytest.raises(ValueError, match=r"y holds NaN or inf \(1 of 420 values"):
        linear_cka(x, y)
    with pytest.raises(ValueError, match="x holds NaN or inf"):
        linear_cka(torch.from_numpy(y), torch.from_numpy(x))


def test_inputs_must_be_2d() -> None:
    with pytest.raises(ValueError, match=r"x must be 2-D \(batch, features\); got shape \(4, 3, 2, 2\).*mean\(dim=\(2, 3\)\)"):
        linear_cka(torch.randn(4, 3, 2, 2), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"y must be 2-D.*got shape \(4,\)"):
        linear_cka(torch.randn(4, 3), torch.randn(4))
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array"):
        linear_cka([[1.0, 2.0]] * 4, torch.randn(4, 2))


@pytest.mark.parametrize("debiased", [True, False])
def test_constant_representation_is_refused(debiased: bool) -> None:
    x, _ = related()
    const = np.tile(np.array([[0.1, 0.3, 7.0]]), (60, 1))
    with pytest.raises(ValueError, match="y has \\(numerically\\) zero variance over the 60 samples"):
        linear_cka(x, const, debiased=debiased)
