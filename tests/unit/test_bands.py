"""Band-aware input adaptation: band specs, kernel adaptation by wavelength, stems, ViT patch size, per-band statistics."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import adapt_input_conv
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.bands import (
    IMAGENET_BANDS,
    SENSORS,
    Band,
    BandSource,
    adapt_band_weights,
    adapt_input_bands,
    band_statistics,
    find_input_layer,
    imagenet_stats_for,
    resolve_bands,
    set_patch_size,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # convolutions on 2 shared cores: one torch thread is faster

RGB = resolve_bands("rgb")


def _weight(out: int = 8, chans: int = 3, k: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, chans, k, k, generator=torch.Generator().manual_seed(seed))


def _flat_response(weight: torch.Tensor, value: float = 0.7) -> torch.Tensor:
    """Response of a conv (no padding) to an input whose every band is the same constant: a flat spectrum."""
    x = torch.full((1, weight.shape[1], 5, 5), value, dtype=weight.dtype)
    return F.conv2d(x, weight)


# --------------------------------------------------------------------------------------------
# The table and band specs
# --------------------------------------------------------------------------------------------


def test_sensor_table_holds_the_documented_bands():
    assert list(SENSORS["rgb"]) == list(IMAGENET_BANDS) == ["red", "green", "blue"]
    assert len(SENSORS["sentinel2"]) == 13 and SENSORS["sentinel2"]["B8A"] == 865
    assert list(SENSORS["landsat8"]) == ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9"]  # 8 multispectral, no pan B8
    assert SENSORS["landsat9"] == SENSORS["landsat8"]
    assert SENSORS["landsat_mss"] == {"green": 550, "red": 650, "nir1": 750, "nir2": 950}


def test_resolve_bands_accepts_every_spec_form():
    assert [b.name for b in resolve_bands("sentinel2")] == list(SENSORS["sentinel2"])
    assert resolve_bands(["B04", "b03", "sentinel2:B02"]) == [Band("B04", 665), Band("B03", 560), Band("B02", 490)]
    assert resolve_bands(["B04", ("nir", 842.0), Band("swir", 1610)]) == [Band("B04", 665), Band("nir", 842), Band("swir", 1610)]
    assert resolve_bands({"a": 500, "b": 600}) == [Band("a", 500), Band("b", 600)]
    assert resolve_bands(["red", "nir1"], sensor="landsat_mss") == [Band("red", 650), Band("nir1", 750)]
    assert resolve_bands(["B1"]) == [Band("B1", 443)]  # landsat8 and landsat9 agree: not ambiguous
    assert str(Band("B8A", 865)) == "B8A (865 nm)"


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        (["red"], {}, r"'red' is ambiguous: rgb:red \(665 nm\), landsat_mss:red \(650 nm\).*'rgb:red'.*sensor="),
        (["B99"], {}, r"Unknown band 'B99'.*Did you mean.*'B9'.*\('B99', <nm>\)"),
        (["B04", "b04"], {}, r"'B04' is given twice"),
        (["B04", ("x", -5)], {}, r"wavelength -5 nm"),
        (["B04", 842], {}, r"neither a name .* nor a \(name, wavelength_nm\) pair"),
        ("sentinel3", {}, r"Unknown sensor 'sentinel3'.*sentinel2"),
        ("B04", {}, r"names one band, not a sensor.*\['B04'\]"),
        (["nir1"], {"sensor": "rgb"}, r"Sensor 'rgb' has no band 'nir1'.*landsat_mss:nir1"),
        (["sentinel2:B8"], {}, r"Sensor 'sentinel2' has no band 'B8'.*B8A"),
        ([], {}, r"empty"),
    ],
)
def test_resolve_bands_errors_name_the_problem_and_the_fix(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_bands(spec, **kwargs)


# --------------------------------------------------------------------------------------------
# Kernel adaptation
# --------------------------------------------------------------------------------------------


def test_match_copies_rgb_kernels_bitwise_into_sentinel2():
    w = _weight()
    new, report = adapt_band_weights(w, RGB, resolve_bands("sentinel2"), "match")
    s2 = list(SENSORS["sentinel2"])
    assert new.shape == (8, 13, 3, 3) and new.dtype == w.dtype
    for name, source in (("B04", 0), ("B03", 1), ("B02", 2)):
        assert torch.equal(new[:, s2.index(name)], w[:, source])
        assert report[s2.index(name)].how == "copied"
    assert str(report[s2.index("B04")]) == "B04 (665 nm) <- copied red (665 nm)"
    # outside the RGB range: the nearest edge band (B01 -> blue, everything beyond red -> red)
    assert torch.allclose(new[:, s2.index("B01")], w[:, 2])
    assert torch.allclose(new[:, s2.index("B08")], w[:, 0])
    assert report[s2.index("B08")].how == "interpolated"
    assert str(report[s2.index("B08")]).startswith("B08 (842 nm) <- interpolated 1.00 x red (665 nm)")


def test_match_interpolates_between_neighbours_and_keeps_the_interpolated_norm():
    w = _weight()
    target = resolve_bands({"yellow": 612.5, "cyan": 532.0})  # halfway green-red; 3/5 of the way blue->green
    new, report = adapt_band_weights(w, RGB, target, "match")
    red, green, blue = w[:, 0], w[:, 1], w[:, 2]
    goal = 0.5 * red.norm() + 0.5 * green.norm()
    assert torch.allclose(new[:, 0].norm(), goal, rtol=1e-5)
    direction = F.cosine_similarity(new[:, 0].flatten(), (red + green).flatten(), dim=0)
    assert direction > 1 - 1e-6
    goal = 0.4 * blue.norm() + 0.6 * green.norm()
    assert torch.allclose(new[:, 1].norm(), goal, rtol=1e-5)
    assert float(((red + green) / 2).norm()) < float(0.5 * red.norm() + 0.5 * green.norm())  # why the rescale is needed
    for j, entry in enumerate(report):  # the report's coefficients rebuild the kernel
        rebuilt = sum(c * w[:, RGB.index(b)] for b, c in zip(entry.sources, entry.coefficients))
        assert torch.allclose(new[:, j], rebuilt, atol=1e-6)
    assert str(report[0]).startswith("yellow (612.5 nm) <- interpolated ")
    assert "x green (560 nm) + " in str(report[0]) and "x red (665 nm)" in str(report[0])


def test_match_to_landsat_mss_copies_within_tolerance_and_noise_makes_bands_distinguishable():
    w = _weight(out=16, k=5)
    mss = resolve_bands("landsat_mss")
    new, report = adapt_band_weights(w, RGB, mss, "match")
    assert [e.how for e in report] == ["copied", "copied", "interpolated", "interpolated"]
    assert torch.equal(new[:, 0], w[:, 1]) and torch.equal(new[:, 1], w[:, 0])  # green 550 <- 560, red 650 <- 665
    assert torch.equal(new[:, 2], w[:, 0]) and torch.equal(new[:, 3], w[:, 0])  # nir1, nir2 <- red (edge)
    assert torch.linalg.matrix_rank(new.transpose(0, 1).reshape(4, -1)) == 2

    g = torch.Generator().manual_seed(1)
    noisy, report = adapt_band_weights(w, RGB, mss, "match", noise=0.1, generator=g)
    assert torch.equal(noisy[:, 0], w[:, 1]) and torch.equal(noisy[:, 1], w[:, 0])  # copies stay bitwise
    assert not torch.equal(noisy[:, 2], w[:, 0]) and not torch.equal(noisy[:, 2], noisy[:, 3])
    assert torch.linalg.matrix_rank(noisy.transpose(0, 1).reshape(4, -1)) == 4
    assert report[2].noise == pytest.approx(0.1 * float(w.std())) and "+ noise (std" in str(report[2])
    assert report[0].noise == 0
    again, _ = adapt_band_weights(w, RGB, mss, "match", noise=0.1, generator=torch.Generator().manual_seed(1))
    other, _ = adapt_band_weights(w, RGB, mss, "match", noise=0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_interpolation_is_exact_on_coincident_wavelengths():
    w = _weight()
    same, report = adapt_band_weights(w, RGB, RGB, "interpolation")
    assert torch.equal(same, w) and all(e.how == "copied" for e in report)
    new, report = adapt_band_weights(w, RGB, resolve_bands(["B02", "B03", "B04", "B08"]), "interpolation")
    assert torch.equal(new[:, 0], w[:, 2]) and torch.equal(new[:, 1], w[:, 1])  # blue and green used by no other band
    assert torch.allclose(new[:, 2], w[:, 0] / 2) and torch.allclose(new[:, 3], w[:, 0] / 2)  # red shared by B04, B08
    assert str(report[3]) == "B08 (842 nm) <- interpolated 0.50 x red (665 nm)"


@pytest.mark.parametrize(
    ("method", "target"),
    [
        *[("interpolation", t) for t in ("sentinel2", "landsat8", "landsat_mss", ["B08", "B11"], ["B03"], {"uv": 380, "deep_red": 700})],
        # averaging into fewer bands keeps it while every target band has a group (["B08", "B11"]: B11 has none)
        *[("averaging", t) for t in ("sentinel2", "landsat8", "landsat_mss", ["B03"], {"uv": 380, "deep_red": 700})],
    ],
)
def test_flat_spectrum_response_is_kept(method, target):
    w = _weight(out=6)
    new, _ = adapt_band_weights(w, RGB, resolve_bands(target), method)
    assert torch.allclose(_flat_response(new), _flat_response(w), atol=1e-5)


def test_flat_spectrum_response_is_kept_when_averaging_reduces_bands():
    w = _weight(chans=13)
    new, _ = adapt_band_weights(w, resolve_bands("sentinel2"), RGB, "averaging")
    assert torch.allclose(_flat_response(new), _flat_response(w), atol=1e-5)


def test_averaging_reduction_sums_the_source_bands_nearest_to_each_target():
    w = _weight(chans=13)
    s2 = list(SENSORS["sentinel2"])
    new, report = adapt_band_weights(w, resolve_bands("sentinel2"), RGB, "averaging")
    groups = {e.target.name: [b.name for b in e.sources] for e in report}
    assert groups == {
        "red": ["B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"],
        "green": ["B03"],
        "blue": ["B01", "B02"],
    }
    for j, entry in enumerate(report):
        assert entry.how == "averaged" and set(entry.coefficients) == {1.0}
        assert torch.allclose(new[:, j], sum(w[:, s2.index(b.name)] for b in entry.sources), atol=1e-6)
    # a target band no source band is nearest to gets the nearest source band's kernel
    new, report = adapt_band_weights(w[:, 1:4], resolve_bands(["B02", "B03", "B04"]), resolve_bands({"x": 480, "y": 486}), "averaging")
    assert [b.name for b in report[1].sources] == ["B02", "B03", "B04"]
    assert [b.name for b in report[0].sources] == ["B02"] and torch.equal(new[:, 0], w[:, 1])


def test_averaging_expansion_replicates_the_scaled_mean_kernel():
    w = _weight()
    new, report = adapt_band_weights(w, RGB, resolve_bands("landsat_mss"), "averaging")
    for j in range(4):
        assert torch.allclose(new[:, j], w.mean(1) * 3 / 4, atol=1e-6)
    assert report[0].coefficients == (0.25, 0.25, 0.25)


def test_random_kernels_are_reproducible_and_match_the_pretrained_std():
    w = _weight(out=32, k=7) * 0.05
    target = resolve_bands("sentinel2")
    a, report = adapt_band_weights(w, RGB, target, "random", generator=torch.Generator().manual_seed(3))
    b, _ = adapt_band_weights(w, RGB, target, "random", generator=torch.Generator().manual_seed(3))
    c, _ = adapt_band_weights(w, RGB, target, "random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (32, 13, 7, 7)
    assert float(a.std()) == pytest.approx(float(w.std()), rel=1e-5)
    assert all(e.how == "random" and e.sources == () for e in report)


@pytest.mark.parametrize("target", ["sentinel2", ["B08"], ["B04", "B08"], "rgb"])
def test_tile_is_timms_adapt_input_conv(target):
    w = _weight()
    bands = resolve_bands(target)
    new, report = adapt_band_weights(w, RGB, bands, "tile")
    assert torch.equal(new, adapt_input_conv(len(bands), w.clone(), base_chans=3))
    assert all(e.how == "tiled" for e in report)


def test_linear_weights_and_low_precision_weights_are_adapted_in_their_dtype():
    lin = torch.randn(5, 3)
    new, _ = adapt_band_weights(lin, RGB, resolve_bands("landsat8"), "match")
    assert new.shape == (5, 8)
    tiled, _ = adapt_band_weights(lin, RGB, resolve_bands("landsat8"), "tile")
    assert torch.equal(tiled, adapt_input_conv(8, lin[..., None, None].clone())[..., 0, 0])
    half = _weight().to(torch.bfloat16)
    new, _ = adapt_band_weights(half, RGB, resolve_bands("sentinel2"), "match", noise=0.1, generator=torch.Generator())
    assert new.dtype == torch.bfloat16 and torch.equal(new[:, 3], half[:, 0])


def test_adaptation_errors_are_explained():
    w = _weight()
    with pytest.raises(ValueError, match=r"Unknown band adaptation method 'nearest'.*match, interpolation, averaging, random, tile"):
        adapt_band_weights(w, RGB, RGB, "nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"takes 3 bands .* source names 2"):
        adapt_band_weights(w, RGB[:2], RGB)
    with pytest.raises(ValueError, match=r"noise= applies to match, interpolation and averaging"):
        adapt_band_weights(w, RGB, RGB, "tile", noise=0.1)


def test_band_source_string_is_one_readable_line():
    line = str(BandSource(Band("nir1", 750), "interpolated", (Band("red", 665), Band("nir", 842)), (0.52, 0.48)))
    assert line == "nir1 (750 nm) <- interpolated 0.52 x red (665 nm) + 0.48 x nir (842 nm)"


# --------------------------------------------------------------------------------------------
# Models in place
# --------------------------------------------------------------------------------------------


def test_adapt_input_bands_on_a_timm_resnet_nested_stem(caplog):
    model = timm.create_model("test_resnet", pretrained=False)
    old = model.get_submodule("conv1.0").weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="lightning_ft.bands"):
        report = adapt_input_bands(model, "rgb", "sentinel2")
    name, conv = find_input_layer(model)
    assert name == "conv1.0" and conv.in_channels == 13 and conv.weight.shape[1] == 13
    assert torch.equal(conv.weight[:, 3], old[:, 0])  # B04 <- red
    assert model.in_chans == 13 and model._model_args["in_chans"] == 13
    assert model.pretrained_cfg["input_size"][0] == 3  # the checkpoint's metadata, as timm keeps it
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_ft.bands"]
    assert len(lines) == 13 and lines[3] == "conv1.0: B04 (665 nm) <- copied red (665 nm)"
    assert len(report) == 13
    model.eval()
    assert model(torch.randn(2, 13, 32, 32)).shape == (2, 1000)


def test_adapt_input_bands_keeps_a_same_padding_stem_and_its_hyper_parameters():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    old = model.conv_stem
    adapt_input_bands(model, "rgb", ["B04", "B03", "B02", "B08"], "match", noise=0.05)
    new = model.conv_stem
    assert type(new) is type(old) and new is not old
    assert (new.stride, new.padding, new.dilation, new.kernel_size) == (old.stride, old.padding, old.dilation, old.kernel_size)
    assert torch.equal(new.weight[:, :3], old.weight)
    model.eval()
    assert model(torch.randn(1, 4, 64, 64)).shape == (1, model.num_features)


def test_adapt_input_bands_on_a_vit_patch_embedding():
    model = timm.create_model("test_vit", pretrained=False)
    bias = model.patch_embed.proj.bias.detach().clone()
    adapt_input_bands(model, "rgb", "landsat8", "interpolation")
    assert model.patch_embed.proj.in_channels == 8 and model.in_chans == 8
    assert torch.equal(model.patch_embed.proj.bias, bias)
    model.eval()
    assert model.forward_features(torch.randn(1, 8, 160, 160)).shape == (1, 101, 64)


def test_adapt_input_bands_on_a_plain_module_with_layer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    old = model[0]
    report = adapt_input_bands(model, ["B04", "B03", "B02"], "sentinel2", layer="0")
    assert isinstance(model[0], nn.Conv2d) and model[0].in_channels == 13 and model[0] is not old
    assert torch.equal(model[0].bias, old.bias) and model[0].weight.requires_grad is False
    assert [e.how for e in report].count("copied") == 3
    assert model(torch.randn(2, 13, 8, 8)).shape == (2, 2)


def test_adapt_input_bands_on_a_linear_input_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    adapt_input_bands(model, "rgb", "landsat_mss", layer="0")
    assert model[0].in_features == 4 and model(torch.randn(2, 4)).shape == (2, 4)


def test_adapt_input_bands_errors_are_explained():
    resnet = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(ValueError, match=r"stem `conv1.0` takes 3 bands but pretrained_bands names 4"):
        adapt_input_bands(resnet, ["B04", "B03", "B02", "B08"], "sentinel2")
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match=r"not a timm model: .*layer=.*0 \(Conv2d 3->8\)"):
        adapt_input_bands(plain, "rgb", "sentinel2")
    with pytest.raises(ValueError, match=r"Layer '1' is a BatchNorm2d.*0 \(Conv2d 3->8\)"):
        adapt_input_bands(plain, "rgb", "sentinel2", layer="1")
    with pytest.raises(ValueError, match=r"no layer 'stem'"):
        adapt_input_bands(plain, "rgb", "sentinel2", layer="stem")
    grouped = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3))
    with pytest.raises(ValueError, match=r"grouped convolution \(groups=3\)"):
        adapt_input_bands(grouped, "rgb", "sentinel2", layer="0")
    assert plain[0].in_channels == 3 and grouped[0].in_channels == 3  # untouched after an error


# --------------------------------------------------------------------------------------------
# ViT patch size
# --------------------------------------------------------------------------------------------


def _resize_patches(x: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Every ``old``-pixel patch resized on its own to ``new`` pixels (as FlexiViT's resampling assumes)."""
    b, c, h, w = x.shape
    gh, gw = h // old, w // old
    patches = x.unfold(2, old, old).unfold(3, old, old).reshape(-1, 1, old, old)
    patches = F.interpolate(patches, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    return patches.reshape(b, c, gh, gw, new, new).permute(0, 1, 2, 4, 3, 5).reshape(b, c, gh * new, gw * new)


def test_set_patch_size_resamples_the_kernel_and_the_position_embedding():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, patch_size=4, img_size=32).eval()  # small patches: fast
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model.patch_embed(x)
        set_patch_size(model, 8, img_size=64)  # the grid stays 8 x 8
        assert model.patch_embed.patch_size == (8, 8) and model.patch_embed.proj.stride == (8, 8)
        after = model.patch_embed(_resize_patches(x, 4, 8))
    assert torch.allclose(after, before, atol=1e-4 * float(before.abs().max()))  # FlexiViT: the same embedding
    set_patch_size(model, 2, img_size=32)
    assert model.patch_embed.grid_size == (16, 16) and model.patch_embed.img_size == (32, 32)
    assert model.pos_embed.shape[1] == 16 * 16 + 1  # the class token's entry kept
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 257, 64)


