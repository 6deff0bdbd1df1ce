"""FineTuneModule(channels_last=True) computes the same function, faster; in-memory datamodules'
``augment`` draws a random affine per training sample and leaves validation and test alone."""

import pytest
import torch

from lightning_ft import FineTuneModule
from lightning_ft.feature_tables import random_transform_report
from lightning_ft.data import DigitsDataModule


def test_channels_last_gives_the_same_outputs_and_gradients_in_channels_last_memory():
    torch.manual_seed(0)
    dense = FineTuneModule("test_resnet", num_classes=3, in_chans=1)
    last = FineTuneModule("test_resnet", num_classes=3, in_chans=1, channels_last=True)
    last.load_state_dict(dense.state_dict())
    conv = last.backbone.layer1[0].conv1.weight  # (out, in > 1, k, k): the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(4, 1, 32, 32)
    seen = []
    last.backbone.conv1[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    a, b = dense(x), last(x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)  # the input is converted too
    assert torch.allclose(a, b, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    assert torch.allclose(dense.backbone.layer1[0].conv1.weight.grad, conv.grad, atol=1e-4)
    # a checkpoint of either loads into the other
    dense.load_state_dict(last.state_dict())
    assert torch.allclose(dense(x), last(x), atol=1e-5)


def test_augment_draws_a_random_affine_per_training_sample_only():
    plain = DigitsDataModule(image_size=16, channels=1, mean=(0.5,), std=(0.25,), limit=32)
    aug = DigitsDataModule(image_size=16, channels=1, mean=(0.5,), std=(0.25,), limit=32, augment=True)
    plain.setup()
    aug.setup()
    torch.manual_seed(0)
    x0 = aug.train_set[3][0]
    torch.manual_seed(1)
    x1 = aug.train_set[3][0]
    assert not torch.equal(x0, x1)  # another draw
    original = plain.train_set[3][0]
    assert x0.shape == original.shape and aug.train_set[3][1] == plain.train_set[3][1]
    # the border the transform uncovers is the background (pixel 0 -> (0 - 0.5) / 0.25), not another value
    assert float(x0.min()) == pytest.approx(-2.0) and float(original.min()) == pytest.approx(-2.0)
    assert float(x0.max()) <= (1.0 - 0.5) / 0.25 + 1e-5  # interpolation stays in the normalised pixel range
    for split in ("val_set", "test_set"):
        a, b = getattr(aug, split)[0][0], getattr(plain, split)[0][0]
        assert torch.equal(a, b)
    assert "RandomAffine" in (random_transform_report(aug.train_set) or "")  # FeatureCache will refuse it, by name
    assert random_transform_report(plain.train_set) is None
