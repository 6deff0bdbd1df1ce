"""Band methods on real multispectral data: Statlog Landsat (4 MSS bands) into ImageNet-pretrained Lite0.

The RGB stem of EfficientNet-Lite0 (offline weights) is adapted to the 4 Landsat MSS bands (green,
red, nir1, nir2) by every method of :mod:`lightning_ft.bands`, then:

    probe      frozen backbone, pooled features, logistic regression (scikit-learn)
    fine-tune  every layer trains from the first step (AdamW, warm-up + cosine)
    staged     the stem and the head train first (epochs 0-1), then everything (GradualUnfreezing)

beside the classical baselines on the 36 raw pixel values (logistic regression, kNN, random forest),
on the same stratified split (60% train, 10% validation, 30% test), over several seeds (the seed
draws the model's random parts, the noise of ``match+noise`` and the training order; the split is
fixed). The 3x3 patches are upsampled to 32x32 px.

    python benchmarks/bands.py              # 3 seeds, every method (about 45 min on 2 cores)
    python benchmarks/bands.py --quick      # 1 seed, 1 method, a few steps: checks that it runs
    python benchmarks/bands.py --methods random,match+noise --arms fine-tune --epochs 15 --augment
                                            # a longer recipe (random flips and right-angle rotations)

Prints one row per arm: mean ± std over seeds of the test accuracy, and every seed's value. If an arm
fails, the others go on, a FAILED line names it and the exit status is 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = {  # label -> (band_method, band_noise)
    "random": ("random", 0.0),
    "match": ("match", 0.0),
    "match+noise": ("match", 0.5),
    "interpolation": ("interpolation", 0.0),
    "averaging": ("averaging", 0.0),
    "tile (timm)": ("tile", 0.0),
}
QUICK_METHODS = ("match+noise",)


def model_for(method: str, seed: int):
    import torch

    from lightning_ft import FineTuneModule

    band_method, noise = METHODS[method]
    torch.manual_seed(seed)
    return FineTuneModule(
        "tf_efficientnet_lite0", pretrained="efficientnet_lite0", num_classes=6, data_bands="landsat_mss",
        band_method=band_method, band_noise=noise, img_size=32, channels_last=True, lr=1e-3, weight_decay=0.05,
    )


def probe(method: str, seed: int, data, quick: bool) -> float:
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = model_for(method, seed).eval()

    def features(loader):
        xs, ys = [], []
        with torch.no_grad():
            for i, (x, y) in enumerate(loader):
                if quick and i >= 2:
                    break
                xs.append(model.forward_features(x)[0].numpy())
                ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = features(data.train_dataloader())
    xte, yte = features(data.test_dataloader())
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def fine_tune(method: str, seed: int, data, epochs: int, staged: bool, quick: bool) -> float:
    import lightning as L

    from lightning_ft.callbacks import GradualUnfreezing

    L.seed_everything(seed, verbose=False)
    model = model_for(method, seed)
    callbacks = [GradualUnfreezing(monitor=None, milestones={0: ["stem"], 2: "all"}, verbose=False)] if staged else []
    limits = dict(limit_train_batches=2, limit_val_batches=1, limit_test_batches=2) if quick else {}
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks, **limits)
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)
    return float(result[0]["test/acc"])


def raw_baselines(data, seed: int, quick: bool) -> dict[str, float]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = data.raw_features("train")
    xte, yte = data.raw_features("test")
    models = {
        "raw pixels: logistic regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        "raw pixels: kNN (k=5)": make_pipeline(StandardScaler(), KNeighborsClassifier(5)),
        "raw pixels: random forest": RandomForestClassifier(20 if quick else 300, random_state=seed, n_jobs=1),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, clf in models.items():
            out[name] = float((clf.fit(xtr, ytr).predict(xte) == yte).mean())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 method, a few steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--arms", default="probe,fine-tune,staged", help="comma-separated, of: probe, fine-tune, staged")
    parser.add_argument("--augment", action="store_true", help="random flips and right-angle rotations in training")
    args = parser.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    unknown += [a for a in args.arms.split(",") if a not in ("probe", "fine-tune", "staged")]
    if unknown:
        parser.error(f"unknown methods or arms: {unknown}")
    import torch

    from lightning_ft.satellite import StatlogLandsatDataModule

    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = [0] if args.quick else list(range(args.seeds))
    epochs = 3 if args.quick else args.epochs
    methods = QUICK_METHODS if args.quick else tuple(args.methods.split(","))
    arms = args.arms.split(",")
    data = StatlogLandsatDataModule(batch_size=128, image_size=32, seed=0, augment=args.augment)
    data.setup("fit")
    n = {s: len(data._splits()[s]) for s in ("train", "val", "test")}
    print(f"Statlog Landsat: {n['train']} train / {n['val']} val / {n['test']} test; seeds {seeds}; "
          f"fine-tuning {epochs} epochs at 32 px, batch 128{', augmented' if args.augment else ''}")
    results: dict[str, list[float]] = {}
    failed = []
    start = time.perf_counter()
    for seed in seeds:
        for name, acc in raw_baselines(data, seed, args.quick).items():
            results.setdefault(name, []).append(acc)
        for method in methods:
            for arm, fn in (("probe", lambda: probe(method, seed, data, args.quick)),
                            ("fine-tune", lambda: fine_tune(method, seed, data, epochs, False, args.quick)),
                            ("staged", lambda: fine_tune(method, seed, data, epochs, True, args.quick))):
                if arm not in arms:
                    continue
                label = f"{method}: {arm}"
                try:
                    t = time.perf_counter()
                    acc = fn()
                    results.setdefault(label, []).append(acc)
                    print(f"  seed {seed} {label:32s} {100 * acc:5.1f}%  ({time.perf_counter() - t:.0f} s)", flush=True)
                except Exception as error:  # the other arms still run
                    failed.append(f"FAILED {label} seed {seed}: {type(error).__name__}: {error}")
                    traceback.print_exc()
    print("\n| arm | test accuracy (mean ± std, %) | per seed |\n| --- | --- | --- |")
    for label, values in results.items():
        mean = 100 * statistics.mean(values)
        std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {label} | {mean:.1f} ± {std:.1f} | " + " ".join(f"{100 * v:.1f}" for v in values) + " |")
    print(f"total {time.perf_counter() - start:.0f} s")
    for line in failed:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
