"""Optimizer param groups with layer-wise learning-rate decay, and schedules that keep it.

Imports torch only. The rule, per :func:`lightning_ft.groups.layer_groups`:
group ``k`` levels below the head gets ``lr * layer_decay ** k``; the head gets ``lr``.
Unlike timm's ``lr_scale`` key (which torch optimizers and schedulers ignore), the scale is
applied to each group's ``lr`` itself, so every torch scheduler that works from the groups'
base lrs keeps the ratios; schedulers that overwrite all groups with one value (``OneCycleLR``,
``CyclicLR``) are rescaled by :func:`align_scheduler`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LRScheduler, OneCycleLR

from lightning_ft.groups import LayerGroup
from lightning_ft.groups import find_timm_model

__all__ = [
    "WarmupCosine",
    "align_scheduler",
    "build_scheduler",
    "check_layer_decay",
    "layer_decay_groups",
    "no_weight_decay_names",
    "param_groups_layer_decay",
]

_NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "position_embeddings")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the params that get no weight decay.

    timm's rule (``param_groups_layer_decay``): every 1-D param (biases, norm weights) and the
    names a timm model's ``no_weight_decay()`` lists (position embeddings, class/register tokens),
    plus, for any module, params named like position embeddings or tokens.
    """
    names: set[str] = set()
    found = find_timm_model(model)
    if found is not None and hasattr(found[1], "no_weight_decay"):
        prefix = f"{found[0]}." if found[0] else ""
        names |= {f"{prefix}{n}" for n in found[1].no_weight_decay()}
    for name, param in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or last.endswith(_NO_DECAY_SUFFIXES) or last.endswith("_token"):
            names.add(name)
    return names


def check_layer_decay(value: float | None, name: str = "layer_decay") -> None:
    """Refuse a layer-wise lr decay outside (0, 1]; ``None`` (no decay) passes. ``name``: the argument's name."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}. Typical values: 0.65-0.9; None turns it off.")


def param_groups_layer_decay(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    lr: float,
    weight_decay: float = 0.0,
    layer_decay: float | None = None,
    no_weight_decay: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Named torch param groups, one or two per layer group (``<group>`` and ``<group>/no_decay``).

    Every parameter of ``model`` lands in exactly one group, frozen ones included (so later
    unfreezing needs no new group). Each dict carries ``name``, ``lr`` (already scaled),
    ``weight_decay``, ``lr_scale`` and ``layer_id`` (0 = stem).
    """
    check_layer_decay(layer_decay)
    params = dict(model.named_parameters())
    seen: dict[str, str] = {}
    for g in groups:
        for n in g.param_names:
            if n not in params:
                raise ValueError(f"Layer group '{g.name}' names parameter '{n}', which the model does not have.")
            if n in seen:
                raise ValueError(f"Parameter '{n}' is in two layer groups: '{seen[n]}' and '{g.name}'.")
            seen[n] = g.name
    missing = [n for n in params if n not in seen]
    if missing:
        raise ValueError(f"Parameters in no layer group: {missing[:5]}. Every parameter needs a group.")
    skip = set(no_weight_decay_names(model) if no_weight_decay is None else no_weight_decay)
    return layer_decay_groups(params, groups, lr, weight_decay, layer_decay, skip)


def layer_decay_groups(
    params: dict[str, torch.nn.Parameter],
    groups: Sequence[LayerGroup],
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    skip: set[str],
) -> list[dict[str, Any]]:
    """The groups for the parameters in ``params`` (any subset of the model; depth from ``groups``)."""
    decay = 1.0 if layer_decay is None else layer_decay
    depth = len(groups)
    out: list[dict[str, Any]] = []
    for layer_id, group in enumerate(groups):
        scale = decay ** (depth - 1 - layer_id)
        names = [n for n in group.param_names if n in params]
        with_wd = [params[n] for n in names if n not in skip]
        without = [params[n] for n in names if n in skip]
        for suffix, plist, wd in (("", with_wd, weight_decay), ("/no_decay", without, 0.0)):
            if plist:
                out.append(
                    {
                        "name": f"{group.name}{suffix}",
                        "params": plist,
                        "lr": lr * scale,
                        "weight_decay": wd,
                        "lr_scale": scale,
                        "layer_id": layer_id,
                    }
                )
    return out


