"""Each loss against an independent reference: numpy, a closed form, or a hand-computed case."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ft.losses import (
    CDANLoss,
    DANNLoss,
    GradientReversal,
    MMDLoss,
    cdan_loss,
    coral,
    dann_loss,
    entropy,
    grl_coefficient,
    mean_alignment,
    minimum_class_confusion,
    mmd,
    mmd_linear,
    pseudo_label_loss,
    reverse_gradient,
)


def _np_gauss(x, y, bw, mults):
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return sum(np.exp(-d2 / (m * bw)) for m in mults)


def test_mmd_matches_a_numpy_reference_biased_and_unbiased():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(7, 3)), rng.normal(1.0, 1.0, size=(5, 3))
    mults, bw = (0.5, 1.0, 2.0), 1.7
    kss, ktt, kst = _np_gauss(s, s, bw, mults), _np_gauss(t, t, bw, mults), _np_gauss(s, t, bw, mults)
    biased = kss.mean() + ktt.mean() - 2 * kst.mean()
    unbiased = (kss.sum() - np.trace(kss)) / 42 + (ktt.sum() - np.trace(ktt)) / 20 - 2 * kst.mean()
    S, T = torch.tensor(s), torch.tensor(t)
    assert float(mmd(S, T, mults, bandwidth=bw)) == pytest.approx(biased, rel=1e-5)
    assert float(mmd(S, T, mults, bandwidth=bw, unbiased=True)) == pytest.approx(unbiased, rel=1e-5)


def test_mmd_of_identical_samples_is_zero():
    x = torch.randn(16, 8)
    assert float(mmd(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(mean_alignment(x, x.clone())) == 0.0
    assert float(coral(x, x.clone())) == pytest.approx(0.0, abs=1e-10)


def test_mmd_of_two_shifted_gaussians_matches_the_closed_form():
    # N(0, s^2 I) vs N(delta, s^2 I) in d dims, kernel exp(-||x - y||^2 / g):
    # MMD^2 = 2 (1 + 4 s^2 / g)^(-d/2) (1 - exp(-||delta||^2 / (g + 4 s^2)))
    torch.manual_seed(0)
    d, sigma, g, n = 2, 1.0, 2.0, 3000
    delta = torch.tensor([1.5, 0.0])
    s = torch.randn(n, d, dtype=torch.float64) * sigma
    t = torch.randn(n, d, dtype=torch.float64) * sigma + delta
    expected = 2 * (1 + 4 * sigma**2 / g) ** (-d / 2) * (1 - math.exp(-float(delta @ delta) / (g + 4 * sigma**2)))
    assert float(mmd(s, t, multipliers=(1.0,), bandwidth=g, unbiased=True)) == pytest.approx(expected, abs=0.01)
    assert float(mmd_linear(s, t, multipliers=(1.0,), bandwidth=g)) == pytest.approx(expected, abs=0.04)


def test_linear_time_mmd_matches_its_definition():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(6, 2)), rng.normal(size=(7, 2)) + 1
    bw, mults = 1.3, (1.0, 2.0)

    def k(a, b):
        return sum(np.exp(-((a - b) ** 2).sum(-1) / (m * bw)) for m in mults)

    ref = np.mean([k(s[i], s[i + 1]) + k(t[i], t[i + 1]) - k(s[i], t[i + 1]) - k(s[i + 1], t[i]) for i in (0, 2, 4)])
    assert float(mmd_linear(torch.tensor(s), torch.tensor(t), mults, bandwidth=bw)) == pytest.approx(ref, rel=1e-6)


def test_mmd_module_uses_the_median_heuristic_and_gives_gradients():
    s = torch.randn(10, 4, requires_grad=True)
    loss = MMDLoss()(s, torch.randn(12, 4) + 2)
    loss.backward()
    assert float(loss) > 0 and s.grad.abs().sum() > 0


def test_coral_matches_numpy():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(20, 5)), rng.normal(size=(15, 5)) * 2
    ref = ((np.cov(s, rowvar=False) - np.cov(t, rowvar=False)) ** 2).sum() / (4 * 25)
    assert float(coral(torch.tensor(s), torch.tensor(t))) == pytest.approx(ref, rel=1e-6)


def test_mean_alignment_hand_computed():
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[1.0, 3.0]])
    assert float(mean_alignment(s, t)) == pytest.approx(9.0)


def test_entropy_of_uniform_and_one_hot():
    assert float(entropy(torch.zeros(3, 4))) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([[100.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


REFERENCES = json.loads((Path(__file__).parent / "references" / "da_losses.json").read_text())


def test_mcc_value_and_gradient_equal_pytorch_adapts():
    """Pinned from pytorch-adapt's MCCLoss (see references/da_losses.json): the entropy weights are
    constants for the gradient, as in the authors' code; with them in the graph the gradient is off by 4%."""
    ref = REFERENCES["mcc"]
    logits = torch.tensor(ref["logits"], requires_grad=True)
    loss = minimum_class_confusion(logits, ref["temperature"])
    loss.backward()
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-6)
    expected = torch.tensor(ref["grad_logits"], dtype=torch.float32)
    assert torch.allclose(logits.grad, expected, rtol=0, atol=1e-6), (logits.grad - expected).abs().max()
    # no confusion at all when predictions are confident and disjoint
    confident = torch.tensor([[50.0, 0, 0], [0, 50.0, 0], [0, 0, 50.0]])
    assert float(minimum_class_confusion(confident, temperature=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_pseudo_labels_keep_only_confident_examples_hand_computed():
    logits = torch.tensor([[4.0, 0.0], [0.1, 0.0], [0.0, 5.0]])
    loss, mask = pseudo_label_loss(logits, threshold=0.9)
    assert mask.tolist() == [True, False, True]
    ce = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 1]), reduction="sum") / 3
    assert float(loss) == pytest.approx(float(ce))
    balanced, _ = pseudo_label_loss(torch.tensor([[5.0, 0], [5.0, 0], [5.0, 0], [0, 5.0]]), 0.9, class_balance=True)
    ce = torch.nn.functional.cross_entropy(torch.tensor([[5.0, 0]]), torch.tensor([0])).item()
    # 3 examples of class 0 weigh 4/(3*2) each, the one of class 1 weighs 4/(1*2): total 4 * ce / 4
    assert float(balanced) == pytest.approx((3 * (4 / 6) + 2) * ce / 4)


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    g = torch.randn(4, 3)
    y.backward(g)
    assert torch.allclose(x.grad, -0.3 * g)
    layer = GradientReversal(2.0)
    x.grad = None
    (layer(x) * 1.0).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -2.0))


