"""Reading image files of any band count, and the one transform that training, prediction and
``model.transform()`` share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ft import FineTuneModule
from lightning_ft.inputs import ImageTransform, read_image, to_chw


def test_grayscale_png_is_one_band_scaled_to_unit_range(tmp_path: Path) -> None:
    pixels = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(pixels, mode="L").save(tmp_path / "g.png")
    x = read_image(tmp_path / "g.png", channels=1)
    assert x.shape == (1, 12, 10) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(pixels).float() / 255)
    rgb = read_image(tmp_path / "g.png", channels=3)  # grayscale into an RGB model: repeated
    assert rgb.shape == (3, 12, 10) and torch.equal(rgb[0], rgb[2]) and torch.equal(rgb[0], x[0])


def test_rgb_jpeg_into_a_one_band_model_is_pillow_luma(tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((8, 9, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    x = read_image(tmp_path / "c.png", channels=1)
    expected = np.asarray(Image.open(tmp_path / "c.png").convert("L"), dtype=np.float32) / 255
    assert x.shape == (1, 8, 9)
    torch.testing.assert_close(x[0], torch.from_numpy(expected))


def test_sixteen_bit_png_and_an_explicit_scale(tmp_path: Path) -> None:
    pixels = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "d.png")
    torch.testing.assert_close(read_image(tmp_path / "d.png", channels=1)[0], torch.from_numpy(pixels / 65535.0).float())
    torch.testing.assert_close(read_image(tmp_path / "d.png", channels=1, scale=10000.0)[0],
                               torch.from_numpy(pixels / 10000.0).float())


@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_npy_of_four_bands_either_layout(tmp_path: Path, layout: str) -> None:
    bands = np.random.default_rng(1).random((4, 6, 7)).astype(np.float32)
    np.save(tmp_path / "m.npy", bands if layout == "chw" else np.moveaxis(bands, 0, -1))
    x = read_image(tmp_path / "m.npy", channels=4)
    torch.testing.assert_close(x, torch.from_numpy(bands))  # floats kept as they are


def test_multiband_tiff(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    bands = (np.random.default_rng(2).random((5, 6, 6)) * 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s2.tif", bands)
    x = read_image(tmp_path / "s2.tif", channels=5, scale=10000.0)
    torch.testing.assert_close(x, torch.from_numpy(bands / 10000.0).float())


def test_band_mismatch_names_both_counts_and_the_fix(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.zeros((4, 6, 6), np.float32))
    with pytest.raises(ValueError, match=r"has 4 bands .* model takes 3 \(in_chans=3\).*in_chans=4"):
        read_image(tmp_path / "m.npy", channels=3)
    with pytest.raises(ValueError, match="unknown image type '.txt'"):
        (tmp_path / "x.txt").write_text("no")
        read_image(tmp_path / "x.txt")


def test_chw_guess_without_channels() -> None:
    assert to_chw(np.zeros((13, 64, 64))).shape == (13, 64, 64)
    assert to_chw(np.zeros((64, 64, 13))).shape == (13, 64, 64)
    assert to_chw(np.zeros((64, 64))).shape == (1, 64, 64)


def test_eval_transform_is_timms_resize_centre_crop_normalise(tmp_path: Path) -> None:
    """Against timm's own eval transform on the same RGB file: same geometry and statistics (timm resizes
    8-bit PIL images, we resize floats: the pixels differ by rounding only)."""
    from timm.data import create_transform

    rng = np.random.default_rng(3)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.random((1, 3, 12, 15))).float(), size=(60, 75),
                                             mode="bilinear", align_corners=False)[0]
    Image.fromarray((smooth.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "p.png")
    config = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "interpolation": "bilinear", "crop_pct": 0.875}
    ours = ImageTransform(config)(tmp_path / "p.png")
    timm_t = create_transform(**config, is_training=False)
    theirs = timm_t(Image.open(tmp_path / "p.png").convert("RGB"))
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.02  # a few 8-bit steps, normalised
    shifted = ImageTransform(dict(config, crop_pct=0.5))(tmp_path / "p.png")
    assert (shifted - theirs).abs().mean() > 0.05  # the crop matters: the comparison can fail


def test_training_transform_is_random_and_keeps_the_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.random.default_rng(4).random((4, 40, 40)).astype(np.float32))
    config = {"input_size": (4, 24, 24), "mean": (0.5,) * 4, "std": (0.25,) * 4}
    t = ImageTransform(config, training=True)
    torch.manual_seed(0)
    a, b = t(tmp_path / "m.npy"), t(tmp_path / "m.npy")
    assert a.shape == b.shape == (4, 24, 24) and not torch.equal(a, b)
    e1, e2 = ImageTransform(config)(tmp_path / "m.npy"), ImageTransform(config)(tmp_path / "m.npy")
    assert torch.equal(e1, e2)


def test_transform_rejects_statistics_of_the_wrong_band_count() -> None:
    with pytest.raises(ValueError, match="mean has 3 values but input_size has 4 bands"):
        ImageTransform({"input_size": (4, 8, 8), "mean": (0.1, 0.2, 0.3), "std": (1.0,) * 4})


def test_model_transform_follows_in_chans_img_size_and_input_config(tmp_path: Path) -> None:
    model = FineTuneModule(backbone="test_resnet", num_classes=3, in_chans=4, img_size=40)
    t = model.transform()
    assert t.channels == 4 and t.size == (40, 40) and len(t.mean) == 4
    np.save(tmp_path / "m.npy", np.ones((4, 50, 50), np.float32))
    assert t(tmp_path / "m.npy").shape == (4, 40, 40)
    model = FineTuneModule(backbone="test_resnet", num_classes=3, input_config={"input_size": (4, 20, 20), "mean": [0.0] * 4,
                                                                              "std": [1.0] * 4, "crop_pct": 1.0})
    x = model.transform()(tmp_path / "m.npy")
    assert x.shape == (4, 20, 20) and torch.allclose(x, torch.ones_like(x))
    with pytest.raises(ValueError, match="unknown keys"):
        FineTuneModule(backbone="test_resnet", num_classes=3, input_config={"size": 3})


def test_class_names_are_checked_against_num_classes() -> None:
    with pytest.raises(ValueError, match=r"class_names has 2 names \(a, b\) but num_classes=3"):
        FineTuneModule(backbone="test_resnet", num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="repeats a name"):
        FineTuneModule(backbone="test_resnet", num_classes=2, class_names=["a", "a"])


def test_sixteen_bit_images_keep_their_values_in_a_three_band_model(tmp_path: Path) -> None:
    """Pillow's convert('RGB') would clip 16-bit values at 255: they are read as one band and repeated."""
    ramp = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(4, 64)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    x = read_image(tmp_path / "r.png", channels=3)
    assert x.shape == (3, 4, 64) and torch.equal(x[0], x[2])
    torch.testing.assert_close(x[0], torch.from_numpy(ramp / 65535.0).float())
    # a 16-bit PGM opens as 32-bit integers ('I'): its values still fit 16 bits, so 65535 is white
    pixels = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    (tmp_path / "d.pgm").write_bytes(b"P5\n2 2\n65535\n" + pixels.astype(">u2").tobytes())
    assert Image.open(tmp_path / "d.pgm").mode in ("I", "I;16", "I;16B")
    torch.testing.assert_close(read_image(tmp_path / "d.pgm", channels=1)[0], torch.from_numpy(pixels / 65535.0).float())


def test_a_pil_image_in_memory_is_read_like_its_file(tmp_path: Path) -> None:
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").convert("P")
    palette.save(tmp_path / "p.png")
    for chans in (1, 3):
        t = ImageTransform({"input_size": (chans, 8, 8), "mean": (0.0,) * chans, "std": (1.0,) * chans})
        assert torch.equal(t(Image.open(tmp_path / "p.png")), t(tmp_path / "p.png"))


def test_integer_pixels_wider_than_16_bits_need_a_scale_and_masks_are_zero_one(tmp_path: Path) -> None:
    np.save(tmp_path / "i.npy", np.full((2, 3, 3), 200, np.int32))
    with pytest.raises(ValueError, match=r"int32 pixels.*Set scale="):
        read_image(tmp_path / "i.npy", channels=2)
    torch.testing.assert_close(read_image(tmp_path / "i.npy", channels=2, scale=255.0), torch.full((2, 3, 3), 200 / 255))
    np.save(tmp_path / "m.npy", np.eye(3, dtype=bool))
    assert torch.equal(read_image(tmp_path / "m.npy", channels=1)[0], torch.eye(3))
