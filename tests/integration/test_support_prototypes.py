"""SupportPrototypes on a plain LightningModule with BatchNorm (not ours) and on FineTuneModule: the
prototypes are the class means of the support features before the first step, once."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft import FineTuneModule
from lightning_ft.callbacks import SupportPrototypes
from lightning_ft.heads import PrototypeHead


class UserModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = PrototypeHead(16, 3)
        self.seen: torch.Tensor | None = None

    def forward(self, x):
        return self.classifier(self.body(x))

    def training_step(self, batch, batch_idx):
        if self.seen is None:
            self.seen = self.classifier.prototypes.detach().clone()
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 30, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 6, generator=g) + 3 * F.one_hot(y, 6).float()
    return TensorDataset(x, y)


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_prototypes_are_the_class_means_of_eval_mode_features_on_a_plain_module():
    torch.manual_seed(0)  # the body's initialisation and the shuffle: not whatever ran before in this worker
    model = UserModule()
    dataset = data()
    # the reference: eval-mode features (BatchNorm running stats), L2-normalised, averaged per class
    model.eval()
    with torch.no_grad():
        f = F.normalize(model.body(dataset.tensors[0]), dim=-1)
    expect = torch.stack([f[dataset.tensors[1] == c].mean(0) for c in range(3)])
    model.train()
    callback = SupportPrototypes()
    trainer(callbacks=[callback]).fit(model, DataLoader(dataset, batch_size=8, shuffle=True))
    torch.testing.assert_close(model.seen, expect)
    assert callback.done and callback.classes_seen == 3
    # nearest prototype classifies the separable support set
    model.eval()
    with torch.no_grad():
        feats = F.normalize(model.body(dataset.tensors[0]), dim=-1)
    assert ((feats @ F.normalize(model.seen, dim=-1).t()).argmax(-1) == dataset.tensors[1]).float().mean() > 0.9


def test_finetunemodule_prototype_head_and_resume_keeps_them(tmp_path):
    model = FineTuneModule(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU()), feature_dim=16,
                           num_classes=3, head="prototype", freeze_backbone=True)
    callback = SupportPrototypes()
    t = trainer(callbacks=[callback], max_steps=1, default_root_dir=tmp_path)
    loader = DataLoader(data(), batch_size=8)
    before = model.head.prototypes.detach().clone()
    t.fit(model, loader)
    assert not torch.equal(before, model.head.prototypes)
    path = tmp_path / "p.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]
    assert state[callback.state_key]["done"] is True
    # resumed: the prototypes come from the checkpoint, the support set is not read again
    again = SupportPrototypes()

    def read_again(*args):
        raise AssertionError("the support set was read again after a resume")

    again._support = read_again
    trainer(callbacks=[again], max_steps=2, default_root_dir=tmp_path).fit(model, loader, ckpt_path=path,
                                                                            weights_only=True)
    assert again.done


def test_no_prototype_head_is_an_error_at_setup():
    class Plain(UserModule):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(16, 3)

    with pytest.raises(ValueError, match="exactly one module with a prototypes parameter"):
        trainer(callbacks=[SupportPrototypes()]).fit(Plain(), DataLoader(data(), batch_size=8))
