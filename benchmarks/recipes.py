"""Final test accuracy of the fine-tuning recipes on the demo, over several seeds.

Pretrained EfficientNet-Lite0 (offline weights) on scikit-learn's digits, each recipe being one of
the shipped configs run through the real CLI with the same epoch budget:

    linear probe           configs/linear_probe.yaml
    gradual unfreezing     configs/gradual_unfreezing.yaml   (plateau-driven, layer decay 0.8)
    full fine-tuning       configs/demo.yaml                 (no layer decay)
    full + LLRD            configs/full_llrd.yaml            (layer decay 0.75)

Every recipe runs at 64 px without augmentation (``--model.img_size=64 --data.init_args.augment=false``),
so the rows differ in the recipe only (the shipped demo itself trains at 96 px with augmentation).

    python benchmarks/recipes.py                 # 3 seeds x 6 epochs (about 25 min on 2 cores)
    python benchmarks/recipes.py --quick         # 1 seed, a few steps: checks that it runs

If a run fails (the CLI raises or exits), the other runs still go on, the table shows what they
measured, a ``FAILED`` line names the recipe, the seed and the error, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "linear probe": "linear_probe.yaml",
    "gradual unfreezing": "gradual_unfreezing.yaml",
    "full fine-tuning": "demo.yaml",
    "full + LLRD": "full_llrd.yaml",
}


def run(config: str, seed: int, epochs: int, quick: bool, root: Path) -> tuple[float, float]:
    from lightning_ft.cli import run

    args = [
        "fit", "--config", str(REPO / "configs" / config), f"--seed_everything={seed}", f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--model.img_size=64", "--data.init_args.augment=false",
    ]
    if quick:
        args += ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    start = time.perf_counter()
    argv, sys.argv = sys.argv, ["lightning-ft"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli = run(args=args)
    finally:
        sys.argv = argv
    metrics = cli.trainer.callback_metrics
    if "test/acc" not in metrics:
        raise RuntimeError(f"the run logged no test/acc (logged: {sorted(metrics)})")
    return float(metrics["test/acc"]), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="run these recipes only")
    args = parser.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = 1 if args.quick else args.epochs
    rows = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in RECIPES.items():
            if args.only and name not in args.only:
                continue
            accs, times = [], []
            for seed in seeds:
                try:
                    acc, seconds = run(config, seed, epochs, args.quick, Path(tmp) / f"{config}-{seed}")
                except (Exception, SystemExit) as err:  # noqa: BLE001 -- the CLI exits on a bad config
                    traceback.print_exc()
                    failed.append(f"{name} (configs/{config}) seed {seed}: {type(err).__name__}: {err}")
                    print(f"{name:20s} seed {seed}: FAILED: {type(err).__name__}: {err}", flush=True)
                    continue
                accs.append(acc)
                times.append(seconds)
                print(f"{name:20s} seed {seed}: test acc {acc:.4f} ({seconds:.0f} s)", flush=True)
            if accs:
                spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
                rows.append((name, config, len(accs), statistics.mean(accs), spread, min(accs), max(accs),
                             statistics.mean(times)))
    print(f"\n{len(seeds)} seed(s), {epochs} epochs each, pretrained Lite0 at 64 px on digits (test split: 360 images)\n")
    print("| recipe | config | test accuracy (mean ± std) | min–max | time per run |")
    print("| --- | --- | --- | --- | --- |")
    for name, config, n, mean, std, lo, hi, seconds in rows:
        runs = "" if n == len(seeds) else f" ({n} of {len(seeds)} seeds)"
        print(f"| {name} | `configs/{config}` | {100 * mean:.1f}% ± {100 * std:.1f}{runs} | {100 * lo:.1f}–{100 * hi:.1f} | "
              f"{seconds:.0f} s |")
    if failed:
        print(f"\nFAILED: {len(failed)} run(s):")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
