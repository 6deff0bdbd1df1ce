"""GradualUnfreezing logic on scripted metric sequences, phases, frozen layers and bad input."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import GradualUnfreezing, LinearProbing
from lightning_ft.callbacks._common import check_strategy
from tests.conftest import fast_trainer, random_loader
from tests.helpers import ScriptedModule, vector_loader


def _trainable(module):
    return {n.rsplit(".", 1)[0] for n, p in module.named_parameters() if p.requires_grad}


def _fit(module, callback, epochs, **kwargs):
    trainer = fast_trainer(max_epochs=epochs, callbacks=[callback], **kwargs)
    trainer.fit(module, vector_loader(), vector_loader(n=8))
    return trainer


def test_plateau_transitions_follow_the_scripted_metric():
    values = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87]
    module = ScriptedModule(values)
    cb = GradualUnfreezing(monitor="val/score", mode="min", patience=2, verbose=False)
    _fit(module, cb, epochs=8)
    # improve at 0, 1; no improvement at 2, 3 -> phase 1 at epoch 3; best restarts: 4 improves; 5, 6 -> phase 2
    assert [(t["epoch"], t["phase"], t["groups"]) for t in cb.transitions] == [(3, 1, ["body.2"]), (6, 2, ["body.1"])]
    assert _trainable(module) == {"head", "body.2", "body.1"}
    assert cb.phase == 2 and cb.wait == 0 and cb.best == pytest.approx(0.87)  # a new phase restarts the count


def test_min_delta_mode_max_groups_per_step_and_max_depth():
    # 0.50 -> 0.505 is not an improvement by 0.01: plateau after one epoch (patience 1)
    module = ScriptedModule([0.5, 0.505, 0.7, 0.7, 0.9, 0.9])
    cb = GradualUnfreezing(monitor="val/score", mode="max", patience=1, min_delta=0.01, groups_per_step=2,
                           max_depth=2, verbose=False)
    _fit(module, cb, epochs=6)
    assert [(t["epoch"], t["groups"]) for t in cb.transitions] == [(1, ["body.2", "body.1"])]
    assert _trainable(module) == {"head", "body.2", "body.1"}  # max_depth=2: body.0 never thaws
    assert cb.num_phases == 2


def test_milestones_thaw_named_groups_at_their_epochs():
    module = ScriptedModule()
    seen = {}

    class Spy(GradualUnfreezing):
        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            seen[trainer.current_epoch] = _trainable(pl_module)

    cb = Spy(monitor=None, milestones={1: ["body.2"], 3: "all"}, verbose=False)
    _fit(module, cb, epochs=4)
    assert seen == {
        0: {"head"}, 1: {"head", "body.2"}, 2: {"head", "body.2"}, 3: {"head", "body.2", "body.1", "body.0"},
    }


def test_regex_phases_are_cumulative():
    module = ScriptedModule([1.0, 1.0, 1.0, 1.0])
    cb = GradualUnfreezing(monitor="val/score", patience=1, phases=[r"^head\.", r"^head\.|body\.2", ".*"], verbose=False)
    _fit(module, cb, epochs=4)
    # the first validation of a phase sets its best; the next flat one is a plateau (patience 1)
    assert [(t["epoch"], t["phase"]) for t in cb.transitions] == [(1, 1), (3, 2)]
    assert _trainable(module) == {"head", "body.2", "body.1", "body.0"}


def test_linear_probing_preset_never_thaws():
    module = ScriptedModule()
    _fit(module, LinearProbing(), epochs=2)
    assert _trainable(module) == {"head"}


def test_monitor_that_was_never_logged_lists_what_was():
    with pytest.raises(ValueError, match=r"monitors `val/acc`, which was not logged\. .*Logged: .*val/loss.*self\.log"):
        _fit(ScriptedModule(), GradualUnfreezing(monitor="val/acc"), epochs=1)


class ManyLogs(ScriptedModule):
    """Logs Lightning-style names plus many learning-rate keys (as LearningRateMonitor does)."""

    def validation_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("val/acc", 1.0 - loss)
        self.log("val/loss", loss)
        for i in range(36):
            self.log(f"lr-AdamW/group{i:02d}", 0.01)


def test_monitor_that_was_never_logged_suggests_the_closest_names_first():
    with pytest.raises(ValueError) as err:
        _fit(ManyLogs(), GradualUnfreezing(monitor="val/accuracy"), epochs=1)
    message = str(err.value)
    assert "Did you mean `val/acc`?" in message
    logged = message.split("Logged: ")[1]
    assert logged.startswith("val/acc, val/loss")  # before the 36 lr keys, which are cut short
    assert "(+" in logged and "more)" in logged


def test_milestones_alone_need_no_monitor_on_a_module_logging_val_loss():
    class LightningStyle(ScriptedModule):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    cb = GradualUnfreezing(milestones={0: ["head"], 2: "all"}, verbose=False)
    assert cb.monitor is None
    _fit(LightningStyle(), cb, epochs=3)
    assert [(t["epoch"], t["reason"]) for t in cb.transitions] == [(2, "milestone epoch 2")]


def test_milestones_are_not_preempted_by_a_plateau_unless_a_monitor_is_given():
    flat = [1.0, 1.0, 1.0, 1.0]  # a plateau from epoch 1 on (patience 1)
    cb = GradualUnfreezing(milestones={3: "all"}, patience=1, verbose=False)
    _fit(ScriptedModule(flat), cb, epochs=4)
    assert [t["epoch"] for t in cb.transitions] == [3]
    both = GradualUnfreezing(milestones={3: "all"}, monitor="val/score", patience=1, verbose=False)
    _fit(ScriptedModule(flat), both, epochs=4)
    assert both.transitions[0]["epoch"] == 1 and "did not improve" in both.transitions[0]["reason"]
    assert GradualUnfreezing().monitor == "val/loss"  # no milestones: plateau on val/loss


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_monitor_never_thaws_and_warns_once(bad):
    values = [1.0, bad, bad, bad, bad]  # patience 1: a NaN counted as "no improvement" would thaw at epoch 1
    cb = GradualUnfreezing(monitor="val/score", patience=1, verbose=False)
    with pytest.warns(UserWarning, match=rf"val/score is {bad} at epoch 1; a non-finite value never counts") as rec:
        _fit(ScriptedModule(values), cb, epochs=5)
    assert cb.transitions == [] and cb.phase == 0 and cb.wait == 0 and cb.best == 1.0
    assert sum("non-finite" in str(w.message) for w in rec) == 1


def test_recalibrate_re_estimates_frozen_batchnorm_once_on_the_training_inputs_in_order():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, lr=0.05)
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    weights = {k: v.clone() for k, v in model.backbone.named_parameters()}
    loader = random_loader(n=24, batch=8, shuffle=True)
    # the exact statistics: the mean over the training batches, in dataset order, of each layer's batch statistics
    expected = FineTuneModule("test_resnet", num_classes=3)
    expected.load_state_dict(model.state_dict())
    from lightning_ft.adabn import adapt_batchnorm

    adapt_batchnorm(expected, [x for x, _ in random_loader(n=24, batch=8)])
    cb = GradualUnfreezing(milestones={0: ["head"]}, frozen_bn="recalibrate", verbose=False)
    fast_trainer(max_epochs=1, callbacks=[cb]).fit(model, loader)  # frozen BatchNorm stays still after the pass
    for bn, ref in zip(bns, [m for m in expected.backbone.modules() if isinstance(m, nn.BatchNorm2d)]):
        assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
        assert torch.allclose(bn.running_var, ref.running_var, atol=1e-5)
        assert not bn.training
    assert all(torch.equal(v, weights[k]) for k, v in model.backbone.named_parameters())
    assert cb.recalibrated


def test_recalibrate_leaves_the_random_stream_and_the_data_order_alone():
    def batches_seen(frozen_bn):
        torch.manual_seed(0)
        model = FineTuneModule("test_resnet", num_classes=3)
        seen = []
        model.training_step = lambda batch, idx, _s=model.training_step: seen.append(batch[1].tolist()) or _s(batch, idx)
        cb = GradualUnfreezing(milestones={0: ["head"]}, frozen_bn=frozen_bn, verbose=False)
        torch.manual_seed(1)
        fast_trainer(max_epochs=2, callbacks=[cb]).fit(model, random_loader(n=24, batch=8, shuffle=True))
        return seen, torch.rand(1)

    assert batches_seen("recalibrate") == batches_seen("eval")





def test_monitor_without_validation_is_refused_at_setup():
    trainer = fast_trainer(max_epochs=1, callbacks=[GradualUnfreezing(monitor="val/loss")], limit_val_batches=0)
    with pytest.raises(ValueError, match="runs no validation"):
        trainer.fit(ScriptedModule(), vector_loader())


def test_pattern_matching_no_parameter_is_refused():
    with pytest.raises(ValueError, match=r"Phase 1 pattern 'blocks\\\\.1\[01\]' matches no parameter"):
        _fit(ScriptedModule(), GradualUnfreezing(phases=["head", r"blocks\.1[01]"]), epochs=1)


def test_group_claimed_by_two_milestones_is_refused():
    cb = GradualUnfreezing(monitor=None, milestones={1: ["body.2"], 2: ["body.2", "body.1"]})
    with pytest.raises(ValueError, match="'body.2' is claimed by the milestones at epochs 1 and 2"):
        _fit(ScriptedModule(), cb, epochs=1)


def test_unknown_milestone_group_lists_the_groups():
    cb = GradualUnfreezing(monitor=None, milestones={1: ["blocks.7"]})
    with pytest.raises(ValueError, match="'blocks.7', which does not exist. Layer groups: body.0, body.1, body.2, head"):
        _fit(ScriptedModule(), cb, epochs=1)


def test_milestone_beyond_max_epochs_warns():
    with pytest.warns(UserWarning, match=r"milestones at epochs \[5\] are at or beyond max_epochs=2"):
        _fit(ScriptedModule(), GradualUnfreezing(monitor=None, milestones={5: "all"}), epochs=2)


def test_unsupported_strategy_is_refused():
    with pytest.raises(ValueError, match="FSDPStrategy.*Use strategy='ddp'"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()), "GradualUnfreezing")


def test_module_without_a_head_is_refused():
    class One(ScriptedModule):
        def __init__(self):
            super().__init__()
            del self.body, self.head
            self.only = nn.Linear(4, 2)

        def forward(self, x):
            return self.only(x)

    with pytest.raises(ValueError, match="found no head in One.*head="):
        _fit(One(), GradualUnfreezing(), epochs=1)


def test_single_group_optimizer_over_trainable_params_takes_in_the_params_to_thaw():
    module = ScriptedModule(only_trainable=True)
    cb = GradualUnfreezing(milestones={1: ["body.2"]}, verbose=False)
    body0 = module.body[0].weight.detach().clone()
    trainer = _fit(module, cb, epochs=2)
    (group,) = trainer.optimizers[0].param_groups
    # the head's params and the ones phase 1 thaws, in module order; body.0 and body.1 never thaw
    assert [id(p) for p in group["params"]] == [id(p) for n, p in module.named_parameters()
                                                 if n.startswith(("body.2", "head"))]
    state = trainer.optimizers[0].state
    assert int(state[module.body[2].weight]["step"]) == 4 and int(state[module.head.weight]["step"]) == 8
    assert torch.equal(module.body[0].weight, body0)


def test_several_groups_without_the_params_to_thaw_are_refused_with_the_fix():
    class TwoGroups(ScriptedModule):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": self.head.parameters()},
                                      {"params": [p for p in self.body.parameters() if p.requires_grad]}])

    with pytest.raises(ValueError, match=r"not in the optimizer.*2 param groups.*AdamW\(self.parameters\(\)\).*LayerwiseLRDecay"):
        _fit(TwoGroups(), GradualUnfreezing(milestones={1: "all"}), epochs=1)


def test_frozen_layers_unchanged_bn_in_eval_and_no_graph_through_the_prefix():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, lr=0.05)
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    grads_seen = []
    model.backbone.layer4.register_forward_hook(lambda m, i, o: grads_seen.append(o.requires_grad))
    cb = GradualUnfreezing(monitor=None, milestones={0: ["head"]}, frozen_bn="eval", verbose=False)
    trainer = fast_trainer(max_epochs=2, callbacks=[cb])
    trainer.fit(model, random_loader(), random_loader(n=8))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k  # weights and BatchNorm statistics
    assert grads_seen and not any(grads_seen)  # the backbone output never carries a graph
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()  # what Lightning and users do; the callback puts frozen BatchNorm back
    cb.on_train_batch_start(trainer, model, None, 0)
    assert bns and not any(bn.training for bn in bns)


def test_by_default_frozen_batchnorm_is_recalibrated_once_then_kept_still():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, lr=0.05)
    weights = {k: v.clone() for k, v in model.backbone.named_parameters()}
    initial = model.backbone.conv1[1].running_mean.clone()
    per_epoch = []

    class Stats(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            per_epoch.append({k: v.clone() for k, v in pl_module.backbone.named_buffers()})

    cb = GradualUnfreezing(milestones={0: ["head"]}, verbose=False)
    assert cb.frozen_bn == "auto"
    fast_trainer(max_epochs=2, callbacks=[cb, Stats()]).fit(model, random_loader(), random_loader(n=8))
    assert cb.recalibrated and not torch.equal(per_epoch[0]["conv1.1.running_mean"], initial)
    assert all(torch.equal(per_epoch[0][k], per_epoch[1][k]) for k in per_epoch[0])  # still during training
    assert all(torch.equal(v, weights[k]) for k, v in model.backbone.named_parameters())


def test_auto_keeps_the_statistics_when_the_training_data_cannot_be_read(caplog):
    import logging

    class TwoLoaders(ScriptedModule):  # trains on {"a": batch, "b": batch}
        def training_step(self, batch, batch_idx):
            return sum(nn.functional.cross_entropy(self(x), y) for x, y in batch.values())

    module = TwoLoaders()
    module.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    before = module.body[1].running_mean.clone()
    cb = GradualUnfreezing(milestones={0: ["head"]})
    with caplog.at_level(logging.INFO):
        fast_trainer(max_epochs=1, callbacks=[cb]).fit(
            module, {"a": vector_loader(), "b": vector_loader(seed=1)}, vector_loader(n=8))
    assert torch.equal(module.body[1].running_mean, before)  # frozen, in eval: not even the batches moved it
    assert "frozen BatchNorm keeps its statistics (frozen_bn='auto'" in caplog.text


def test_frozen_bn_train_lets_frozen_batchnorm_statistics_move():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3)
    stats = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)][0]
    before = stats.running_mean.clone()
    cb = GradualUnfreezing(milestones={0: ["head"]}, frozen_bn="train", verbose=False)
    fast_trainer(max_epochs=1, callbacks=[cb]).fit(model, random_loader())
    assert not torch.equal(stats.running_mean, before)
    assert not stats.weight.requires_grad


def test_thawed_layers_train_and_keep_their_lr_curve_while_the_rest_stays_frozen():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, layer_decay=0.5, lr=0.05)
    stem_before = model.backbone.conv1[0].weight.clone()
    top_before = model.backbone.layer4[0].conv1.weight.clone()
    cb = GradualUnfreezing(monitor=None, milestones={1: ["layer4.0"]}, verbose=False)
    fast_trainer(max_epochs=2, callbacks=[cb]).fit(model, random_loader())
    assert torch.equal(model.backbone.conv1[0].weight, stem_before)
    assert not torch.equal(model.backbone.layer4[0].conv1.weight, top_before)


def test_restore_best_goes_back_to_the_best_weights_of_the_phase():
    module = ScriptedModule([0.5, 0.9, 0.9, 0.9])  # best at epoch 0, then plateau (mode min)
    snapshots = {}

    class Snap(GradualUnfreezing):
        def on_validation_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            super().on_validation_end(trainer, pl_module)

    cb = Snap(monitor="val/score", patience=1, restore_best=True, verbose=False)
    captured = {}
    trainer = fast_trainer(max_epochs=2, callbacks=[cb])
    original = cb._transition

    def spy(trainer, pl_module, target, reason):
        original(trainer, pl_module, target, reason)
        captured.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    cb._transition = spy
    trainer.fit(module, vector_loader(), vector_loader(n=8))
    assert cb.transitions[0]["epoch"] == 1
    for k, v in captured.items():
        assert torch.equal(v, snapshots[0][k]), k
    assert any(not torch.equal(snapshots[1][k], snapshots[0][k]) for k in captured)


def test_state_dict_round_trip_and_state_key_includes_the_monitor():
    a = GradualUnfreezing(monitor="val/loss")
    b = GradualUnfreezing(monitor="val/acc", mode="max")
    assert a.state_key != b.state_key and "val/loss" in a.state_key
    a.phase, a.wait, a.best = 2, 1, 0.25
    c = GradualUnfreezing(monitor="val/loss")
    c.load_state_dict(a.state_dict())
    assert (c.phase, c.wait, c.best) == (2, 1, 0.25)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="needs a trigger"):
        GradualUnfreezing(monitor=None)
    with pytest.raises(ValueError, match="either milestones"):
        GradualUnfreezing(milestones={1: "all"}, phases=[".*"])
    with pytest.raises(ValueError, match="mode must be"):
        GradualUnfreezing(mode="maximum")


def test_logs_phase_trainable_count_and_group_lrs_and_says_why(caplog):
    import logging

    module = ScriptedModule([1.0, 1.0, 1.0])
    cb = GradualUnfreezing(monitor="val/score", patience=1)
    with caplog.at_level(logging.INFO):
        trainer = _fit(module, cb, epochs=2)
    metrics = trainer.callback_metrics
    assert float(metrics["unfreeze/phase"]) == 1.0
    assert float(metrics["unfreeze/trainable_params"]) == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert float(metrics["unfreeze/lr/group0"]) == pytest.approx(0.01)
    assert "GradualUnfreezing: epoch 1, val/score did not improve for 1 epochs (best 1): unfroze body.2" in caplog.text


def test_freeze_backbone_module_conflicts_with_unfreezing():
    model = FineTuneModule("test_resnet", num_classes=3, freeze_backbone=True)
    with pytest.raises(ValueError, match="freeze_backbone=True.*Set freeze_backbone=False"):
        fast_trainer(max_steps=1, callbacks=[GradualUnfreezing(monitor=None, milestones={1: "all"})]).fit(
            model, random_loader())


def test_missing_monitor_is_caught_by_the_sanity_check_before_training():
    module = ScriptedModule()
    steps = []

    class Count(GradualUnfreezing):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append(batch_idx)

    trainer = fast_trainer(max_epochs=1, num_sanity_val_steps=1, callbacks=[Count(monitor="val/acc")])
    with pytest.raises(ValueError, match="monitors `val/acc`, which was not logged. Logged: val/loss"):
        trainer.fit(module, vector_loader(), vector_loader(n=8))
    assert steps == []


def test_recalibrate_on_several_training_loaders_is_refused_with_the_fix():
    module = ScriptedModule()
    module.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))  # something to recalibrate
    cb = GradualUnfreezing(milestones={0: ["head"]}, frozen_bn="recalibrate", verbose=False)
    trainer = fast_trainer(max_epochs=1, callbacks=[cb])
    with pytest.raises(ValueError, match=r"frozen_bn='recalibrate'.*one DataLoader.*this fit trains on dict\. Use frozen_bn='eval'"):
        trainer.fit(module, {"a": vector_loader(), "b": vector_loader(seed=1)}, vector_loader(n=8))
    assert trainer.global_step == 0


def test_bad_frozen_bn_value_fails_at_construction():
    with pytest.raises(ValueError, match="frozen_bn must be 'auto', 'recalibrate', 'eval' or 'train'"):
        GradualUnfreezing(milestones={1: "all"}, frozen_bn="freeze")


def test_recalibrate_uses_full_batches_so_a_one_sample_tail_cannot_break_batchnorm1d():
    class Tail(ScriptedModule):  # BatchNorm1d: a batch of one sample raises in train mode
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))

    torch.manual_seed(0)
    module = Tail()
    loader = vector_loader(n=33, batch=16)  # 16 + 16 + 1
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=16, drop_last=True)
    weight, bias = module.body[0].weight.detach().clone(), module.body[0].bias.detach().clone()
    cb = GradualUnfreezing(milestones={0: ["head"]}, frozen_bn="recalibrate", verbose=False)
    fast_trainer(max_epochs=1, callbacks=[cb]).fit(module, loader)
    x = loader.dataset.tensors[0][:32]
    a = (x @ weight.T + bias).split(16)  # the two full batches, in order
    assert torch.allclose(module.body[1].running_mean, torch.stack([t.mean(0) for t in a]).mean(0), atol=1e-6)
    assert torch.allclose(module.body[1].running_var, torch.stack([t.var(0) for t in a]).mean(0), atol=1e-5)


def test_empty_milestones_are_refused():
    with pytest.raises(ValueError, match=r"milestones=\{\} names no epoch"):
        GradualUnfreezing(milestones={})
