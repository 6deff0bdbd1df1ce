"""TemporalHead: exact masked pooling, L-TAE attention against a numpy reference, day-of-year encoding."""

import math

import numpy as np
import pytest
import torch
from scipy.special import erf

from lightning_ft.heads import HEADS, TemporalHead, build_head

POOLINGS = ["mean", "max", "last", "attention"]


def _series(b=3, t=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, t, d, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.4
    mask[:, 0] = True
    mask[1] = torch.tensor([True, False, True, False, False, False])[:t]  # holes, last valid date at 2
    doy = torch.sort(torch.randint(1, 366, (b, t), generator=g), dim=1).values
    return features, mask, doy


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_and_masked_dates_never_change_the_logits(pooling):
    torch.manual_seed(0)
    head = TemporalHead(16, 5, pooling=pooling, num_heads=4, hidden_dim=32).eval()
    features, mask, doy = _series()
    logits = head(features, mask, doy)
    # padding dates with garbage: NaN, huge values, nonsense days of year
    pad = torch.full((3, 4, 16), float("nan"))
    pad[:, 1] = 1e30
    padded = head(
        torch.cat([features, pad], 1),
        torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1),
        torch.cat([doy, torch.tensor([[999, -5, 0, 12345]] * 3)], 1),
    )
    assert torch.equal(logits, padded)
    # garbage in masked (clouded) dates inside the series changes nothing either
    clouded = features.clone()
    clouded[~mask] = float("inf")
    garbled_doy = torch.where(mask, doy, torch.full_like(doy, 777))
    assert torch.equal(head(clouded, mask, garbled_doy), logits)


def test_mean_max_last_pool_by_hand():
    features, mask, doy = _series()
    for pooling, expected in [
        ("mean", [features[i][mask[i]].mean(0) for i in range(3)]),
        ("max", [features[i][mask[i]].max(0).values for i in range(3)]),
        ("last", [features[i][mask[i]][-1] for i in range(3)]),
    ]:
        head = TemporalHead(16, 5, pooling=pooling)
        pooled = head.pool(features, mask, doy)
        assert torch.allclose(pooled, torch.stack(expected), atol=1e-6), pooling
        assert torch.allclose(head(features, mask, doy), head.fc(pooled))
    # "last" with holes: sample 1 is valid at dates 0 and 2 only
    assert torch.equal(TemporalHead(16, 5, pooling="last").pool(features, mask, doy)[1], features[1, 2])


def _np_layer_norm(x, weight, bias, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def _np_reference(head, features, mask, doy):
    """L-TAE written out per sample over its valid dates only, in float64 numpy."""
    p = {k: v.detach().double().numpy() for k, v in head.state_dict().items()}
    heads, dk = head.num_heads, head.key_dim
    width = p["proj.weight"].shape[0]
    dh = width // heads
    out = []
    for i in range(features.shape[0]):
        x = features[i][mask[i]].double().numpy()
        t = doy[i][mask[i]].double().numpy()
        e = _np_layer_norm(x, p["in_norm.weight"], p["in_norm.bias"]) @ p["proj.weight"].T + p["proj.bias"]
        j = np.arange(dh)
        angle = t[:, None] / 365.0 ** (2 * (j // 2) / dh)
        pe = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
        e = e + np.tile(pe, heads)
        keys = (e @ p["key.weight"].T + p["key.bias"]).reshape(len(t), heads, dk)
        pooled = []
        for n in range(heads):
            score = keys[:, n] @ p["query"][n] / math.sqrt(dk)
            a = np.exp(score - score.max())
            a /= a.sum()
            pooled.append(a @ e[:, n * dh : (n + 1) * dh])
        h = np.concatenate(pooled) @ p["mlp.0.weight"].T + p["mlp.0.bias"]
        h = _np_layer_norm(h, p["mlp.1.weight"], p["mlp.1.bias"])
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        out.append(h @ p["fc.weight"].T + p["fc.bias"])
    return np.stack(out)


def test_attention_matches_an_ltae_reference_written_in_numpy():
    torch.manual_seed(1)
    head = TemporalHead(16, 5, pooling="attention", num_heads=4, key_dim=8, hidden_dim=32).eval()
    with torch.no_grad():  # non-trivial norms
        for norm in (head.in_norm, head.mlp[1]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    features, mask, doy = _series()
    logits = head(features, mask, doy)
    assert np.allclose(logits.detach().double().numpy(), _np_reference(head, features, mask, doy), atol=1e-5)


def test_attention_uses_the_day_of_year_not_the_position():
    torch.manual_seed(2)
    head = TemporalHead(16, 5, pooling="attention", hidden_dim=32).eval()
    features, mask, doy = _series()
    logits = head(features, mask, doy)
    # permuting the dates together with their days of year leaves the output unchanged...
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(head(features[:, perm], mask[:, perm], doy[:, perm]), logits, atol=1e-5)
    # ...while shifting the days of year changes it
    assert not torch.allclose(head(features, mask, doy + 40), logits, atol=1e-3)
    # and the encoding is L-TAE's sinusoid of the day of year, repeated for each head
    pe = head.positional_encoding(torch.tensor([[0, 100]]))
    assert pe.shape == (1, 2, 32)
    assert torch.allclose(pe[0, 0, :8], torch.tensor([0.0, 1.0] * 4))
    assert pe[0, 1, 0] == pytest.approx(math.sin(100.0)) and pe[0, 1, 3] == pytest.approx(math.cos(100 / 365 ** 0.25))
    assert torch.equal(pe[..., :8], pe[..., 8:16])


def test_attention_gives_gradients_to_valid_dates_only():
    torch.manual_seed(3)
    head = TemporalHead(16, 5, pooling="attention", hidden_dim=32)
    features, mask, doy = _series()
    features.requires_grad_(True)
    head(features, mask, doy).sum().backward()
    touched = features.grad.abs().sum(-1) > 0
    assert torch.equal(touched, mask)
    assert head.query.grad.abs().sum() > 0 and head.key.weight.grad.abs().sum() > 0


def test_registered_and_built_by_name():
    assert HEADS["temporal"] is TemporalHead
    head = build_head("temporal", 16, 3, pooling="max")
    assert isinstance(head, TemporalHead) and head.wants_dates and not head.wants_tokens
    features, mask, doy = _series()
    assert head(features, mask, doy).shape == (3, 3)


def test_bad_inputs_are_explained():
    head = TemporalHead(16, 5, pooling="mean")
    features, mask, doy = _series()
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\].*no valid date.*True = valid"):
        head(features, empty, doy)
    with pytest.raises(TypeError, match="mask must be bool.*key_padding_mask"):
        head(features, mask.float(), doy)
    with pytest.raises(ValueError, match=r"expects features \(B, T, D\)"):
        head(features[0], mask, doy)
    with pytest.raises(ValueError, match="mask .* and doy .* must both be"):
        head(features, mask[:, :3], doy)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        TemporalHead(16, 5, hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        TemporalHead(16, 5, pooling="median")
