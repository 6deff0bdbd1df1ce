"""Linear probing, timed: FeatureCache vs a plain Lightning frozen-backbone loop vs finetuning-scheduler's phase 0.

The demo setting: ImageNet-pretrained EfficientNet-Lite0 (offline asset), 64 px digits, batch 32,
validation every epoch. All in one process, one after the other, so the ratios compare like with like:

* ``forward``: ONE no-grad forward pass of the backbone over the training and validation splits
  (eval mode, the physical limit of a linear probe that validates);
* ``ours``:  FineTuneModule(freeze_backbone=True) + FeatureCache;
* ``plain``: a minimal LightningModule, backbone in eval under ``torch.no_grad()``, linear head;
* ``fts``:   the same minimal module under finetuning-scheduler with a one-phase (head-only) schedule.

It also prints two floors: the forward pass plus a hand-written PyTorch loop (no framework) training
the head on the feature tensors for the same epochs and batches -- the reference for the "at most
1.2 forward passes" goal at a given image size -- and the forward pass plus a minimal
LightningModule doing the same (no metrics, no logging): what no Lightning-based tool can beat.

    python benchmarks/linear_probe.py                                   # benchmark 1: 20 epochs
    python benchmarks/linear_probe.py --scales 1 2 4 --epochs 5 --tools ours plain   # benchmark 4: data size
    python benchmarks/linear_probe.py --image-size 160 --tools ours     # a dearer forward pass
    python benchmarks/linear_probe.py --quick                           # a few steps: checks that it runs

If a measurement fails (a tool's fit or test raises, or the forward pass or a floor does), the rest
still runs and prints, a ``FAILED`` line names what failed and the error, and the exit status is 1.
finetuning-scheduler, when it is not installed, is skipped with a note (exit status 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_ft import FineTuneModule, create_backbone
from lightning_ft.callbacks import FeatureCache
from lightning_ft.data import DigitsDataModule

TOOLS = ("ours", "plain", "fts")


class TiledDigits(DigitsDataModule):
    """The demo's digits repeated ``scale`` times (a bigger dataset of the same kind)."""

    def __init__(self, scale: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = super().load_arrays()
        return np.concatenate([images] * self.scale), np.concatenate([labels] * self.scale)


class PlainProbe(L.LightningModule):
    """What a user writes for a linear probe without us: frozen backbone in eval, no_grad, a linear head."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.backbone = create_backbone("tf_efficientnet_lite0", pretrained="efficientnet_lite0", in_chans=1)
        self.backbone.reset_classifier(0)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(self.backbone.num_features, 10)
        self.lr = lr

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone(x)
        return self.head(feats)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits = self(batch[0])
        self.log("val/loss", F.cross_entropy(logits, batch[1]))
        self.log("val/acc", (logits.argmax(-1) == batch[1]).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test/acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.0)


class HeadOnly(L.LightningModule):
    """The least a Lightning user can write to train the head on feature tensors: no metrics, no logging."""

    def __init__(self, dim: int, lr: float) -> None:
        super().__init__()
        self.head = nn.Linear(dim, 10)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.head(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.head(batch[0])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                                   "interval": "step"}}


def lightning_head_seconds(splits: list[tuple[torch.Tensor, torch.Tensor]], epochs: int, lr: float) -> float:
    """The same head training as a minimal Lightning fit on the feature tensors: Lightning's own per-step cost."""
    (x, y), (xv, yv) = splits
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=32)
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(HeadOnly(x.shape[1], lr), train, val)
    return timer.seconds


