"""Acceptance: during a whole fit, every group's lr / head lr == layer_decay ** k at every step."""

import math
from functools import partial

import lightning as L
import pytest
import torch

from lightning_ft import FineTuneModule
from tests.conftest import fast_trainer, random_loader

DECAY = 0.7

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class LrRecorder(L.Callback):
    """The lrs each optimizer step actually uses (read just before the step)."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append([(g["name"], g["layer_id"], g["lr"]) for g in optimizer.param_groups])


def _fit(lr_scheduler=None, interval="step", epochs=3):
    torch.manual_seed(0)
    model = FineTuneModule(
        "test_resnet", num_classes=3, lr=0.01, layer_decay=DECAY, warmup=0.25,
        lr_scheduler=lr_scheduler, scheduler_interval=interval,
    )
    recorder = LrRecorder()
    trainer = fast_trainer(max_epochs=epochs, callbacks=[recorder])
    trainer.fit(model, random_loader(n=32, batch=8))
    return model, recorder.steps, trainer


def _depth_of_test_resnet(model):
    """Depth levels counted from the architecture, not from the library's layer ids: the stem, one level
    per residual block (timm's ``group_matcher(coarse=False)`` for ResNets), the head."""
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model.backbone, f"layer{i}")))]
    return ["stem", *blocks, "head"]


def _assert_ratios(steps, levels):
    """Every group's lr is the head's times DECAY**k, k = its level below the head, counted independently."""
    assert steps, "no optimizer step was recorded"
    depth = len(levels)
    expected_id = {name: i for i, name in enumerate(levels)}
    for step in steps:
        head = [lr for name, _, lr in step if name == "head"][0]
        stem = [lr for name, _, lr in step if name == "stem"][0]
        assert {layer_id for _, layer_id, _ in step} == set(range(depth))  # one id per level, stem 0 ... head depth-1
        for name, layer_id, lr in step:
            assert layer_id == expected_id[name.removesuffix("/no_decay")], name
            assert lr == pytest.approx(head * DECAY ** (depth - 1 - expected_id[name.removesuffix("/no_decay")]),
                                       rel=1e-9, abs=1e-15), name
        assert stem / head == pytest.approx(DECAY ** (depth - 1), rel=1e-9)


