"""PredictionWriter: a file a person can read -- one row per sample with its path, class name and top-k.

``lightning-ft predict`` adds it by itself; on your own Trainer::

    trainer = L.Trainer(callbacks=[PredictionWriter("predictions.csv", top_k=3)])
    trainer.predict(model, datamodule=dm, ckpt_path="best.ckpt")

Each row: the sample's ``path`` (or ``index`` when the dataset has no file paths), its ``label``
(when the predicted files sit in class folders), the ``prediction`` (class name) and its
``probability``, then ``top2``, ``top2_probability``, ... up to ``top_k``. Class names are the
model's ``class_names`` (saved in its checkpoint), else the datamodule's ``classes``, else the
class index. ``predict_step`` may return probabilities or logits (logits are put through a softmax,
said once). Under DDP every rank's rows are gathered and rank 0 writes them, in dataset order,
each sample once. The file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Subset

__all__ = ["PredictionWriter", "sample_paths"]

_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def sample_paths(dataset: Any) -> list[str] | None:
    """File paths of a dataset's samples in index order (Subset, torchvision folders, ``paths``), or ``None``."""
    if isinstance(dataset, Subset):
        inner = sample_paths(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    if isinstance(samples, Sequence) and samples and isinstance(samples[0], (tuple, list)):
        return [str(s[0]) for s in samples]
    paths = getattr(dataset, "paths", None)
    if isinstance(paths, Sequence) and not isinstance(paths, str):
        return [str(p) for p in paths]
    return None


def _sample_labels(dataset: Any) -> list[str | None] | None:
    """The class-folder name of each sample (``None`` where unknown), or ``None`` without labels."""
    if isinstance(dataset, Subset):
        inner = _sample_labels(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    targets, classes = getattr(dataset, "targets", None), getattr(dataset, "classes", None)
    if not targets or not classes:
        return None
    return [classes[int(t)] if 0 <= int(t) < len(classes) else None for t in targets]


class PredictionWriter(BasePredictionWriter):
    """Write ``trainer.predict`` outputs as CSV (``.csv``) or JSON lines (``.jsonl``).

    Args:
        path: the output file; its suffix picks the format. Parent folders are created.
        top_k: how many classes to list per sample (capped at the number of classes).
        verbose: log the number of rows written and the file.
    """

    def __init__(self, path: str = "predictions.csv", top_k: int = 5, verbose: bool = True) -> None:
        super().__init__(write_interval="batch")
        suffix = Path(path).suffix.lower()
        if suffix not in _FORMATS:
            raise ValueError(
                f"PredictionWriter writes .csv or JSON lines (.jsonl, .json) files, got '{path}'. Name the file *.csv or *.jsonl."
            )
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        self.path = Path(path).expanduser()
        self.format = _FORMATS[suffix]
        self.top_k = top_k
        self.verbose = verbose
        self.rows_written = 0
        self._probs: dict[int, list[tuple[list[int], torch.Tensor]]] = {}
        self._said_softmax = False

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probs = {}

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if isinstance(prediction, dict) and getattr(pl_module, "tasks", None):
            raise ValueError(
                f"PredictionWriter writes one classification per sample, but predict_step returned one per task "
                f"({', '.join(sorted(map(str, prediction)))}): a model with several tasks. Use trainer.predict(model, "
                "loader), which returns a dict of probabilities per task, or predict one task at a time."
            )
        if not isinstance(prediction, torch.Tensor) or prediction.ndim != 2:
            raise ValueError(
                "PredictionWriter needs predict_step to return a (batch, classes) tensor of probabilities or logits; "
                f"got {type(prediction).__name__}{'' if not isinstance(prediction, torch.Tensor) else tuple(prediction.shape)}."
            )
        probs = prediction.detach().float()
        if not (bool((probs >= 0).all()) and torch.allclose(probs.sum(-1), torch.ones(len(probs), device=probs.device), atol=1e-3)):
            if not self._said_softmax:
                rank_zero_info("PredictionWriter: predict_step returned logits (rows do not sum to 1); applying softmax.")
                self._said_softmax = True
            probs = probs.softmax(-1)
        if batch_indices is None:
            raise ValueError("PredictionWriter needs the batch indices of each predict batch (a DataLoader with a sampler).")
        self._probs.setdefault(dataloader_idx, []).append((list(batch_indices), probs.cpu()))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = self._gather(trainer)
        if trainer.is_global_zero:
            self.rows_written = self._write(trainer, pl_module, gathered)
            if self.verbose:
                rank_zero_info(f"PredictionWriter: wrote {self.rows_written} predictions to {self.path}")
        self._probs = {}

    def _gather(self, trainer: L.Trainer) -> dict[int, dict[int, torch.Tensor]]:
        local = {k: [(i, p) for idx, probs in v for i, p in zip(idx, probs)] for k, v in self._probs.items()}
        parts = [local]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(parts, local)
        merged: dict[int, dict[int, torch.Tensor]] = {}
        for part in parts:
            for loader, rows in part.items():
                for i, p in rows:
                    merged.setdefault(loader, {})[int(i)] = p  # a DistributedSampler's padding repeats samples
        return merged

    def _class_names(self, trainer: L.Trainer, pl_module: L.LightningModule, num_classes: int) -> list[str]:
        for names in (getattr(pl_module, "class_names", None), getattr(trainer.datamodule, "classes", None)):
            if not names:  # None, or a predict-only datamodule's empty list
                continue
            if len(names) == num_classes:
                return [str(n) for n in names]
            else:
                rank_zero_warn(f"PredictionWriter: {len(names)} class names for {num_classes} outputs; writing indices.")
                break
        return [str(i) for i in range(num_classes)]

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, gathered: dict[int, dict[int, torch.Tensor]]) -> int:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        records = []
        for loader_idx in sorted(gathered):
            dataset = getattr(loaders[loader_idx], "dataset", None) if loader_idx < len(loaders) else None
            paths, labels = sample_paths(dataset), _sample_labels(dataset)
            rows = gathered[loader_idx]
            names = self._class_names(trainer, pl_module, next(iter(rows.values())).numel())
            k = min(self.top_k, len(names))
            for index in sorted(rows):
                top = rows[index].topk(k)
                record: dict[str, Any] = {}
                if len(gathered) > 1:
                    record["dataloader"] = loader_idx
                record["path" if paths is not None else "index"] = paths[index] if paths is not None else index
                if labels is not None:
                    record["label"] = labels[index]
                record["prediction"] = names[int(top.indices[0])]
                record["probability"] = round(float(top.values[0]), 6)
                record["top_k"] = [(names[int(c)], round(float(p), 6)) for p, c in zip(top.values, top.indices)]
                records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            if self.format == "jsonl":
                for r in records:
                    r = dict(r, top_k=[{"class": c, "probability": p} for c, p in r["top_k"]])
                    f.write(json.dumps(r) + "\n")
            else:
                writer = None
                for r in records:
                    flat = {key: value for key, value in r.items() if key != "top_k"}
                    for rank, (c, p) in enumerate(r["top_k"][1:], start=2):
                        flat[f"top{rank}"], flat[f"top{rank}_probability"] = c, p
                    if writer is None:
                        writer = csv.DictWriter(f, fieldnames=list(flat))
                        writer.writeheader()
                    writer.writerow(flat)
        os.replace(tmp, self.path)
        return len(records)
