"""Domain adaptation: MNIST (labelled) -> scikit-learn digits (no labels used), pretrained Lite0.

    python examples/domain_adaptation.py --loss dann            # or cdan, mmd, coral, mcc, pseudo_label, none
    python examples/domain_adaptation.py --loss mmd --adabn     # + re-estimate BatchNorm on the target
    python examples/domain_adaptation.py --quick                # a few steps (what the test runs)

The checkpoint is chosen without target labels (``val/label_free``); the target labels are used
only to report ``test/acc`` at the end.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ft import FineTuneModule
from lightning_ft.adabn import adapt_batchnorm
from lightning_ft.callbacks import DomainAdaptation
from lightning_ft.data import DigitsDataModule, MNISTSubsetDataModule, SourceTargetDataModule


class History(Callback):
    """Per-epoch monitors, to compare the label-free choice with what target labels would have chosen."""

    KEYS = ("val/acc", "val/label_free", "val/target_im", "val/target_entropy", "val_target/acc")

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # after the module logs
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.epochs.append({k: float(metrics[k]) for k in self.KEYS if k in metrics})


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="dann", choices=["dann", "cdan", "mmd", "coral", "mcc", "pseudo_label", "none"])
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adabn", action="store_true",
                        help="also report the accuracy after re-estimating BatchNorm statistics on target data (AdaBN)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    L.seed_everything(args.seed)
    model = FineTuneModule("tf_efficientnet_lite0", num_classes=10, pretrained="efficientnet_lite0", in_chans=1,
                           img_size=64, lr=1e-3, label_smoothing=0.1)
    limit = 64 if args.quick else None
    source_only = args.loss == "none"
    # source-only trains on source batches alone but validates on both domains, like the adapted runs
    data = SourceTargetDataModule(MNISTSubsetDataModule(limit=limit), DigitsDataModule(limit=limit, mnist_frame=True),
                                  batch_size=32, source_only=source_only)
    # label-free selection for adaptation; source validation accuracy for the source-only baseline
    workdir = tempfile.mkdtemp(prefix="lightning_ft_da_")  # checkpoints stay out of your working directory
    checkpoint = ModelCheckpoint(dirpath=workdir, monitor="val/acc" if source_only else "val/label_free", mode="max")
    history = History()
    callbacks = [checkpoint, history] if source_only else [checkpoint, history, DomainAdaptation({args.loss: args.weight})]
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1 if args.quick else args.epochs, callbacks=callbacks, logger=False,
        limit_train_batches=2 if args.quick else None, limit_val_batches=1 if args.quick else None,
        enable_progress_bar=not args.quick, num_sanity_val_steps=0,
        val_check_interval=None if args.quick else 0.5,  # two checkpoint candidates per epoch
    )
    trainer.fit(model, datamodule=data)
    model = FineTuneModule.load_from_checkpoint(checkpoint.best_model_path, weights_only=True)
    target = DigitsDataModule(limit=limit, mnist_frame=True, batch_size=32)
    tester = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                       limit_test_batches=1 if args.quick else None)
    result = tester.test(model, datamodule=target, verbose=False)[0]
    print(f"{args.loss}: target test accuracy {result['test/acc']:.4f}")
    if args.adabn:  # the same checkpoint, BatchNorm statistics re-estimated on (unlabelled) target training images
        adapt_batchnorm(model, target.train_dataloader())
        result["test/acc_adabn"] = tester.test(model, datamodule=target, verbose=False)[0]["test/acc"]
        print(f"{args.loss} + AdaBN: target test accuracy {result['test/acc_adabn']:.4f}")
    return {**result, "history": history.epochs, "monitor": checkpoint.monitor}


if __name__ == "__main__":
    main()
