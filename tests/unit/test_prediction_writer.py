"""PredictionWriter on a plain LightningModule whose predict_step returns logits, over tensors (no paths)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.callbacks import PredictionWriter
from tests.conftest import fast_trainer


class Plain(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(5, 4)
        self.class_names = ["ant", "bee", "cat", "dog"]

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])  # logits


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_rows_in_dataset_order_with_names_and_top_k_from_logits(tmp_path: Path, suffix: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 5)
    model = Plain()
    writer = PredictionWriter(str(tmp_path / f"out{suffix}"), top_k=3)
    fast_trainer(callbacks=[writer]).predict(model, DataLoader(TensorDataset(x), batch_size=3), return_predictions=False)
    probs = model.net(x).softmax(-1).detach()
    top = probs.topk(3)
    if suffix == ".csv":
        rows = list(csv.DictReader(open(tmp_path / "out.csv")))
        assert list(rows[0]) == ["index", "prediction", "probability", "top2", "top2_probability", "top3",
                                 "top3_probability"]
        got = [(r["prediction"], float(r["probability"]), [r["top2"], r["top3"]]) for r in rows]
    else:
        rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
        got = [(r["prediction"], r["probability"], [t["class"] for t in r["top_k"][1:]]) for r in rows]
    assert [int(r["index"]) for r in rows] == list(range(7)) and writer.rows_written == 7
    for (name, p, rest), values, indices in zip(got, top.values, top.indices):
        assert name == model.class_names[int(indices[0])] and abs(p - float(values[0])) < 1e-6
        assert rest == [model.class_names[int(i)] for i in indices[1:]]
    assert "predict_step returned logits" in caplog.text


def test_bad_file_names_and_outputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.csv or JSON lines"):
        PredictionWriter(str(tmp_path / "out.txt"))

    class Scalar(Plain):
        def predict_step(self, batch, batch_idx):
            return {"logits": self.net(batch[0])}

    with pytest.raises(ValueError, match=r"a \(batch, classes\) tensor"):
        fast_trainer(callbacks=[PredictionWriter(str(tmp_path / "o.csv"))]).predict(
            Scalar(), DataLoader(TensorDataset(torch.randn(2, 5)), batch_size=2))
