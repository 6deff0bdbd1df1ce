"""Helpers shared by the callbacks: strategy checks, DDP re-wrapping, optimizer introspection.

Callbacks find parameters by name and identity, never through ``lightning_ft.module``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

_SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def check_strategy(trainer: L.Trainer, who: str) -> None:
    """Refuse strategies whose parameter handling we cannot keep right (sharded or engine-managed)."""
    name = type(trainer.strategy).__name__
    if name in _SUPPORTED_STRATEGIES:  # exact types: DeepSpeedStrategy subclasses DDPStrategy
        return
    raise ValueError(
        f"{who} supports single-device training and DDP (strategy='ddp' or 'ddp_spawn'); this Trainer uses "
        f"{name}, which shards or owns the parameters (freezing and param groups would be silently wrong). "
        "Use strategy='ddp'."
    )


def is_ddp(trainer: L.Trainer) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(trainer.strategy.model, DistributedDataParallel)


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Build a new DistributedDataParallel around the LightningModule.

    DDP's reducer only all-reduces the parameters that required grad when it was built: after
    parameters are thawed, a new wrapper is the only way their gradients get synchronised. The
    new wrapper also broadcasts rank 0's parameters and buffers, so all ranks start identical.
    """
    if not is_ddp(trainer):
        return
    strategy = trainer.strategy
    old = strategy.model
    strategy.model = strategy.lightning_module
    del old
    gc.collect()  # the old reducer's autograd hooks go with it
    strategy.configure_ddp()


def optimizer_param_ids(trainer: L.Trainer) -> set[int]:
    return {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}


def group_label(group: dict[str, Any], index: int) -> str:
    return str(group.get("name", f"group{index}"))


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def batchnorm_modules(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield name, m


def param_by_name(module: nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(module.named_parameters())
