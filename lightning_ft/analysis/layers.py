"""Per-layer-group analysis: activations, CKA between two models, relative weight change.

Everything is reported per layer group of the depth map (:func:`lightning_ft.groups.layer_groups`:
stem first, head last), the same groups layer-wise LR decay and gradual unfreezing use, so "how much
did the stem move" reads against "what learning rate did the stem get". A model is any ``nn.Module``:
a timm model, a plain module, or a :class:`lightning_ft.FineTuneModule` (its groups are those of the
whole module, backbone and head; this file does not import it).

* :func:`group_modules` / :func:`group_activations`: the module hooked for each group and its output,
  pooled to ``(B, D)``.
* :func:`layer_cka`: linear CKA (Kornblith et al. 2019, debiased) per group between two models on the
  same inputs, e.g. pretrained vs fine-tuned, streamed over batches.
* :func:`weight_change` and :func:`snapshot`: ``||W - W0|| / ||W0||`` per group against a copy of the
  parameters taken before training.

Imports torch (and :mod:`lightning_ft.groups` / :mod:`lightning_ft.batch`, both torch only), no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_ft.analysis.cka import LinearCKA
from lightning_ft.batch import Inputs, split_batch
from lightning_ft.groups import LayerGroup, find_timm_model, layer_groups

__all__ = ["group_activations", "group_modules", "layer_cka", "snapshot", "weight_change"]

GroupSpec = Optional[Sequence[Union[LayerGroup, str]]]  # None: every group of layer_groups(model)


def _short(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(f"'{x}'" for x in list(names)[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _resolve_groups(model: nn.Module, groups: GroupSpec) -> list[LayerGroup]:
    """``groups`` as :class:`LayerGroup` s: all of ``layer_groups(model)`` by default; names pick from them."""
    if groups is None:
        return layer_groups(model)
    if isinstance(groups, (str, LayerGroup)):
        groups = [groups]
    by_name: dict[str, LayerGroup] | None = None
    out = []
    for g in groups:
        if isinstance(g, LayerGroup):
            out.append(g)
            continue
        if by_name is None:
            by_name = {found.name: found for found in layer_groups(model)}
        if g not in by_name:
            raise ValueError(
                f"{type(model).__name__} has no layer group '{g}'. Its groups: {_short(list(by_name), 50)}. "
                "See lightning_ft.format_layer_groups(model)."
            )
        out.append(by_name[g])
    return out


def _hooked_module(owned: Sequence[tuple[str, frozenset[str]]], members: set[str]) -> str | None:
    """The last (in registration order) of the largest modules whose parameters all belong to the group."""
    chosen: list[str] = []
    for name, params in owned:
        if any(c == "" or name.startswith(f"{c}.") for c in chosen):
            continue  # inside a module already taken
        if params <= members:
            chosen.append(name)
    return chosen[-1] if chosen else None


def group_modules(model: nn.Module, groups: GroupSpec = None) -> dict[str, str]:
    """The module whose output stands for each layer group: ``{group name: module name in model}``.

    For each group, the largest modules all of whose parameters are in the group are found, and the
    last of them in registration order (forward order, for timm models and ``nn.Sequential``) is
    taken: ``blocks.3.0`` for timm's EfficientNet group ``blocks.3.0``, ``bn1`` for its ``stem``
    (``conv_stem`` + ``bn1``), ``bn2`` for ``blocks.4.0+conv_head+bn2``, ``norm`` for a ViT's
    ``blocks.5+norm``, ``backbone.blocks.3.0`` inside a :class:`~lightning_ft.FineTuneModule`.

    Skipped (absent from the result): the ``head`` group (logits; in a timm model it also mixes the
    backbone's unmatched parameters with our head), and groups with no such module (e.g. a group of
    loose parameters such as a lone ``cls_token``).

    Args:
        groups: layer groups (:class:`~lightning_ft.groups.LayerGroup` s, or names picked from
            ``layer_groups(model)``); default: all of :func:`lightning_ft.groups.layer_groups`.
    """
    # every module with parameters, in registration order, with the full names of all its parameters
    owned = [
        (name, frozenset(f"{name}.{p}" if name else p for p, _ in module.named_parameters()))
        for name, module in model.named_modules()
    ]
    owned = [(name, params) for name, params in owned if params]
    out: dict[str, str] = {}
    for g in _resolve_groups(model, groups):
        if g.name == "head":
            continue
        name = _hooked_module(owned, set(g.param_names))
        if name is not None:
            out[g.name] = name
    return out


def _is_nhwc(fmt: Any) -> bool:
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"


def _nhwc(model: nn.Module, hooked: Mapping[str, str]) -> dict[str, bool]:
    """Per group, whether a 4-D output is channels-last ``(B, H, W, C)``.

    The hooked module's own ``output_fmt`` (timm's ``PatchEmbed``) decides, else the timm model's
    (Swin: ``output_fmt='NHWC'``); otherwise ``(B, C, H, W)``.
    """
    found = find_timm_model(model)
    default = found is not None and _is_nhwc(getattr(found[1], "output_fmt", "NCHW"))
    modules = dict(model.named_modules())
    out = {}
    for group, name in hooked.items():
        fmt = getattr(modules[name], "output_fmt", None)
        out[group] = default if fmt is None else _is_nhwc(fmt)
    return out


def _pool(out: Any, group: str, module: str, nhwc: bool) -> torch.Tensor:
    """A module's output as ``(B, D)``: spatial mean of ``(B, C, H, W)``, token mean of ``(B, N, D)``."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"Layer group '{group}': module '{module}' returned {type(out).__name__}, not a tensor. Pass groups= "
            "without this group."
        )
    t = out.detach()
    if t.ndim == 4:
        return t.mean(dim=(1, 2) if nhwc else (2, 3))
    if t.ndim == 3:
        return t.mean(dim=1)
    if t.ndim == 2:
        return t
    raise ValueError(
        f"Layer group '{group}': module '{module}' returned shape {tuple(t.shape)}; expected (B, D), (B, N, D) or "
        "(B, C, H, W). Pass groups= without this group."
    )


