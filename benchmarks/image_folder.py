"""Loading an image folder: ``ImageFolderDataModule`` vs torchvision's ``ImageFolder`` with timm's transforms.

Both read the same RGB JPEG folder (``root/<class>/*.jpg``, 320x240 photos-like images) into
normalised 224 px batches of 32 in this process (``num_workers=0``, so the number is the per-core
cost); the baseline is what the datamodule replaced: ``torchvision.datasets.ImageFolder`` +
``timm.data.create_transform`` (Pillow resize on 8-bit images). Ours reads to float tensors and
resizes those (so it also takes any band count: a 4-band 16-bit TIFF folder of the same size is
timed too, with no baseline since timm's transforms take Pillow images only). Arms alternate
(A B A B ...) to spread machine noise evenly; the time per image is the median over rounds.

    python benchmarks/image_folder.py            # 256 images, 5 rounds
    python benchmarks/image_folder.py --quick    # checks that it runs

A crashed arm prints a ``FAILED`` line; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CONFIG = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
          "interpolation": "bilinear", "crop_pct": 0.875}


def write_folders(root: Path, n: int) -> tuple[Path, Path]:
    import tifffile

    rng = np.random.default_rng(0)
    jpeg, tif = root / "jpeg", root / "tif"
    for i in range(n):
        c = f"class{i % 4}"
        (jpeg / c).mkdir(parents=True, exist_ok=True)
        (tif / c).mkdir(parents=True, exist_ok=True)
        low = torch.from_numpy(rng.random((1, 3, 15, 20))).float()  # smooth content: JPEG-like sizes
        img = torch.nn.functional.interpolate(low, size=(240, 320), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(jpeg / c / f"{i}.jpg", quality=90)
        bands = np.concatenate([img.numpy(), img.numpy()[:1]]) * 10000
        tifffile.imwrite(tif / c / f"{i}.tif", bands.astype(np.uint16))
    return jpeg, tif


def baseline_loader(root: Path, training: bool, batch: int) -> torch.utils.data.DataLoader:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root), transform=create_transform(**CONFIG, is_training=training))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=training, num_workers=0)


def our_loader(root: Path, training: bool, batch: int, bands: int = 3, scale: float | None = None):
    from lightning_ft.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(root), batch_size=batch, image_size=224, channels=bands,
                               mean=CONFIG["mean"][:1] * bands if bands != 3 else CONFIG["mean"],
                               std=CONFIG["std"][:1] * bands if bands != 3 else CONFIG["std"], scale=scale,
                               crop_pct=CONFIG["crop_pct"], augment=training, val_fraction=0.0, test_fraction=0.0,
                               num_workers=0)
    dm.setup("fit")
    return dm.train_dataloader() if training else dm._loader("train", False)


def epoch_seconds(make: Callable[[], torch.utils.data.DataLoader]) -> tuple[float, int, tuple[int, ...]]:
    loader = make()
    start = time.perf_counter()
    count, shape = 0, ()
    for x, _ in loader:
        count += len(x)
        shape = tuple(x.shape[1:])
    return time.perf_counter() - start, count, shape


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, rounds = (32, 1) if args.quick else (args.images, args.rounds)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        jpeg, tif = write_folders(Path(tmp), n)
        arms: dict[str, Callable[[], torch.utils.data.DataLoader]] = {
            "eval, timm + ImageFolder": lambda: baseline_loader(jpeg, False, 32),
            "eval, ours": lambda: our_loader(jpeg, False, 32),
            "train, timm + ImageFolder": lambda: baseline_loader(jpeg, True, 32),
            "train, ours": lambda: our_loader(jpeg, True, 32),
            "eval, ours, 4-band TIFF": lambda: our_loader(tif, False, 32, bands=4, scale=10000.0),
        }
        times: dict[str, list[float]] = {name: [] for name in arms}
        shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(rounds):
            for name, make in arms.items():
                if name in failed:
                    continue
                try:
                    seconds, count, shape = epoch_seconds(make)
                    times[name].append(seconds / count)
                    shapes[name] = shape
                except Exception:  # noqa: BLE001 - report the arm, run the others
                    failed.append(name)
                    print(f"FAILED: {name}\n{traceback.format_exc()}")
    print(f"\n{n} images of 320x240 -> 224 px batches of 32, 1 thread, {rounds} round(s), median per image\n")
    print("| arm | ms per image | batch shape | ours / baseline |")
    print("| --- | --- | --- | --- |")
    median = {k: statistics.median(v) * 1000 for k, v in times.items() if v}
    for name in arms:
        if name not in median:
            print(f"| {name} | FAILED | | |")
            continue
        mode = name.split(",")[0]
        base = median.get(f"{mode}, timm + ImageFolder")
        ratio = f"{median[name] / base:.2f}" if "ours" in name and "TIFF" not in name and base else ""
        print(f"| {name} | {median[name]:.2f} | {shapes[name]} | {ratio} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
