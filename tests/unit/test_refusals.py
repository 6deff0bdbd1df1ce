"""Each refusal in optim.py, LayerwiseLRDecay and FeatureCache's loader check fires; its message names the problem."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.optim import lr_scheduler as S

from lightning_ft import FineTuneModule
from lightning_ft.groups import LayerGroup, layer_groups
from lightning_ft.callbacks import FeatureCache, LayerwiseLRDecay
from lightning_ft.optim import WarmupCosine, align_scheduler, param_groups_layer_decay
from tests.conftest import fast_trainer, random_loader
from tests.helpers import ScriptedModule, vector_loader

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _net():
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))


def _decayed_sgd(decay=0.5):
    """SGD over the named, layer-decayed groups of a 3-layer net: lr_scale 0.25, 0.5, 1 (no no-decay split)."""
    net = _net()
    groups = param_groups_layer_decay(net, layer_groups(net), lr=0.1, layer_decay=decay, no_weight_decay=())
    return torch.optim.SGD(groups, lr=0.1)


# ------------------------------------------------------------------ WarmupCosine
@pytest.mark.parametrize("total", [0, -3])
def test_warmup_cosine_refuses_a_schedule_without_steps(total):
    with pytest.raises(ValueError, match=rf"total_steps must be >= 1, got {total}\."):
        WarmupCosine(total)


@pytest.mark.parametrize("warmup", [-1, 11])
def test_warmup_cosine_refuses_warmup_outside_the_schedule(warmup):
    with pytest.raises(ValueError, match=rf"warmup_steps must be in \[0, total_steps=10\], got {warmup}\."):
        WarmupCosine(10, warmup_steps=warmup)
    WarmupCosine(10, warmup_steps=10)  # the whole schedule as warm-up is allowed


# ------------------------------------------------------------------ param groups
@pytest.mark.parametrize("decay", [0.0, 1.5, -0.1])
def test_layer_decay_outside_zero_one_is_refused(decay):
    net = _net()
    with pytest.raises(ValueError, match=rf"layer_decay must be in \(0, 1\], got {decay}.*None turns it off"):
        param_groups_layer_decay(net, layer_groups(net), lr=0.1, layer_decay=decay)


def test_a_layer_group_naming_a_missing_parameter_is_named():
    net = _net()
    groups = [*layer_groups(net), LayerGroup("extra", ("3.weight",))]
    with pytest.raises(ValueError, match=r"Layer group 'extra' names parameter '3\.weight', which the model does not"):
        param_groups_layer_decay(net, groups, lr=0.1)


def test_a_parameter_in_two_layer_groups_is_named_with_both_groups():
    net = _net()
    groups = layer_groups(net)
    groups = [*groups[:-1], LayerGroup(groups[-1].name, (*groups[-1].param_names, "0.bias"))]
    with pytest.raises(ValueError, match=r"Parameter '0\.bias' is in two layer groups: '0' and 'head'"):
        param_groups_layer_decay(net, groups, lr=0.1)


def test_parameters_in_no_layer_group_are_listed():
    net = _net()
    with pytest.raises(ValueError, match=r"Parameters in no layer group: \['1\.weight', '1\.bias'\]"):
        param_groups_layer_decay(net, [g for g in layer_groups(net) if g.name != "1"], lr=0.1)


# ------------------------------------------------------------------ align_scheduler
def test_one_cycle_with_per_group_peaks_that_break_layer_decay_is_refused():
    opt = _decayed_sgd()
    scheduler = S.OneCycleLR(opt, max_lr=[0.1, 0.3, 0.2], total_steps=10)
    with pytest.raises(ValueError, match=r"OneCycleLR was given per-group max_lr values \[0\.1, 0\.3, 0\.2\]"
                                         r".*do not follow layer-wise lr decay.*Give one scalar max_lr"):
        align_scheduler(scheduler, opt)


def test_one_cycle_with_per_group_peaks_that_follow_layer_decay_is_kept():
    opt = _decayed_sgd()
    peaks = [0.1 * g["lr_scale"] for g in opt.param_groups]
    scheduler = S.OneCycleLR(opt, max_lr=peaks, total_steps=10)
    align_scheduler(scheduler, opt)
    assert [g["max_lr"] for g in opt.param_groups] == peaks  # not scaled twice


class _AbsoluteLR(S.LRScheduler):
    """A user scheduler with one absolute lr for every group (ignores the groups' own lrs)."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.base_lrs = [1e-3] * len(optimizer.param_groups)

    def get_lr(self):
        return list(self.base_lrs)


def test_a_scheduler_whose_base_lrs_break_layer_decay_is_refused_with_the_schedulers_that_work():
    opt = _decayed_sgd()
    with pytest.raises(ValueError, match=r"_AbsoluteLR gives the param groups base lrs \[0\.001, 0\.001, 0\.001\]"
                                         r".*break layer-wise lr decay.*LambdaLR.*or set layer_decay=None"):
        align_scheduler(_AbsoluteLR(opt), opt)


def test_finetunemodule_refuses_such_a_scheduler_before_the_first_step():
    model = FineTuneModule("test_resnet", num_classes=3, layer_decay=0.7, lr_scheduler=_AbsoluteLR)
    trainer = fast_trainer(max_steps=1)
    with pytest.raises(ValueError, match="_AbsoluteLR gives the param groups base lrs.*break layer-wise lr decay"):
        trainer.fit(model, random_loader(n=8, size=16))
    assert trainer.global_step == 0


def test_cyclic_lr_from_scalars_is_rescaled_per_group():
    opt = _decayed_sgd()
    scheduler = S.CyclicLR(opt, base_lr=1e-3, max_lr=1e-1, step_size_up=2, cycle_momentum=False)
    align_scheduler(scheduler, opt)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert sorted(set(scales)) == [0.25, 0.5, 1.0]
    assert scheduler.base_lrs == pytest.approx([1e-3 * s for s in scales])
    assert scheduler.max_lrs == pytest.approx([1e-1 * s for s in scales])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * s for s in scales])
    for _ in range(3):  # the ratios hold along the cycle
        opt.step()
        scheduler.step()
        head = opt.param_groups[-1]["lr"]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([head * s for s in scales], rel=1e-9)


