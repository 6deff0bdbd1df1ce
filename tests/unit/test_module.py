from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch import nn

from lightning_ft import FineTuneModule
from lightning_ft.heads import MLPHead
from tests.conftest import fast_trainer, random_loader


def test_num_classes_below_two_is_refused():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2.*num_classes=2"):
        FineTuneModule("test_resnet", num_classes=1)


def test_unknown_head_name_is_refused_at_construction():
    with pytest.raises(ValueError, match="Unknown head 'linaer'.*Did you mean 'linear'"):
        FineTuneModule("test_resnet", num_classes=3, head="linaer")


def test_label_outside_num_classes_fails_on_the_first_batch():
    model = FineTuneModule("test_resnet", num_classes=3)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    with pytest.raises(ValueError, match=r"Label 3 is outside \[0, 2\].*num_classes=3"):
        fast_trainer(max_steps=1).fit(model, loader)


@pytest.mark.parametrize("head", ["linear", "mlp", "attention", "prototype"])
def test_heads_by_name_on_cnn_and_vit(head):
    for backbone in ("test_resnet", "test_vit"):
        model = FineTuneModule(backbone, num_classes=4, head=head).eval()
        assert model(torch.randn(2, 3, 32, 32) if backbone == "test_resnet" else torch.randn(2, 3, 160, 160)).shape == (2, 4)


def test_head_is_swappable_after_construction():
    model = FineTuneModule("test_resnet", num_classes=4).eval()
    new = model.replace_head("mlp", hidden_dim=8)
    assert isinstance(new, MLPHead) and model.head is new
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert model.layer_groups()[-1].param_names[0].startswith("head.mlp")


def test_plain_module_backbone_needs_and_uses_a_feature_width():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="feature_dim="):
        FineTuneModule(net, num_classes=2)
    model = FineTuneModule(net, num_classes=2, feature_dim=8, head="attention", head_kwargs={"num_heads": 2})
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 2)


def test_optimizer_lr_outside_the_module_is_not_silently_ignored():
    model = FineTuneModule("test_resnet", num_classes=3, optimizer=partial(torch.optim.AdamW, lr=0.5))
    with pytest.raises(ValueError, match="Set model.lr"):
        fast_trainer(max_steps=1).fit(model, random_loader())


def test_predict_returns_probabilities():
    model = FineTuneModule("test_resnet", num_classes=3)
    preds = fast_trainer().predict(model, random_loader(n=8))
    probs = torch.cat(preds)
    assert probs.shape == (8, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(8), atol=1e-5) and (probs >= 0).all()


def test_frozen_backbone_stays_bitwise_unchanged_with_batchnorm_in_eval():
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, freeze_backbone=True, lr=0.1)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.fc.weight.clone()
    fast_trainer(max_epochs=2).fit(model, random_loader(), random_loader(n=8))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm running stats
    assert not torch.equal(model.head.fc.weight, head_before)
    model.train()
    assert not model.backbone.training and model.head.training


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    import timm

    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    model = FineTuneModule("test_resnet", num_classes=3, pretrained=str(weights), head="mlp", in_chans=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fast_trainer(max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(model, random_loader())
    weights.unlink()  # the pretrained file is not needed any more
    loaded = FineTuneModule.load_from_checkpoint(ckpt.last_model_path, weights_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.hparams.head == "mlp" and loaded.hparams.num_classes == 3


def test_metrics_are_logged_per_stage():
    model = FineTuneModule("test_resnet", num_classes=3)
    trainer = fast_trainer(max_epochs=1)
    trainer.fit(model, random_loader(), random_loader(n=8))
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/acc", "train/f1", "train/ece", "val/loss", "val/acc", "val/f1", "val/ece"} <= logged
    results = trainer.test(model, random_loader(n=8), verbose=False)[0]
    assert {"test/loss", "test/acc", "test/f1", "test/ece"} <= set(results)


def test_bf16_mixed_precision_fit_runs():
    model = FineTuneModule("test_resnet", num_classes=3, layer_decay=0.8)
    trainer = fast_trainer(max_steps=2, precision="bf16-mixed")
    trainer.fit(model, random_loader())
    assert trainer.global_step == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_seeded_runs_are_reproducible():
    def run():
        L.seed_everything(1)
        model = FineTuneModule("test_resnet", num_classes=3, layer_decay=0.7)
        fast_trainer(max_steps=3, deterministic=True).fit(model, random_loader(shuffle=True))
        return model.head.fc.weight.detach().clone()

    assert torch.equal(run(), run())


def test_epoch_metrics_and_loss_equal_a_direct_computation(monkeypatch):
    """Metrics are buffered (METRIC_BUFFER batches per update) and logged once per epoch; the loss
    epoch value is a sample-weighted mean. Both must equal what one computes from the batches."""
    monkeypatch.setattr(FineTuneModule, "METRIC_BUFFER", 3)  # 7 batches: two full buffers and a remainder
    torch.manual_seed(0)
    model = FineTuneModule("test_resnet", num_classes=3, in_chans=3, img_size=32, lr=1e-3)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((float(outputs["loss"]), len(batch[1])))

    loader = random_loader(n=52, batch=8)  # 6 batches of 8 and one of 4
    val = random_loader(n=52, batch=8, seed=1)
    trainer = fast_trainer(max_epochs=1, callbacks=[Record()], log_every_n_steps=1)
    trainer.fit(model, loader, val)
    expected_loss = sum(loss * n for loss, n in seen) / sum(n for _, n in seen)
    assert float(trainer.callback_metrics["train/loss_epoch"]) == pytest.approx(expected_loss, rel=1e-5)
    model.eval()
    with torch.no_grad():
        x, y = val.dataset.tensors
        logits = model(x)
        correct = (logits.argmax(-1) == y).float().mean()
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(float(correct), abs=1e-6)
    # the validation loss: the mean over all samples (7 batches, the last one smaller), no label smoothing
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    test = trainer.test(model, val, verbose=False)[0]
    assert test["test/loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert not model._pending  # nothing left behind in a buffer


def test_a_nan_loss_reaches_the_epoch_value():
    """torchmetrics' MeanMetric drops NaN by default: a diverged run must log NaN, not a finite mean."""
    model = FineTuneModule("test_resnet", num_classes=3, in_chans=3, img_size=32)
    model._update_loss(model.val_loss, torch.tensor(float("nan")), 4)
    model._update_loss(model.val_loss, torch.tensor(1.0), 4)
    assert torch.isnan(model._epoch_loss(model.val_loss))
