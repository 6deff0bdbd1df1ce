"""Per-layer-group analysis: hooked modules, activations, layer CKA, weight change, snapshots."""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ft.analysis as analysis
from lightning_ft.analysis import group_activations, group_modules, layer_cka, linear_cka, snapshot, weight_change
from lightning_ft.groups import layer_groups


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False, num_classes=3)


def sequential_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3),
    )


def images(n: int = 24, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturb(model: nn.Module, group: str, scale: float = 0.5, seed: int = 1) -> None:
    """Add noise to every parameter of one layer group, in place."""
    names = set(next(g for g in layer_groups(model) if g.name == group).param_names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- which module stands for a group
def test_group_modules_take_the_last_module_of_each_group_and_skip_the_head() -> None:
    torch.manual_seed(0)
    eff = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    assert group_modules(eff) == {
        "stem": "bn1",  # conv_stem + bn1
        "blocks.0.0": "blocks.0",  # one block in the stage: the stage's params are the group's
        "blocks.1.0": "blocks.1",
        "blocks.2.0": "blocks.2",
        "blocks.3.0": "blocks.3",
        "blocks.4.0+conv_head+bn2": "bn2",  # last of blocks.4, conv_head, bn2
    }
    assert group_modules(sequential_bn()) == {"0": "0", "1": "1", "3": "3", "4": "4"}  # "head" (8) skipped
    assert list(group_modules(tiny_resnet(), ["layer2.0", "stem"])) == ["layer2.0", "stem"]
    with pytest.raises(ValueError, match="no layer group 'layer9'.*'stem'"):
        group_modules(tiny_resnet(), ["layer9"])


def test_group_activations_are_pooled_per_group() -> None:
    model = tiny_resnet().eval()
    acts = group_activations(model, images(2))
    assert list(acts) == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    with torch.no_grad():
        stem = model.bn1(model.conv1(images(2)))
    torch.testing.assert_close(acts["stem"], stem.mean(dim=(2, 3)))
    assert acts["layer4.0"].shape == (2, model.num_features)


def test_vit_tokens_and_channels_last_patch_embedding_are_pooled_over_positions() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()  # dynamic size: 32 px is 2x2 patches
    x = images(2)
    acts = group_activations(vit, x)
    assert {tuple(a.shape) for a in acts.values()} == {(2, vit.embed_dim)}
    with torch.no_grad():
        patches = vit.patch_embed(x)  # (B, H, W, C): timm's output_fmt NHWC
    torch.testing.assert_close(acts["stem"], patches.mean(dim=(1, 2)))


class UnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.aux = nn.Conv2d(4, 4, 1)  # built but never called by forward
        self.body = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def test_a_hook_that_never_fires_raises_with_the_group_name() -> None:
    model = UnusedBranch().eval()
    assert group_modules(model) == {"stem.0": "stem.0", "stem.1": "stem.1", "aux": "aux", "body": "body"}
    with pytest.raises(RuntimeError, match=r"groups 'aux' \(module 'aux'\) never fired.*groups="):
        group_activations(model, images(2))
    with pytest.raises(RuntimeError, match="'aux'"):
        layer_cka(model, model, [images(4)])
    acts = group_activations(model, images(2), groups=["stem.1", "body"])
    assert list(acts) == ["stem.1", "body"]
    assert not model.aux._forward_hooks and not model.body._forward_hooks  # hooks removed, even after an error


# ---------------------------------------------------------------- layer CKA
@pytest.mark.parametrize("make", [tiny_resnet, sequential_bn], ids=["test_resnet", "sequential_bn"])
def test_layer_cka_of_a_model_with_itself_is_one(make) -> None:
    model = make()
    x = images(24)
    batches = [(x[i:i + 8], torch.zeros(8)) for i in range(0, 24, 8)]
    same = layer_cka(model, model, batches)
    copied = layer_cka(model, copy.deepcopy(model), batches, debiased=False)
    assert list(same) == list(group_modules(model))
    for values in (same, copied):
        for group, value in values.items():
            assert value == pytest.approx(1.0, abs=1e-9), group


def test_layer_cka_is_below_one_in_the_perturbed_group_only() -> None:
    model = tiny_resnet()
    changed = copy.deepcopy(model)
    perturb(changed, "layer4.0")
    result = layer_cka(model, changed, DataLoader(TensorDataset(images(24)), batch_size=8))
    for group in ("stem", "layer1.0", "layer2.0", "layer3.0"):
        assert result[group] == pytest.approx(1.0, abs=1e-9), group
    assert result["layer4.0"] < 0.99


def test_layer_cka_on_a_sequential_with_batchnorm_changes_from_the_perturbed_group_down() -> None:
    model = sequential_bn()
    changed = copy.deepcopy(model)
    perturb(changed, "1")  # BatchNorm affine: an anisotropic per-channel rescale
    result = layer_cka(model, changed, [images(16)])
    assert result["0"] == pytest.approx(1.0, abs=1e-9)  # upstream of the change: identical
    assert result["1"] < 0.999
    assert result["3"] < 0.999 and result["4"] < 0.999  # downstream activations change with their inputs


def test_layer_cka_streams_over_batches_like_the_whole_set() -> None:
    model, other = tiny_resnet(0), tiny_resnet(1)
    x = images(24)
    streamed = layer_cka(model, other, [x[i:i + 5] for i in range(0, 24, 5)])
    whole_a = group_activations(model.eval(), x)
    whole_b = group_activations(other.eval(), x)
    for group, value in streamed.items():
        assert value == pytest.approx(linear_cka(whole_a[group], whole_b[group]), abs=1e-6), group
        assert value < 0.999  # two random inits differ


def test_layer_cka_evaluates_without_grad_and_restores_each_mode() -> None:
    model = sequential_bn().train()
    model[1].eval()  # a frozen BatchNorm stays frozen
    before = copy.deepcopy(model.state_dict())
    seen = []
    model[0].register_forward_hook(lambda m, a, out: seen.append((m.training, out.requires_grad)))
    layer_cka(model, model, [images(8)])
    assert seen and all(mode is False and not grad for mode, grad in seen)
    assert model.training and model[0].training and not model[1].training and model[4].training
    for k, v in model.state_dict().items():  # eval mode: running statistics untouched
        torch.testing.assert_close(v, before[k])


def test_layer_cka_refuses_models_with_different_groups_and_empty_batches() -> None:
    torch.manual_seed(0)
    eff = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match=r"different layer groups: only in model_a \['layer1.0'.*only in model_b \['blocks.0.0'"):
        layer_cka(tiny_resnet(), eff, [images(4)])
    with pytest.raises(ValueError, match="batches is empty"):
        layer_cka(tiny_resnet(), tiny_resnet(), [])
    with pytest.raises(ValueError, match="Layer group 'stem' \\(module 'bn1'\\): Debiased CKA needs at least 4 samples; got 2"):
        layer_cka(tiny_resnet(), tiny_resnet(), [images(2)])
    assert list(layer_cka(tiny_resnet(), tiny_resnet(), [images(4)], groups="layer1.0")) == ["layer1.0"]


def test_fine_tune_module_groups_are_those_of_the_whole_module() -> None:
    from lightning_ft import FineTuneModule

    torch.manual_seed(0)
    module = FineTuneModule(backbone="test_resnet", num_classes=3)
    hooked = group_modules(module)
    assert hooked["stem"] == "backbone.bn1" and hooked["layer4.0"] == "backbone.layer4"
    assert "head" not in hooked
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in layer_cka(module, module, [{"inputs": images(8)}]).values())
    start = snapshot(module)
    with torch.no_grad():
        for p in module.head.parameters():
            p.mul_(1.5)
    change = weight_change(module, start)
    assert list(change) == [g.name for g in module.layer_groups()]
    assert change["head"] > 0 and all(v == 0.0 for k, v in change.items() if k != "head")


