"""DomainAdaptation on FineTuneModule and on a user's module: losses bound, scheduled, logged, checked."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import DomainAdaptation
from lightning_ft.data import DigitsDataModule, MNISTSubsetDataModule, SourceTargetDataModule
from lightning_ft.losses import grl_coefficient
from tests.conftest import fast_trainer


def _data(limit=32, target_size=None, explicit=False, source_only=False):
    fixed = dict(image_size=32, channels=1, mean=(0.5,), std=(0.5,)) if explicit else {}
    target = dict(fixed, image_size=target_size) if target_size else fixed
    return SourceTargetDataModule(
        MNISTSubsetDataModule(limit=limit, **fixed),
        DigitsDataModule(limit=limit, mnist_frame=True, **target),
        batch_size=8,
        source_only=source_only,
    )


def _model():
    torch.manual_seed(0)
    return FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=32)


@pytest.mark.parametrize("losses", [{"dann": 1.0}, {"cdan": 1.0}, {"mmd": 1.0}, {"coral": 1.0}, {"mean": 1.0},
                                    {"entropy": 0.1}, {"mcc": 1.0}, {"pseudo_label": 1.0}])
def test_each_loss_trains_logs_and_reports_target_metrics(losses):
    model = _model()
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation(losses)])
    trainer.fit(model, datamodule=_data())
    name = next(iter(losses))
    metrics = trainer.callback_metrics
    assert f"da/{name}" in metrics and torch.isfinite(metrics[f"da/{name}"])
    assert {"val/acc", "val_target/acc", "val/target_entropy", "val/target_im", "val/label_free"} <= set(metrics)
    assert "da/target_entropy" in metrics
    result = trainer.test(model, datamodule=_data(), verbose=False)[0]
    assert "test/acc" in result  # the target test split


def test_dann_discriminator_trains_with_the_module_and_weights_follow_the_schedule(tmp_path):
    model = _model()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fast_trainer(max_epochs=2, callbacks=[DomainAdaptation({"dann": 0.5}), ckpt], enable_checkpointing=True)
    trainer.fit(model, datamodule=_data())
    disc = model.da_losses["dann"].discriminator
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in disc.parameters())
    total = trainer.estimated_stepping_batches
    # the reversal strength at the last step is DANN's schedule of the progress
    assert model.da_losses["dann"].coeff == pytest.approx(grl_coefficient((trainer.global_step - 1) / total))
    assert float(trainer.callback_metrics["da/dann_weight"]) == 0.5  # the DANN weight is constant; lambda ramps
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert any(k.startswith("da_losses.dann.discriminator") for k in state)
    # the checkpoint alone still rebuilds the classifier (the discriminator is dropped)
    loaded = FineTuneModule.load_from_checkpoint(ckpt.last_model_path, weights_only=True)
    assert not hasattr(loaded, "da_losses")


def test_ramp_weights_for_other_losses_and_constant_schedule():
    model = _model()
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation({"mmd": 2.0})])
    trainer.fit(model, datamodule=_data())
    progress = (trainer.global_step - 1) / trainer.estimated_stepping_batches
    assert float(trainer.callback_metrics["da/mmd_weight"]) == pytest.approx(2.0 * grl_coefficient(progress))
    model = _model()
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation({"mmd": 2.0}, schedule="constant")])
    trainer.fit(model, datamodule=_data())
    assert float(trainer.callback_metrics["da/mmd_weight"]) == 2.0


def test_joint_forward_and_bf16_run():
    model = _model()
    cb = DomainAdaptation({"mmd": 1.0, "coral": 1.0}, forward="joint")
    trainer = fast_trainer(max_epochs=1, callbacks=[cb], precision="bf16-mixed")
    trainer.fit(model, datamodule=_data())
    assert torch.isfinite(trainer.callback_metrics["da/mmd"])


def test_source_only_baseline_trains_on_source_batches_and_logs_the_same_monitors():
    model = _model()
    seen = []
    model.training_step = lambda batch, idx, _step=model.training_step: seen.append(batch) or _step(batch, idx)
    trainer = fast_trainer(max_epochs=1)
    trainer.fit(model, datamodule=_data(source_only=True))
    assert seen and all(isinstance(b, (list, tuple)) and len(b) == 2 for b in seen)  # plain (x, y) source batches
    assert {"val/acc", "val_target/acc", "val/label_free"} <= set(trainer.callback_metrics)


def test_source_only_data_with_the_callback_is_refused_before_training():
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation({"mmd": 1.0})])
    with pytest.raises(ValueError, match="source_only=True.*drop the DomainAdaptation callback"):
        trainer.fit(_model(), datamodule=_data(source_only=True))


def test_unknown_loss_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="Unknown domain-adaptation loss 'mdd'.*Did you mean 'mmd'"):
        DomainAdaptation({"mdd": 1.0})


def test_no_target_data_is_refused_before_training():
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation({"mmd": 1.0})])
    with pytest.raises(ValueError, match="needs target data.*SourceTargetDataModule"):
        trainer.fit(_model(), datamodule=DigitsDataModule(limit=16))


def test_target_with_another_input_shape_is_refused_before_training():
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation({"mmd": 1.0})])
    with pytest.raises(ValueError, match=r"Source images have shape \(1, 32, 32\) but target images \(1, 16, 16\)"):
        trainer.fit(_model(), datamodule=_data(target_size=16))


class UserModule(L.LightningModule):
    """A module that is not ours: a few lines give the callback what it needs."""

    def __init__(self, pass_features=True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, 10)
        self.num_features = 8
        self.pass_features = pass_features

    def training_step(self, batch, batch_idx):
        (xs, ys), (xt, _) = batch["source"], batch["target"]
        fs, ft = self.encoder(xs), self.encoder(xt)
        logits_s, logits_t = self.classifier(fs), self.classifier(ft)
        extra = {"source_features": fs, "target_features": ft} if self.pass_features else {}
        return F.cross_entropy(logits_s, ys) + self.domain_adaptation(self, target_logits=logits_t, **extra)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_drop_in_on_a_users_module():
    module = UserModule()
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation({"dann": 1.0, "mcc": 1.0})])
    trainer.fit(module, datamodule=_data(explicit=True))
    assert {"da/dann", "da/mcc", "da/discriminator_acc"} <= set(trainer.callback_metrics)


def test_a_loss_missing_its_features_names_them():
    trainer = fast_trainer(max_epochs=1, callbacks=[DomainAdaptation({"coral": 1.0})])
    with pytest.raises(ValueError, match="'coral' needs source_features, target_features"):
        trainer.fit(UserModule(pass_features=False), datamodule=_data(explicit=True))


def test_schedule_comes_from_the_trainers_step_so_resume_continues_it():
    from types import SimpleNamespace

    cb = DomainAdaptation({"mmd": 1.0})
    cb._trainer = SimpleNamespace(global_step=30, estimated_stepping_batches=120)  # e.g. restored from a checkpoint
    assert cb.progress() == 0.25 and cb.ramp() == pytest.approx(grl_coefficient(0.25))
    assert cb.state_dict() == {}  # nothing else to save


def test_a_resumed_run_continues_the_weight_and_reversal_schedules_exactly(tmp_path):
    class Schedule(L.Callback):
        def __init__(self):
            self.steps = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.steps[trainer.global_step] = (float(m["da/mmd_weight"]), float(pl_module.da_losses["dann"].coeff))

    class StopAfterFirstEpoch(L.Callback):  # an interrupted run
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def fit(extra=(), ckpt_path=None, checkpoint=None):
        record = Schedule()
        callbacks = [DomainAdaptation({"mmd": 2.0, "dann": 1.0}), record, *extra] + ([checkpoint] if checkpoint else [])
        trainer = fast_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=checkpoint is not None)
        trainer.fit(_model(), datamodule=_data(), ckpt_path=ckpt_path)
        return record.steps, trainer

    whole, trainer = fit()
    total = trainer.estimated_stepping_batches
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first, _ = fit([StopAfterFirstEpoch()], checkpoint=ckpt)  # stops after epoch 1 of 2 ...
    resumed, _ = fit(ckpt_path=ckpt.last_model_path)  # ... and picks up from its checkpoint
    assert first == {s: whole[s] for s in first}
    assert set(resumed) == {s for s in whole if s > max(first)}
    assert {s: resumed[s] for s in resumed} == {s: whole[s] for s in resumed}  # the same values, step for step
    last = max(whole)  # and they are the ramp of the progress, not a restart from zero
    assert whole[last][1] == pytest.approx(grl_coefficient((last - 1) / total))


class _TinyPair(L.LightningDataModule):
    """Random 16x16 source images and shifted, rescaled target images, batched like SourceTargetDataModule
    (a ``{"source", "target"}`` CombinedLoader); 8 source and 6 target images a step, 3 steps an epoch."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.source_train = TensorDataset(torch.randn(24, 1, 16, 16, generator=g), torch.arange(24) % 10)
        self.target_train = TensorDataset(0.5 * torch.randn(18, 1, 16, 16, generator=g) + 1.0, torch.arange(18) % 10)

    def train_dataloader(self):
        return CombinedLoader({"source": DataLoader(self.source_train, batch_size=8),
                               "target": DataLoader(self.target_train, batch_size=6)}, mode="max_size_cycle")


