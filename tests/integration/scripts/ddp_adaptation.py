"""DomainAdaptation's batch-statistic losses under 2-process CPU DDP; each rank records to ``out_dir/rank{r}.json``.

Usage: ``python ddp_adaptation.py OUT_DIR [gather|per_rank]``

One SGD step of a small BatchNorm-free module with MMD + CORAL + mean alignment + MCC (constant
weights). Each rank trains on its own samples (DistributedSampler) and records the batch it saw:
the test compares the weights after the step with one process stepping on the two batches
concatenated. ``per_rank`` turns gathering
off (the negative control). Each rank also gathers tensors of unequal length (3 rows on rank 0,
5 on rank 1) and records the result and the gradient that comes back to its own rows.

Lightning's DDP launcher re-executes this file for rank 1: the run lives under ``__main__``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.utilities import CombinedLoader  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ft.callbacks import DomainAdaptation  # noqa: E402
from lightning_ft.losses import gather_with_grad  # noqa: E402

BATCH = 8  # per rank
LOSSES = {"mmd": 1.0, "coral": 10.0, "mean": 1.0, "mcc": 1.0}
LR = 0.5


def make_data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)
    xt, yt = 0.7 * torch.randn(64, 12, generator=g) + 1.0, torch.randint(0, 4, (64,), generator=g)
    return TensorDataset(xs, ys), TensorDataset(xt, yt)


class Model(L.LightningModule):
    """A user's module: features and logits per domain, the callback adds the adaptation loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
        self.classifier = nn.Linear(6, 4)
        self.num_features = 6

    def training_step(self, batch, batch_idx):
        (xs, ys), (xt, _) = batch["source"], batch["target"]
        self.seen = {"source": xs.tolist(), "source_labels": ys.tolist(), "target": xt.tolist()}
        fs, ft = self.encoder(xs), self.encoder(xt)
        logits_s, logits_t = self.classifier(fs), self.classifier(ft)
        extra = self.domain_adaptation(self, source_features=fs, target_features=ft, target_logits=logits_t)
        return F.cross_entropy(logits_s, ys) + extra

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Data(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.source_train, self.target_train = make_data()

    def train_dataloader(self):
        return CombinedLoader({"source": DataLoader(self.source_train, batch_size=BATCH),
                               "target": DataLoader(self.target_train, batch_size=BATCH)}, mode="max_size_cycle")


def main(out_dir: Path, mode: str) -> None:
    callback = DomainAdaptation(LOSSES, schedule="constant", gather=mode == "gather")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    model = Model()
    trainer.fit(model, datamodule=Data())
    rank = trainer.global_rank
    # unequal lengths: rank 0 holds 3 rows, rank 1 holds 5
    x = (torch.arange((3 + 2 * rank) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank).requires_grad_()
    y = gather_with_grad(x)
    weights = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
    (y * weights).sum().backward()
    record = {
        "rank": rank,
        "world_size": trainer.world_size,
        "params": {k: v.detach().tolist() for k, v in model.state_dict().items()},
        "gathered": y.detach().tolist(),
        "seen": model.seen,
        "gathered_grad": x.grad.tolist(),
    }
    torch.distributed.barrier()  # both ranks are done with collectives: shut the process group down cleanly
    torch.distributed.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "gather")
