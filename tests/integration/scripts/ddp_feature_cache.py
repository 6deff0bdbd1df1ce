"""FeatureCache under 2-process CPU DDP; each rank records to ``out_dir/rank{r}.json``.

Usage: ``python ddp_feature_cache.py OUT_DIR [cache|plain]``

test_resnet on 96 digits for 2 epochs, DistributedSampler shuffling: a linear probe in epoch 0, then
``layer4`` thawed by GradualUnfreezing in epoch 1. With ``cache`` each rank computes half of each table
(head inputs, then the inputs of layer4) and the halves are gathered; the test compares the weights
(all of them, in ``rank{r}.pt``) with the ``plain`` run and across ranks.

Lightning's DDP launcher re-executes this file for rank 1: the run lives under ``__main__``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_ft import FineTuneModule  # noqa: E402
from lightning_ft.callbacks import FeatureCache, GradualUnfreezing  # noqa: E402
from lightning_ft.data import DigitsDataModule  # noqa: E402


class Kinds(Callback):
    """Counts the training batches run from the head's inputs, from a prefix of the backbone, from images
    (``FeatureCache.serving``: the cut a step runs from; it runs before this callback)."""

    def __init__(self, cache):
        self.cache = cache
        self.cached = self.prefix = self.images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        serving = self.cache.serving if self.cache is not None else None
        if serving is not None and serving.startswith("head"):
            self.cached += 1
        elif serving is not None:
            self.prefix += 1
        else:
            self.images += 1


def main(out_dir: Path, mode: str) -> None:
    L.seed_everything(0)
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=32, lr=1e-2)
    cache = FeatureCache() if mode == "cache" else None
    kinds = Kinds(cache)
    unfreezing = GradualUnfreezing(monitor=None, milestones={1: ["layer4.0"]}, verbose=False)
    callbacks = [unfreezing] + ([cache] if cache is not None else []) + [kinds]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DigitsDataModule(limit=96, batch_size=8))
    record = {
        "rank": trainer.global_rank,
        "head": {k: v.tolist() for k, v in model.head.state_dict().items()},
        "cached": kinds.cached,
        "prefix": kinds.prefix,
        "images": kinds.images,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
    }
    torch.distributed.barrier()  # both ranks are done with collectives: shut the process group down cleanly
    torch.distributed.destroy_process_group()
    torch.save(model.state_dict(), out_dir / f"rank{trainer.global_rank}.pt")
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cache")
