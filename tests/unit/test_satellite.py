"""Satellite data: the Statlog Landsat patches (installed from Debian's r-cran-mlbench) and the synthetic
crop time series (its format, and that the timing of the season is what carries the classes)."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_ft import satellite
from lightning_ft.satellite import (
    STATLOG_CLASS_COUNTS,
    STATLOG_CLASSES,
    CropTimeSeriesDataModule,
    StatlogLandsatDataModule,
    SyntheticCropTimeSeries,
    load_statlog_landsat,
)

ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = ROOT / "scripts" / "fetch_statlog_landsat.py"


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_statlog_landsat", FETCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def statlog() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The installed data; installed here (as scripts/setup.sh does) when missing and apt-get can get it."""
    fetch = _fetch_module()
    target = satellite.data_dir() / satellite.STATLOG_FILENAME
    if not fetch.is_installed(target):
        if shutil.which("apt-get") is None and not fetch.SYSTEM_RDA.is_file():
            pytest.skip(f"Statlog Landsat data not installed at {target} and apt-get is unavailable to fetch "
                        "r-cran-mlbench; run scripts/fetch_statlog_landsat.py --rda path/to/Satellite.rda.")
        fetch.fetch()
    return load_statlog_landsat()


# ------------------------------------------------------------------ Statlog Landsat: the installed data
def test_statlog_data_is_the_documented_data(statlog) -> None:
    images, labels, classes = statlog
    assert images.shape == (6435, 4, 3, 3) and images.dtype == np.uint8
    assert labels.shape == (6435,) and labels.dtype == np.int64
    assert tuple(classes) == STATLOG_CLASSES
    assert tuple(np.bincount(labels)) == STATLOG_CLASS_COUNTS == (1533, 703, 1358, 626, 707, 1508)
    # UCI's first training row, "92 115 120 94 84 102 106 79 ... 84 107 113 87" (grey soil): pixel by pixel
    first = images[0].transpose(1, 2, 0).reshape(-1)
    assert first[:8].tolist() == [92, 115, 120, 94, 84, 102, 106, 79] and first[-4:].tolist() == [84, 107, 113, 87]
    assert classes[labels[0]] == "grey soil"


def test_statlog_patches_are_spatial_and_bands_are_mss(statlog) -> None:
    images, labels, classes = statlog
    x = images.astype(np.float64)
    # a band changes little from one pixel to its neighbour, much more from one band to the next:
    # the UCI order (pixels, 4 bands each) was reshaped the right way round
    neighbours = np.abs(x[..., 1:] - x[..., :-1]).mean()
    two_apart = np.abs(x[..., 2] - x[..., 0]).mean()
    next_band = np.abs(x[:, 1:] - x[:, :-1]).mean()
    assert neighbours < two_apart < next_band
    # vegetation (cotton) is dark in red and bright in the near infrared; soil is not
    centre = x[:, :, 1, 1]
    cotton, red_soil = centre[labels == classes.index("cotton crop")].mean(0), centre[labels == 0].mean(0)
    assert cotton[1] < cotton[2] and red_soil[1] > red_soil[3]


def test_missing_statlog_data_names_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_FT_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"fetch_statlog_landsat\.py.*setup\.sh"):
        load_statlog_landsat()
    with pytest.raises(FileNotFoundError, match="fetch_statlog_landsat"):
        StatlogLandsatDataModule().setup("fit")


