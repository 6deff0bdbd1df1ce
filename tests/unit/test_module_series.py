"""FineTuneModule on satellite image time series: every date through the backbone with shared weights,
a temporal head over the valid dates; padding never changes a prediction."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ft import FineTuneModule
from lightning_ft.groups import layer_groups


def series(b: int = 4, t: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False  # a short series, padded
    mask[1, 1] = False  # a clouded date
    doy = torch.sort(torch.randint(1, 366, (b, t), generator=g), dim=1).values
    return {"images": torch.randn(b, t, 3, 16, 16, generator=g), "mask": mask, "doy": doy}


@pytest.mark.parametrize("pooling", ["attention", "mean", "max", "last"])
def test_backbone_runs_on_every_date_with_shared_weights(pooling):
    model = FineTuneModule(backbone="test_resnet", num_classes=3, head="temporal",
                           head_kwargs={"pooling": pooling, "num_heads": 2, "hidden_dim": 16}).eval()
    x = series()
    with torch.no_grad():
        logits = model(x)
        per_date = model.backbone.forward_head(model.backbone.forward_features(x["images"][2]), pre_logits=True)
        pooled, _ = model.forward_features(x)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(pooled[2], per_date)  # date by date, the same backbone
    # padding dates with garbage (images and days) change nothing
    padded = {k: torch.cat([v, v[:, :2]], dim=1) for k, v in x.items()}
    padded["mask"][:, -2:] = False
    padded["images"][:, -2:] = 1e3
    with torch.no_grad():
        torch.testing.assert_close(model(padded), logits, rtol=0, atol=1e-5)


def test_temporal_head_is_the_head_group_and_mismatches_are_named():
    model = FineTuneModule(backbone="test_resnet", num_classes=3, head="temporal")
    assert layer_groups(model)[-1].name == "head"
    assert any(n.startswith("head.") for n in layer_groups(model)[-1].param_names)
    with pytest.raises(ValueError, match="not a time series"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="head='temporal'"):
        FineTuneModule(backbone="test_resnet", num_classes=3)(series())


class SeriesData(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.x = series(b=n, t=4, seed=3)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.x.items()}, self.y[i]


def test_fits_with_bf16_mixed_and_several_tasks():
    model = FineTuneModule(backbone="test_resnet", tasks={"crop": 3, "irrigated": 2}, head="temporal",
                           head_kwargs={"pooling": "attention", "num_heads": 2, "hidden_dim": 16})

    class Two(SeriesData):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, {"crop": y, "irrigated": y % 2}

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(Two(), batch_size=8)
    trainer.fit(model, loader, loader)
    assert {"val/crop/acc", "val/irrigated/acc", "val/acc", "val/loss"} <= set(trainer.callback_metrics)