def test_grl_schedule_is_danns():
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_coefficient(2.0) == grl_coefficient(1.0)  # clamped


def test_dann_loss_trains_the_discriminator_and_reverses_the_features():
    torch.manual_seed(0)
    s = torch.randn(8, 4, requires_grad=True)
    t = (torch.randn(8, 4) + 3).requires_grad_()
    disc = torch.nn.Linear(4, 1)
    loss, acc = dann_loss(s, t, lambda f: disc(f).squeeze(-1), coeff=1.0)
    labels = torch.cat([torch.zeros(8), torch.ones(8)])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(disc(torch.cat([s, t])).squeeze(-1), labels)
    assert float(loss) == pytest.approx(float(ref))
    loss.backward()
    # features receive minus the gradient the plain loss would give them
    s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    torch.nn.functional.binary_cross_entropy_with_logits(
        disc(torch.cat([s2, t2])).squeeze(-1), labels).backward()
    assert torch.allclose(s.grad, -s2.grad) and torch.allclose(t.grad, -t2.grad)
    assert 0.0 <= float(acc) <= 1.0
    module = DANNLoss(4)
    module.coeff = 0.5
    assert module(torch.randn(4, 4), torch.randn(4, 4)).ndim == 0


@pytest.mark.parametrize("case", REFERENCES["cdan"]["cases"],
                         ids=lambda c: f"{'randomized' if c['randomized'] else 'exact'}-"
                                       f"{'E' if c['entropy_conditioning'] else 'plain'}")
def test_cdan_value_and_feature_gradient_equal_the_authors_code(case):
    """Pinned from thuml/CDAN's ``CDAN()`` (see references/da_losses.json), exact and randomized map,
    with and without entropy conditioning. The features' gradient (reversed, x coeff) matches; the
    logits get none here, as in tllib and pytorch-adapt, while the authors' code also sends a reversed
    gradient through the entropy weights into the logits."""
    ref = REFERENCES["cdan"]
    t = {k: torch.tensor(ref[k], dtype=torch.float32) for k in ("fs", "ft", "ls", "lt", "rf", "rg")}
    w = torch.tensor(ref["w_random" if case["randomized"] else "w_exact"], dtype=torch.float32)
    fs, ft = t["fs"].clone().requires_grad_(), t["ft"].clone().requires_grad_()
    ls, lt = t["ls"].clone().requires_grad_(), t["lt"].clone().requires_grad_()
    loss, acc = cdan_loss(fs, ft, ls, lt, lambda x: x @ w + ref["bias"], coeff=ref["coeff"],
                          entropy_conditioning=case["entropy_conditioning"],
                          projection=(t["rf"], t["rg"]) if case["randomized"] else None)
    loss.backward()
    assert float(loss) == pytest.approx(case["loss"], rel=1e-6)
    grad = torch.cat([fs.grad, ft.grad])
    assert torch.allclose(grad, torch.tensor(case["grad_features"], dtype=torch.float32), rtol=0, atol=1e-7)
    assert ls.grad is None and lt.grad is None
    assert 0.0 <= float(acc) <= 1.0


def test_cdan_module_picks_the_randomized_map_for_wide_inputs():
    assert not CDANLoss(in_features=64, num_classes=10).randomized  # 640 entries: the exact outer product
    wide = CDANLoss(in_features=1280, num_classes=10)
    assert wide.randomized and wide.r_f.shape == (1280, 1024) and "r_f" in wide.state_dict()
    out = wide(torch.randn(4, 1280), torch.randn(4, 1280), torch.randn(4, 10), torch.randn(4, 10))
    assert out.ndim == 0 and torch.isfinite(out)


def test_losses_compute_in_float32_under_bf16_inputs():
    s, t = torch.randn(8, 4).bfloat16(), torch.randn(8, 4).bfloat16()
    for value in (mmd(s, t), coral(s, t), mean_alignment(s, t), entropy(s), minimum_class_confusion(s)):
        assert value.dtype == torch.float32