def test_data_dir_is_shared_with_the_fetch_script(tmp_path, monkeypatch) -> None:
    fetch = _fetch_module()
    monkeypatch.setenv("LIGHTNING_FT_DATA_DIR", str(tmp_path / "d"))
    assert satellite.data_dir() == fetch.data_dir() == tmp_path / "d"
    monkeypatch.delenv("LIGHTNING_FT_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert satellite.data_dir() == fetch.data_dir() == tmp_path / "cache" / "lightning_ft" / "data"
    assert fetch.CONTENT_SHA256 == satellite._STATLOG_SHA256
    assert fetch.CLASSES == STATLOG_CLASSES and fetch.CLASS_COUNTS == STATLOG_CLASS_COUNTS


def test_corrupt_npz_is_refused(statlog, tmp_path) -> None:
    images, labels, classes = statlog
    bad = images.copy()
    bad[0, 0, 0, 0] ^= 1
    path = tmp_path / "statlog_landsat.npz"
    np.savez(path, images=bad, labels=labels, classes=np.array(classes))
    with pytest.raises(ValueError, match="--force"):
        load_statlog_landsat(path)
    assert not _fetch_module().is_installed(path)


def test_fetch_script_is_idempotent_and_does_not_import_torch(statlog) -> None:
    code = ("import sys; sys.path.insert(0, 'scripts'); import fetch_statlog_landsat as f; rc = f.main([]); "
            "assert 'torch' not in sys.modules, 'the fetch script imported torch'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout


def test_fetch_script_without_apt_get_says_how_to_install_by_hand(tmp_path, monkeypatch, capsys) -> None:
    fetch = _fetch_module()
    monkeypatch.setenv("LIGHTNING_FT_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(fetch, "SYSTEM_RDA", tmp_path / "absent.rda")
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    assert fetch.main([]) == 1
    err = capsys.readouterr().err
    assert "apt-get is not available" in err and "manually" in err and "--rda" in err
    assert not (tmp_path / "statlog_landsat.npz").exists()


def test_deb_reader_without_dpkg(tmp_path, monkeypatch) -> None:
    """The fallback when dpkg-deb is missing: the .deb's ar archive and its data.tar.xz, read in Python."""
    import tarfile

    payload = b"RDX3 not really an rda"
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/lib/R/site-library/mlbench/data/Satellite.rda")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def member(name: str, data: bytes) -> bytes:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    deb = tmp_path / "r-cran-mlbench_0_all.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", tar_bytes.getvalue()))
    fetch = _fetch_module()
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)  # no dpkg-deb
    out = tmp_path / "out"
    out.mkdir()
    assert fetch.extract_rda_from_deb(deb, out).read_bytes() == payload


# ------------------------------------------------------------------ Statlog Landsat: the datamodule
def test_statlog_splits_are_stratified_and_disjoint(statlog) -> None:
    _, labels, _ = statlog
    dm = StatlogLandsatDataModule(image_size=3, val_fraction=0.1, test_fraction=0.3, seed=1)
    dm.setup("fit")
    train, val, test = (dm.split_indices[k] for k in ("train", "val", "test"))
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert len(train) + len(val) + len(test) == 6435
    for idx, fraction in ((val, 0.1), (test, 0.3), (train, 0.6)):
        assert np.all(np.abs(np.bincount(labels[idx], minlength=6) - fraction * np.array(STATLOG_CLASS_COUNTS)) <= 1.5)
    assert dm.classes == list(STATLOG_CLASSES) and dm.num_classes == 6
    assert dm.bands == ("green", "red", "nir1", "nir2") and dm.sensor == "landsat_mss"
    again = StatlogLandsatDataModule(image_size=3, seed=1)
    again.setup()
    assert np.array_equal(again.split_indices["test"], test)


def test_statlog_normalised_with_training_band_statistics(statlog) -> None:
    images, _, _ = statlog
    dm = StatlogLandsatDataModule(image_size=3)
    dm.setup("fit")
    x = dm._sets["train"].tensors[0]
    assert x.shape == (len(dm.split_indices["train"]), 4, 3, 3) and x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-3)
    raw = images[dm.split_indices["train"]] / 255.0
    assert np.allclose(dm.transform_config()["mean"], raw.mean(axis=(0, 2, 3)))
    assert np.allclose(dm.transform_config()["std"], raw.std(axis=(0, 2, 3)))
    # not ImageNet's, and given statistics win
    assert not np.allclose(dm.transform_config()["mean"][:3], (0.485, 0.456, 0.406), atol=0.02)
    given = StatlogLandsatDataModule(image_size=3, mean=(0.5,) * 4, std=(0.25,) * 4)
    assert given.transform_config()["mean"] == (0.5,) * 4


def test_statlog_batches_match_the_recorded_transform(statlog) -> None:
    from lightning_ft.inputs import ImageTransform

    images, labels, _ = statlog
    dm = StatlogLandsatDataModule(image_size=16, batch_size=32, limit=64)
    dm.setup("fit")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (32, 4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    config = dm.transform_config()
    assert config["input_size"] == (4, 16, 16) and config["interpolation"] == "bilinear" and config["crop_pct"] == 1.0
    index = dm.split_indices["test"][0]
    assert torch.allclose(ImageTransform(config)(images[index]), x[0], atol=1e-6)  # what model.transform() does
    assert int(y[0]) == labels[index]
    trained = dm._sets["train"].tensors[0]
    assert abs(float(trained.mean())) < 0.3 and 0.8 < float(trained.std(dim=(0, 2, 3)).mean()) < 1.2


def test_statlog_raw_features_are_the_same_samples(statlog) -> None:
    images, labels, _ = statlog
    dm = StatlogLandsatDataModule(image_size=3, limit=200)
    features, y = dm.raw_features("test")
    idx = dm.split_indices["test"]
    assert features.shape == (200, 36) and features.dtype == np.float32
    assert np.array_equal(y, labels[idx])
    assert np.array_equal(features.reshape(-1, 3, 3, 4).transpose(0, 3, 1, 2), images[idx])
    assert np.array_equal(features[:, 16:20], images[idx][:, :, 1, 1])  # UCI attributes 17-20: the centre
    dm.setup()
    mean, std = dm.band_statistics()
    x = dm._sets["test"].tensors[0]
    expected = (features.reshape(-1, 3, 3, 4) / 255.0 - np.array(mean)) / np.array(std)
    assert np.allclose(x.numpy().transpose(0, 2, 3, 1), expected, atol=1e-5)
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        dm.raw_features("validation")  # type: ignore[arg-type]


def test_statlog_augmentation_is_a_flip_or_rotation(statlog) -> None:
    plain = StatlogLandsatDataModule(image_size=3, limit=20)
    plain.setup()
    augmented = StatlogLandsatDataModule(image_size=3, limit=20, augment=True)
    augmented.setup()
    torch.manual_seed(0)
    seen = set()
    for i in range(20):
        x, y = augmented._sets["train"][i]
        ref, ref_y = plain._sets["train"][i]
        variants = [torch.rot90(ref, k, dims=(-2, -1)) for k in range(4)]
        variants += [v.flip(-1) for v in variants]
        match = [j for j, v in enumerate(variants) if torch.equal(v, x)]
        assert match and int(y) == int(ref_y)
        seen.update(match)
    assert len(seen) > 1
    assert torch.equal(augmented._sets["test"].tensors[0], plain._sets["test"].tensors[0])


def test_statlog_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="image_size"):
        StatlogLandsatDataModule(image_size=2)
    with pytest.raises(ValueError, match="one value per band"):
        StatlogLandsatDataModule(mean=(0.5, 0.5, 0.5))


def test_statlog_shots_keep_k_per_class_and_tasks_mark_missing_labels(statlog) -> None:
    from lightning_ft.batch import MISSING

    few = StatlogLandsatDataModule(shots=5, image_size=3)
    few.setup("fit")
    _, labels, _ = statlog
    train = few.split_indices["train"]
    assert np.bincount(labels[train]).tolist() == [5] * 6
    full = StatlogLandsatDataModule(image_size=3)
    assert np.array_equal(few._splits()["test"], full._splits()["test"])  # the test split stays whole
    assert set(train) <= set(full._splits()["train"])

    two = StatlogLandsatDataModule(image_size=3, two_tasks=True, missing=0.5)
    two.setup("fit")
    x, y = next(iter(two.train_dataloader()))
    assert set(y) == {"landcover", "vegetated"}
    vegetated = two._sets["train"].vegetated
    gone = (vegetated == MISSING).float().mean().item()
    assert 0.45 < gone < 0.55
    labelled = vegetated != MISSING
    cover = two._sets["train"].base.tensors[1]
    assert torch.equal(vegetated[labelled], torch.isin(cover[labelled], torch.tensor([1, 4])).long())
    val = two._sets["val"].vegetated
    assert not bool((val == MISSING).any())  # validation and test keep every label
    with pytest.raises(ValueError, match="two_tasks=True"):
        StatlogLandsatDataModule(missing=0.5)
    with pytest.raises(ValueError, match="shots"):
        StatlogLandsatDataModule(shots=0)


def test_crop_datamodule_limit() -> None:
    dm = CropTimeSeriesDataModule(num_samples=200, limit=10)
    dm.setup("fit")
    assert [len(dm._sets[s]) for s in ("train", "val", "test")] == [10, 10, 10]


# ------------------------------------------------------------------ synthetic crop time series
def test_generator_is_deterministic() -> None:
    a, b = SyntheticCropTimeSeries(seed=3).generate(300), SyntheticCropTimeSeries(seed=3).generate(300)
    c = SyntheticCropTimeSeries(seed=4).generate(300)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["images"], c["images"])


