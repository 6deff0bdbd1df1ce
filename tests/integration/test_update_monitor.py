"""UpdateMonitor on a LightningModule written here (a conv net with BatchNorm, its own SGD) and on FineTuneModule.

With SGD without momentum or weight decay the update is ``lr * g`` exactly, so the logged update
ratio must be ``lr * ||g|| / ||W||``, with ``g`` and ``W`` taken from a manual forward/backward of
the same batches through a copy of the module (the reference below, written with torch alone).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import GradualUnfreezing, UpdateMonitor
from lightning_ft.groups import layer_groups
from tests.conftest import fast_trainer, random_loader
from tests.helpers import run_ddp_script

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.1
GROUPS = ["backbone.0", "backbone.1", "backbone.3", "backbone.4", "head"]


class UserNet(L.LightningModule):
    """Somebody else's module: conv + BatchNorm layers, a linear head, self(x), plain SGD."""

    def __init__(self, freeze: tuple[str, ...] = (), not_in_optimizer: tuple[str, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8, 3)
        for name, p in self.named_parameters():
            if name.startswith(freeze):
                p.requires_grad_(False)
        self.not_in_optimizer = not_in_optimizer

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(self.not_in_optimizer)]
        return torch.optim.SGD(params, lr=LR)


class Collector(Logger):
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "collector"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def updates(self, prefix: str = "updates") -> list[tuple[int, dict[str, float]]]:
        """(step, {group: (grad_norm, update_ratio)}) for each call that logged the monitor's values."""
        out = []
        for step, metrics in self.calls:
            norms = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith(f"{prefix}/grad_norm/")}
            if norms:
                ratios = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith(f"{prefix}/update_ratio/")}
                assert set(ratios) == set(norms), metrics
                out.append((step, {g: (norms[g], ratios[g]) for g in norms}))
        return out

    def steps_of(self, key: str) -> list[int]:
        return [step for step, metrics in self.calls if key in metrics]


def _loader(batches: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    n = 8 * batches
    return DataLoader(TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3), batch_size=8)


def _fit(model: L.LightningModule, callbacks, batches: int = 3, epochs: int = 1, logger=None, **kwargs) -> Collector:
    logger = logger or Collector()
    L.seed_everything(0)
    trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks, logger=logger, **kwargs)
    trainer.fit(model, train_dataloaders=_loader(batches))
    return logger


def _reference(batches: int, accumulate: int = 1, **net) -> list[dict[str, tuple[float, float]]]:
    """Per optimizer step, per group: (||g||, lr ||g|| / ||W||), from a manual loop on a copy of the module
    (train mode, the same batches, the loss scaled by 1/accumulate as Lightning does, p -= lr * g for the
    optimizer's parameters, whose gradients are reset before each step)."""
    model = UserNet(**net)
    model.train()
    named = dict(model.named_parameters())
    data = list(_loader(batches))
    out = []
    for start in range(0, len(data), accumulate):
        for n, p in named.items():  # as the optimizer does: a parameter it does not hold accumulates
            if not n.startswith(model.not_in_optimizer):
                p.grad = None
        for x, y in data[start:start + accumulate]:
            (F.cross_entropy(model(x), y) / accumulate).backward()
        step = {}
        for group in GROUPS:
            params = [p for n, p in named.items() if n.startswith(f"{group}.") and p.requires_grad]
            g = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))
            w = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
            step[group] = (g, LR * g / w) if params else (0.0, 0.0)
        out.append(step)
        with torch.no_grad():
            for n, p in named.items():
                if p.requires_grad and p.grad is not None and not n.startswith(model.not_in_optimizer):
                    p -= LR * p.grad
    return out


def _assert_matches(logged: list[dict[str, tuple[float, float]]], reference: list[dict[str, tuple[float, float]]]) -> None:
    assert len(logged) == len(reference)
    for got, want in zip(logged, reference):
        assert list(got) == GROUPS
        for group in GROUPS:
            assert got[group][0] == pytest.approx(want[group][0], rel=1e-5, abs=1e-12), (group, got, want)
            # ||W_before - W_after|| in float32: relative rounding ~ eps / ratio
            assert got[group][1] == pytest.approx(want[group][1], rel=2e-3, abs=1e-12), (group, got, want)


def test_grad_norm_and_update_ratio_equal_the_hand_computed_values():
    logger = _fit(UserNet(), [UpdateMonitor(verbose=False)], batches=3, log_every_n_steps=1)
    logged = logger.updates()
    assert [step for step, _ in logged] == [0, 1, 2] == logger.steps_of("train_loss")  # the rows Lightning logs at
    _assert_matches([values for _, values in logged], _reference(3))
    assert all(0 < ratio < 1 for _, values in logged for _, ratio in values.values())