def test_set_patch_size_to_the_same_patch_is_exact():
    model = timm.create_model("test_vit", pretrained=False)
    weight, pos = model.patch_embed.proj.weight.detach().clone(), model.pos_embed.detach().clone()
    set_patch_size(model, 16)
    assert torch.equal(model.patch_embed.proj.weight, weight) and torch.equal(model.pos_embed, pos)


def test_set_patch_size_errors_are_explained():
    with pytest.raises(ValueError, match=r"timm vision transformers.*`ResNet` is not one"):
        set_patch_size(timm.create_model("test_resnet", pretrained=False), 8)
    vit = timm.create_model("test_vit", pretrained=False)
    with pytest.raises(ValueError, match=r"not a multiple of patch_size \(24, 24\).*144 or 168"):
        set_patch_size(vit, 24)
    with pytest.raises(ValueError, match=r"patch_size=0"):
        set_patch_size(vit, 0)
    assert vit.patch_embed.patch_size == (16, 16)


# --------------------------------------------------------------------------------------------
# Per-band statistics
# --------------------------------------------------------------------------------------------


def _reference(x: torch.Tensor, axis: int = -3) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.mean(1), flat.std(1, unbiased=False)


def _data(n: int = 21, chans: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 10.0, 100.0, 0.01])[:chans].view(1, -1, 1, 1)
    return (torch.randn(n, chans, 6, 5, generator=g) * scale + 1000 * scale).float()


