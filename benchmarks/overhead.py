"""Per-step cost of our callbacks: GradualUnfreezing + LayerwiseLRDecay (+ their logging) vs the same loop without.

A plain LightningModule (EfficientNet-Lite0, 64 px digits, batch 32, AdamW over all parameters,
OneCycleLR) trains whole; the callbacks run with every group already thawed (milestone at epoch 0)
and a layer decay of 0.9, so both arms do the same arithmetic per step. Arms alternate
(A B A B ...) in one process to spread machine noise evenly; the step time is the median interval
between consecutive ``on_train_batch_start`` calls (step + every hook + data), and the epoch time
is reported too.

    python benchmarks/overhead.py              # 4 rounds x 2 epochs per arm
    python benchmarks/overhead.py --quick      # checks that it runs

If an arm's run fails, the other arm still runs and prints, a ``FAILED`` line names the arm and the
error, there is no ratio, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_ft import create_backbone
from lightning_ft.callbacks import GradualUnfreezing, LayerwiseLRDecay
from lightning_ft.data import DigitsDataModule


class UserModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = create_backbone("tf_efficientnet_lite0", pretrained="efficientnet_lite0", in_chans=1)
        self.backbone.reset_classifier(0)
        self.head = torch.nn.Linear(self.backbone.num_features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3,
                                                        total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StepClock(Callback):
    """Intervals between consecutive training-batch starts (within an epoch) and epoch durations."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.epochs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = self._last = time.perf_counter()
        self._first = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if not self._first:
            self.steps.append(now - self._last)
        self._first, self._last = False, now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self._epoch)


def run(arm: str, dm: DigitsDataModule, epochs: int, limit: int | None) -> StepClock:
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    if arm == "callbacks":
        callbacks += [GradualUnfreezing(monitor=None, milestones={0: "all"}, verbose=False), LayerwiseLRDecay(0.9)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, limit_train_batches=limit, callbacks=callbacks)
    L.seed_everything(0)
    trainer.fit(UserModule(), datamodule=dm)
    return clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rounds, epochs, limit = (1, 1, 4) if args.quick else (args.rounds, args.epochs, None)
    dm = DigitsDataModule(batch_size=32, image_size=64, channels=1, mean=(0.449,), std=(0.226,))
    dm.setup("fit")
    arms = ("plain", "callbacks")
    results: dict[str, dict[str, list[float]]] = {a: {"steps": [], "epochs": []} for a in arms}
    failed: list[str] = []
    print(f"torch threads: {torch.get_num_threads()}; {rounds} round(s) x {epochs} epoch(s) per arm, arms alternating")
    for r in range(rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            try:
                clock = run(arm, dm, epochs, limit)
            except Exception as err:  # noqa: BLE001 -- reported, counted, and the exit status says so
                traceback.print_exc()
                failed.append(f"round {r} {arm}: {type(err).__name__}: {err}")
                print(f"round {r} {arm:9s}: FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            results[arm]["steps"] += clock.steps
            results[arm]["epochs"] += clock.epochs
            print(f"round {r} {arm:9s}: median step {1e3 * statistics.median(clock.steps):.2f} ms, "
                  f"epochs {', '.join(f'{e:.2f}' for e in clock.epochs)} s", flush=True)
    done = [a for a in arms if results[a]["steps"] and results[a]["epochs"]]
    step = {a: statistics.median(results[a]["steps"]) for a in done}
    epoch = {a: statistics.median(results[a]["epochs"]) for a in done}
    print("\n| arm | median step (ms) | median epoch (s) | steps timed |")
    print("| --- | --- | --- | --- |")
    for arm in done:
        print(f"| {arm} | {1e3 * step[arm]:.2f} | {epoch[arm]:.2f} | {len(results[arm]['steps'])} |")
    if len(done) == len(arms):
        print(f"\nstep-time ratio callbacks / plain: {step['callbacks'] / step['plain']:.4f} (goal <= 1.01); "
              f"epoch-time ratio: {epoch['callbacks'] / epoch['plain']:.4f}")
    if failed:
        print(f"\nFAILED: {len(failed)} run(s)" + ("" if len(done) == len(arms) else "; no ratio") + ":")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
