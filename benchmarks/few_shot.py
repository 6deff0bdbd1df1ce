"""Few shots on real data: prototypes against a linear probe on the same support sets.

Statlog Landsat (6 land-cover classes, 4 Landsat MSS bands) through ImageNet-pretrained
EfficientNet-Lite0, frozen, its stem adapted with ``band_method="match", band_noise=0.5``; pooled
features of the 1,931 test-split patches computed once (normalised with the training split's per-band
statistics: nothing of the evaluated patches is seen before an episode). Then 6-way episodes with 1, 5 and 10 labelled patches per
class (the support set) and 15 queries per class:

    prototype     nearest class mean in cosine (what SupportPrototypes starts a prototype head from)
    linear probe  logistic regression fitted on the support features of the same episode

The same episodes (same seed) serve both. Accuracy is the mean over episodes with its 95% interval.

    python benchmarks/few_shot.py            # 600 episodes per cell (about 1 min on 2 cores)
    python benchmarks/few_shot.py --quick    # 20 episodes, 400 patches: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHOTS = (1, 5, 10)


def features(quick: bool):
    import torch

    from lightning_ft import FineTuneModule
    from lightning_ft.satellite import StatlogLandsatDataModule

    # the patches are normalised with the training split's statistics; episodes are drawn from the test split
    data = StatlogLandsatDataModule(image_size=32, batch_size=256, limit=400 if quick else None)
    data.setup("fit")
    torch.manual_seed(0)
    model = FineTuneModule("tf_efficientnet_lite0", pretrained="efficientnet_lite0", num_classes=6,
                           data_bands="landsat_mss", band_noise=0.5, img_size=32, channels_last=True).eval()
    xs, ys = [], []
    with torch.no_grad():
        for x, y in data.test_dataloader():
            xs.append(model.forward_features(x)[0])
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 episodes on 400 patches")
    parser.add_argument("--episodes", type=int, default=600)
    args = parser.parse_args()
    from lightning_ft.fewshot import evaluate_few_shot

    start = time.perf_counter()
    feats, labels = features(args.quick)
    episodes = 20 if args.quick else args.episodes
    print(f"Statlog Landsat: {len(labels)} patches, frozen Lite0 features {tuple(feats.shape[1:])} "
          f"({time.perf_counter() - start:.0f} s); 6-way, 15 queries per class, {episodes} episodes")
    print("| shots | prototype (%) | linear probe (%) |\n| --- | --- | --- |")
    failed = []
    for k in SHOTS:
        row = []
        for classifier in ("prototype", "linear"):
            try:
                result = evaluate_few_shot(feats, labels, n_way=6, k_shot=k, n_query=15, n_episodes=episodes,
                                           seed=0, classifier=classifier)
                row.append(f"{100 * result.mean:.1f} ± {100 * result.ci95:.1f}")
            except Exception as error:  # the other cells still run
                failed.append(f"FAILED {classifier} {k}-shot: {type(error).__name__}: {error}")
                traceback.print_exc()
                row.append("failed")
        print(f"| {k} | {row[0]} | {row[1]} |", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    for line in failed:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
