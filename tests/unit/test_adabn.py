import pytest
import torch
from torch import nn

from lightning_ft.adabn import adapt_batchnorm


def test_adabn_sets_the_exact_target_statistics_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model.train()
    model[1].momentum = 0.3
    weight_before = model[0].weight.clone()
    batches = [torch.randn(16, 3) * 2 + 5 for _ in range(4)]
    used = adapt_batchnorm(model, batches)
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    expected_mean = torch.stack([a.mean(0) for a in acts]).mean(0)
    expected_var = torch.stack([a.var(0, unbiased=True) for a in acts]).mean(0)
    assert used == 4
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-4)
    assert torch.equal(model[0].weight, weight_before)
    assert model.training and model[1].training and model[1].momentum == 0.3


def test_adabn_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(nn.Linear(2, 2), [torch.randn(2, 2)])