def test_band_statistics_are_exact_over_a_dataloader_of_pairs():
    x = _data()
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=4)  # uneven last batch
    mean, std = band_statistics(loader)
    ref_mean, ref_std = _reference(x)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), ref_mean, rtol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), ref_std, rtol=1e-9)
    batch_means = torch.stack([_reference(x[i : i + 4])[0] for i in range(0, len(x), 4)]).mean(0)
    assert not torch.allclose(batch_means, ref_mean, rtol=1e-12)  # a mean of batch means would be off


def test_band_statistics_of_dict_batches_max_batches_and_a_datamodule():
    x = _data()
    dicts = [{"inputs": x[i : i + 5], "targets": torch.zeros(5)} for i in range(0, 20, 5)]
    mean, std = band_statistics(dicts, max_batches=2)
    ref_mean, ref_std = _reference(x[:10])
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), ref_mean, rtol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), ref_std, rtol=1e-9)

    class DataModule:
        stage = None

        def setup(self, stage):
            self.stage = stage

        def train_dataloader(self):
            return DataLoader(TensorDataset(x), batch_size=8)

    dm = DataModule()
    assert band_statistics(dm)[0] == pytest.approx(tuple(_reference(x)[0].tolist()), rel=1e-12)
    assert dm.stage == "fit"