class Timer(Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start


def forward_pass(dm: DigitsDataModule, repeats: int = 3) -> tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One no-grad forward pass of the frozen backbone over the training and validation splits
    (the median of ``repeats`` passes: single passes varied by up to 25% on a shared machine), and
    the (features, labels) of each split."""
    model = FineTuneModule("tf_efficientnet_lite0", num_classes=10, pretrained="efficientnet_lite0", in_chans=1,
                           img_size=dm.cfg.image_size, freeze_backbone=True).eval()
    loaders = [dm.train_dataloader(), dm.val_dataloader()]
    times = []
    with torch.no_grad():
        model.forward_features(next(iter(loaders[0]))[0])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            tables = [[(model.forward_features(x)[0], y) for x, y in loader] for loader in loaders]  # pooled features
            times.append(time.perf_counter() - start)
    splits = [(torch.cat([f for f, _ in t]), torch.cat([y for _, y in t])) for t in tables]
    return statistics.median(times), splits


def head_loop_seconds(splits: list[tuple[torch.Tensor, torch.Tensor]], epochs: int, lr: float) -> float:
    """The floor under any framework: a hand-written PyTorch loop that trains the linear head on
    feature tensors already in memory -- the same batches per epoch (32, shuffled), AdamW, a
    per-step LambdaLR and a validation pass per epoch, with no hooks, logging or metrics."""
    (x, y), (xv, _) = splits
    head = nn.Linear(x.shape[1], 10)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            for xb in xv.split(32):
                head(xb)
    return time.perf_counter() - start


def run(tool: str, dm: DigitsDataModule, args: argparse.Namespace, tmp: str) -> tuple[float, float, float, float]:
    """(fit seconds from on_train_start to on_train_end, whole fit() seconds, test accuracy, cache build seconds)."""
    L.seed_everything(0)
    timer = Timer()
    callbacks: list[Callback] = [timer]
    kwargs: dict[str, Any] = {}
    if tool == "ours":
        model: L.LightningModule = FineTuneModule(
            "tf_efficientnet_lite0", num_classes=10, pretrained="efficientnet_lite0", in_chans=1, img_size=args.image_size,
            freeze_backbone=True, lr=args.lr, weight_decay=0.0, label_smoothing=0.0)
        cache = FeatureCache()
        callbacks.append(cache)
    else:
        model = PlainProbe(args.lr)
    if tool == "fts":
        from finetuning_scheduler import FinetuningScheduler, FTSCheckpoint

        schedule = {0: {"params": [n for n, _ in model.head.named_parameters(prefix="head")],
                        "max_transition_epoch": args.epochs}}
        callbacks += [FinetuningScheduler(ft_schedule=schedule, epoch_transitions_only=True, restore_best=False,
                                          log_dir=tmp, logging_level=logging.ERROR),
                      FTSCheckpoint(monitor="val/loss", save_top_k=0, dirpath=os.path.join(tmp, "ckpt"))]
        kwargs["enable_checkpointing"] = True
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                        enable_checkpointing=kwargs.pop("enable_checkpointing", False), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=tmp)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    whole = time.perf_counter() - start
    tester = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       default_root_dir=tmp)
    acc = float(tester.test(model, datamodule=dm, verbose=False)[0]["test/acc"])
    return timer.seconds, whole, acc, float(cache.stats["build_seconds"]) if tool == "ours" else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--scales", type=int, nargs="+", default=[1])
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--image-size", type=int, default=64, help="the demo's 64 px; larger makes the forward dearer")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 2
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "finetuning_scheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tools = list(dict.fromkeys(args.tools))
    notes: list[str] = []
    if "fts" in tools and importlib.util.find_spec("finetuning_scheduler") is None:
        tools.remove("fts")
        notes.append("finetuning-scheduler is not installed: skipped (pip install finetuning-scheduler).")
    failed: list[str] = []

    def attempt(what: str, fn: Any, *fn_args: Any) -> Any:
        """fn(*fn_args), or None after a FAILED line (and the traceback on stderr) if it raises."""
        try:
            return fn(*fn_args)
        except Exception as err:  # noqa: BLE001 -- reported, counted, and the exit status says so
            traceback.print_exc()
            failed.append(f"{what}: {type(err).__name__}: {err}")
            print(f"  FAILED: {what}: {type(err).__name__}: {err}", flush=True)
            return None

    print(f"torch threads: {torch.get_num_threads()}, epochs: {args.epochs}, {args.image_size} px, "
          f"tools: {', '.join(tools)}")
    for note in notes:
        print(note)
    rows = []
    for scale in args.scales:
        dm = TiledDigits(scale=scale, batch_size=32, image_size=args.image_size, channels=1, mean=(0.449,), std=(0.226,),
                         limit=96 if args.quick else None)
        dm.setup("fit")
        measured = attempt(f"one no-grad forward pass (scale {scale}x)", forward_pass, dm)
        if measured is None:
            continue  # every ratio of this scale is to the forward pass
        fwd, splits = measured
        n_train, n_val = len(dm.train_set), len(dm.val_set)
        print(f"\nscale {scale}x: {n_train} train + {n_val} val images; one no-grad forward pass: {fwd:.2f} s", flush=True)
        loop = attempt(f"hand-written PyTorch head loop (scale {scale}x)",
                       lambda: statistics.median(head_loop_seconds(splits, args.epochs, args.lr) for _ in range(3)))
        if loop is not None:
            print(f"  floor: one forward pass + a hand-written PyTorch head loop ({args.epochs} epochs on feature tensors, "
                  f"{loop:.2f} s) = {(fwd + loop) / fwd:.2f} x forward pass", flush=True)
        steps = args.epochs * len(dm.train_dataloader())
        light = attempt(f"minimal LightningModule head fit (scale {scale}x)",
                        lambda: statistics.median(lightning_head_seconds(splits, args.epochs, args.lr) for _ in range(3)))
        if light is not None:
            print(f"  Lightning floor: one forward pass + a minimal LightningModule training the head on the feature "
                  f"tensors ({light:.2f} s, {light / steps * 1e3:.2f} ms per step) = {(fwd + light) / fwd:.2f} x forward "
                  "pass", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for tool in tools:
                measured = attempt(f"{tool} (scale {scale}x)", run, tool, dm, args, tmp)
                if measured is None:
                    continue
                fit_s, whole_s, acc, build_s = measured
                rows.append((scale, tool, fwd, fit_s, whole_s, acc))
                build = f" (cache build {build_s:.2f} s, head epochs {fit_s - build_s:.2f} s)" if tool == "ours" else ""
                print(f"  {tool:6s} fit {fit_s:7.2f} s{build} (whole fit() {whole_s:7.2f} s)  = {fit_s / fwd:6.2f} x "
                      f"forward pass  test acc {acc:.4f}", flush=True)
    print(f"\n| data | tool | {args.epochs}-epoch fit (s) | / one forward pass | ours is faster by | test acc |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scale, tool, fwd, fit_s, _, acc in rows:
        ours = next((r[3] for r in rows if r[0] == scale and r[1] == "ours"), None)
        speed = f"{fit_s / ours:.1f}x" if ours and tool != "ours" else "-"
        print(f"| {scale}x | {tool} | {fit_s:.2f} | {fit_s / fwd:.2f} | {speed} | {acc:.4f} |")
    if failed:
        print(f"\nFAILED: {len(failed)} measurement(s):")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
