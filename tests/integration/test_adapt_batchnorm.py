"""AdaptBatchNorm on a plain LightningModule with BatchNorm (written here, not FineTuneModule).

Against the same fit without the callback: the training is bitwise the same; the target
validation loader sees BatchNorm statistics equal to an independent AdaBN computation on the
target training inputs; the source loader sees the training statistics; checkpoints and a test
after the fit hold the adapted statistics; a resumed fit equals the uninterrupted one.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_ft.callbacks import AdaptBatchNorm, FeatureCache, GradualUnfreezing
from lightning_ft.data import DigitsDataModule, MNISTSubsetDataModule, SourceTargetDataModule
from tests.conftest import fast_trainer

FIXED = dict(image_size=16, channels=1, mean=(0.5,), std=(0.5,))


class BatchNormNet(L.LightningModule):
    """A user's module: Flatten -> Linear -> BatchNorm1d -> ReLU -> Linear, AdamW over everything."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
        self.seen: list[dict] = []  # per validation loader: the weights and BatchNorm statistics it ran with

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        bn = self.net[2]
        if batch_idx == 0:
            self.seen.append({"epoch": self.current_epoch, "loader": dataloader_idx,
                              "w": self.net[1].weight.detach().clone(), "b": self.net[1].bias.detach().clone(),
                              "mean": bn.running_mean.clone(), "var": bn.running_var.clone()})
        acc = (self(batch[0]).argmax(-1) == batch[1]).float().mean()
        self.log(f"val{dataloader_idx}/acc", acc, add_dataloader_idx=False)

    def test_step(self, batch, batch_idx):
        self.log("test/acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02)


class InOrder(SourceTargetDataModule):
    """Source batches in a fixed order, so a resumed fit sees the batches of the uninterrupted one."""

    def train_dataloader(self):
        return DataLoader(self.source.train_set, batch_size=16, shuffle=False)


def data(cls: type[SourceTargetDataModule] = SourceTargetDataModule) -> SourceTargetDataModule:
    return cls(MNISTSubsetDataModule(limit=64, **FIXED), DigitsDataModule(limit=64, mnist_frame=True, **FIXED),
               batch_size=16, source_only=True)


def fit(callbacks=(), epochs=2, ckpt_path=None, module=None, datamodule=None, **kwargs):
    L.seed_everything(0)
    module = module or BatchNormNet()
    trainer = fast_trainer(max_epochs=epochs, callbacks=list(callbacks), **kwargs)
    trainer.fit(module, datamodule=datamodule or data(), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return module, trainer


def adabn_reference(w: torch.Tensor, b: torch.Tensor, dm: SourceTargetDataModule) -> tuple[np.ndarray, np.ndarray]:
    """AdaBN by hand, in numpy: the mean over the target training batches (in order, batch 16) of the
    batch mean and unbiased batch variance of the BatchNorm's input."""
    x = np.stack([dm.target_train[i][0].numpy().reshape(-1) for i in range(len(dm.target_train))]).astype(np.float64)
    a = x @ w.double().numpy().T + b.double().numpy()
    batches = [a[i:i + 16] for i in range(0, len(a), 16)]
    return (np.mean([bt.mean(0) for bt in batches], 0), np.mean([bt.var(0, ddof=1) for bt in batches], 0))


def test_target_validation_sees_adabn_statistics_and_training_is_unchanged():
    plain, _ = fit()
    adapted, trainer = fit([AdaptBatchNorm(verbose=False)])
    dm = trainer.datamodule
    # training: bitwise the same as without the callback
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), adapted.parameters()))
    source = [s for s in adapted.seen if s["loader"] == 0]
    target = [s for s in adapted.seen if s["loader"] == 1]
    assert len(source) == len(target) == 2
    for mine, ref in zip(source, [s for s in plain.seen if s["loader"] == 0]):  # source loader: training statistics
        assert torch.equal(mine["mean"], ref["mean"]) and torch.equal(mine["var"], ref["var"])
    for seen in target:  # target loader: AdaBN on the target training inputs, with the weights of that moment
        mean, var = adabn_reference(seen["w"], seen["b"], dm)
        assert np.allclose(seen["mean"].numpy(), mean, atol=1e-5) and np.allclose(seen["var"].numpy(), var, rtol=1e-4)
        assert not torch.allclose(seen["mean"], source[0]["mean"])  # really other statistics
    # after the fit the module holds the adapted statistics of its final weights
    assert torch.equal(adapted.net[2].running_mean, target[-1]["mean"])