def test_generator_padding_mask_doy_and_clouds() -> None:
    data = SyntheticCropTimeSeries(num_classes=5, max_dates=10, min_dates=3, image_size=6, cloud_fraction=0.3,
                                   seed=0).generate(800)
    images, mask, doy, cloud, labels = (data[k] for k in ("images", "mask", "doy", "cloud", "labels"))
    assert images.shape == (800, 10, 4, 6, 6) and images.dtype == np.float32
    assert mask.dtype == cloud.dtype == np.bool_ and doy.dtype == labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(5))
    real = doy > 0
    count = real.sum(1)
    assert count.min() == 3 and count.max() == 10
    assert np.all(real[:, :-1] >= real[:, 1:])  # dates first, padding after
    assert np.all(doy[real] >= 1) and np.all(doy <= 365)
    steps = np.diff(doy, axis=1)
    assert np.all(steps[real[:, 1:]] > 0)  # distinct days, sorted
    assert not np.any(mask & ~real) and not np.any(cloud & ~real) and not np.any(mask & cloud)
    assert np.array_equal(mask, real & ~cloud)
    assert np.all(images[~real] == 0)
    assert mask.sum(1).min() >= 1  # a clear date in every sample
    assert 0.22 < cloud.sum() / real.sum() < 0.38
    # clouds are bright in every band; clear dates are not
    cloudy, clear = images[cloud].mean(axis=(2, 3)), images[mask].mean(axis=(2, 3))
    assert cloudy[:, :2].min() > 0.3 and clear[:, :2].max() < 0.25
    # vegetation raises nir and lowers red
    fraction = clear[:, 2] - clear[:, 1]
    assert np.corrcoef(fraction, clear[:, 1])[0, 1] < -0.9


