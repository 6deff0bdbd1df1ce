"""Several tasks under 2-process CPU DDP, where rank 1 never sees a label of task ``b``.

Usage: ``python ddp_tasks.py OUT_DIR``. Each rank writes ``OUT_DIR/rank{r}.json``: the parameter
hash at the end of every epoch and the logged metrics. The DistributedSampler (no shuffle) gives
rank r the samples r, r + 2, ...; task ``b`` is labelled on even samples only and, when a batch has no
``b`` label at all, the collate function leaves ``b`` out of its targets. So on rank 1 task ``b``'s
head gets no loss in any batch (it must still take part in DDP's all-reduce) and its epoch loss has
no labelled sample (the ranks must still all take part in the metric sync).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402

from lightning_ft import FineTuneModule  # noqa: E402
from lightning_ft.batch import MISSING  # noqa: E402


class Data(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.a = torch.arange(n) % 3
        self.b = torch.where(torch.arange(n) % 2 == 0, (torch.arange(n) // 2) % 2, torch.full((n,), MISSING))

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}


def collate(samples):
    x, y = default_collate(samples)
    if bool((y["b"] == MISSING).all()):
        del y["b"]  # a batch without any label of b: the task is left out
    return x, y


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.epochs: list[str] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(state_hash(pl_module))

    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank, "epochs": self.epochs, "metrics": metrics}))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", tasks={"a": 3, "b": 2}, task_weighting="uncertainty", lr=1e-2)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)  # DDP's first wrap must broadcast rank 0's weights
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Record(out)])
    train = DataLoader(Data(32, seed=0), batch_size=4, collate_fn=collate)
    val = DataLoader(Data(16, seed=1), batch_size=4, collate_fn=collate)
    trainer.fit(model, train, val)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
