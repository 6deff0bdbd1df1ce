"""Temporal pooling on satellite image time series: does the date order carry the signal?

The synthetic crop time series of :class:`lightning_ft.satellite.CropTimeSeriesDataModule` (2,000
fields, 4 classes that differ in the green-up day of a seasonal curve and, weakly, in their in-season
SWIR; 4-12 irregular dates per field, 20% clouded and masked; 8x8 px in 4 bands). Each arm is
``FineTuneModule(head="temporal")`` with another pooling of the per-date features, trained end to end
from scratch (timm's small ``test_resnet`` on every date, shared weights):

    attention   L-TAE-style attention over the clear dates with a day-of-year encoding
    mean        the mean of the clear dates
    max         their element-wise maximum
    last        a single date: the last clear one

    python benchmarks/time_series.py            # 3 seeds x 4 poolings, 8 epochs (about 15 min on 2 cores)
    python benchmarks/time_series.py --quick    # 1 seed, 2 poolings, a few steps: checks that it runs

Prints the test accuracy per arm (mean ± std over seeds, and each seed's value). If an arm fails, the
others go on, a FAILED line names it and the exit status is 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POOLINGS = ("attention", "mean", "max", "last")


def run(pooling: str, seed: int, epochs: int, quick: bool) -> float:
    import lightning as L

    from lightning_ft import FineTuneModule
    from lightning_ft.satellite import CropTimeSeriesDataModule

    L.seed_everything(seed, verbose=False)
    data = CropTimeSeriesDataModule(seed=0, limit=64 if quick else None)  # one data set; the seed draws the model
    model = FineTuneModule("test_resnet", pretrained=None, num_classes=4, in_chans=4, head="temporal",
                           head_kwargs={"pooling": pooling}, lr=3e-3, weight_decay=0.01)
    limits = dict(limit_train_batches=2, limit_val_batches=1) if quick else {}
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **limits)
    trainer.fit(model, datamodule=data)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 poolings, a few steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    seeds = [0] if args.quick else list(range(args.seeds))
    poolings = ("attention", "last") if args.quick else POOLINGS
    epochs = 1 if args.quick else args.epochs
    print(f"crop time series: 2,000 fields (1,200 train / 300 val / 500 test), seeds {seeds}, {epochs} epochs")
    results: dict[str, list[float]] = {}
    failed = []
    start = time.perf_counter()
    for seed in seeds:
        for pooling in poolings:
            try:
                t = time.perf_counter()
                acc = run(pooling, seed, epochs, args.quick)
                results.setdefault(pooling, []).append(acc)
                print(f"  seed {seed} {pooling:10s} {100 * acc:5.1f}%  ({time.perf_counter() - t:.0f} s)", flush=True)
            except Exception as error:  # the other arms still run
                failed.append(f"FAILED {pooling} seed {seed}: {type(error).__name__}: {error}")
                traceback.print_exc()
    print("\n| pooling | test accuracy (mean ± std, %) | per seed |\n| --- | --- | --- |")
    for pooling, values in results.items():
        mean = 100 * statistics.mean(values)
        std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {pooling} | {mean:.1f} ± {std:.1f} | " + " ".join(f"{100 * v:.1f}" for v in values) + " |")
    print(f"total {time.perf_counter() - start:.0f} s")
    for line in failed:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
