"""lightning_ft.feature_tables: the cached iterator replays the loader's batches and random stream exactly;
random augmentation is found and named; tables in memory and on disk serve the same rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_ft.feature_tables import FeatureTable, cached_iterator, random_transform_report, sample_fingerprint


class Indexed(Dataset):
    def __init__(self, n=37, transform=None):
        self.n, self.transform = n, transform

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.full((1, 8, 8), float(i))
        return (self.transform(x) if self.transform else x), i


@pytest.mark.parametrize("generator", [None, 5])
def test_cached_iterator_replays_the_loaders_batches_and_random_stream(generator):
    dataset = Indexed()
    table = FeatureTable(torch.arange(37.0)[:, None] * 10, torch.arange(37), torch.float32)
    g = torch.Generator().manual_seed(generator) if generator is not None else None
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=g)
    torch.manual_seed(0)
    if g is not None:
        g.manual_seed(generator)
    plain = [[int(i) for i in y] for epoch in range(2) for _, y in loader]
    after_plain = torch.get_rng_state()
    torch.manual_seed(0)
    if g is not None:
        g.manual_seed(generator)
    cached = []
    for _ in range(2):
        it = cached_iterator(loader, table)
        assert len(it) == len(loader)
        for features, target in it:  # the labels are the indices here
            assert torch.equal(features[:, 0], target.float() * 10)
            cached.append(target.tolist())
    assert cached == plain  # same batches, epoch after epoch
    assert torch.equal(torch.get_rng_state(), after_plain)  # and the same draws from the global generator


def test_random_transforms_are_found_named_and_the_random_state_restored():
    torchvision = pytest.importorskip("torchvision")
    T = torchvision.transforms
    assert random_transform_report(Indexed(transform=T.Compose([T.Normalize((0.5,), (0.5,))]))) is None
    noisy = Indexed(transform=T.Compose([T.RandomErasing(p=1.0, value="random"), T.Normalize((0.5,), (0.5,))]))
    states = torch.get_rng_state(), np.random.get_state()[1].copy()
    report = random_transform_report(noisy)
    assert "loads differently" in report and "RandomErasing" in report
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])


def test_fingerprint_follows_the_data():
    x = torch.randn(10, 3)
    ds = TensorDataset(x, torch.arange(10))
    before = sample_fingerprint(ds)
    assert sample_fingerprint(ds) == before
    x[-1] += 1.0  # in-place change of the last sample
    assert sample_fingerprint(ds) != before


def test_memory_mapped_table_serves_the_same_rows(tmp_path):
    rows = torch.randn(12, 4)
    path = tmp_path / "t.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(12, 4))
    mm[:] = rows.numpy()
    on_disk = FeatureTable(mm, torch.arange(12), torch.float32, path)
    in_memory = FeatureTable(rows, torch.arange(12), torch.float32)
    (fa, ya), (fb, yb) = on_disk.rows([3, 7, 1]), in_memory.rows([3, 7, 1])
    assert torch.equal(fa, fb) and torch.equal(ya, yb) and ya.tolist() == [3, 7, 1]
    on_disk.close()
    assert not path.exists()


def test_probes_never_reseed_the_gpu_generators(monkeypatch):
    """The fingerprint and the randomness probe seed the CPU generator only (and restore it): a GPU run
    keeps its own random stream (dropout masks would otherwise repeat every epoch)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    ds = TensorDataset(torch.randn(8, 3), torch.arange(8))
    state = torch.get_rng_state()
    sample_fingerprint(ds)
    random_transform_report(ds)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)
