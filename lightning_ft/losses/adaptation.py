"""Where a LightningModule and the ``DomainAdaptation`` callback meet (torch only).

The whole agreement, in one place that both sides import:

* the losses by name (:data:`ADAPTATION_LOSSES`);
* while the callback is attached, it is the module's attribute ``domain_adaptation``
  (:data:`ATTRIBUTE`; :func:`adaptation_of` reads it) and the losses' parameters -- DANN's
  discriminator, say -- are the module's submodule ``da_losses`` (:data:`LOSSES_ATTRIBUTE`), so
  they are optimised and checkpointed with the model;
* the module's training step runs the two domains (:func:`domain_forward`, in the callback's
  ``forward`` mode) and adds ``domain_adaptation(module, source_features=..., target_features=...,
  source_logits=..., target_logits=...)`` to its loss;
* a checkpoint loaded without the callback drops the losses' weights
  (:func:`drop_adaptation_state`).

A module of your own needs three lines in its training step::

    (xs, ys), (xt, *_) = batch["source"], batch["target"]
    fs, logits_s, ft, logits_t = domain_forward(self.features_and_logits, xs, xt, self.domain_adaptation.forward_mode)
    return F.cross_entropy(logits_s, ys) + self.domain_adaptation(self, source_features=fs, target_features=ft,
                                                                  source_logits=logits_s, target_logits=logits_t)

where ``features_and_logits(x)`` is any method of yours returning ``(pooled features (B, D), logits (B, C))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lightning_ft.losses.adversarial import CDANLoss, DANNLoss
from lightning_ft.losses.discrepancy import CORALLoss, MeanAlignmentLoss, MMDLoss
from lightning_ft.losses.self_training import EntropyLoss, MCCLoss, PseudoLabelLoss

__all__ = [
    "ADAPTATION_LOSSES",
    "ATTRIBUTE",
    "LOSSES_ATTRIBUTE",
    "adaptation_of",
    "domain_forward",
    "drop_adaptation_state",
]

ADAPTATION_LOSSES: dict[str, type[nn.Module]] = {
    "cdan": CDANLoss,
    "coral": CORALLoss,
    "dann": DANNLoss,
    "entropy": EntropyLoss,
    "mcc": MCCLoss,
    "mean": MeanAlignmentLoss,
    "mmd": MMDLoss,
    "pseudo_label": PseudoLabelLoss,
}
ATTRIBUTE = "domain_adaptation"  # the attached callback, on the module
LOSSES_ATTRIBUTE = "da_losses"  # the losses (with their parameters), a submodule of the module

ForwardMode = Literal["separate", "joint"]
Features = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def adaptation_of(module: nn.Module) -> Any:
    """The ``DomainAdaptation`` callback attached to ``module``, or ``None``."""
    return getattr(module, ATTRIBUTE, None)


def domain_forward(features_and_logits: Features, source: torch.Tensor, target: torch.Tensor,
                   mode: ForwardMode = "separate") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source features, source logits, target features, target logits)``.

    ``"separate"``: a forward pass per domain, so BatchNorm normalises each domain with its own
    statistics; ``"joint"``: one pass over the concatenation (BatchNorm sees mixed statistics).
    On the digits, DANN reached about 79% with separate passes and 20% with a joint one.
    """
    if mode == "joint":
        features, logits = features_and_logits(torch.cat([source, target]))
        n = len(source)
        return features[:n], logits[:n], features[n:], logits[n:]
    if mode != "separate":
        raise ValueError(f"forward must be 'separate' or 'joint', got {mode!r}.")
    fs, ls = features_and_logits(source)
    ft, lt = features_and_logits(target)
    return fs, ls, ft, lt


def drop_adaptation_state(state_dict: dict[str, Any]) -> list[str]:
    """Remove the adaptation losses' weights from a checkpoint's ``state_dict`` (in place); returns the keys.

    For a module loading a checkpoint trained with ``DomainAdaptation`` while the callback is not
    attached: the model is kept, the discriminator is not.
    """
    prefix = LOSSES_ATTRIBUTE + "."
    dropped = [k for k in state_dict if k.startswith(prefix)]
    for key in dropped:
        del state_dict[key]
    return dropped
