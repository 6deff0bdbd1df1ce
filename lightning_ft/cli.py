"""``lightning-ft``: the LightningCLI entry point (``fit``, ``validate``, ``test``, ``predict``)."""

from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_ft.module import FineTuneModule

__all__ = ["FineTuneCLI", "main", "run"]


class FineTuneCLI(LightningCLI):
    """LightningCLI for :class:`FineTuneModule` and any LightningDataModule (``data.class_path``).

    Adds ``--test_after_fit``: after ``fit``, test the best checkpoint (or the last weights when no
    checkpoint was kept) on the datamodule's test split and print the metrics.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, run the test split and print its metrics."
        )

    def after_fit(self) -> None:
        if not self.config.get(self.subcommand, {}).get("test_after_fit", False):
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        kwargs = {"weights_only": True} if "weights_only" in inspect.signature(self.trainer.test).parameters else {}
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, **kwargs)
        if self.trainer.is_global_zero and results:
            acc = results[0].get("test/acc")
            if acc is not None:
                print(f"test accuracy: {acc:.4f}")


def run(args: list[str] | None = None) -> FineTuneCLI:
    """Run the CLI and return it (its ``trainer``, ``model``, ``datamodule``): for Python scripts and tests.

    ``args`` (a list of strings) replaces ``sys.argv[1:]``.
    """
    return FineTuneCLI(
        FineTuneModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> int:
    """The ``lightning-ft`` console script: exit status 0 after a successful run.

    A bad command line or config exits with status 2 and jsonargparse's message; an error raised
    while building or running (e.g. an invalid model argument) exits with status 1 and its traceback.
    """
    run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
