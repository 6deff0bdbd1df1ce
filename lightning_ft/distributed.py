"""Collectives for DDP: gather a batch across ranks with gradients (batch-statistic losses, the feature cache).

MMD, CORAL, mean alignment, MCC and class-balanced pseudo-labels are not averages of per-example
terms: computed per rank and averaged by DDP they equal neither the loss nor the gradient of the
global batch. :func:`gather_with_grad` concatenates the features of all ranks (each rank's own
part keeps its autograd graph), so every rank computes the loss of the global batch. Backward sends
each rank the sum over ranks of the gradient for its part, i.e. ``world_size`` times the gradient of
the global-batch loss; DDP's gradient averaging divides it out again. Net effect: the same gradient
as one process computing the loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_with_grad", "world_size"]


def world_size() -> int:
    """The number of ranks in the default process group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGather(torch.autograd.Function):
    """``all_gather`` whose backward hands each rank the sum over ranks of the gradient for its part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank = dist.get_rank()
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)  # every rank's gradient for every part, summed
        return stacked[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of shape ``(N_r, ...)`` on every rank -> ``(sum_r N_r, ...)`` in rank order, differentiable.

    Ranks may hold different batch sizes (a last, short batch): parts are padded for the collective
    and trimmed after. Without an initialised process group (or with one rank) ``x`` is returned as is.
    """
    world = world_size()
    if world == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    biggest = max(counts)
    if x.shape[0] < biggest:
        x = torch.cat([x, x.new_zeros((biggest - x.shape[0], *x.shape[1:]))])
    parts = _AllGather.apply(x.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])
