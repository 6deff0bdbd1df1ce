"""AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation", ICLR-W 2017).

Re-estimate every BatchNorm layer's running statistics on target data, weights untouched. Imports
torch only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["adapt_batchnorm", "batchnorm_modules"]


def batchnorm_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every BatchNorm layer in ``module`` (any ``_BatchNorm``: 1-3d, SyncBatchNorm, lazy)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield name, m


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    norms: Sequence[nn.Module] | None = None,
) -> int:
    """Replace BatchNorm running statistics by their exact averages over ``batches`` (target images).

    Each BatchNorm (of ``norms``; default: all of ``model``'s) is reset and run with ``momentum=None``
    (a cumulative average), so after the pass its statistics are the mean over batches of the batch
    means and (unbiased) variances; every other module runs in eval mode. A BatchNorm that the
    forward pass never calls (e.g. in a domain discriminator) keeps its statistics. Batches may be
    tensors or ``(x, ...)`` tuples. Modes and momenta are restored, and so are the old statistics when
    the pass fails or sees no batch. Returns the number of batches used.
    """
    if norms is None:
        norms = [m for _, m in batchnorm_modules(model)]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer: AdaBN has nothing to adapt.")
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in norms}
    saved = {bn: {k: v.clone() for k, v in bn.state_dict().items()} for bn in norms}
    device = next(model.parameters()).device
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.eval()
    for bn in norms:
        bn.train()
    called: set[nn.Module] = set()
    hooks = [bn.register_forward_pre_hook(lambda m, args: called.add(m)) for bn in norms]
    used = 0
    try:
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
            used += 1
        if used == 0:
            raise ValueError("AdaBN got no batch: the data is empty.")
    except BaseException:
        for bn, state in saved.items():
            bn.load_state_dict(state)
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    for bn in norms:
        if bn not in called:
            bn.load_state_dict(saved[bn])
    return used