def _move(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def _device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _capture(
    model: nn.Module, hooked: Mapping[str, str], x: Inputs, nhwc: Mapping[str, bool]
) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` with a forward hook on each hooked module; the pooled outputs by group."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(group: str, module_name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            outputs[group] = _pool(out, group, module_name, nhwc[group])  # a module called twice: the last call
        return hook

    try:
        for group, module_name in hooked.items():
            handles.append(modules[module_name].register_forward_hook(make_hook(group, module_name)))
        device = _device(model)
        model(_move(x, device) if device is not None else x)
    finally:
        for h in handles:
            h.remove()
    silent = [g for g in hooked if g not in outputs]
    if silent:
        listed = ", ".join(f"'{g}' (module '{hooked[g]}')" for g in silent)
        raise RuntimeError(
            f"The forward hooks of layer groups {listed} never fired during {type(model).__name__}.forward: "
            "forward does not call these modules, so they have no activations. Pass groups= without them "
            "(see lightning_ft.analysis.group_modules(model))."
        )
    return {g: outputs[g] for g in hooked}


def group_activations(model: nn.Module, x: Inputs, groups: GroupSpec = None) -> dict[str, torch.Tensor]:
    """The output of each layer group's module (see :func:`group_modules`) on one batch, pooled to ``(B, D)``.

    Runs ``model(x)`` once as the model is (no mode change, no ``no_grad``: the caller decides) with
    forward hooks that are removed afterwards. A ``(B, C, H, W)`` output is averaged over space
    (``(B, H, W, C)`` where the module or the timm model says ``output_fmt='NHWC'``: a ViT's patch
    embedding, Swin), a ``(B, N, D)`` output
    over tokens, a ``(B, D)`` one kept. Raises ``RuntimeError`` naming the groups whose hooks never
    fired (a module that forward never calls); the head group is skipped.

    Shape:
        - x: the model's input, e.g. ``(B, C, H, W)`` (moved to the model's device), or a dict of tensors.
        - output: ``{group name: (B, D_group)}`` detached tensors, in depth order.
    """
    hooked = group_modules(model, groups)
    return _capture(model, hooked, x, _nhwc(model, hooked))


def _training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore(flags: Mapping[nn.Module, bool]) -> None:
    for m, mode in flags.items():
        m.training = mode


def layer_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    groups: GroupSpec = None,
    debiased: bool = True,
) -> dict[str, float]:
    """Linear CKA (Kornblith et al. 2019; debiased HSIC, Song et al. 2012) per layer group between two models.

    Both models see the same inputs, in eval mode and under ``torch.no_grad`` (each submodule's mode
    is restored afterwards); one :class:`~lightning_ft.analysis.LinearCKA` per group accumulates over
    all the batches, so the result is that of the whole set whatever the batch size. Typical use:
    ``layer_cka(pretrained, fine_tuned, val_loader)`` -- near 1 where fine-tuning left the
    representation alone, lower where it changed it.

    Args:
        model_a: a model (e.g. the pretrained one): any ``nn.Module`` or a :class:`~lightning_ft.FineTuneModule`.
        model_b: a model with the same layer group names (e.g. the same architecture after fine-tuning).
        batches: an iterable of batches of the :mod:`lightning_ft.batch` contract: input tensors,
            ``(inputs, targets)`` tuples or ``{"inputs": ...}`` dicts (targets are ignored).
        groups: group names (or :class:`~lightning_ft.groups.LayerGroup` s, looked up by name in each
            model) to compare; default: every group of :func:`group_modules` (the head is skipped).
        debiased: the unbiased HSIC estimator (needs >= 4 samples in all); ``False``: the biased one.

    Shape:
        - each batch's inputs: what the models take, e.g. ``(B, C, H, W)``.
        - output: ``{group name: CKA}`` in depth order.
    """
    if isinstance(groups, (str, LayerGroup)):
        groups = [groups]
    names = None if groups is None else [g.name if isinstance(g, LayerGroup) else g for g in groups]
    hooked_a = group_modules(model_a, names)
    hooked_b = group_modules(model_b, names)
    if list(hooked_a) != list(hooked_b):
        only_a = [g for g in hooked_a if g not in hooked_b]
        only_b = [g for g in hooked_b if g not in hooked_a]
        raise ValueError(
            f"model_a and model_b have different layer groups: only in model_a {only_a or 'none'}, only in model_b "
            f"{only_b or 'none'} (order: {list(hooked_a)} vs {list(hooked_b)}). Compare two models of one "
            "architecture, or pass groups= with names both have."
        )
    if not hooked_a:
        raise ValueError(
            f"{type(model_a).__name__} has no layer group to compare (only a head, or none with a module to hook)."
        )
    metrics = {g: LinearCKA(debiased=debiased) for g in hooked_a}
    nhwc_a, nhwc_b = _nhwc(model_a, hooked_a), _nhwc(model_b, hooked_b)
    flags = {**_training_flags(model_a), **_training_flags(model_b)}
    seen = 0
    try:
        model_a.eval()
        model_b.eval()
        with torch.no_grad():
            for batch in batches:
                x, _ = split_batch(batch)
                acts_a = _capture(model_a, hooked_a, x, nhwc_a)
                acts_b = _capture(model_b, hooked_b, x, nhwc_b)
                for g, metric in metrics.items():
                    metric.update(acts_a[g], acts_b[g])
                seen += 1
    finally:
        _restore(flags)
    if seen == 0:
        raise ValueError("batches is empty: give an iterable of input batches (a DataLoader, a list of tensors).")
    out = {}
    for g, metric in metrics.items():
        try:
            out[g] = metric.compute()
        except ValueError as err:
            raise ValueError(f"Layer group '{g}' (module '{hooked_a[g]}'): {err}") from err
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s named parameters (float32; float64 stays float64).

    Take it before training and give it to :func:`weight_change` after.
    """
    out = {}
    for name, p in model.named_parameters():
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        out[name] = p.detach().to(device="cpu", dtype=dtype, copy=True)
    return out


def weight_change(
    model: nn.Module,
    initial_state: Mapping[str, torch.Tensor],
    groups: GroupSpec = None,
) -> dict[str, float]:
    """Relative weight change ``||W - W0|| / ||W0||`` per layer group (Frobenius norm over all its parameters).

    The parameters of a group are taken together (concatenated, in float64): a group moved by 1% of
    its norm reads 0.01. A group whose initial norm is 0 reads ``inf`` if it moved, else 0.

    Args:
        model: the model now (e.g. after fine-tuning).
        initial_state: parameter name -> tensor before, as :func:`snapshot` gives (a ``state_dict()``
            copy works too); it must hold every parameter of the groups.
        groups: group names or :class:`~lightning_ft.groups.LayerGroup` s; default: every group of
            :func:`lightning_ft.groups.layer_groups`, head included.

    Shape:
        - output: ``{group name: relative change}`` in depth order (stem first, head last).
    """
    params = dict(model.named_parameters())
    chosen = _resolve_groups(model, groups)
    wanted = [n for g in chosen for n in g.param_names]
    unknown = [n for n in wanted if n not in params]
    if unknown:
        raise ValueError(f"The layer groups name parameters {type(model).__name__} does not have: {_short(unknown)}.")
    missing = [n for n in wanted if n not in initial_state]
    if missing:
        have = list(initial_state)
        raise ValueError(
            f"initial_state lacks {len(missing)} parameter(s) of the model: {_short(missing)}. It has "
            f"{_short(have, 5) or 'nothing'}. Take it with lightning_ft.analysis.snapshot(model) on this same "
            "model (not on its backbone alone) before training."
        )
    out: dict[str, float] = {}
    for g in chosen:
        diff2 = 0.0
        norm2 = 0.0
        for n in g.param_names:
            now = params[n].detach().to(dtype=torch.float64)
            before = torch.as_tensor(initial_state[n]).detach().to(device=now.device, dtype=torch.float64)
            if before.shape != now.shape:
                raise ValueError(
                    f"initial_state['{n}'] has shape {tuple(before.shape)}, the model's parameter "
                    f"{tuple(now.shape)}. Snapshot the same architecture (a replaced head has new shapes)."
                )
            diff2 += float(((now - before) ** 2).sum())
            norm2 += float((before * before).sum())
        if norm2 > 0:
            out[g.name] = math.sqrt(diff2) / math.sqrt(norm2)
        else:
            out[g.name] = math.inf if diff2 > 0 else 0.0
    return out
