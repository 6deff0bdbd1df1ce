"""Domain adaptation on the shipped shift: MNIST subset (labelled) -> scikit-learn digits (unlabelled).

Pretrained EfficientNet-Lite0 at 64 px. For each method and seed: train, choose the checkpoint
WITHOUT target labels (``val/label_free`` for adaptation, source ``val/acc`` for source-only),
then report the target test accuracy (the only use of target labels). Each method is a run of
``examples/domain_adaptation.py``.

    python benchmarks/adaptation.py                      # 3 seeds x all methods (about 1 hour on 2 cores)
    python benchmarks/adaptation.py --methods none dann  # a subset
    python benchmarks/adaptation.py --quick              # a few steps: checks that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import statistics
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "domain_adaptation.py"
METHODS = {  # name -> example arguments
    "source only": ["--loss", "none"],
    "source only + AdaBN": ["--loss", "none", "--adabn"],
    "DANN": ["--loss", "dann"],
    "MMD": ["--loss", "mmd"],
    "CORAL": ["--loss", "coral", "--weight", "10"],
    "MCC": ["--loss", "mcc"],
    "pseudo-labels": ["--loss", "pseudo_label"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run = runpy.run_path(str(EXAMPLE))["main"]
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = args.methods[:2] if args.quick else args.methods
    rows = []
    for name in methods:
        accs = []
        for seed in seeds:
            extra = ["--quick"] if args.quick else ["--epochs", str(args.epochs)]
            with contextlib.redirect_stdout(io.StringIO()):
                result = run([*METHODS[name], "--seed", str(seed), *extra])
            accs.append(float(result["test/acc"]))
            print(f"{name:22s} seed {seed}: target test acc {accs[-1]:.4f}", flush=True)
        rows.append((name, statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0))
    base = rows[0][1] if rows and rows[0][0] == "source only" else None
    print(f"\n{len(seeds)} seed(s), {1 if args.quick else args.epochs} epochs, checkpoint chosen without target labels\n")
    print("| method | target test accuracy (mean ± std) | vs source only |")
    print("| --- | --- | --- |")
    for name, mean, std in rows:
        delta = f"{100 * (mean - base):+.1f} points" if base is not None else "n/a"
        print(f"| {name} | {100 * mean:.1f}% ± {100 * std:.1f} | {delta} |")


if __name__ == "__main__":
    main()
