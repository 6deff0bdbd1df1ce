"""GradualUnfreezing under 2-process CPU DDP; every rank records what it did to ``out_dir/rank{r}.json``.

Usage: ``python ddp_unfreeze.py OUT_DIR [milestones|plateau]``

* ``milestones``: FineTuneModule(layer_decay=0.8) thawed at epoch milestones 1, 2, 3.
* ``temporal``: FineTuneModule on a satellite image time series (every date through the backbone,
  an attention temporal head), bf16-mixed, thawed at milestones 1 and 2.
* ``plateau``: a plain LightningModule with its own ``AdamW(self.parameters())`` + OneCycleLR,
  made layer-decayed by LayerwiseLRDecay, thawed on a plateau of a metric that each rank scripts
  differently (only the cross-rank mean plateaus): the decision must be taken together.

Each rank feeds different samples (DistributedSampler over 64 samples), so gradients that DDP does
not all-reduce make the ranks drift apart. ``LFT_NO_REWRAP=1`` replaces ``rewrap_ddp`` by a no-op
(the negative control: the ranks must then drift).

Lightning's DDP launcher re-executes this file for rank 1: the run lives under ``__main__``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
import timm  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_ft.callbacks._common as _common  # noqa: E402
import lightning_ft.callbacks.unfreezing as _unfreezing  # noqa: E402
from lightning_ft import FineTuneModule  # noqa: E402
from lightning_ft.callbacks import GradualUnfreezing, LayerwiseLRDecay  # noqa: E402

if os.environ.get("LFT_NO_REWRAP") == "1":  # negative control (both ranks run this module code)

    def _no_rewrap(trainer: L.Trainer) -> None:
        return None

    _common.rewrap_ddp = _no_rewrap
    _unfreezing.rewrap_ddp = _no_rewrap

MAX_EPOCHS = {"milestones": 4, "plateau": 5, "temporal": 3}
TEMPORAL_MILESTONES = {1: ["layer4.0"], 2: "all"}
MILESTONES = {1: ["layer4.0"], 2: ["layer3.0", "layer2.0"], 3: "all"}
# per-rank scripted metric (min mode, patience 1). Alone, rank 0 would plateau at epoch 2 only and
# rank 1 at epoch 1 only; their mean (1.0, 1.25, 1.5, 1.75, 0.75) plateaus at epochs 1 and 3,
# which is what both ranks must do
SCRIPTED = {0: [1.0, 0.5, 0.5, 1.5, 0.5], 1: [1.0, 2.0, 2.5, 2.0, 1.0]}


def state_hash(module: nn.Module, buffers: bool = True) -> str:
    """sha256 over the bytes of every state_dict tensor (params + buffers), in state_dict order."""
    h = hashlib.sha256()
    names = {n for n, _ in module.named_parameters()}
    for name, tensor in module.state_dict().items():
        if not buffers and name not in names:
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class UserModule(L.LightningModule):
    """A user's module: its own optimizer over all parameters, its own scheduler, no lightning_ft code."""

    def __init__(self, scripted: bool = True) -> None:
        super().__init__()
        self.backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
        self.fc = nn.Linear(self.backbone.num_features, 3)
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y), sync_dist=True)
        if self.scripted:  # deliberately NOT synced: each rank sees its own value
            value = SCRIPTED[self.global_rank][self.current_epoch]
            self.log("val/scripted", value, sync_dist=False)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(L.Callback):
    """Writes, on every rank, phases, transitions, state hashes and the frozen-prefix checks."""

    def __init__(self, out_dir: Path, unfreezing: GradualUnfreezing, config: str) -> None:
        self.out_dir = out_dir
        self.unfreezing = unfreezing
        self.record: dict = {"config": config, "epochs": [], "steps": [], "fit_end": None}
        self._outputs: dict[str, bool] = {}
        self._order: list[tuple[str, nn.Module]] = []

    def on_fit_start(self, trainer, pl_module):
        # the modules an input flows through, in order: backbone stages, then the head
        self.record["rank"] = trainer.global_rank
        self.record["world_size"] = trainer.world_size
        self.record["strategy_model"] = type(trainer.strategy.model).__name__
        head = pl_module.head if hasattr(pl_module, "head") else pl_module.fc
        self._order = [(f"backbone.{n}", m) for n, m in pl_module.backbone.named_children()] + [("head", head)]
        for name, module in self._order:
            module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self._outputs[name] = bool(output.requires_grad)

        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._outputs = {}

    def on_after_backward(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        modules = dict(self._order)
        frozen_prefix, first_trainable = [], None
        for name, module in self._order:
            own = list(module.parameters())
            if any(p.requires_grad for p in own):
                first_trainable = name
                break
            frozen_prefix.append(name)
        frozen_bn_training = [
            n for n, m in pl_module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False)) and m.training
        ]
        self.record["steps"].append({
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "phase": self.unfreezing.phase,
            "frozen_with_grad": [n for n, p in params.items() if not p.requires_grad and p.grad is not None],
            "trainable_without_grad": [n for n, p in params.items() if p.requires_grad and p.grad is None],
            "outputs_seen": sorted(self._outputs),
            "frozen_prefix": frozen_prefix,
            "frozen_prefix_outputs_requiring_grad": [n for n in frozen_prefix if self._outputs.get(n, False)],
            "frozen_prefix_unseen_with_params": [
                n for n in frozen_prefix if n not in self._outputs and any(True for _ in modules[n].parameters())
            ],
            "first_trainable": first_trainable,
            "first_trainable_output_requires_grad": self._outputs.get(first_trainable) if first_trainable else None,
            "frozen_bn_in_train_mode": frozen_bn_training,
            "new_ddp_wrapper": self._new_wrapper(trainer),
        })

    @staticmethod
    def _new_wrapper(trainer) -> bool:
        """True the first time a step runs through this DistributedDataParallel object."""
        wrapper = trainer.strategy.model
        new = not getattr(wrapper, "_recorder_seen", False)
        wrapper._recorder_seen = True
        return new

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # parameters after the optimizer step (buffers legitimately differ between DDP forwards)
        self.record["steps"][-1]["param_hash_after_step"] = state_hash(pl_module, buffers=False)

    def _snapshot(self, trainer, pl_module) -> dict:
        return {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "phase": self.unfreezing.phase,
            "wait": self.unfreezing.wait,
            "best": self.unfreezing.best,
            "transitions": [dict(t) for t in self.unfreezing.transitions],
            "hash": state_hash(pl_module),
            "param_hash": state_hash(pl_module, buffers=False),
            "requires_grad": {n: p.requires_grad for n, p in pl_module.named_parameters()},
            "lrs": [g["lr"] for opt in trainer.optimizers for g in opt.param_groups],
            "group_names": [g.get("name") for opt in trainer.optimizers for g in opt.param_groups],
        }

    def _write(self, trainer):
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, path)

    def on_train_epoch_end(self, trainer, pl_module):
        self.record["epochs"].append(self._snapshot(trainer, pl_module))
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module):
        self.record["fit_end"] = self._snapshot(trainer, pl_module)
        self._write(trainer)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g)
    y = torch.arange(64) % 3
    xv = torch.randn(32, 3, 32, 32, generator=g)
    yv = torch.arange(32) % 3
    # a normal DataLoader: Lightning adds a DistributedSampler, so each rank gets other samples
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    val = DataLoader(TensorDataset(xv, yv), batch_size=8, shuffle=False)
    return train, val


