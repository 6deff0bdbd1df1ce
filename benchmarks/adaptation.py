"""Domain adaptation on the shipped shift: MNIST subset (labelled) -> scikit-learn digits (unlabelled).

Pretrained EfficientNet-Lite0 at 64 px. For each method and seed: train, choose the checkpoint
WITHOUT target labels (``val/label_free`` for adaptation, source ``val/acc`` for source-only),
then report the target test accuracy (the only use of target labels). Each method is a run of
``examples/domain_adaptation.py``; every run also reports its checkpoint after AdaBN (BatchNorm statistics
re-estimated on unlabelled target images), the one cheap step that needs no training.

A second table checks the label-free selection itself: per run, the labelled target validation
accuracy (``val_target/acc``, never used for training or selection) of the epoch each monitor picks,
against the best epoch in hindsight ("oracle"), and the rank correlation between the monitor and
target accuracy over all epochs of all runs.

    python benchmarks/adaptation.py                      # 3 seeds x all methods (about 1 hour on 2 cores)
    python benchmarks/adaptation.py --methods none dann  # a subset
    python benchmarks/adaptation.py --quick              # a few steps: checks that it runs
    python benchmarks/adaptation.py --methods MMD --save mmd.json   # runs in parallel processes, then
    python benchmarks/adaptation.py --combine *.json                 # one table from their saved runs

If a run fails (the example raises or exits), the other runs still go on, the tables show what they
measured, a ``FAILED`` line names the method, the seed and the error, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import statistics
import sys
import traceback
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "domain_adaptation.py"
METHODS = {  # name -> example arguments (every run also reports its checkpoint after AdaBN)
    "source only": ["--loss", "none"],
    "DANN": ["--loss", "dann"],
    "CDAN+E": ["--loss", "cdan"],
    "MMD": ["--loss", "mmd"],
    "CORAL": ["--loss", "coral", "--weight", "10"],
    "MCC": ["--loss", "mcc"],
    "pseudo-labels": ["--loss", "pseudo_label"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--save", help="write every run (method, seed, accuracy, per-epoch monitors) to this JSON file")
    parser.add_argument("--combine", nargs="+", help="print the tables from JSON files written by --save; run nothing")
    args = parser.parse_args(argv)
    if args.combine:
        runs = [r for path in args.combine for r in json.loads(open(path).read())["runs"]]
        epochs = {json.loads(open(path).read())["epochs"] for path in args.combine}
        report(runs, f"{', '.join(map(str, sorted(epochs)))} epochs")
        return 0
    run = runpy.run_path(str(EXAMPLE))["main"]
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = args.methods[:2] if args.quick else args.methods
    runs = []
    failed: list[str] = []
    for name in methods:
        for seed in seeds:
            extra = ["--quick"] if args.quick else ["--epochs", str(args.epochs)]
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    result = run([*METHODS[name], "--adabn", "--seed", str(seed), *extra])
                record = {"method": name, "seed": seed, "acc": float(result["test/acc"]),
                          "acc_adabn": float(result["test/acc_adabn"]), "history": result["history"]}
            except (Exception, SystemExit) as err:  # noqa: BLE001 -- argparse exits on a bad argument
                traceback.print_exc()
                failed.append(f"{name} seed {seed}: {type(err).__name__}: {err}")
                print(f"{name:22s} seed {seed}: FAILED: {type(err).__name__}: {err}", flush=True)
                continue
            runs.append(record)
            curve = " ".join(f"{e.get('val_target/acc', float('nan')):.3f}" for e in result["history"])
            print(f"{name:22s} seed {seed}: target test acc {runs[-1]['acc']:.4f}, after AdaBN "
                  f"{runs[-1]['acc_adabn']:.4f}  (target val acc by half-epoch: {curve})", flush=True)
            if args.save:  # after every run: an interrupted benchmark keeps what it measured
                with open(args.save, "w") as fh:
                    json.dump({"epochs": 1 if args.quick else args.epochs, "runs": runs}, fh)
    report(runs, f"{1 if args.quick else args.epochs} epochs")
    if failed:
        print(f"\nFAILED: {len(failed)} run(s):")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    return 0


def report(runs: list[dict], budget: str) -> None:
    methods = list(dict.fromkeys(r["method"] for r in runs))
    order = [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]
    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = []
    for name in order:
        mine = [r for r in runs if r["method"] == name]
        adabn = [r["acc_adabn"] for r in mine if "acc_adabn" in r]
        rows.append((name, len(mine), *stats([r["acc"] for r in mine]), *(stats(adabn) if adabn else (None, None))))
    base = next((row[2] for row in rows if row[0] == "source only"), None)
    print(f"\n{budget}, checkpoint chosen without target labels\n")
    print("| method | seeds | target test accuracy (mean ± std) | vs source only | same checkpoint + AdaBN |")
    print("| --- | --- | --- | --- | --- |")
    for name, n, mean, std, amean, astd in rows:
        delta = f"{100 * (mean - base):+.1f} points" if base is not None else "n/a"
        adabn = f"{100 * amean:.1f}% ± {100 * astd:.1f}" if amean is not None else "n/a"
        print(f"| {name} | {n} | {100 * mean:.1f}% ± {100 * std:.1f} | {delta} | {adabn} |")
    print_selection([r["history"] for r in runs])


def selection_quality(histories: list[list[dict[str, float]]], monitor: str) -> tuple[float, float, float]:
    """(mean target val acc of the epoch ``monitor`` picks, of the best epoch, Spearman rho over all epochs)."""
    picked, best, xs, ys = [], [], [], []
    for epochs in histories:
        epochs = [e for e in epochs if monitor in e and "val_target/acc" in e]
        if not epochs:
            continue
        choice = max(range(len(epochs)), key=lambda i: (epochs[i][monitor], -i))  # ModelCheckpoint keeps the first
        picked.append(epochs[choice]["val_target/acc"])
        best.append(max(e["val_target/acc"] for e in epochs))
        xs += [e[monitor] for e in epochs]
        ys += [e["val_target/acc"] for e in epochs]
    if not picked:
        return float("nan"), float("nan"), float("nan")
    return statistics.mean(picked), statistics.mean(best), _spearman(xs, ys)


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    if len(xs) < 3:
        return float("nan")
    try:
        return statistics.correlation(ranks(xs), ranks(ys))
    except statistics.StatisticsError:  # a constant series
        return float("nan")


def print_selection(histories: list[list[dict[str, float]]]) -> None:
    print("\nLabel-free selection, all runs pooled (target labels used here only to judge the monitors)\n")
    print("| monitor | target val acc of the picked epoch | best epoch (oracle) | Spearman rho vs target acc |")
    print("| --- | --- | --- | --- |")
    for monitor, higher in (("val/label_free", True), ("val/acc", True), ("val/target_im", True),
                            ("val/target_entropy", False)):
        flipped = [[{**e, monitor: -e[monitor]} if (monitor in e and not higher) else e for e in h] for h in histories]
        picked, best, rho = selection_quality(flipped, monitor)
        sign = "" if higher else " (lower is better)"
        print(f"| {monitor}{sign} | {100 * picked:.1f}% | {100 * best:.1f}% | {rho:+.2f} |")


if __name__ == "__main__":
    sys.exit(main())
