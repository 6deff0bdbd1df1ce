"""FineTuneModule(data_bands=...): the pretrained stem adapted band by band, the statistics honest, the
checkpoint rebuilt with the same bands."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_ft import FineTuneModule


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "test_resnet.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    return path


def test_sentinel2_stem_copies_the_rgb_kernels_bitwise(rgb_weights):
    pretrained = timm.create_model("test_resnet")
    from safetensors.torch import load_file

    pretrained.load_state_dict(load_file(str(rgb_weights)))
    model = FineTuneModule("test_resnet", num_classes=3, pretrained=str(rgb_weights), data_bands="sentinel2")
    stem = model.backbone.conv1[0].weight
    assert stem.shape[1] == 13 and model.hparams.in_chans == 13
    rgb = pretrained.conv1[0].weight  # red, green, blue
    assert torch.equal(stem[:, 3], rgb[:, 0]) and torch.equal(stem[:, 2], rgb[:, 1]) and torch.equal(stem[:, 1], rgb[:, 2])
    report = {r.target.name: r.how for r in model.band_report}
    assert report["B04"] == "copied" and report["B08"] != "copied" and len(report) == 13
    assert model(torch.randn(2, 13, 32, 32)).shape == (2, 3)
    # ImageNet statistics describe red/green/blue only: none are made up for 13 bands
    assert "mean" not in model.data_config and "std" not in model.data_config
    rgb_model = FineTuneModule("test_resnet", num_classes=3, data_bands=["B04", "B03", "B02"])
    assert rgb_model.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_checkpoint_rebuilds_the_adapted_model(rgb_weights, tmp_path):
    model = FineTuneModule("test_resnet", num_classes=3, pretrained=str(rgb_weights), data_bands="landsat_mss",
                           band_method="match", band_noise=0.5)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    again = FineTuneModule.load_from_checkpoint(path, weights_only=True)
    assert again.backbone.conv1[0].weight.shape[1] == 4
    assert torch.equal(again.backbone.conv1[0].weight, model.backbone.conv1[0].weight)


def test_plain_module_backbone_with_stem_layer_and_errors():
    body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = FineTuneModule(body, num_classes=2, feature_dim=8, data_bands="landsat_mss", stem_layer="0")
    assert model.backbone[0].in_channels == 4
    with pytest.raises(ValueError, match="layer="):
        FineTuneModule(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), num_classes=2,
                       feature_dim=8, data_bands="landsat_mss")
    with pytest.raises(ValueError, match="in_chans=5 but data_bands names 4 bands"):
        FineTuneModule("test_resnet", num_classes=2, in_chans=5, data_bands="landsat_mss")


def test_vit_patch_size_changes_the_token_grid():
    model = FineTuneModule("test_vit", num_classes=3, img_size=32, patch_size=8)
    assert model.backbone.patch_embed.grid_size == (4, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_identical_band_kernels_are_warned_about_and_the_default_noise_avoids_them():
    with pytest.warns(UserWarning, match="identical kernels to bands red = nir1.*band_noise > 0"):
        FineTuneModule("test_resnet", num_classes=2, data_bands="landsat_mss", band_noise=0.0)
    with pytest.warns(UserWarning, match="band_method='tile' repeats"):
        FineTuneModule("test_resnet", num_classes=2, data_bands="landsat_mss", band_method="tile")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = FineTuneModule("test_resnet", num_classes=2, data_bands="landsat_mss")  # match + noise 0.5
    assert model.hparams.band_noise == 0.5
    w = model.backbone.conv1[0].weight.detach().flatten(2).transpose(0, 1).flatten(1)  # (bands, O*k*k)
    assert torch.linalg.matrix_rank(w) == 4  # every band its own direction
