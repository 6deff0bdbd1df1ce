"""PrefixCut / find_cut: where the frozen prefix ends, and that running from the cut equals the full model."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ft.prefix import find_cut


def _timm(name: str, thaw: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if n.startswith(thaw):
            p.requires_grad_(True)
    return model


CASES = [  # model, first thawed group, input, the expected cut, the expected outermost skipped modules
    ("test_resnet", "layer4.0", (3, 3, 32, 32), "layer4", ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"]),
    ("resnet18", "layer3.1", (3, 3, 32, 32), "layer3.1", ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3.0"]),
    ("test_vit", "blocks.1", (3, 3, 32, 32), "blocks.1", ["patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks.0"]),
    ("tf_efficientnet_lite0", "blocks.6", (3, 3, 32, 32), "blocks.6",
     ["conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5"]),
]


@pytest.mark.parametrize("name, thaw, shape, cut_name, skipped", CASES, ids=[c[0] for c in CASES])
def test_running_from_the_cut_equals_the_full_model_in_values_and_gradients(name, thaw, shape, cut_name, skipped):
    kwargs = {"img_size": 32} if "vit" in name else {}
    model = _timm(name, thaw, **kwargs)
    x = torch.randn(shape)
    cut, why = find_cut(model, model.forward_features, x)
    assert cut is not None, why
    assert cut.name == cut_name
    names = {m: n for n, m in model.named_modules()}
    assert [names[m] for m in cut.skipped] == skipped

    full = model.forward_features(x)
    full.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    features = cut.capture(model.forward_features, x)
    with cut.inject(features):
        again = model.forward_features(cut.placeholder_input(len(x), x.device))
    again.square().mean().backward()
    torch.testing.assert_close(again, full, rtol=0, atol=0)  # the same ops on the same values
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=0, atol=0)
    assert all(model.get_submodule(s).forward.__func__ is type(model.get_submodule(s)).forward for s in skipped)


def test_capture_stops_at_the_cut_and_placeholders_take_no_memory():
    model = _timm("test_resnet", "layer4.0")
    cut, _ = find_cut(model, model.forward_features, torch.randn(2, 3, 32, 32))
    ran = []
    handle = model.layer4.register_forward_hook(lambda *a: ran.append(1))
    features = cut.capture(model.forward_features, torch.randn(5, 3, 32, 32))
    handle.remove()
    assert not ran and features.shape[0] == 5 and not features.requires_grad
    assert cut.placeholder_input(5, torch.device("cpu")).stride() == (0, 0, 0, 0)


def test_a_training_mode_batchnorm_in_the_prefix_moves_the_cut_before_it():
    model = _timm("test_resnet", "layer4.0")
    model.layer2[0].bn1.train()  # a frozen BatchNorm left in training mode still changes its output
    cut, why = find_cut(model, model.forward_features, torch.randn(3, 3, 32, 32))
    assert cut is not None, why
    assert cut.name == "layer2"
    assert model.layer2[0].bn1.training and not model.layer1.training  # modes restored after tracing


def test_the_prefix_state_sees_a_written_weight():
    model = _timm("test_resnet", "layer4.0")
    cut, _ = find_cut(model, model.forward_features, torch.randn(3, 3, 32, 32))
    before = cut.state()
    with torch.no_grad():
        model.layer2[0].conv1.weight.mul_(2)
    after = cut.state()
    assert after != before
    with torch.no_grad():
        model.layer4[0].conv1.weight.mul_(2)  # after the cut: not the table's business
    assert cut.state() == after


def test_dropout_applied_without_calling_its_module_moves_the_cut_before_it():
    # timm's fused attention applies attn_drop.p itself when training: the module never runs
    model = _timm("test_vit", "blocks.1", img_size=32, attn_drop_rate=0.5).train()
    x = torch.randn(3, 3, 32, 32)
    cut, why = find_cut(model, model.forward_features, x)
    assert cut is not None, why
    assert cut.name == "blocks"  # before the first block, whose attention drops at random
    torch.testing.assert_close(cut.capture(model.forward_features, x), cut.capture(model.forward_features, x))


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.lin(x), 0.5, self.training)  # random in training mode, no dropout module


def test_a_prefix_that_is_random_in_training_mode_is_refused_and_the_random_state_kept():
    model = nn.Sequential(_Noisy(), nn.Linear(4, 4)).train()
    model[0].requires_grad_(False)
    x = torch.randn(3, 4)
    state = torch.get_rng_state()
    cut, why = find_cut(model, model, x)
    assert cut is None and "random in training mode" in why
    assert torch.equal(torch.get_rng_state(), state)  # checking drew nothing from the global stream


def test_gradient_checkpointing_is_refused():
    model = _timm("test_vit", "blocks.1", img_size=32)
    model.set_grad_checkpointing(True)  # would re-run the prefix in backward, outside the injection
    cut, why = find_cut(model, model.forward_features, torch.randn(3, 3, 32, 32))
    assert cut is None and "gradient checkpointing" in why


def test_a_candidate_that_fails_on_placeholders_falls_back_to_the_enclosing_block():
    from torchvision.models import resnet18

    model = resnet18().eval()
    model.requires_grad_(False)
    for name, p in model.named_parameters():  # from layer3.0.conv2 up: layer3.0's shared in-place ReLU runs twice
        if name.startswith(("layer3.0.conv2", "layer3.0.bn2", "layer3.1", "layer4", "fc")):
            p.requires_grad_(True)
    x = torch.randn(3, 3, 32, 32)
    cut, why = find_cut(model, model, x)
    assert cut is not None, why
    assert cut.name == "layer3"
    with cut.inject(cut.capture(model, x)):
        again = model(cut.placeholder_input(3, x.device))
    torch.testing.assert_close(again, model(x))
    assert "forward" not in model.layer2.__dict__  # placeholders removed after the context


def test_inject_restores_a_forward_set_on_the_instance_by_someone_else():
    model = _timm("test_resnet", "layer4.0")
    x = torch.randn(3, 3, 32, 32)
    cut, _ = find_cut(model, model.forward_features, x)
    own = model.layer1.forward  # e.g. a wrapper another tool installed on the instance
    model.layer1.forward = own
    with cut.inject(cut.capture(model.forward_features, x)):
        assert model.layer1.forward is not own  # skipped: a placeholder while injecting
    assert model.layer1.__dict__["forward"] is own


class _LongSkip(nn.Module):
    """A value of the prefix reaches past the cut: caching the cut's input alone would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)
        self.top = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        return self.top(self.mid(a)) + a


def test_a_cut_that_a_skip_connection_crosses_is_refused():
    model = _LongSkip()
    model.stem.requires_grad_(False)
    model.mid.requires_grad_(False)
    cut, why = find_cut(model, model, torch.randn(3, 4))
    assert cut is None and "does not reproduce the full forward pass" in why and "'top'" in why


def test_nothing_to_cut_says_why():
    model = _LongSkip()
    model.requires_grad_(False)
    assert "nothing in the model trains" in find_cut(model, model, torch.randn(3, 4))[1]
    model.stem.requires_grad_(True)
    assert "the first layer that runs" in find_cut(model, model, torch.randn(3, 4))[1]
    vit = _timm("test_vit", "pos_embed", img_size=32)  # the backbone's own parameter trains
    assert "no frozen prefix" in find_cut(vit, vit.forward_features, torch.randn(2, 3, 32, 32))[1]
