"""FineTuneModule's label-free validation monitors under 2-process CPU DDP; each rank writes ``out_dir/rank{r}.json``.

Usage: ``python ddp_label_free.py OUT_DIR``

A FineTuneModule with a small MLP backbone fits one epoch on vector data, validating on a source
split (index 0) and a labelled target split (index 1, 16 samples: 8 per rank, no padding). The
target split alternates two kinds of samples, so DistributedSampler (rank r takes indices r, r+2, ...)
gives the ranks different prediction distributions: a per-rank information-maximisation score
differs from the one of the whole split. Each rank records the logged monitors, the target samples
it validated and the final weights; the test recomputes the monitors on the whole target split.

Lightning's DDP launcher re-executes this file for rank 1: the run lives under ``__main__``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ft import FineTuneModule  # noqa: E402

CLASSES = 3
FEATURES = 6
MONITORS = ("val/acc", "val_target/acc", "val/target_entropy", "val/target_im", "val/label_free")


def make_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Source train/val blobs around 3 * e_class; target val: even indices class 0, odd indices classes 1, 2."""
    g = torch.Generator().manual_seed(3)
    centers = 3.0 * torch.eye(CLASSES, FEATURES)

    def blobs(labels: torch.Tensor, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        return centers[labels] + torch.randn(len(labels), FEATURES, generator=g) + shift, labels

    target_labels = torch.tensor([0, 1, 0, 2] * 4)
    return {
        "train": blobs(torch.arange(32) % CLASSES),
        "val": blobs(torch.arange(12) % CLASSES),
        "target_val": blobs(target_labels, shift=0.3),
    }


def make_model() -> FineTuneModule:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU())
    return FineTuneModule(backbone, num_classes=CLASSES, feature_dim=16, lr=0.05, warmup=0.0, weight_decay=0.0)


class SeenTarget(L.Callback):
    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if dataloader_idx == 1:
            self.rows += batch[0].tolist()


def main(out_dir: Path) -> None:
    data = make_data()
    seen = SeenTarget()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, callbacks=[seen],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    model = make_model()
    loaders = {k: DataLoader(TensorDataset(*v), batch_size=4) for k, v in data.items()}
    trainer.fit(model, loaders["train"], [loaders["val"], loaders["target_val"]])
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "metrics": {k: float(trainer.callback_metrics[k]) for k in MONITORS if k in trainer.callback_metrics},
        "seen_target": seen.rows,
        "state": {k: v.tolist() for k, v in model.state_dict().items() if v.is_floating_point()},
    }
    torch.distributed.barrier()  # both ranks are done with collectives: shut the process group down cleanly
    torch.distributed.destroy_process_group()
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
