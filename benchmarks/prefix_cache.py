"""Gradual unfreezing with and without FeatureCache: the frozen prefix computed once per phase.

The demo setting (pretrained EfficientNet-Lite0, digits, batch 32, validation every epoch) with
GradualUnfreezing thawing one more piece of the top every E epochs (``--epochs-per-phase``, 3):

    phase 0  the head alone                        (FeatureCache: the head's inputs)
    phase 1  + blocks.6 / conv_head                (FeatureCache: the inputs of blocks.6)
    phase 2  + blocks.5.3                          (... of blocks.5.3)
    phase 3  + blocks.5.0-5.2, the rest of stage 5 (... of blocks.5)

Each phase's first epoch pays for the table (one pass over the prefix, as the uncached epoch does);
its later epochs run the trainable suffix only.

Both arms run in this process, one after the other (``--repeats`` alternates them), from the same
seed. Per phase it prints the sum of its epochs, each timed the time from ``on_train_epoch_start`` (epoch 0: ``on_train_start``) to
``on_train_epoch_end``: training, validation, and FeatureCache's table build at the start of each
phase. Then the ratio, and at the
end the largest difference between the two arms' final weights (float tolerance: same batches).

    python benchmarks/prefix_cache.py                     # 64 px, the demo
    python benchmarks/prefix_cache.py --image-size 160    # a dearer backbone
    python benchmarks/prefix_cache.py --quick             # a few batches: checks that it runs

If an arm's run fails, the other arm still runs, a ``FAILED`` line names the arm and the error,
the table and the weight difference need both arms and are left out, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import FeatureCache, GradualUnfreezing
from lightning_ft.data import DigitsDataModule

GROUPS = [["blocks.6.0+conv_head+bn2"], ["blocks.5.3"], ["blocks.5.0", "blocks.5.1", "blocks.5.2"]]


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()  # epoch 0 counts FeatureCache's first build (in its on_train_start)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def run(cached: bool, args: argparse.Namespace, tmp: str) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    L.seed_everything(0)
    model = FineTuneModule("tf_efficientnet_lite0", num_classes=10, pretrained="efficientnet_lite0", in_chans=1,
                           img_size=args.image_size, lr=1e-3, weight_decay=0.0)
    timer = EpochTimer()
    cache = FeatureCache() if cached else None
    milestones = {(i + 1) * args.epochs_per_phase: groups for i, groups in enumerate(GROUPS)}
    callbacks: list[Callback] = [GradualUnfreezing(monitor=None, milestones=milestones, verbose=False), timer]
    callbacks += [cache] if cache is not None else []
    data = DigitsDataModule(batch_size=32, image_size=args.image_size, channels=1, mean=(0.449,), std=(0.226,),
                            limit=96 if args.quick else None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=args.epochs_per_phase * (len(GROUPS) + 1), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks, default_root_dir=tmp)
    trainer.fit(model, datamodule=data)
    return timer.seconds, {k: v.detach().clone() for k, v in model.state_dict().items()}, cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs-per-phase", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the arms this many times (medians)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs_per_phase, args.repeats = 1, 1
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_ft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch threads: {torch.get_num_threads()}, {args.image_size} px, {args.epochs_per_phase} epochs per phase, "
          f"{args.repeats} repeat(s)")
    times: dict[bool, list[list[float]]] = {False: [], True: []}
    weights: dict[bool, dict[str, torch.Tensor]] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for cached in (False, True):
                arm = "FeatureCache" if cached else "uncached"
                try:
                    seconds, weights[cached], cache = run(cached, args, tmp)
                except Exception as err:  # noqa: BLE001 -- reported, counted, and the exit status says so
                    traceback.print_exc()
                    failed.append(f"{arm} (repeat {repeat}): {type(err).__name__}: {err}")
                    print(f"FAILED: {arm} (repeat {repeat}): {type(err).__name__}: {err}", flush=True)
                    continue
                times[cached].append(seconds)
                print(f"{arm} (repeat {repeat}): epochs " + ", ".join(f"{t:.2f}" for t in seconds) + " s", flush=True)
                if cache is not None:
                    print(f"FeatureCache: {int(cache.stats['builds'])} table builds "
                          f"({cache.stats['build_seconds']:.2f} s), {int(cache.stats['cached_batches'])} cached batches")
    if failed:
        print(f"\nFAILED: {len(failed)} run(s); no table and no weight difference (they need both arms):")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    e = args.epochs_per_phase
    print(f"\n| phase ({e} epochs) | trainable (top) | uncached | FeatureCache | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    thawed = ["head"]
    for phase in range(len(GROUPS) + 1):
        thawed = thawed + ([g.split("+")[0] for g in GROUPS[phase - 1]] if phase else [])
        plain = statistics.median(sum(r[phase * e:(phase + 1) * e]) for r in times[False])
        ours = statistics.median(sum(r[phase * e:(phase + 1) * e]) for r in times[True])
        print(f"| {phase} | {', '.join(thawed)} | {plain:.2f} s | {ours:.2f} s | {plain / ours:.2f}x |")
    total_plain = statistics.median(sum(r) for r in times[False])
    total_ours = statistics.median(sum(r) for r in times[True])
    print(f"| all | | {total_plain:.2f} s | {total_ours:.2f} s | {total_plain / total_ours:.2f}x |")
    if weights[True].keys() != weights[False].keys():
        print(f"\nFAILED: the two arms' final state dicts have different keys: "
              f"{sorted(weights[True].keys() ^ weights[False].keys())}")
        return 1
    diffs = [float((weights[True][k].float() - v.float()).abs().max()) for k, v in weights[False].items()]
    diff = float("nan") if any(d != d for d in diffs) else max(diffs)  # max() alone would skip a NaN
    print(f"\nlargest difference between the two arms' final weights: {diff:.2e} ({len(weights[False])} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