def _features(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hand-made features: the last clear date, the mean over clear dates, the NDVI profile by month."""
    means, mask, doy = data["images"].mean(axis=(3, 4)), data["mask"], data["doy"]
    n, t = mask.shape
    last = t - 1 - np.argmax(mask[:, ::-1], axis=1)
    weights = mask[:, :, None].astype(np.float64)
    ndvi = (means[..., 2] - means[..., 1]) / np.maximum(means[..., 2] + means[..., 1], 1e-6)
    months = np.minimum((np.maximum(doy, 1) - 1) * 12 // 365, 11)
    rows = np.broadcast_to(np.arange(n)[:, None], mask.shape)
    total, seen = np.zeros((n, 12)), np.zeros((n, 12))
    np.add.at(total, (rows[mask], months[mask]), ndvi[mask])
    np.add.at(seen, (rows[mask], months[mask]), 1.0)
    profile = np.where(seen > 0, total / np.maximum(seen, 1.0), 0.0)
    return {"single": means[np.arange(n), last], "mean": (means * weights).sum(1) / weights.sum(1),
            "profile": np.concatenate([profile, seen > 0], axis=1)}


def test_timing_carries_the_classes() -> None:
    """One date says little, the temporal mean something, the profile by day of year nearly everything."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = SyntheticCropTimeSeries(seed=0).generate(1200)
    y = data["labels"]
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, x in _features(data).items():
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[:900], y[:900])
            scores[name] = model.score(x[900:], y[900:])
    assert scores["single"] < 0.6, scores
    assert scores["mean"] > scores["single"] + 0.08, scores
    assert scores["profile"] > 0.85 and scores["profile"] > scores["mean"] + 0.12, scores


def test_crop_datamodule_batches() -> None:
    dm = CropTimeSeriesDataModule(num_samples=300, max_dates=9, min_dates=4, image_size=5, batch_size=16, seed=2)
    dm.setup("fit")
    inputs, y = next(iter(dm.train_dataloader()))
    assert set(inputs) == {"images", "mask", "doy"}
    assert inputs["images"].shape == (16, 9, 4, 5, 5) and inputs["images"].dtype == torch.float32
    assert inputs["mask"].shape == (16, 9) and inputs["mask"].dtype == torch.bool
    assert inputs["doy"].shape == (16, 9) and inputs["doy"].dtype == torch.int64
    assert y.shape == (16,) and y.dtype == torch.int64
    padding = inputs["doy"] == 0
    assert not inputs["mask"][padding].any() and torch.all(inputs["images"][padding] == 0)
    assert dm.classes == SyntheticCropTimeSeries().classes and len(dm.classes) == dm.num_classes == 4
    assert dm.bands == ("green", "red", "nir", "swir")
    # stratified, disjoint splits; per-band statistics of the clear training dates
    splits = dm.split_indices
    assert sum(len(v) for v in splits.values()) == 300 and not set(splits["train"]) & set(splits["test"])
    train = dm._sets["train"]
    clear = train.images[train.mask]  # (dates, C, H, W)
    assert torch.allclose(clear.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-3)
    assert torch.allclose(clear.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-2)
    config = dm.transform_config()
    assert config["input_size"] == (4, 5, 5) and len(config["mean"]) == len(config["std"]) == 4
    same = CropTimeSeriesDataModule(num_samples=300, max_dates=9, min_dates=4, image_size=5, batch_size=16, seed=2)
    same.setup()
    assert torch.equal(same._sets["val"].images, dm._sets["val"].images)


def test_crop_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_dates"):
        SyntheticCropTimeSeries(min_dates=5, max_dates=4)
    with pytest.raises(ValueError, match="cloud_fraction"):
        SyntheticCropTimeSeries(cloud_fraction=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        CropTimeSeriesDataModule().transform_config()
