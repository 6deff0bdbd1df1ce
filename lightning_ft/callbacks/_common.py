"""Helpers shared by the callbacks: strategy checks, DDP re-wrapping, optimizer introspection.

Callbacks find parameters by name and identity, never through ``lightning_ft.module``.
"""

from __future__ import annotations

import gc
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ft.adabn import adapt_batchnorm

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


def reestimate_batchnorm(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    dataset: Dataset,
    norms: list[nn.Module],
    who: str,
    batch_size: int = 64,
    collate_fn: Any = None,
    num_workers: int = 0,
    max_batches: int | None = None,
) -> int:
    """AdaBN on this rank's share of ``dataset``: ``norms``' statistics become the average batch statistics.

    The samples are read in order (rank ``r`` takes ``r, r + world, ...``) with the random state
    isolated, so training sees the same data order and random stream as without the pass; the
    module runs on the first element of each batch (the inputs), in the run's precision. Only full
    batches are used when there is at least one (a batch of one sample has no variance, and a
    partial batch would count as much as a full one), and every rank runs the same number of
    batches (the smallest share decides), so a SyncBatchNorm's collectives pair up. Under DDP the
    statistics are then averaged over the ranks (the mean over all batches used), so every rank
    holds the same. Returns the number of batches this rank used.
    """
    rank, world = trainer.global_rank, trainer.world_size
    indices = list(range(rank, len(dataset), world))  # type: ignore[arg-type]
    full = len(indices) // batch_size
    batches = full if full else 1
    smallest = len(indices)
    if world > 1:  # every rank takes the same decisions, so their collectives pair up
        batches, smallest = _all_min(torch.tensor([batches, len(indices)], device=pl_module.device))
    if smallest < 2:
        raise ValueError(
            f"{who} re-estimates BatchNorm statistics from batches of at least two samples, but a rank's share of "
            f"the {len(dataset)} samples has {smallest}. Use more data or fewer devices."  # type: ignore[arg-type]
        )
    if max_batches is not None:
        batches = min(batches, max_batches)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate_fn, num_workers=num_workers,
                        drop_last=full > 0)

    def inputs() -> Any:
        for batch in loader:
            batch = trainer.strategy.batch_to_device(batch, pl_module.device)
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not isinstance(x, torch.Tensor):
                raise ValueError(
                    f"{who} runs the module on the first element of each batch, which is a {type(x).__name__} "
                    "here, not a tensor of inputs."
                )
            yield x

    with isolate_rng(), trainer.precision_plugin.forward_context():
        used = adapt_batchnorm(pl_module, inputs(), max_batches=batches, norms=norms)
    if world > 1:
        for bn in norms:
            for buf in (bn.running_mean, bn.running_var):
                if buf is not None:
                    buf.copy_(trainer.strategy.reduce(buf.clone(), reduce_op="mean"))
    return used


def _all_min(values: torch.Tensor) -> list[int]:
    """The element-wise smallest of ``values`` over the ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return [int(v) for v in values.tolist()]