# ---------------------------------------------------------------- weight change and snapshots
@pytest.mark.parametrize("make", [tiny_resnet, sequential_bn], ids=["test_resnet", "sequential_bn"])
def test_weight_change_is_zero_for_unchanged_groups_and_the_hand_value_for_a_changed_one(make) -> None:
    model = make()
    groups = layer_groups(model)
    target = groups[1]
    start = snapshot(model)
    g = torch.Generator().manual_seed(3)
    deltas = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in target.param_names:
                old = p.detach().double().clone()
                p.add_(0.01 * torch.randn(p.shape, generator=g))
                deltas[name] = p.detach().double() - old  # the step as float32 stored it
    change = weight_change(model, start)
    assert list(change) == [grp.name for grp in groups] and list(change)[-1] == "head"
    d = torch.cat([deltas[n].double().flatten() for n in target.param_names])
    w0 = torch.cat([start[n].double().flatten() for n in target.param_names])
    assert change[target.name] == pytest.approx(float(d.norm() / w0.norm()), rel=1e-6)
    assert all(v == 0.0 for k, v in change.items() if k != target.name)


def test_weight_change_of_a_uniform_rescale_and_a_zero_start() -> None:
    model = sequential_bn()
    start = snapshot(model)
    with torch.no_grad():
        model[3].weight.mul_(1.1)
        model[3].bias.mul_(1.1)
    assert weight_change(model, start, groups=["3"]) == {"3": pytest.approx(0.1, rel=1e-6)}
    zero = {k: torch.zeros_like(v) for k, v in start.items()}
    assert weight_change(model, zero, groups=["0"]) == {"0": math.inf}


def test_weight_change_names_missing_and_misshapen_parameters() -> None:
    model = sequential_bn()
    start = snapshot(model)
    del start["4.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 parameter\(s\) of the model: '4.bias'.*snapshot\(model\)"):
        weight_change(model, start)
    start = snapshot(model)
    start["8.weight"] = torch.zeros(5, 12)
    with pytest.raises(ValueError, match=r"initial_state\['8.weight'\] has shape \(5, 12\), the model's parameter \(3, 12\)"):
        weight_change(model, start)


def test_snapshot_is_a_detached_cpu_float_copy() -> None:
    model = sequential_bn().to(torch.bfloat16)
    start = snapshot(model)
    assert list(start) == [n for n, _ in model.named_parameters()]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in start.values())
    before = start["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(start["0.weight"], before)
    assert snapshot(nn.Linear(2, 2).double())["weight"].dtype == torch.float64


# ---------------------------------------------------------------- package rules
def test_analysis_package_exports_and_imports_no_lightning() -> None:
    assert all(hasattr(analysis, name) for name in analysis.__all__)
    forbidden = ("lightning", "pytorch_lightning", "lightning_ft.module", "lightning_ft.callbacks", "lightning_ft.cli")
    for path in Path(analysis.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                assert not any(mod == f or mod.startswith(f"{f}.") for f in forbidden), f"{path.name} imports {mod}"