def _small_model():
    torch.manual_seed(0)
    return FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=16)


@pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
def test_total_loss_is_the_classification_loss_plus_the_weighted_adaptation_losses_at_each_step():
    """train/total_loss (and the loss the step returns) == train/loss + sum_i w_i(step) * da/<loss_i>, with
    w_i the DANN ramp 2 / (1 + exp(-10 p)) - 1 of the progress p = step / total steps, written out here."""
    weights = {"mmd": 2.0, "coral": 0.5}

    class Record(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = trainer.global_step  # the step the training_step runs at

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.rows.append((self.step, float(outputs["loss"]), float(m["train/total_loss"]),
                              float(m["train/loss_step"]), {k: float(m[f"da/{k}_step"]) for k in weights}))

    record = Record()
    trainer = fast_trainer(max_epochs=2, log_every_n_steps=1, callbacks=[DomainAdaptation(weights), record])
    trainer.fit(_small_model(), datamodule=_TinyPair())
    total_steps = trainer.estimated_stepping_batches
    assert [row[0] for row in record.rows] == list(range(6)) == list(range(total_steps))
    for step, returned, total, loss, values in record.rows:
        ramp = 2.0 / (1.0 + math.exp(-10.0 * step / total_steps)) - 1.0
        expected = loss + sum(ramp * w * values[k] for k, w in weights.items())
        assert total == pytest.approx(expected, rel=1e-5), step
        assert returned == pytest.approx(expected, rel=1e-5), step
        if step > 0:  # the adaptation terms are a visible part of the total
            assert total - loss > 1e-3 * abs(loss)


class _BatchNormProbe(L.Callback):
    """Every training-mode BatchNorm2d call of the backbone in the first step: its input and the batch mean it
    normalised with, read back from the running-mean update ``new = (1 - momentum) old + momentum batch_mean``
    (timm's BatchNormAct2d returns the activation, not the normalised values)."""

    def __init__(self):
        self.calls = []
        self.recording = False

    def on_fit_start(self, trainer, pl_module):
        for name, module in pl_module.backbone.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.register_forward_pre_hook(self._before)
                module.register_forward_hook(lambda mod, args, out, name=name: self._after(name, mod, args))

    def _before(self, module, args):
        module._probe_running_mean = module.running_mean.clone()

    def _after(self, name, module, args):
        if self.recording and module.training:
            used = (module.running_mean - (1 - module.momentum) * module._probe_running_mean) / module.momentum
            self.calls.append((name, args[0].detach(), used.detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.recording = batch_idx == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.recording = False


def _bn_calls(forward):
    probe = _BatchNormProbe()
    cb = DomainAdaptation({"mmd": 1.0}, forward=forward)
    model = _small_model()
    names = [name for name, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    fast_trainer(max_steps=1, callbacks=[cb, probe]).fit(model, datamodule=_TinyPair())
    return probe.calls, names


def _channel_mean(x):
    return x.mean(dim=(0, 2, 3))


@pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
def test_separate_forward_normalises_each_domain_with_its_own_batchnorm_statistics():
    calls, names = _bn_calls("separate")
    assert [name for name, *_ in calls] == names + names  # every BatchNorm: one call per domain
    for i, (name, x, used) in enumerate(calls):
        assert len(x) == (8 if i < len(names) else 6), name  # 8 source images, then 6 target images, never mixed
        assert torch.allclose(used, _channel_mean(x), atol=1e-4), name  # that domain's statistics alone


@pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
def test_joint_forward_mixes_the_domains_batchnorm_statistics():
    calls, names = _bn_calls("joint")
    assert [name for name, *_ in calls] == names  # one call per BatchNorm, on both domains at once
    mixed = 0
    for name, x, used in calls:
        assert len(x) == 14, name
        assert torch.allclose(used, _channel_mean(x), atol=1e-4), name  # the statistics of all 14 images ...
        source, target = _channel_mean(x[:8]), _channel_mean(x[8:])
        if float((source - target).abs().max()) > 0.05:  # ... which, where the domains differ, are neither's own
            assert not torch.allclose(used, source, atol=1e-2) and not torch.allclose(used, target, atol=1e-2), name
            mixed += 1
    assert mixed == len(names)  # the domains differ at every BatchNorm layer here