class WarmupCosine:
    """LR factor: linear warm-up over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``.

    A picklable callable for ``LambdaLR`` (its state is saved in the scheduler's state_dict).
    Step ``s < warmup_steps`` gives ``(s + 1) / (warmup_steps + 1)``; afterwards
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with ``p`` the cosine progress.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# scheduler arguments that carry the schedule length; filled in when the user left them unset
_LENGTH_ARGS = ("total_steps", "T_max")


def build_scheduler(factory: Callable[..., Any], optimizer: Optimizer, length: int) -> Any:
    """Call a scheduler factory, filling the arguments the user left unset.

    ``total_steps`` (OneCycleLR, unless ``epochs`` is given) and ``T_max`` (CosineAnnealingLR) get
    ``length``; ``max_lr`` (OneCycleLR, CyclicLR) gets each group's own lr.
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return factory(optimizer)
    kwargs: dict[str, Any] = {}
    p = signature.parameters.get("max_lr")
    if p is not None and p.default is inspect.Parameter.empty:
        kwargs["max_lr"] = [g["lr"] for g in optimizer.param_groups]  # OneCycleLR / CyclicLR peak = each group's lr
    for name in _LENGTH_ARGS:
        p = signature.parameters.get(name)
        if p is not None and (p.default is inspect.Parameter.empty or p.default is None):
            if name == "total_steps" and "epochs" in signature.parameters and signature.parameters["epochs"].default:
                continue
            kwargs[name] = length
    return factory(optimizer, **kwargs)


def align_scheduler(scheduler: Any, optimizer: Optimizer) -> None:
    """Make a scheduler respect each group's ``lr_scale``.

    Schedulers that scale the groups' own base lrs (LambdaLR, LinearLR, SequentialLR, cosine,
    StepLR, ReduceLROnPlateau, ...) already do. ``OneCycleLR`` and ``CyclicLR`` give every group the
    same absolute lrs when built from a scalar: those values are multiplied by the group's scale.
    Any other scheduler whose base lrs break the ratios is an error (never a silent wrong curve).
    """
    groups = optimizer.param_groups
    if not groups or not all("lr_scale" in g for g in groups):
        return
    scales = [float(g["lr_scale"]) for g in groups]
    if isinstance(scheduler, OneCycleLR):
        keys = ("max_lr", "initial_lr", "min_lr")
        _rescale(groups, scales, keys, type(scheduler).__name__, "max_lr")
        for g in groups:
            g["lr"] = g["initial_lr"]
        scheduler.base_lrs = [g["initial_lr"] for g in groups]
        scheduler._last_lr = [g["lr"] for g in groups]
        return
    if isinstance(scheduler, CyclicLR):  # base_lr and max_lr: each scaled when given as one value
        scheduler.base_lrs = _follow_decay(list(scheduler.base_lrs), scales, "CyclicLR", "base_lr")
        scheduler.max_lrs = _follow_decay(list(scheduler.max_lrs), scales, "CyclicLR", "max_lr")
        for g, b in zip(groups, scheduler.base_lrs):
            g["lr"] = b
            g["initial_lr"] = b
        scheduler._last_lr = [g["lr"] for g in groups]
        return
    if isinstance(scheduler, LRScheduler):
        base = getattr(scheduler, "base_lrs", None)
        if base is not None and not _ratios_hold(base, scales):
            raise ValueError(
                f"{type(scheduler).__name__} gives the param groups base lrs {base[:4]}..., which break layer-wise "
                "lr decay. Use a scheduler that scales each group's own lr (LambdaLR, LinearLR, SequentialLR, "
                "CosineAnnealingLR, StepLR, OneCycleLR), or set layer_decay=None."
            )


def _ratios_hold(values: Sequence[float], scales: Sequence[float], rel: float = 1e-6) -> bool:
    top = max(range(len(scales)), key=lambda i: scales[i])
    ref = values[top] / scales[top] if scales[top] else 0.0
    return all(math.isclose(v, ref * s, rel_tol=rel, abs_tol=1e-12) for v, s in zip(values, scales))


def _follow_decay(values: list[float], scales: list[float], what: str, arg: str) -> list[float]:
    """``values`` if they follow the groups' scales already, one value times each scale, else an error."""
    if _ratios_hold(values, scales):
        return values
    if len(set(values)) == 1:
        return [v * s for v, s in zip(values, scales)]
    raise ValueError(
        f"{what} was given per-group {arg} values {values[:4]}... that do not follow layer-wise lr decay. "
        f"Give one scalar {arg} (the head's); it is scaled per group."
    )


def _rescale(groups: list[dict[str, Any]], scales: list[float], keys: Sequence[str], what: str, arg: str) -> None:
    values = [g[keys[0]] for g in groups]
    if _ratios_hold(values, scales):
        return
    if len(set(values)) != 1:
        raise ValueError(
            f"{what} was given per-group {arg} values {values[:4]}... that do not follow layer-wise lr decay. "
            f"Give one scalar {arg} (the head's); it is scaled per group."
        )
    for g, s in zip(groups, scales):
        for key in keys:
            g[key] = g[key] * s