def test_checkpoint_and_test_after_fit_hold_the_adapted_model(tmp_path):
    plain, _ = fit()
    cb = AdaptBatchNorm(verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val1/acc", mode="max", save_last=True)
    model, trainer = fit([cb, ckpt], enable_checkpointing=True)
    saved = torch.load(ckpt.last_model_path, weights_only=True)
    last_target = [s for s in model.seen if s["loader"] == 1][-1]
    assert torch.equal(saved["state_dict"]["net.2.running_mean"], last_target["mean"])  # adapted, in the weights
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("AdaptBatchNorm"))
    assert torch.equal(state["train_stats"]["net.2"]["running_mean"], plain.net[2].running_mean)  # training ones kept
    # the test after the fit reports the accuracy of the adapted checkpoint
    result = trainer.test(model, datamodule=data(), ckpt_path=ckpt.best_model_path, weights_only=True, verbose=False)
    best = BatchNormNet()
    best.load_state_dict(torch.load(ckpt.best_model_path, weights_only=True)["state_dict"])
    best.eval()
    dm = data()
    dm.setup("test")
    x, y = (torch.stack(t) for t in zip(*[dm.target.test_set[i] for i in range(len(dm.target.test_set))]))
    with torch.no_grad():
        expected = (best(x).argmax(-1) == y).float().mean().item()
    assert result[0]["test/acc"] == pytest.approx(expected, abs=1e-6)


def test_a_resumed_fit_equals_the_uninterrupted_one(tmp_path):
    def run(callbacks, ckpt_path=None):
        return fit(callbacks, epochs=3, ckpt_path=ckpt_path, datamodule=data(InOrder), enable_checkpointing=True)[0]

    for adapt in (False, True):
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(adapt), filename="{epoch}", save_top_k=-1)
        whole = run([*([AdaptBatchNorm(verbose=False)] if adapt else []), ckpt])
        resumed = run([AdaptBatchNorm(verbose=False)] if adapt else [], ckpt_path=tmp_path / str(adapt) / "epoch=0.ckpt")
        a, b = whole.state_dict(), resumed.state_dict()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"adapt={adapt}: {different}"  # weights, and the final adapted statistics
        if adapt:  # the resumed fit validated with the same statistics, epoch by epoch
            assert [s["mean"].tolist() for s in resumed.seen] == [s["mean"].tolist() for s in whole.seen
                                                                  if s["epoch"] >= 1]


def test_data_train_uses_the_exact_statistics_of_the_training_inputs():
    L.seed_everything(0)
    module = BatchNormNet()
    dm = DigitsDataModule(limit=64, batch_size=16, **FIXED)
    dm.setup()
    trainer = fast_trainer(max_epochs=1, callbacks=[AdaptBatchNorm(data="train", verbose=False)])
    trainer.fit(module, DataLoader(dm.train_set, batch_size=16, shuffle=True), DataLoader(dm.val_set, batch_size=16))
    seen = module.seen[-1]
    x = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))]).flatten(1).double()
    a = (x @ seen["w"].double().T + seen["b"].double()).split(16)
    assert torch.allclose(seen["mean"].double(), torch.stack([t.mean(0) for t in a]).mean(0), atol=1e-5)


def test_bad_setups_are_refused_at_setup_with_the_fix():
    with pytest.raises(ValueError, match="needs unlabelled target data.*target_train.*SourceTargetDataModule"):
        fast_trainer(max_epochs=1, callbacks=[AdaptBatchNorm()]).fit(
            BatchNormNet(), datamodule=DigitsDataModule(limit=32, batch_size=16, **FIXED))
    with pytest.raises(ValueError, match="FeatureCache.*Drop one"):
        fit([AdaptBatchNorm(), FeatureCache()], epochs=1)

    class NoNorm(BatchNormNet):
        def __init__(self):
            super().__init__()
            self.net[2] = nn.Identity()

    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        fit([AdaptBatchNorm()], epochs=1, module=NoNorm())
    with pytest.raises(ValueError, match="data must be 'target' or 'train'"):
        AdaptBatchNorm(data="source")
    with pytest.raises(ValueError, match=r"restore_best=True.*adapted statistics.*Set restore_best=False"):
        fit([AdaptBatchNorm(), GradualUnfreezing(milestones={1: "all"}, head="net.4", restore_best=True)], epochs=1)


@pytest.mark.parametrize("order", ["unfreezing_first", "adabn_first"])
def test_the_sanity_check_is_left_alone_and_recalibrated_statistics_survive(order):
    """With Lightning's default sanity check (2 batches) and both callback orders, the frozen BatchNorm
    trains with GradualUnfreezing's recalibrated statistics, as without AdaptBatchNorm."""
    def first_step_stats(callbacks):
        seen = []

        class Probe(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if not seen:
                    seen.append(pl_module.net[2].running_mean.clone())

        fit([*callbacks, Probe()], epochs=1, num_sanity_val_steps=2)
        return seen[0]

    def unfreezing():
        return GradualUnfreezing(milestones={0: ["head"], 5: "all"}, head="net.4", frozen_bn="recalibrate", verbose=False)

    alone = first_step_stats([unfreezing()])
    both = [unfreezing(), AdaptBatchNorm(verbose=False)]
    assert torch.equal(first_step_stats(both if order == "unfreezing_first" else both[::-1]), alone)
    assert not torch.equal(alone, torch.zeros_like(alone))  # recalibrated, not the initial statistics
    # data="train" reads the training loader, which does not exist yet during the sanity check
    fit([AdaptBatchNorm(data="train", verbose=False)], epochs=1, num_sanity_val_steps=2)