class SeriesData(torch.utils.data.Dataset):
    """Time series of 4 dates (the last one padding for every third sample), classes by the date of a bright spell."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.images = torch.randn(n, 4, 3, 16, 16, generator=g)
        self.images[torch.arange(n), self.y] += 1.5
        self.mask = torch.ones(n, 4, dtype=torch.bool)
        self.mask[::3, -1] = False
        self.doy = torch.tensor([30, 120, 210, 300]).expand(n, 4)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"images": self.images[i], "mask": self.mask[i], "doy": self.doy[i]}, self.y[i]


def main(out_dir: Path, config: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    if config == "milestones":
        model = FineTuneModule("test_resnet", num_classes=3, pretrained=None, layer_decay=0.8, lr=1e-2)
        unfreezing = GradualUnfreezing(monitor=None, milestones=MILESTONES, verbose=False)
        callbacks = [unfreezing]
    elif config == "temporal":
        model = FineTuneModule("test_resnet", num_classes=3, head="temporal", layer_decay=0.8, lr=1e-2,
                               head_kwargs={"pooling": "attention", "num_heads": 2, "hidden_dim": 16})
        unfreezing = GradualUnfreezing(monitor=None, milestones=TEMPORAL_MILESTONES, verbose=False)
        callbacks = [unfreezing]
    elif config == "plateau":
        model = UserModule(scripted=True)
        unfreezing = GradualUnfreezing(monitor="val/scripted", patience=1, groups_per_step=2, verbose=False)
        callbacks = [LayerwiseLRDecay(decay=0.8, verbose=False), unfreezing]
    else:
        raise SystemExit(f"unknown config {config!r}")
    # different initial weights per rank: DDP's first wrap must broadcast rank 0's
    if os.environ.get("LOCAL_RANK", "0") != "0":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    callbacks.append(Recorder(out_dir, unfreezing, config))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=MAX_EPOCHS[config], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, precision="bf16-mixed" if config == "temporal" else "32-true",
    )
    if config == "temporal":
        train = DataLoader(SeriesData(32, seed=0), batch_size=4)
        val = DataLoader(SeriesData(16, seed=1), batch_size=4)
    else:
        train, val = loaders()
    trainer.fit(model, train, val)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "milestones")
