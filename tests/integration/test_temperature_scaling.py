"""TemperatureScaling on a user's LightningModule (a conv net with BatchNorm, steps that call self(x)) and on
FineTuneModule: a temperature fitted at every validation, kept in each checkpoint with the weights it was
fitted on, and used by test and predict from that checkpoint in a new Trainer (losses and probabilities
compared with the logits divided by T by hand); under 2-rank DDP (scripts/ddp_temperature.py) and bf16-mixed.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_ft import FineTuneModule
from lightning_ft.analysis.calibration import calibration_errors, fit_temperature
from lightning_ft.callbacks import TemperatureScaling
from lightning_ft.data import DigitsDataModule
from tests.conftest import fast_trainer
from tests.helpers import run_ddp_script

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_temperature.py"
KEY = "TemperatureScaling"  # the callback's state_key in a checkpoint


class UserNet(L.LightningModule):
    """Somebody else's module: a conv net with BatchNorm and a linear head, steps that call self(x)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", (logits.argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0]).softmax(-1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, image_size=16, channels=1, limit=200, mean=(0.5,), std=(0.5,))


def _fit(model, callbacks, epochs=3, **kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=_data())
    return trainer


@torch.no_grad()
def _logits(model: nn.Module, loader, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits over a loader in eval mode, by hand."""
    model.eval()
    out, ys = [], []
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out.append(model(x))
        ys.append(y)
    return torch.cat(out), torch.cat(ys)


def _loaded(model: L.LightningModule, path: str) -> L.LightningModule:
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model


def _loaders():
    data = _data()
    data.setup("fit")
    data.setup("test")
    return data.val_dataloader(), data.test_dataloader()


def _epoch_checkpoints(tmp_path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)


def test_every_validation_fits_and_logs_and_each_checkpoint_keeps_the_temperature_of_its_weights(tmp_path):
    scaling, checkpoints = TemperatureScaling(), _epoch_checkpoints(tmp_path)
    trainer = _fit(UserNet(), [scaling, checkpoints], epochs=3, enable_checkpointing=True)
    history = scaling.history
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(h["rows"] == 180 for h in history)
    assert len({h["temperature"] for h in history}) == 3  # refitted on each epoch's weights
    metrics = trainer.callback_metrics
    last = history[-1]
    assert float(metrics["val/temperature"]) == pytest.approx(last["temperature"], rel=1e-6)
    assert float(metrics["val/ece_uncalibrated"]) == pytest.approx(last["ece"], rel=1e-6)
    assert float(metrics["val/ece_calibrated"]) == pytest.approx(last["ece_calibrated"], rel=1e-6)
    assert scaling.temperature == last["temperature"] and scaling.fitted_step == trainer.global_step
    assert any(h["ece_calibrated"] < h["ece"] for h in history)

    val_loader, _ = _loaders()
    for record in history:
        path = tmp_path / f"epoch={record['epoch']}.ckpt"
        state = torch.load(path, weights_only=True)["callbacks"][KEY]  # python floats: weights_only loads it
        assert state["temperature"] == record["temperature"] and state["epoch"] == record["epoch"]
        # the stored T is the one the checkpoint's own weights give on the validation set
        logits, y = _logits(_loaded(UserNet(), str(path)), val_loader)
        assert fit_temperature(logits, y) == pytest.approx(state["temperature"], rel=1e-5)
        assert calibration_errors(logits, y)["ece"] == pytest.approx(state["ece"], abs=1e-5)


def test_test_and_predict_from_a_checkpoint_in_a_new_trainer_divide_the_logits_by_its_temperature(tmp_path):
    fitting = TemperatureScaling(verbose=False)
    _fit(UserNet(), [fitting, _epoch_checkpoints(tmp_path)], epochs=3, enable_checkpointing=True)
    path = str(tmp_path / "epoch=0.ckpt")  # an earlier epoch than the last: its T differs from the final one
    t = fitting.history[0]["temperature"]
    assert t != pytest.approx(fitting.temperature, rel=1e-3)
    val_loader, test_loader = _loaders()
    logits, y = _logits(_loaded(UserNet(), path), test_loader)

    scaling = TemperatureScaling()
    trainer = fast_trainer(callbacks=[scaling])
    result = trainer.test(UserNet(), datamodule=_data(), ckpt_path=path, weights_only=True, verbose=False)[0]
    assert scaling.temperature == t and scaling.fitted_epoch == 0
    assert result["test/temperature"] == pytest.approx(t, rel=1e-6)
    assert result["test_loss"] == pytest.approx(float(F.cross_entropy(logits / t, y)), rel=1e-5)
    assert result["test_loss"] != pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-3)
    assert result["test_acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()), abs=1e-6)  # unchanged
    assert result["test/ece_calibrated"] == pytest.approx(calibration_errors(logits / t, y)["ece"], abs=1e-5)
    assert result["test/ece_uncalibrated"] == pytest.approx(calibration_errors(logits, y)["ece"], abs=1e-5)

    predictor = TemperatureScaling()
    probs = fast_trainer(callbacks=[predictor]).predict(UserNet(), dataloaders=test_loader, ckpt_path=path)
    torch.testing.assert_close(torch.cat(probs), (logits / t).softmax(-1), rtol=1e-5, atol=1e-6)

    # validation is never scaled; validating the checkpoint refits the same T on the same weights
    result = trainer.validate(UserNet(), dataloaders=val_loader, ckpt_path=path, verbose=False)[0]
    val_logits, val_y = _logits(_loaded(UserNet(), path), val_loader)
    assert result["val_loss"] == pytest.approx(float(F.cross_entropy(val_logits, val_y)), rel=1e-5)
    assert scaling.temperature == pytest.approx(t, rel=1e-6)


def test_without_a_fitted_temperature_test_runs_unscaled_and_warns_once(tmp_path):
    model = UserNet()
    _, test_loader = _loaders()
    logits, y = _logits(model, test_loader)
    scaling = TemperatureScaling()
    trainer = fast_trainer(callbacks=[scaling])
    with pytest.warns(UserWarning, match="no fitted temperature: test runs with T=1") as caught:
        result = trainer.test(model, dataloaders=test_loader, verbose=False)[0]
        trainer.test(model, dataloaders=test_loader, verbose=False)
    assert sum("no fitted temperature" in str(w.message) for w in caught) == 1
    assert result["test/temperature"] == 1.0
    assert result["test_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)

    # a checkpoint saved without the callback's state: the T held from before is not these weights' T
    _fit(UserNet(), [_epoch_checkpoints(tmp_path)], epochs=1, enable_checkpointing=True)
    scaling.temperature = 2.0
    with pytest.warns(UserWarning, match="holds no temperature"):
        result = trainer.test(UserNet(), dataloaders=test_loader, ckpt_path=str(tmp_path / "epoch=0.ckpt"),
                              verbose=False)[0]
    assert scaling.temperature is None and result["test/temperature"] == 1.0


def test_a_temperature_older_than_the_weights_is_flagged(tmp_path):
    """Validation every 2 epochs of 3, a checkpoint every 3 steps: T and the saved or final weights part ways."""
    scaling = TemperatureScaling(verbose=False)
    with pytest.warns(UserWarning) as caught:
        _fit(UserNet(), [scaling, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)], epochs=3,
             check_val_every_n_epoch=2, enable_checkpointing=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "training went on" in messages and "stores the temperature fitted at the validation" in messages
    assert [h["epoch"] for h in scaling.history] == [1]


class DictOutput(UserNet):
    def forward(self, x):
        return {"a": super().forward(x)}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["a"], batch[1])


class TwoForwards(UserNet):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy((self(x) + self(x.flip(-1))) / 2, y))


class Probabilities(UserNet):
    def forward(self, x):
        return super().forward(x).softmax(-1)


class NoForward(UserNet):
    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.backbone(batch[0])), batch[1])


@pytest.mark.parametrize("module, error, match", [
    (DictOutput, ValueError, r"DictOutput.forward to return logits.*returned a dict \(a: one entry per task\?\)"),
    (TwoForwards, RuntimeError, r"TwoForwards.forward ran 2 times in this validation step"),
    (Probabilities, ValueError, r"Probabilities.forward returns probabilities"),
    (NoForward, ValueError, "defines no forward"),
])
def test_a_module_the_callback_cannot_serve_is_refused_with_the_reason(module, error, match):
    with pytest.raises(error, match=match):
        _fit(module(), [TemperatureScaling()], epochs=1, limit_train_batches=1)


def test_on_fine_tune_module_test_from_the_checkpoint_uses_its_temperature(tmp_path):
    def model():
        torch.manual_seed(0)
        return FineTuneModule(backbone="test_resnet", num_classes=10, in_chans=1, lr=1e-2, warmup=0.0)

    scaling = TemperatureScaling(verbose=False)
    trainer = _fit(model(), [scaling, _epoch_checkpoints(tmp_path)], epochs=2, enable_checkpointing=True,
                   limit_train_batches=3)
    metrics = trainer.callback_metrics
    assert {"val/ece_uncalibrated", "val/ece_calibrated", "val/temperature", "val/loss"} <= set(metrics)
    # the module's own val/ece is over the same unscaled validation logits
    assert float(metrics["val/ece"]) == pytest.approx(float(metrics["val/ece_uncalibrated"]), abs=1e-5)
    path = str(tmp_path / "epoch=1.ckpt")
    t = scaling.temperature
    _, test_loader = _loaders()
    logits, y = _logits(_loaded(model(), path), test_loader)
    tester = TemperatureScaling()
    result = fast_trainer(callbacks=[tester]).test(model(), datamodule=_data(), ckpt_path=path, verbose=False)[0]
    assert tester.temperature == t
    assert result["test/loss"] == pytest.approx(float(F.cross_entropy(logits / t, y)), rel=1e-5)
    assert result["test/acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()), abs=1e-6)
    assert result["test/ece_calibrated"] == pytest.approx(calibration_errors(logits / t, y)["ece"], abs=1e-5)
    assert result["test/ece"] == pytest.approx(result["test/ece_calibrated"], abs=1e-5)  # the module saw scaled logits


CLI_CONFIG = """\
seed_everything: 0
test_after_fit: true
trainer:
  accelerator: cpu
  max_epochs: 2
  limit_train_batches: 3
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - class_path: lightning_ft.callbacks.TemperatureScaling
      init_args:
        n_bins: 10
        verbose: false
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: val/loss
        mode: min
model:
  backbone: test_resnet
  num_classes: 10
  in_chans: 1
  lr: 0.01
  warmup: 0.0
data:
  class_path: lightning_ft.data.DigitsDataModule
  init_args:
    batch_size: 32
    image_size: 16
    channels: 1
    limit: 200
"""


def test_from_a_lightning_cli_yaml_test_after_fit_uses_the_best_checkpoints_temperature(tmp_path, monkeypatch):
    import sys

    from lightning_ft.cli import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-ft"])
    config = tmp_path / "temperature.yaml"
    config.write_text(CLI_CONFIG)
    cli = run(args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}"])
    scaling = next(cb for cb in cli.trainer.callbacks if isinstance(cb, TemperatureScaling))
    assert scaling.n_bins == 10 and not scaling.verbose and len(scaling.history) == 2
    best = cli.trainer.checkpoint_callback.best_model_path
    stored = torch.load(best, weights_only=True)["callbacks"][KEY]
    assert scaling.temperature == stored["temperature"]  # restored from the best checkpoint for the test
    assert float(cli.trainer.callback_metrics["test/temperature"]) == pytest.approx(stored["temperature"], rel=1e-6)


def test_bf16_mixed(tmp_path):
    scaling = TemperatureScaling(verbose=False)
    model = UserNet()
    trainer = _fit(model, [scaling], epochs=2, precision="bf16-mixed")
    t = scaling.temperature
    assert t is not None and 0.05 < t < 20 and len(scaling.history) == 2
    assert float(trainer.callback_metrics["val/temperature"]) == pytest.approx(t, rel=1e-6)
    _, test_loader = _loaders()
    result = trainer.test(model, dataloaders=test_loader, verbose=False)[0]
    assert result["test/temperature"] == pytest.approx(t, rel=1e-6) and "test/ece_calibrated" in result
    probs = torch.cat(trainer.predict(model, dataloaders=test_loader))
    logits, y = _logits(model, test_loader, precision="bf16-mixed")
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(probs.float(), (logits / t).float().softmax(-1), atol=2e-3, rtol=0)
    assert torch.equal(probs.argmax(1), logits.float().argmax(1))


@pytest.mark.slow
@pytest.mark.ddp
def test_under_ddp_both_ranks_fit_the_same_temperature_on_the_whole_validation_set(tmp_path):
    r0, r1 = run_ddp_script(SCRIPT, tmp_path, timeout=240)
    assert r0["local_rows"] == r1["local_rows"] == [90, 90]  # each rank validated half of the 180 rows per epoch
    assert [h["rows"] for h in r0["history"]] == [180, 180]  # ... and fitted on all of them
    assert r0["history"] == r1["history"]  # the same T, ECEs and rows on both ranks, every epoch
    assert r0["temperature"] == r1["temperature"] == r0["history"][-1]["temperature"]
    assert r0["metrics"]["val/temperature"] == pytest.approx(r0["temperature"], rel=1e-6)
    assert r0["metrics"] == r1["metrics"]
    # T fitted by hand on rank 0 over the whole validation set, with the final weights
    assert r0["by_hand"] == pytest.approx(r0["temperature"], rel=1e-5)
    assert r0["test"]["test/temperature"] == pytest.approx(r0["temperature"], rel=1e-6)
    assert r0["test"] == r1["test"]
    # predict through DDP's forward redirection: each rank's probabilities are softmax(logits / T), scaled once
    assert r0["predict_rows"] == r1["predict_rows"] == 32
    assert r0["predict_error"] < 1e-5 and r1["predict_error"] < 1e-5
