"""Shared test helpers: tiny timm models, random tensors, a fast CPU Trainer."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several test processes on the cores: one thread each, in the subprocesses it starts too
    # (OpenMP pools competing for 2 cores spin-wait: convolutions get ~20x slower)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def random_loader(n: int = 32, classes: int = 3, size: int = 32, chans: int = 3, batch: int = 8, seed: int = 0,
                  shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chans, size, size, generator=g)
    y = torch.arange(n) % classes
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


def fast_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture
def loader():
    return random_loader()


@pytest.fixture
def one_thread():
    """One torch thread for the test: on 2 shared cores, OpenMP threads competing with other
    processes make convolutions ~20x slower (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