# ------------------------------------------------------------------ LayerwiseLRDecay
@pytest.mark.parametrize("decay", [0.0, 1.01, -0.5])
def test_layerwise_lr_decay_refuses_a_decay_outside_zero_one(decay):
    with pytest.raises(ValueError, match=rf"decay must be in \(0, 1\], got {decay}\. Typical values"):
        LayerwiseLRDecay(decay)


def test_layerwise_lr_decay_names_the_head_that_matches_nothing_and_lists_the_modules():
    trainer = fast_trainer(max_steps=1, callbacks=[LayerwiseLRDecay(0.5, head="classifier", verbose=False)])
    with pytest.raises(ValueError, match=r"No parameter of ScriptedModule matches the head \['classifier'\]\. "
                                         r"Top-level modules: \['body', 'head'\]"):
        trainer.fit(ScriptedModule(), vector_loader())
    assert trainer.global_step == 0


class _OwnStrategy(SingleDeviceStrategy):
    """Stands for a strategy that shards or owns the parameters (FSDP, DeepSpeed): not one of the supported two."""


def test_layerwise_lr_decay_refuses_strategies_other_than_single_device_and_ddp():
    trainer = fast_trainer(max_steps=1, strategy=_OwnStrategy(device=torch.device("cpu")),
                           callbacks=[LayerwiseLRDecay(0.5, verbose=False)])
    with pytest.raises(ValueError, match=r"LayerwiseLRDecay supports single-device training and DDP.*this Trainer uses "
                                         r"_OwnStrategy.*Use strategy='ddp'"):
        trainer.fit(ScriptedModule(), vector_loader())


class _NoOptimizer(ScriptedModule):
    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


def test_layerwise_lr_decay_on_a_module_without_optimizer_says_so():
    trainer = fast_trainer(max_steps=1, callbacks=[LayerwiseLRDecay(0.5, verbose=False)])
    with pytest.raises(ValueError, match="LayerwiseLRDecay needs an optimizer: configure_optimizers returned none"):
        trainer.fit(_NoOptimizer(), vector_loader())


# ------------------------------------------------------------------ FeatureCache
def test_feature_cache_refuses_several_training_loaders_and_counts_them():
    model = FineTuneModule("test_resnet", num_classes=3, freeze_backbone=True)
    trainer = fast_trainer(max_steps=1, callbacks=[FeatureCache()])
    loaders = {"a": random_loader(n=8, size=16), "b": random_loader(n=8, size=16, seed=1)}
    with pytest.raises(ValueError, match=r"FeatureCache serves one training DataLoader of \(inputs, targets\) batches; "
                                         r"this run trains on a dict of 2 loaders\. Train on one DataLoader"):
        trainer.fit(model, loaders)
    assert trainer.global_step == 0
