"""Frozen prefix: autograd keeps no activation and computes no gradient for frozen layers before the
first trainable one, in a real fit under GradualUnfreezing (a positive control shows the probe sees
what the trainable layers keep)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import GradualUnfreezing
from lightning_ft.data import DigitsDataModule
from tests.conftest import fast_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class SavedBytesByModule(Callback):
    """Bytes autograd saves for backward during each training step, by top-level backbone child."""

    def __init__(self):
        self.by_epoch: dict[int, dict[str, int]] = {}
        self.grads: dict[int, set[str]] = {}
        self._where: list[str] = []

    def setup(self, trainer, pl_module, stage):
        params = lambda: {p.untyped_storage().data_ptr() for p in pl_module.parameters()}  # noqa: E731
        self._params = params
        for name, child in pl_module.backbone.named_children():
            child.register_forward_pre_hook(lambda m, a, name=name: self._where.append(name))
            child.register_forward_hook(self._leave)

    def _leave(self, module, args, output):
        self._where.pop()  # returns None: the output is left as it is

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        counts = self.by_epoch.setdefault(trainer.current_epoch, {})
        params = self._params()

        def pack(t):
            if self._where and t.untyped_storage().data_ptr() not in params:
                counts[self._where[-1]] = counts.get(self._where[-1], 0) + t.untyped_storage().nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()

    def on_before_backward(self, trainer, pl_module, loss):
        self._hooks.__exit__(None, None, None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.current_epoch] = {n.split(".")[1] for n, p in pl_module.named_parameters()
                                             if p.grad is not None and n.startswith("backbone.")}


def test_frozen_prefix_keeps_no_activations_and_gets_no_gradients():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=10, in_chans=1, img_size=32)
    probe = SavedBytesByModule()
    unfreezing = GradualUnfreezing(monitor=None, milestones={1: ["layer4.0"], 2: "all"}, verbose=False)
    trainer = fast_trainer(max_epochs=3, callbacks=[unfreezing, probe], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule(limit=32, batch_size=8))
    prefix = {"conv1", "bn1", "maxpool", "layer1", "layer2", "layer3"}
    # head only: nothing in the backbone is kept for backward
    assert sum(probe.by_epoch[0].values()) == 0 and not probe.grads[0]
    # layer4 trainable: it keeps activations (positive control), the frozen prefix keeps none
    assert probe.by_epoch[1].get("layer4", 0) > 0
    assert not {k for k, v in probe.by_epoch[1].items() if v and k in prefix}
    assert probe.grads[1] == {"layer4"}
    # all trainable: the prefix keeps its activations now
    assert sum(probe.by_epoch[2].get(k, 0) for k in prefix) > 0
