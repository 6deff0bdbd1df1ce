"""Layer groups: the one depth map of a model, from the stem (index 0) to the head (last).

:func:`layer_groups` splits a model's parameters into ordered :class:`LayerGroup` s. Layer-wise LR
decay (group ``k`` levels below the head gets ``lr * decay ** k``) and gradual unfreezing (groups
thawed from the head down) both read this one map, so they always agree on what "deeper" means.

* For a timm model (the model itself or one inside it, e.g. ``backbone.``) the groups are timm's
  own ``group_matcher(coarse=False)`` ordering, exactly as timm's ``param_groups_layer_decay``
  builds it; parameters no matcher claims and everything outside the timm model (our heads) form
  the last group, ``head``, as in timm.
* Any other ``nn.Module`` falls back to a generic map: children in registration order, with
  ``nn.Sequential`` / ``nn.ModuleList`` expanded; the last one (or the ``head`` names given) is
  the head.

Imports torch (and timm's ``group_parameters`` for timm models) only, no Lightning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lightning_ft.backbones import is_timm_model

__all__ = ["LayerGroup", "find_timm_model", "format_layer_groups", "layer_groups"]


@dataclass(frozen=True)
class LayerGroup:
    """One depth level: a name and the full parameter names (relative to the root module) in it."""

    name: str
    param_names: tuple[str, ...]


def find_timm_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first timm model inside ``model`` (``model`` itself included) as ``(prefix, module)``.

    ``prefix`` is the module's name in ``model`` (``""`` for the root, e.g. ``"backbone"``);
    ``None`` when ``model`` holds no timm model (see :func:`lightning_ft.backbones.is_timm_model`).
    """
    for prefix, module in model.named_modules():
        if is_timm_model(module):
            return prefix, module
    return None


def _timm_groups(module: nn.Module) -> tuple[list[list[str]], list[str]]:
    """timm's fine-grained ordering (as ``param_groups_layer_decay`` uses it), stem first.

    Returns the matched groups and, separately, the names no matcher claims (timm puts those at
    the largest ordinal, i.e. with the classifier).
    """
    from timm.models import group_parameters

    matcher = module.group_matcher(coarse=False)
    mapping = group_parameters(module, matcher, reverse=False)
    groups = [list(mapping[k]) for k in sorted(mapping)]
    if isinstance(matcher, dict) and groups:
        patterns = []
        for spec in matcher.values():
            if isinstance(spec, str):
                patterns.append(re.compile(spec))
            else:
                patterns.extend(re.compile(p[0]) for p in spec)
        last = groups[-1]
        if not any(p.match(n) for p in patterns for n in last):
            return groups[:-1], last
    return groups, []


def _generic_groups(module: nn.Module) -> list[list[str]]:
    """Fallback for plain modules: children in registration order, containers expanded."""
    groups: list[list[str]] = []
    own = [n for n, _ in module.named_parameters(recurse=False)]

    def visit(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 1:
            for name, child in mod.named_children():
                visit(f"{prefix}{name}.", child)
            return
        names = [f"{prefix}{n}" for n, _ in mod.named_parameters()]
        if names:
            groups.append(names)

    for name, child in module.named_children():
        visit(f"{name}.", child)
    if own:
        if groups:
            groups[0] = own + groups[0]
        else:
            groups.append(own)
    return groups


def _group_name(names: Sequence[str], prefix: str) -> str:
    """``blocks.3.1`` for one block; ``blocks.6.0+conv_head+bn2`` when a group spans several modules."""
    rel = [n[len(prefix):] if n.startswith(prefix) else n for n in names]
    by_top: dict[str, list[list[str]]] = {}
    for r in rel:
        parts = r.split(".")
        by_top.setdefault(parts[0], []).append(parts[:-1])  # module path, without the param name
    labels = []
    for top, paths in by_top.items():
        common: list[str] = []
        for items in zip(*paths):
            if len(set(items)) != 1:
                break
            common.append(items[0])
        labels.append(".".join(common) or top)
    return "+".join(labels[:3]) + ("+..." if len(labels) > 3 else "")


def layer_groups(model: nn.Module, head: str | Sequence[str] | None = None) -> list[LayerGroup]:
    """Ordered layer groups of ``model``, from the stem (index 0) to the head (last).

    * The first timm model inside ``model`` (the root itself, or e.g. ``backbone.``) is split with
      its own ``group_matcher(coarse=False)``, exactly as timm's ``param_groups_layer_decay`` does.
    * Every parameter outside it (heads, necks, discriminators) and every backbone parameter no
      matcher claims goes into the last group, ``head`` -- also as timm does.
    * Without a timm model, a generic fallback orders children by registration, expanding
      ``nn.Sequential`` / ``nn.ModuleList``; ``head`` (names or prefixes) then picks the head.

    Frozen parameters are included: groups describe the architecture, not the training state.
    """
    all_names = [n for n, _ in model.named_parameters()]
    head_prefixes = (head,) if isinstance(head, str) else tuple(head or ())
    found = find_timm_model(model)
    if found is not None:
        prefix, module = found
        prefix = f"{prefix}." if prefix else ""
        matched, _ = _timm_groups(module)
        body = [[f"{prefix}{n}" for n in g] for g in matched]
        inside = {n for g in body for n in g}
        # unmatched backbone params (classifier, fc_norm, ...) and everything outside the
        # backbone (our heads) share the last depth level, as in timm's layer decay
        head_names = [n for n in all_names if n not in inside]
        raw = [g for g in body if g]
    else:
        raw = _generic_groups(model)
        if head_prefixes:
            head_names = [n for n in all_names if any(n == h or n.startswith(f"{h}.") for h in head_prefixes)]
            if not head_names:
                raise ValueError(
                    f"No parameter of {type(model).__name__} matches the head {list(head_prefixes)}. "
                    f"Top-level modules: {[n for n, _ in model.named_children()]}."
                )
        else:
            head_names = raw.pop() if raw else []
        taken = set(head_names)
        raw = [[n for n in g if n not in taken] for g in raw]
        raw = [g for g in raw if g]
        prefix = ""
    groups = [LayerGroup(_group_name(g, prefix), tuple(g)) for g in raw]
    if len(groups) > 0 and not groups[0].name.startswith("stem") and found is not None:
        groups[0] = LayerGroup("stem", groups[0].param_names)
    if head_names:
        groups.append(LayerGroup("head", tuple(head_names)))
    seen: dict[str, int] = {}
    unique = []
    for g in groups:
        count = seen.get(g.name, 0)
        seen[g.name] = count + 1
        unique.append(g if count == 0 else LayerGroup(f"{g.name}_{count}", g.param_names))
    return unique


def format_layer_groups(model: nn.Module, groups: Sequence[LayerGroup] | None = None) -> str:
    """A text table: depth index, group name, parameter count, trainable count, first names."""
    groups = layer_groups(model) if groups is None else groups
    params = dict(model.named_parameters())
    rows = [("#", "group", "params", "trainable", "parameter names")]
    for i, g in enumerate(groups):
        count = sum(params[n].numel() for n in g.param_names)
        trainable = sum(params[n].numel() for n in g.param_names if params[n].requires_grad)
        names = ", ".join(g.param_names[:3]) + (f", ... ({len(g.param_names)})" if len(g.param_names) > 3 else "")
        rows.append((str(i), g.name, f"{count:,}", f"{trainable:,}", names))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows]
    return "\n".join(lines)
