"""Per-step cost of our callbacks: GradualUnfreezing + LayerwiseLRDecay (+ their logging), UpdateMonitor, vs the same loop without.

A plain LightningModule (EfficientNet-Lite0, 64 px digits, batch 32, AdamW over all parameters,
OneCycleLR) trains whole; the callbacks run with every group already thawed (milestone at epoch 0)
and a layer decay of 0.9, so both arms do the same arithmetic per step. Arms alternate
(A B A B ...) in one process to spread machine noise evenly; the step time is the median interval
between consecutive ``on_train_batch_start`` calls (step + every hook + data), and the epoch time
is reported too.

UpdateMonitor writes to a logger, so it has its own baseline: ``logged`` is the plain loop with a
CSVLogger (Lightning logs ``train/loss`` every ``log_every_n_steps``, the Trainer's default 50);
``monitor`` adds UpdateMonitor at its default interval (the same steps); ``monitor, every step``
logs on every step (``logging_interval=1``): its ratio to ``logged`` is the cost of a logging step.
The monitor's own hooks are timed as well (their median on logging steps). The five arms alternate
in the same process.

    python benchmarks/overhead.py              # 4 rounds x 2 epochs per arm
    python benchmarks/overhead.py --quick      # checks that it runs

If an arm's run fails, the other arm still runs and prints, a ``FAILED`` line names the arm and the
error, there is no ratio, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_ft import create_backbone
from lightning_ft.callbacks import GradualUnfreezing, LayerwiseLRDecay, UpdateMonitor
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


class TimedUpdateMonitor(UpdateMonitor):
    """UpdateMonitor whose two hooks are timed: ``logging_steps`` holds their time on each logging step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(verbose=False, **kwargs)
        self.logging_steps: list[float] = []
        self.groups_seen = 0
        self.interval = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.groups_seen = len(self._names)
        self.interval = self.logging_interval or trainer.log_every_n_steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._spent = time.perf_counter() - start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        logging = self._pending is not None
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, *args)
        if logging:
            self.logging_steps.append(self._spent + time.perf_counter() - start)


ARMS = ("plain", "callbacks")
MONITOR_ARMS = ("logged", "monitor", "monitor, every step")


def run(arm: str, dm: DigitsDataModule, epochs: int, limit: int | None,
        monitors: list[TimedUpdateMonitor] | None = None) -> StepClock:
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    if arm == "callbacks":
        callbacks += [GradualUnfreezing(monitor=None, milestones={0: "all"}, verbose=False), LayerwiseLRDecay(0.9)]
    if arm in ("monitor", "monitor, every step"):
        monitor = TimedUpdateMonitor(logging_interval=1 if arm == "monitor, every step" else None)
        callbacks.append(monitor)
        if monitors is not None:
            monitors.append(monitor)
    log_dir = tempfile.mkdtemp(prefix="overhead_") if arm in MONITOR_ARMS else None
    logger = CSVLogger(log_dir, name="run") if log_dir else False
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=logger, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, limit_train_batches=limit, callbacks=callbacks)
        L.seed_everything(0)
        trainer.fit(UserModule(), datamodule=dm)
    finally:
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
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
    arms = ARMS + MONITOR_ARMS
    results: dict[str, dict[str, list[float]]] = {a: {"steps": [], "epochs": []} for a in arms}
    monitors: dict[str, list[TimedUpdateMonitor]] = {"monitor": [], "monitor, every step": []}
    failed: list[str] = []
    print(f"torch threads: {torch.get_num_threads()}; {rounds} round(s) x {epochs} epoch(s) per arm, arms alternating")
    for r in range(rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            try:
                clock = run(arm, dm, epochs, limit, monitors.get(arm))
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
    for arm in (a for a in ARMS if a in done):
        print(f"| {arm} | {1e3 * step[arm]:.2f} | {epoch[arm]:.2f} | {len(results[arm]['steps'])} |")
    if all(a in done for a in ARMS):
        print(f"\nstep-time ratio callbacks / plain: {step['callbacks'] / step['plain']:.4f} (goal <= 1.01); "
              f"epoch-time ratio: {epoch['callbacks'] / epoch['plain']:.4f}")
    _report_monitor(done, step, epoch, results, monitors)
    if failed:
        print(f"\nFAILED: {len(failed)} run(s)" + ("" if len(done) == len(arms) else "; no ratio") + ":")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    return 0


def _report_monitor(done: list[str], step: dict[str, float], epoch: dict[str, float],
                    results: dict[str, dict[str, list[float]]], monitors: dict[str, list[TimedUpdateMonitor]]) -> None:
    """The UpdateMonitor arms' table and ratios against ``logged`` (the same loop with a logger)."""
    if not any(a in done for a in MONITOR_ARMS):
        return
    print("\n| monitor arm | median step (ms) | median epoch (s) | steps timed |")
    print("| --- | --- | --- | --- |")
    for arm in (a for a in MONITOR_ARMS if a in done):
        print(f"| {arm} | {1e3 * step[arm]:.2f} | {epoch[arm]:.2f} | {len(results[arm]['steps'])} |")
    default = monitors["monitor"]
    if default:
        logged = sum(len(m.logging_steps) for m in default)
        print(f"\nUpdateMonitor at its default interval: every {default[0].interval} optimizer steps (the Trainer's "
              f"log_every_n_steps), {default[0].groups_seen} layer groups; {logged} logging step(s) in "
              f"{len(results['monitor']['steps']) + len(results['monitor']['epochs'])} steps of the 'monitor' arm")
    if "logged" in done and "monitor" in done:
        print(f"update monitor per-step cost, monitor / logged: median step {step['monitor'] / step['logged']:.4f} "
              f"(goal <= 1.01); epoch {epoch['monitor'] / epoch['logged']:.4f}")
    if "logged" in done and "monitor, every step" in done:
        extra = step["monitor, every step"] - step["logged"]
        print(f"update monitor on a logging step (logging_interval=1), monitor / logged: median step "
              f"{step['monitor, every step'] / step['logged']:.4f} ({1e3 * extra:+.2f} ms per logging step)")
    timed = [t for m in monitors["monitor"] + monitors["monitor, every step"] for t in m.logging_steps]
    if timed and "logged" in done:
        own = statistics.median(timed)
        print(f"update monitor's own hooks on a logging step: median {1e3 * own:.2f} ms over {len(timed)} logging steps "
              f"({100 * own / step['logged']:.2f}% of a logged step)")


if __name__ == "__main__":
    sys.exit(main())
