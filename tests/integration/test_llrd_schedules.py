"""Acceptance: during a whole fit, every group's lr / head lr == layer_decay ** k at every step."""

from functools import partial

import lightning as L
import pytest
import torch

from lightning_ft import FineTuneModule
from lightning_ft.optim import WarmupCosine
from tests.conftest import fast_trainer, random_loader

DECAY = 0.7


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


def _assert_ratios(steps, depth):
    assert steps, "no optimizer step was recorded"
    for step in steps:
        head = [lr for name, _, lr in step if name == "head"][0]
        for name, layer_id, lr in step:
            k = depth - 1 - layer_id
            assert lr == pytest.approx(head * DECAY**k, rel=1e-9, abs=1e-15), (name, k)


def test_warmup_cosine_keeps_layer_decay_at_every_step():
    model, steps, trainer = _fit()
    depth = len(model.layer_groups())
    _assert_ratios(steps, depth)
    total = trainer.estimated_stepping_batches
    assert len(steps) == total == 12
    reference = WarmupCosine(total, warmup_steps=3, min_ratio=0.01)
    # the head follows the closed form of linear warm-up then cosine
    head = [[lr for name, _, lr in s if name == "head"][0] for s in steps]
    assert head == pytest.approx([0.01 * reference(i) for i in range(total)], rel=1e-12)
    assert head[0] < head[2] < head[3] and head[3] > head[-1]  # warms up, then decays
    names = {name for name, _, _ in steps[0]}
    assert {"stem", "stem/no_decay", "head", "head/no_decay"} <= names


def test_one_cycle_keeps_layer_decay_at_every_step():
    model, steps, trainer = _fit(lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01))
    _assert_ratios(steps, len(model.layer_groups()))
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
    _assert_ratios(steps, len(model.layer_groups()))
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
    _assert_ratios(steps, len(model.layer_groups()))
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
