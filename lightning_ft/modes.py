"""Modules kept in eval mode on purpose, said in one line of ours instead of Lightning's warning.

Lightning warns "Found N module(s) in eval mode at the start of training" whenever a submodule is
in eval mode when training starts. Frozen BatchNorm is kept in eval mode by design here
(``FineTuneModule(freeze_backbone=True)``, ``GradualUnfreezing``), so that warning fired on every
such run and read like a bug. Whoever holds modules in eval mode calls :func:`hold` at
``on_fit_start`` with a function naming the modules it holds and why. For that trainer only, the
fit loop's check (``_warn_if_modules_in_eval_mode``, called just before ``on_train_start``) is then
ours: one line per holder saying how many modules it keeps in eval mode and why, and Lightning's
warning, naming them, for any module in eval mode that no holder claims -- so other causes still warn.
Nothing global is changed (no warning filter), so nothing can leak into another fit when one fails.
If a Lightning version lacks that method, its warning is simply left as it is
(``tests/integration/test_image_folders.py`` fails loudly then).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

__all__ = ["hold"]

_CHECK = "_warn_if_modules_in_eval_mode"
_HOLDERS = "_lightning_ft_eval_holders"

Held = Callable[[], tuple[list[nn.Module], str]]  # -> (modules held in eval, why)


def hold(trainer: Any, owner: str, held: Held) -> None:
    """Register ``owner``'s held modules for this trainer's next start of training."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not callable(getattr(loop, _CHECK, None)):
        return
    holders = loop.__dict__.setdefault(_HOLDERS, {})
    holders[owner] = held
    if _CHECK not in loop.__dict__:  # the instance's own attribute: this trainer only
        setattr(loop, _CHECK, lambda: _explain(trainer, holders))


def _explain(trainer: Any, holders: dict[str, Held]) -> None:
    pl_module = trainer.lightning_module
    claimed: set[int] = set()
    lines = []
    for owner, fn in list(holders.items()):
        modules, why = fn()
        in_eval = [m for m in modules if not m.training]
        claimed.update(id(m) for m in in_eval)
        if in_eval:
            lines.append(f"{owner}: {len(in_eval)} module(s) kept in eval mode: {why}.")
    holders.clear()  # a later fit of this trainer registers again
    for line in lines:
        rank_zero_info(line)
    others = [name or "(the LightningModule)" for name, m in pl_module.named_modules()
              if not m.training and id(m) not in claimed]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        rank_zero_warn(
            f"Found {len(others)} module(s) in eval mode at the start of training that lightning_ft did not put there "
            f"({shown}). This may lead to unexpected behavior during training. If this is intentional, you can "
            "ignore this warning.",
            category=PossibleUserWarning,
        )
