"""``lightning-ft``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``) and ``export``.

* ``fit`` keeps the run's checkpoints in one stable folder, ``<trainer.default_root_dir>/checkpoints``
  (also with W&B, whose runs would each get a new folder), with ``last.ckpt``, so an interrupted run
  resumes with ``--ckpt_path last``.
* ``predict`` writes one row per sample (path, class name, probability, top-k) to ``--predictions``.
* ``compare`` runs fine-tuning strategies over seeds and writes a report (``lightning-ft compare --help``,
  :mod:`lightning_ft.compare`).
* ``export`` writes the fine-tuned model as safetensors + JSON, TorchScript and ONNX
  (``lightning-ft export --help``).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_ft.module import FineTuneModule

__all__ = ["FineTuneCLI", "export_main", "main", "run"]


class FineTuneCLI(LightningCLI):
    """LightningCLI for :class:`FineTuneModule` and any LightningDataModule (``data.class_path``).

    Adds ``--test_after_fit``: after ``fit``, test the best checkpoint (or the last weights when no
    checkpoint was kept) on the datamodule's test split and print the metrics; and, for ``predict``,
    ``--predictions`` (the CSV or JSON-lines file written) and ``--top_k``.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, run the test split and print its metrics."
        )
        parser.add_argument(
            "--predictions", type=str | None, default=None,
            help="predict: the file to write, .csv or .jsonl (default: <trainer.default_root_dir>/predictions.csv).",
        )
        parser.add_argument("--top_k", type=int, default=5, help="predict: classes listed per sample.")

    def after_instantiate_classes(self) -> None:
        # one stable checkpoint folder per default_root_dir, with last.ckpt: `--ckpt_path last` finds it
        # (a logger's folder changes from run to run: W&B names it after a new run id)
        root = str(self.trainer.default_root_dir)
        stable = os.path.join(root, "checkpoints")
        if "://" not in root:  # local: an absolute path; remote (s3://...): as given
            stable = os.path.realpath(os.path.expanduser(stable))
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = stable
                if callback.save_last is None:
                    callback.save_last = True

    def before_predict(self) -> None:
        from lightning_ft.callbacks.predictions import PredictionWriter

        if any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            return
        config = self.config.get(self.subcommand, {})
        path = config.get("predictions") or os.path.join(self.trainer.default_root_dir, "predictions.csv")
        self._writer = PredictionWriter(path, top_k=config.get("top_k", 5), verbose=False)
        self.trainer.callbacks.append(self._writer)

    def after_predict(self) -> None:
        writer = getattr(self, "_writer", None)
        if writer is not None and self.trainer.is_global_zero:
            print(f"predictions: {writer.rows_written} rows written to {writer.path}")

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and isinstance(callback, ModelCheckpoint) and callback.dirpath:
            best = callback.best_model_path or "none"
            print(f"checkpoints: {callback.dirpath} (best: {os.path.basename(best)}; resume with --ckpt_path last)")
        if not self.config.get(self.subcommand, {}).get("test_after_fit", False):
            return
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        kwargs = {"weights_only": True} if "weights_only" in inspect.signature(self.trainer.test).parameters else {}
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, **kwargs)
        if self.trainer.is_global_zero and results:
            acc = results[0].get("test/acc")
            if acc is not None:
                print(f"test accuracy: {acc:.4f}")


def run(args: list[str] | None = None, cli_class: type[FineTuneCLI] = FineTuneCLI) -> FineTuneCLI:
    """Run the CLI and return it (its ``trainer``, ``model``, ``datamodule``): for Python scripts and tests.

    ``args`` (a list of strings) replaces ``sys.argv[1:]``; ``cli_class`` is a subclass adding hooks
    (``lightning-ft compare`` records each run's history with one).
    """
    return cli_class(
        FineTuneModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Fine-tune pretrained models. Also: `lightning-ft compare --help`, "
                                      "`lightning-ft export --help`."},
        args=args,
    )


def export_main(args: list[str] | None = None) -> int:
    """``lightning-ft export``: a checkpoint -> ``model.safetensors`` + ``config.json``, TorchScript, ONNX."""
    from lightning_ft.export import EXPORT_FORMATS, export_checkpoint

    try:  # ONNX when its packages are installed (pip install 'lightning_ft[export]')
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401

        default = list(EXPORT_FORMATS)
    except ImportError:
        default = [f for f in EXPORT_FORMATS if f != "onnx"]
    parser = argparse.ArgumentParser(
        prog="lightning-ft export",
        description="Export a fine-tuned FineTuneModule checkpoint (backbone + head, class names, input settings).",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint (.ckpt) to export")
    parser.add_argument("--output", default=None, help="folder to write (default: <ckpt folder>/export)")
    parser.add_argument("--formats", nargs="+", default=default, choices=list(EXPORT_FORMATS),
                        help=f"what to write (default here: {' '.join(default)}; onnx needs lightning_ft[export])")
    ns = parser.parse_args(args)
    ckpt = Path(ns.ckpt_path).expanduser()
    if not ckpt.is_file():
        parser.error(f"--ckpt_path {ns.ckpt_path}: no such file")
    out = Path(ns.output) if ns.output else ckpt.parent / "export"
    written = export_checkpoint(ckpt, out, formats=ns.formats)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def main(args: list[str] | None = None) -> int:
    """The ``lightning-ft`` console script: exit status 0 after a successful run.

    A bad command line or config exits with status 2 and jsonargparse's (or argparse's) message; an
    error raised while building or running (e.g. an invalid model argument) exits with status 1 and
    its traceback.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["compare"]:
        from lightning_ft.compare import main as compare_main

        return compare_main(argv[1:])
    run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
