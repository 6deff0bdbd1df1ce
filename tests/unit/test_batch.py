"""The inputs/targets contract (lightning_ft.batch) and FineTuneModule's one shared step on it:
every batch form, dict inputs, missing labels skipped by the loss and the metrics, clear refusals;
and the label-free scores (lightning_ft.losses.label_free) against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ft import FineTuneModule
from lightning_ft.batch import MISSING, batch_size, check_class_targets, is_domain_batch, split_batch
from lightning_ft.losses import entropy, information_maximization, prediction_sums


def test_every_batch_form_splits_into_inputs_and_targets():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    for batch in ((x, y), [x, y], [x, y, torch.arange(4)], {"inputs": x, "targets": y, "index": 0}):
        inputs, targets = split_batch(batch)
        assert inputs is x and targets is y
    assert split_batch(x) == (x, None) and split_batch([x])[1] is None
    series = {"image": torch.randn(2, 5, 4, 8, 8), "mask": torch.ones(2, 5, dtype=torch.bool), "dates": torch.zeros(2, 5)}
    assert split_batch((series, torch.tensor([0, 1])))[0] is series and batch_size(series) == 2
    assert is_domain_batch({"source": (x, y), "target": (x,)}) and not is_domain_batch({"inputs": x})


@pytest.mark.parametrize("batch, message", [
    ({"image": torch.randn(2, 3)}, r"needs an 'inputs' key.*\['image'\]"),
    ({"inputs": {"a": torch.randn(2, 3), "b": torch.randn(3, 3)}}, r"same batch size; got \{'a': 2, 'b': 3\}"),
    (("not a tensor", torch.tensor([0])), "Inputs must be a tensor or a dict of tensors, got str"),
    ({"source": 1, "target": 2}, "domain-adaptation batch"),
    (3.0, "got float"),
])
def test_batches_outside_the_contract_are_refused_by_name(batch, message):
    with pytest.raises(ValueError, match=message):
        split_batch(batch)


def test_class_targets_allow_missing_and_name_what_is_wrong():
    y = torch.tensor([0, MISSING, 2])
    assert check_class_targets(y, 3) is y
    with pytest.raises(ValueError, match="Label 3 is outside"):
        check_class_targets(torch.tensor([3, MISSING]), 3)
    with pytest.raises(ValueError, match="1-D integer tensor.*MISSING"):
        check_class_targets(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="of task 'land_cover'"):
        check_class_targets(torch.tensor([[0]]), 3, task="land_cover")


def _model():
    torch.manual_seed(0)
    return FineTuneModule("test_resnet", num_classes=3, in_chans=1, img_size=16)


def test_missing_labels_are_skipped_by_the_loss_and_the_metrics_not_dropped():
    model = _model().eval()
    x = torch.randn(4, 1, 16, 16)
    y = torch.tensor([0, MISSING, 2, MISSING])
    loss = model._step((x, y), "val")
    logits = model(x)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits[[0, 2]], y[[0, 2]])), rel=1e-6)
    model._flush(model.val_metrics)
    expected = float((logits[[0, 2]].argmax(-1) == y[[0, 2]]).float().mean())
    assert float(model.val_metrics["acc"].compute()) == pytest.approx(expected)  # over the 2 labelled rows


def test_a_batch_without_any_label_gives_no_loss_and_no_nan_but_a_graph():
    model = _model().train()
    loss = model._score(model(torch.randn(2, 1, 16, 16)), torch.tensor([MISSING, MISSING]), "val")
    assert float(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class TwoPartBackbone(nn.Module):
    """A backbone taking dict inputs as keyword arguments (a time series with its mask, say)."""

    num_features = 4

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, series, mask):
        return (self.proj(series) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


def test_dict_inputs_reach_a_backbone_that_takes_them_as_keywords():
    torch.manual_seed(0)
    model = FineTuneModule(TwoPartBackbone(), num_classes=3)
    inputs = {"series": torch.randn(5, 7, 6), "mask": torch.ones(5, 7)}
    loss = model._step({"inputs": inputs, "targets": torch.tensor([0, 1, 2, 0, 1])}, "train")
    expected = model.head(model.backbone(**inputs))
    assert torch.allclose(model(inputs), expected)
    assert torch.isfinite(loss)


def test_timm_backbones_refuse_dict_inputs_by_name():
    with pytest.raises(ValueError, match=r"timm backbone takes an image tensor.*\['image', 'mask'\]"):
        _model()({"image": torch.randn(2, 1, 16, 16), "mask": torch.ones(2)})


def test_targets_per_task_are_refused_until_there_is_a_head_per_task():
    model = _model()
    with pytest.raises(ValueError, match=r"per task \(crop, land\).*one classification head"):
        model._step((torch.randn(2, 1, 16, 16), {"land": torch.tensor([0, 1]), "crop": torch.tensor([1, MISSING])}),
                    "train")
    with pytest.raises(ValueError, match="This batch has no targets"):
        model._step(torch.randn(2, 1, 16, 16), "train")


def _np_entropy(p):
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def test_entropy_agrees_with_numpy_from_logits_and_probabilities():
    logits = torch.randn(6, 4, dtype=torch.float64)
    p = torch.softmax(logits, -1).numpy()
    assert float(entropy(logits)) == pytest.approx(_np_entropy(p).mean(), rel=1e-6)
    assert entropy(torch.from_numpy(p), probs=True, reduction="none").numpy() == pytest.approx(_np_entropy(p), rel=1e-6)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    assert float(entropy(one_hot, probs=True)) == 0.0  # 0 log 0 = 0, no NaN
    eps = float(entropy(one_hot, probs=True, eps=1e-5))  # the authors' form, as MCC and CDAN+E use it
    assert eps == pytest.approx(-math.log(1 + 1e-5), rel=0.01)  # float32


def test_information_maximisation_from_sums_added_over_ranks():
    probs = torch.softmax(torch.randn(10, 3), -1)
    ent, im = information_maximization(prediction_sums(probs))
    marginal = probs.numpy().mean(0)
    assert float(ent) == pytest.approx(_np_entropy(probs.numpy()).mean(), rel=1e-5)
    assert float(im) == pytest.approx((_np_entropy(marginal) - _np_entropy(probs.numpy()).mean()) / math.log(3), rel=1e-5)
    halves = prediction_sums(probs[:4]) + prediction_sums(probs[4:])  # two ranks' sums, added
    assert torch.allclose(torch.stack(information_maximization(halves)), torch.stack((ent, im)))
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert float(information_maximization(prediction_sums(collapsed))[1]) == pytest.approx(0.0, abs=1e-7)
