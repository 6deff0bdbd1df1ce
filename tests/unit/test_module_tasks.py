"""FineTuneModule with several tasks on one backbone: a head per task, labels missing per sample and
per task, metrics per task, a combined monitor, fixed or uncertainty weights (bounded)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_ft import FineTuneModule
from lightning_ft.batch import MISSING

TASKS = {"landcover": 4, "crop": 3}


class TwoTaskData(Dataset):
    """Images whose landcover is the mean brightness quartile and whose crop label is the dominant band;
    ``crop`` labels missing for ``missing`` of the samples."""

    def __init__(self, n: int = 48, missing: float = 0.5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.landcover = torch.arange(n) % 4
        self.x += self.landcover.view(-1, 1, 1, 1).float()
        self.crop = torch.arange(n) % 3
        self.x[torch.arange(n), self.crop] += 2.0
        drop = torch.rand(n, generator=g) < missing
        self.crop_targets = torch.where(drop, torch.full_like(self.crop, MISSING), self.crop)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"landcover": self.landcover[i], "crop": self.crop_targets[i]}


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **kwargs})


def test_trains_and_logs_every_task_with_half_the_crop_labels_missing():
    data = TwoTaskData(missing=0.5)
    assert (data.crop_targets == MISSING).float().mean().item() == pytest.approx(0.5, abs=0.2)
    model = FineTuneModule(backbone="test_resnet", tasks=TASKS, lr=1e-2)
    assert set(model.head.heads) == set(TASKS)
    t = trainer()
    loader = DataLoader(data, batch_size=16)
    t.fit(model, loader, loader)
    logged = t.callback_metrics
    for stage in ("train", "val"):
        for task in TASKS:
            assert f"{stage}/{task}/acc" in logged, sorted(logged)
            assert f"{stage}/{task}/loss" in logged, sorted(logged)
    # the combined monitor: mean of the task losses and accuracies
    expect_loss = (logged["val/landcover/loss"] + logged["val/crop/loss"]) / 2
    assert logged["val/loss"] == pytest.approx(float(expect_loss), rel=1e-5)
    expect_acc = (logged["val/landcover/acc"] + logged["val/crop/acc"]) / 2
    assert logged["val/acc"] == pytest.approx(float(expect_acc), rel=1e-5)
    assert "train/crop/weight" in logged and float(logged["train/crop/weight"]) == 1.0
    probs = t.predict(model, DataLoader([d[0] for d in data], batch_size=16))
    assert set(probs[0]) == set(TASKS) and probs[0]["crop"].shape == (16, 3)


def test_loss_equals_the_sum_of_per_task_means_over_labelled_rows():
    model = FineTuneModule(backbone="test_resnet", tasks=TASKS, task_weights={"landcover": 1.0, "crop": 0.5})
    model.eval()
    data = TwoTaskData(n=8, missing=0.5, seed=1)
    x = data.x
    y = {"landcover": data.landcover, "crop": data.crop_targets}
    loss = model._step((x, y), "test")
    logits = model(x)
    keep = y["crop"] != MISSING
    expect = F.cross_entropy(logits["landcover"], y["landcover"]) + 0.5 * F.cross_entropy(
        logits["crop"][keep], y["crop"][keep])
    torch.testing.assert_close(loss, expect)
    # a task with no label in the batch is left out of the loss (not a NaN, not a zero that pulls weights)
    y_none = {"landcover": data.landcover, "crop": torch.full_like(data.crop, MISSING)}
    torch.testing.assert_close(model._step((x, y_none), "test"), F.cross_entropy(logits["landcover"], y["landcover"]))
    # a task left out of the dict entirely: the same
    torch.testing.assert_close(model._step((x, {"landcover": data.landcover}), "test"),
                               F.cross_entropy(logits["landcover"], y["landcover"]))


def test_uncertainty_weights_stay_bounded_while_training():
    model = FineTuneModule(backbone="test_resnet", tasks=TASKS, task_weighting="uncertainty", lr=0.5, warmup=0.0)
    bound = model.task_weighting.bound
    t = trainer(max_epochs=4)
    loader = DataLoader(TwoTaskData(missing=0.5), batch_size=16)
    t.fit(model, loader, loader)
    s = model.task_weighting.effective_log_vars().detach()
    raw = model.task_weighting.log_vars.detach()
    assert not torch.equal(raw, torch.zeros_like(raw)), "the log-variances never trained"
    assert bool((s.abs() < bound).all()), s
    # what is logged is the weight the loss used: 0.5 exp(-s) of the bounded s
    weights = model.task_weighting.weights_dict()
    for i, task in enumerate(TASKS):
        assert weights[task] == pytest.approx(0.5 * torch.exp(-s[i]).item(), rel=1e-5)
        assert float(t.callback_metrics[f"train/{task}/weight"]) == pytest.approx(weights[task], rel=1e-5)
    # and the task losses stay finite (the weighted total is bounded below by -K * bound / 2 by construction)
    loss = float(t.callback_metrics["train/loss"])  # the epoch mean of the task losses
    assert loss == loss and loss >= 0


def test_tasks_errors_name_the_fix():
    model = FineTuneModule(backbone="test_resnet", tasks=TASKS)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError, match="targets are a dict of class indices per task"):
        model._step((x, torch.zeros(4, dtype=torch.long)), "val")
    with pytest.raises(ValueError, match=r"tasks \['weather'\] that the model lacks"):
        model._step((x, {"weather": torch.zeros(4, dtype=torch.long)}), "val")
    with pytest.raises(ValueError, match="crop"):  # a class index out of range names its task
        model._step((x, {"crop": torch.full((4,), 7)}), "val")
    with pytest.raises(ValueError, match="give tasks="):
        FineTuneModule(backbone="test_resnet")._step((x, {"crop": torch.zeros(4, dtype=torch.long)}), "val")
    with pytest.raises(ValueError, match="one or the other"):
        FineTuneModule(backbone="test_resnet", tasks=TASKS, task_weighting="uncertainty", task_weights={"crop": 1.0})
    with pytest.raises(ValueError, match="apply to several tasks"):
        FineTuneModule(backbone="test_resnet", task_weighting="uncertainty")


def test_prediction_files_refuse_a_model_with_tasks_by_name(tmp_path):
    from lightning_ft.callbacks import PredictionWriter

    model = FineTuneModule(backbone="test_resnet", tasks=TASKS)
    t = trainer(callbacks=[PredictionWriter(tmp_path / "p.csv")])
    with pytest.raises(ValueError, match="one per task .*crop, landcover.*trainer.predict"):
        t.predict(model, DataLoader([d[0] for d in TwoTaskData(n=4)], batch_size=4))