def test_band_statistics_of_time_series_count_the_dates_the_mask_keeps():
    x = _data(n=12).reshape(3, 4, 4, 6, 5)  # (B, T, C, H, W)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    mean, std = band_statistics([{"inputs": {"images": x, "mask": mask}}])
    ref_mean, ref_std = _reference(x[mask], axis=1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), ref_mean, rtol=1e-12)
    assert band_statistics([x[:, :, :, :, :]])[0] == pytest.approx(tuple(_reference(x.flatten(0, 1), axis=1)[0].tolist()), rel=1e-12)
    channels_last = x[0].permute(0, 2, 3, 1)  # (T, H, W, C)
    assert band_statistics([channels_last], band_axis=-1)[0] == pytest.approx(tuple(_reference(x[0], axis=1)[0].tolist()), rel=1e-12)


def test_band_statistics_errors_name_the_band():
    x = _data()
    x[:, 2] = 7.0
    with pytest.raises(ValueError, match=r"Band 2 is constant \(7 everywhere\)"):
        band_statistics([x])
    with pytest.raises(ValueError, match=r"No pixels"):
        band_statistics([])


def test_imagenet_statistics_are_for_red_green_and_blue_only():
    mean, std = imagenet_stats_for(["B02", "B03", "B04"])
    assert mean == pytest.approx((0.406, 0.456, 0.485)) and std == pytest.approx((0.225, 0.224, 0.229))
    assert imagenet_stats_for("rgb")[0] == pytest.approx((0.485, 0.456, 0.406))
    message = r"ImageNet statistics describe red, green and blue only.*B08.*band_statistics\(datamodule\).*mean=/std="
    with pytest.raises(ValueError, match=message):
        imagenet_stats_for(["B04", "B08"])