def test_frozen_groups_log_zero_and_a_parameter_missing_from_the_optimizer_shows_ratio_zero():
    """Documented: a group without trainable parameters logs 0 for both; a trainable parameter the
    optimizer does not hold has a gradient but does not move."""
    net = dict(freeze=("backbone.0.",), not_in_optimizer=("backbone.1.",))
    model = UserNet(**net)
    stem = [p.detach().clone() for p in model.backbone[0].parameters()]
    logger = _fit(model, [UpdateMonitor(verbose=False)], batches=3, log_every_n_steps=1)
    logged = [values for _, values in logger.updates()]
    _assert_matches([{**v, "backbone.1": (v["backbone.1"][0], 0.0)} for v in logged],
                    [{**v, "backbone.1": (v["backbone.1"][0], 0.0)} for v in _reference(3, **net)])
    for values in logged:
        assert values["backbone.0"] == (0.0, 0.0)
        assert values["backbone.1"][0] > 0 and values["backbone.1"][1] == 0.0
        assert all(values[g][0] > 0 and values[g][1] > 0 for g in ("backbone.3", "backbone.4", "head"))
    assert all(torch.equal(a, b) for a, b in zip(stem, model.backbone[0].parameters()))


def test_logs_only_on_lightnings_logging_steps_in_metrics_csv(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    _fit(UserNet(), [UpdateMonitor(verbose=False)], batches=8, epochs=2, logger=logger, log_every_n_steps=3)
    with open(logger.log_dir + "/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    ours = [int(r["step"]) for r in rows if r.get("updates/grad_norm/head")]
    lightning = [int(r["step"]) for r in rows if r.get("train_loss")]
    assert ours == lightning == [2, 5, 8, 11, 14]  # (steps taken + 1) % 3 == 0, across the epoch boundary
    for r in rows:
        if r.get("updates/grad_norm/head"):
            assert all(r[f"updates/{what}/{g}"] for what in ("grad_norm", "update_ratio") for g in GROUPS)


def test_own_logging_interval_counts_optimizer_steps():
    logger = _fit(UserNet(), [UpdateMonitor(logging_interval=4, verbose=False)], batches=8, epochs=2,
                  log_every_n_steps=1)
    assert [step for step, _ in logger.updates()] == [3, 7, 11, 15]


def test_gradient_accumulation_reports_once_per_optimizer_step():
    logger = _fit(UserNet(), [UpdateMonitor(verbose=False)], batches=6, log_every_n_steps=1, accumulate_grad_batches=2)
    logged = logger.updates()
    assert [step for step, _ in logged] == [0, 1, 2] == logger.steps_of("train_loss")
    _assert_matches([values for _, values in logged], _reference(6, accumulate=2))  # the accumulated gradient


class ManualNet(UserNet):
    """The same module with manual optimization: zero_grad, manual_backward, step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        optimizer.step()
        self.log("train_loss", loss)


def test_manual_optimization():
    logger = _fit(ManualNet(), [UpdateMonitor(verbose=False)], batches=4, log_every_n_steps=2)
    logged = logger.updates()
    assert [step for step, _ in logged] == [1, 3] == logger.steps_of("train_loss")
    _assert_matches([values for _, values in logged], _reference(4)[1::2])


def test_bf16_mixed_on_cpu():
    """Weights stay float32 under bf16-mixed, so the step is still lr * g: ratio = lr ||g|| / ||W_0||."""
    logger = _fit(UserNet(), [UpdateMonitor(verbose=False)], batches=1, log_every_n_steps=1, precision="bf16-mixed")
    ((step, values),) = logger.updates()
    start = dict(UserNet().named_parameters())
    for group in GROUPS:
        norm, ratio = values[group]
        w = math.sqrt(sum(float(p.detach().double().square().sum()) for n, p in start.items() if n.startswith(f"{group}.")))
        assert math.isfinite(norm) and norm > 0
        assert ratio == pytest.approx(LR * norm / w, rel=2e-3)
    reference = _reference(1)[0]  # float32 gradients: bf16 matmuls change them by ~1%
    assert all(values[g][0] == pytest.approx(reference[g][0], rel=0.1) for g in GROUPS)


def test_16_mixed_gradient_norms_are_unscaled():
    """The hook runs after GradScaler.unscale_: the norms are those of the float32 loop, not 65536 times them.
    (``precision="16-mixed"`` alone becomes bf16 on CPU: the plugin with a CPU GradScaler keeps fp16 scaling.)"""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    logger = _fit(UserNet(), [UpdateMonitor(verbose=False)], batches=2, log_every_n_steps=1, plugins=[plugin])
    assert scaler.get_scale() >= 2.0**15  # a real fp16 scaler ran (65536, or halved once after an overflow)
    logged = logger.updates()
    assert len(logged) == 2
    for (_, values), reference in zip(logged, _reference(2)):
        assert all(values[g][0] == pytest.approx(reference[g][0], rel=0.05) for g in GROUPS), (values, reference)


def test_own_groups_and_two_monitors_side_by_side():
    fine = UpdateMonitor(verbose=False)
    coarse = UpdateMonitor(groups={"features": ["backbone"], "classifier": ["head.weight", "head.bias"]}, prefix="coarse",
                           verbose=False)
    logger = _fit(UserNet(), [fine, coarse], batches=2, log_every_n_steps=1)
    for (_, per_group), (_, groups) in zip(logger.updates(), logger.updates("coarse"), strict=True):
        assert list(groups) == ["features", "classifier"]
        features = math.sqrt(sum(per_group[g][0] ** 2 for g in GROUPS[:-1]))
        assert groups["features"][0] == pytest.approx(features, rel=1e-5)
        assert groups["classifier"] == pytest.approx(per_group["head"], rel=1e-6)


def test_fine_tune_module_with_gradual_unfreezing_reports_groups_as_they_thaw():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, in_chans=1, img_size=16, lr=1e-2)
    names = [g.name for g in layer_groups(model)]
    thawed = names[-2]
    unfreezing = GradualUnfreezing(monitor=None, milestones={0: ["head"], 1: [thawed]}, verbose=False)
    logger = Collector()
    L.seed_everything(0)
    trainer = fast_trainer(max_epochs=2, callbacks=[unfreezing, UpdateMonitor(verbose=False)], logger=logger,
                           log_every_n_steps=1, limit_train_batches=3)
    trainer.fit(model, train_dataloaders=random_loader(n=24, size=16, chans=1, batch=8))
    logged = logger.updates()
    assert [step for step, _ in logged] == list(range(6))
    for step, values in logged:
        assert list(values) == names  # layer_groups' names, stem first, head last
        moving = {g for g, (norm, ratio) in values.items() if norm > 0 and ratio > 0}
        frozen = {g for g, v in values.items() if v == (0.0, 0.0)}
        expected = {"head"} if step < 3 else {"head", thawed}
        assert moving == expected and frozen == set(names) - expected, (step, values)


def test_fine_tune_module_with_a_frozen_backbone_reports_only_the_head():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, in_chans=1, img_size=16, freeze_backbone=True)
    logger = _fit(model, [UpdateMonitor(verbose=False)], batches=2, log_every_n_steps=1)
    logged = logger.updates()
    assert len(logged) == 2
    for _, values in logged:
        assert list(values)[-1] == "head" and values["head"][0] > 0 and values["head"][1] > 0
        assert all(v == (0.0, 0.0) for g, v in values.items() if g != "head"), values


def test_refuses_a_trainer_without_logger_and_prefixes_that_name_nothing():
    with pytest.raises(ValueError, match="has none \\(logger=False\\)"):
        L.seed_everything(0)
        fast_trainer(callbacks=[UpdateMonitor()]).fit(UserNet(), train_dataloaders=_loader(1))
    with pytest.raises(ValueError, match="'body'.*Top-level modules: \\['backbone', 'head'\\]"):
        _fit(UserNet(), [UpdateMonitor(groups={"x": ["body"]})], batches=1)
    with pytest.raises(ValueError, match="logging_interval=0"):
        UpdateMonitor(logging_interval=0)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_cpu_ranks_compute_the_same_values_and_finish(tmp_path):
    """GradualUnfreezing thaws ``body.2`` at epoch 1 (a new DDP wrapper); a logger on every rank records
    the monitor's values: bitwise the same on both ranks, every 2nd step, the thawed group from its thaw."""
    r0, r1 = run_ddp_script(Path(__file__).resolve().parent / "scripts" / "ddp_update_monitor.py", tmp_path)
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)

    def updates(record):
        return [c for c in record["calls"] if any(k.startswith("updates/") for k in c["metrics"])]

    assert updates(r0) == updates(r1)  # same gradients and weights after DDP's all-reduce
    assert [c["step"] for c in updates(r0)] == [1, 3, 5, 7]
    assert [c["step"] for c in r0["calls"] if "train_loss" in c["metrics"]] == [1, 3, 5, 7]
    for call in updates(r0):
        m = call["metrics"]
        assert m["updates/grad_norm/body.0"] == m["updates/update_ratio/body.0"] == 0.0  # never thawed
        assert m["updates/grad_norm/head"] > 0 and m["updates/update_ratio/head"] > 0
        thawed = m["updates/grad_norm/body.2"] > 0 and m["updates/update_ratio/body.2"] > 0
        assert thawed == (call["step"] >= 4), call