def _lr_warmup_cosine(step, total, warmup, peak, min_ratio):
    """The default schedule in closed form: ``warmup`` linear steps peak/(warmup+1), 2 peak/(warmup+1), ...,
    then from ``peak`` at step ``warmup`` a half cosine towards ``min_ratio * peak`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / (total - warmup)
    return min_ratio * peak + (peak - min_ratio * peak) * (1 + math.cos(math.pi * progress)) / 2


def test_warmup_cosine_keeps_layer_decay_at_every_step():
    model, steps, trainer = _fit()
    levels = _depth_of_test_resnet(model)
    assert len(levels) == 6  # stem, layer1.0 ... layer4.0, head
    _assert_ratios(steps, levels)
    total = trainer.estimated_stepping_batches
    assert len(steps) == total == 12
    warmup = 3  # warmup=0.25 of 12 steps
    # every group follows the closed form of linear warm-up then cosine, scaled by its layer's factor
    for s, step in enumerate(steps):
        for name, _, lr in step:
            k = len(levels) - 1 - levels.index(name.removesuffix("/no_decay"))
            peak = 0.01 * DECAY**k
            assert lr == pytest.approx(_lr_warmup_cosine(s, total, warmup, peak, 0.01), rel=1e-12), (s, name)
    head = [[lr for name, _, lr in s if name == "head"][0] for s in steps]
    assert head[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01], rel=1e-12)  # warm-up: peak/4, 2/4, 3/4, peak
    assert head[0] < head[2] < head[3] and head[3] > head[-1]  # warms up, then decays
    names = {name for name, _, _ in steps[0]}
    assert {"stem", "stem/no_decay", "head", "head/no_decay"} <= names


def test_one_cycle_keeps_layer_decay_at_every_step():
    model, steps, trainer = _fit(lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01))
    _assert_ratios(steps, _depth_of_test_resnet(model))
    # the head's curve is exactly OneCycleLR's for a single group with that max_lr
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    ref = torch.optim.lr_scheduler.OneCycleLR(probe, max_lr=0.01, total_steps=trainer.estimated_stepping_batches)
    expected = []
    for _ in range(trainer.estimated_stepping_batches):
        expected.append(probe.param_groups[0]["lr"])
        probe.step()
        ref.step()
    head = [[lr for name, _, lr in s if name == "head"][0] for s in steps]
    assert head == pytest.approx(expected, rel=1e-9)


def test_one_cycle_without_max_lr_takes_each_groups_lr():
    model, steps, _ = _fit(lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, pct_start=0.5))
    _assert_ratios(steps, _depth_of_test_resnet(model))
    assert max(lr for s in steps for name, _, lr in s if name == "head") == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize(
    "factory, interval",
    [
        (partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), "epoch"),
        (partial(torch.optim.lr_scheduler.CosineAnnealingLR), "step"),
        (partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.1, total_iters=4), "step"),
    ],
)
def test_other_schedulers_keep_layer_decay(factory, interval):
    model, steps, _ = _fit(lr_scheduler=factory, interval=interval)
    _assert_ratios(steps, _depth_of_test_resnet(model))
    heads = {[lr for name, _, lr in s if name == "head"][0] for s in steps}
    assert len(heads) > 1  # the scheduler really moved the lr


def test_frozen_params_stay_in_the_groups():
    model = FineTuneModule("test_resnet", num_classes=3, layer_decay=DECAY)
    model.backbone.requires_grad_(False)  # frozen for now (as by GradualUnfreezing): may thaw later
    trainer = fast_trainer(max_steps=1)
    trainer.fit(model, random_loader())
    in_groups = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters()}


def test_a_statically_frozen_backbone_is_left_out_of_the_optimizer():
    model = FineTuneModule("test_resnet", num_classes=3, layer_decay=DECAY, freeze_backbone=True)
    trainer = fast_trainer(max_steps=1)
    trainer.fit(model, random_loader())
    in_groups = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.head.parameters()}  # no per-step optimizer work for the backbone


def _single_group_curve(factory, steps):
    """The lrs a scheduler gives one plain group with lr 0.01, step by step (torch's own, as a reference)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = factory(probe)
    curve = []
    for _ in range(steps):
        curve.append(probe.param_groups[0]["lr"])
        probe.step()
        scheduler.step()
    return curve


def test_cyclic_lr_from_scalars_is_rescaled_to_keep_layer_decay_at_every_step():
    """CyclicLR(base_lr, max_lr) gives every group the same absolute lrs; align_scheduler scales them per layer."""
    cyclic = partial(torch.optim.lr_scheduler.CyclicLR, base_lr=1e-4, max_lr=1e-2, step_size_up=2, cycle_momentum=False)
    model, steps, trainer = _fit(lr_scheduler=cyclic)
    _assert_ratios(steps, _depth_of_test_resnet(model))
    head = [[lr for name, _, lr in s if name == "head"][0] for s in steps]
    assert head == pytest.approx(_single_group_curve(cyclic, len(steps)), rel=1e-9)  # the head: CyclicLR's own curve
    assert min(head) == pytest.approx(1e-4) and max(head) == pytest.approx(1e-2)


def test_cyclic_lr_with_base_lr_only_keeps_layer_decay_at_every_step():
    cyclic = partial(torch.optim.lr_scheduler.CyclicLR, base_lr=1e-4, step_size_up=2, cycle_momentum=False)
    model, steps, _ = _fit(lr_scheduler=cyclic)
    _assert_ratios(steps, _depth_of_test_resnet(model))
