"""Modules kept in eval mode on purpose, said in one line of ours instead of Lightning's warning.

Lightning warns "Found N module(s) in eval mode at the start of training" whenever a submodule is
in eval mode when training starts. Frozen BatchNorm is kept in eval mode by design here
(``FineTuneModule(freeze_backbone=True)``, ``GradualUnfreezing``), so that warning fired on every
such run and read like a bug. Whoever holds modules in eval mode calls :func:`hold` at
``on_fit_start`` (before Lightning's check) with a function naming the modules it holds and why;
:func:`explain` at ``on_train_start`` (right after the check) says per holder, once, how many
modules it keeps in eval and why, and repeats Lightning's warning for any module in eval mode that
no holder claims, so other causes still warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

__all__ = ["explain", "hold", "release"]

_LIGHTNING_MESSAGE = r"Found \d+ module\(s\) in eval mode at the start of training"
_KEY = "_lightning_ft_eval_holders"

Held = Callable[[], tuple[list[nn.Module], str]]  # -> (modules held in eval, why)


def hold(trainer: Any, owner: str, held: Held) -> None:
    """Register ``owner``'s held modules and mute Lightning's eval-mode warning until :func:`explain`."""
    state = trainer.__dict__.setdefault(_KEY, {"holders": {}, "catcher": None})
    state["holders"][owner] = held
    if state["catcher"] is None:
        catcher = warnings.catch_warnings()
        catcher.__enter__()
        warnings.filterwarnings("ignore", message=_LIGHTNING_MESSAGE, category=PossibleUserWarning)
        state["catcher"] = catcher


def release(trainer: Any) -> None:
    """Unmute (idempotent): the filter lives only between ``on_fit_start`` and ``on_train_start``."""
    state = trainer.__dict__.get(_KEY)
    if state and state["catcher"] is not None:
        state["catcher"].__exit__(None, None, None)
        state["catcher"] = None


def explain(trainer: Any, pl_module: nn.Module) -> None:
    """Say, once per fit, what each holder keeps in eval mode; warn about eval-mode modules nobody holds."""
    state = trainer.__dict__.get(_KEY)
    if not state or state["catcher"] is None:
        return
    release(trainer)
    held: dict[int, str] = {}
    lines = []
    for owner, fn in state["holders"].items():
        modules, why = fn()
        in_eval = [m for m in modules if not m.training]
        for m in in_eval:
            held.setdefault(id(m), owner)
        if in_eval:
            lines.append(f"{owner}: {len(in_eval)} module(s) kept in eval mode: {why}.")
    state["holders"] = {}
    for line in lines:
        rank_zero_info(line)
    others = [name or "(the LightningModule)" for name, m in pl_module.named_modules() if not m.training and id(m) not in held]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        rank_zero_warn(
            f"Found {len(others)} module(s) in eval mode at the start of training that lightning_ft did not put there "
            f"({shown}). This may lead to unexpected behavior during training. If this is intentional, you can "
            "ignore this warning.",
            category=PossibleUserWarning,
        )
