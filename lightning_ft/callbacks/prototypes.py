"""SupportPrototypes: start a prototype head from the training set (the support set) before the first step.

Few-shot fine-tuning starts best from the class means of the support features (weight imprinting):
the head then classifies by the nearest class mean in cosine before it has trained at all, and
training refines the prototypes (and, with GradualUnfreezing, the backbone) from there.

The callback finds the prototype head (a module with a ``prototypes`` parameter ``(classes, D)``:
:class:`~lightning_ft.heads.PrototypeHead`, or ``head=`` by name), runs the LightningModule over the
training set once in eval mode without gradients, catches the head's input features with a forward
pre-hook, and sets the prototypes with :func:`lightning_ft.fewshot.init_prototype_head`. It works on
any LightningModule whose forward reaches the head. Every rank reads the whole training set (not its
DistributedSampler shard), so the prototypes are the same on every rank without communication.
Once set, they are kept in the checkpoint; a resumed run does not set them again.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from lightning_ft.batch import MISSING, split_batch
from lightning_ft.fewshot import init_prototype_head

__all__ = ["SupportPrototypes"]


class SupportPrototypes(Callback):
    """Set the prototype head's prototypes to the class means of the training set's features.

    Args:
        head: dotted name of the head in the LightningModule; ``None`` finds the one module with a
            2-D ``prototypes`` parameter.
        batch_size: batch size of the pass over the support set (default: the training loader's).
    """

    def __init__(self, head: str | None = None, batch_size: int | None = None) -> None:
        self.head = head
        self.batch_size = batch_size
        self.done = False
        self.classes_seen: int | None = None

    @property
    def state_key(self) -> str:
        return f"SupportPrototypes[head={self.head}]"

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "classes_seen": self.classes_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
        self.classes_seen = state_dict.get("classes_seen")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._find_head(pl_module)  # a missing head is an error now, not after the data is loaded

    def _find_head(self, pl_module: nn.Module) -> nn.Module:
        if self.head is not None:
            modules = dict(pl_module.named_modules())
            if self.head not in modules:
                names = [n for n in modules if n.endswith("head")][:5]
                raise ValueError(f"SupportPrototypes(head={self.head!r}): no such module. Heads found: {names}.")
            module = modules[self.head]
        else:
            found = [(n, m) for n, m in pl_module.named_modules()
                     if isinstance(getattr(m, "prototypes", None), torch.Tensor) and m.prototypes.dim() == 2]
            if len(found) != 1:
                what = "none" if not found else ", ".join(n for n, _ in found)
                raise ValueError(
                    f"SupportPrototypes needs exactly one module with a prototypes parameter (classes, D); found {what}. "
                    "Use head='prototype' (FineTuneModule) or lightning_ft.heads.PrototypeHead, or name it with head=."
                )
            module = found[0][1]
        if not isinstance(getattr(module, "prototypes", None), torch.Tensor):
            raise ValueError(f"SupportPrototypes: '{self.head}' has no prototypes parameter; it is a {type(module).__name__}.")
        return module

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done:
            return
        head = self._find_head(pl_module)
        features, labels = self._support(trainer, pl_module, head)
        with torch.no_grad():
            init_prototype_head(head, features, labels)
        self.done = True
        self.classes_seen = int(labels.unique().numel())
        rank_zero_info(f"SupportPrototypes: {head.prototypes.shape[0]} prototypes set from {len(labels)} support samples.")

    @torch.no_grad()
    def _support(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        train = trainer.train_dataloader
        if not isinstance(train, DataLoader):
            raise ValueError("SupportPrototypes reads one training DataLoader of (inputs, targets); this run has "
                             f"a {type(train).__name__}.")
        loader = DataLoader(train.dataset, batch_size=self.batch_size or train.batch_size or 64, shuffle=False,
                            collate_fn=train.collate_fn, num_workers=0)
        caught: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda m, args: caught.append(args[0].detach().float()))
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        features, labels = [], []
        try:
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch, pl_module.device)
                inputs, targets = split_batch(batch)
                if targets is None or isinstance(targets, dict):
                    raise ValueError("SupportPrototypes needs (inputs, class index) batches: one task with labels.")
                caught.clear()
                with trainer.precision_plugin.forward_context():
                    pl_module(inputs)
                if len(caught) != 1:
                    raise RuntimeError(f"SupportPrototypes: the head ran {len(caught)} times in one forward pass; "
                                       "it must run once per batch.")
                keep = targets != MISSING
                features.append(caught[0][keep])
                labels.append(targets[keep])
        finally:
            handle.remove()
            for m, mode in modes:
                m.training = mode
        return torch.cat(features), torch.cat(labels)
