"""``configs/wandb.yaml`` composed with ``configs/full_llrd.yaml`` logs a complete run to W&B (offline).

The run goes through the real entry point with ``WANDB_MODE=offline``, then everything is checked from
the offline run's files on disk, not from in-memory objects: hyperparameters, metrics and the
per-layer-group learning rates of LearningRateMonitor.

An offline run is ``<save_dir>/wandb/offline-run-<time>-<id>/``. With wandb 0.31 (wandb-core) it holds
no ``files/config.yaml`` or ``files/wandb-summary.json`` (those are produced by ``wandb sync``): the
run is the transaction log ``run-<id>.wandb``, which ``wandb sync`` uploads. That log is LevelDB's
log format (32 KiB blocks, 7-byte chunk headers: CRC-32 of type+data, length, type FULL/FIRST/
MIDDLE/LAST) after a 7-byte ``:W&B`` file header, each record a ``wandb_internal_pb2.Record``.
wandb no longer ships a Python reader for it (``wandb.sdk.internal.datastore`` is gone), so
:func:`read_wandb_log` below reads it, verifying every checksum.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from lightning_ft.cli import run as run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
BASE = REPO / "configs" / "full_llrd.yaml"
DECAY = yaml.safe_load(BASE.read_text())["model"]["layer_decay"]  # what the config promises
OVERLAY = REPO / "configs" / "wandb.yaml"
TRAIN_BATCHES = 2

# ------------------------------------------------------------------------ reading an offline run

_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_log(path: Path) -> list[pb.Record]:
    """All records of a ``run-*.wandb`` transaction log, in order."""
    data = path.read_bytes()
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"not a W&B transaction log: {path}"
    pos, pending, payloads = _FILE_HEADER.size, None, []
    while pos + _CHUNK_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        assert len(chunk) == length, f"truncated record at byte {pos} of {path}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos} of {path}"
        pos += _CHUNK_HEADER.size + length
        if kind == _FULL:
            payloads.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            payloads.append(pending + chunk)
            pending = None
        else:
            raise AssertionError(f"unknown chunk type {kind} at byte {pos} of {path}")
    assert pending is None, f"{path} ends inside a record"
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _of_type(records: list[pb.Record], kind: str) -> list[Any]:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list[pb.Record]) -> list[dict[str, Any]]:
    """One dict per ``run.log`` call (a history row), values decoded from JSON."""
    return [{_key(i): json.loads(i.value_json) for i in h.item} for h in _of_type(records, "history")]


def merged(records: list[pb.Record], kind: str) -> dict[str, Any]:
    """The run's config (``kind="config"``) or summary (``"summary"``) after all its updates."""
    out: dict[str, Any] = {}
    for rec in _of_type(records, kind):
        for item in rec.update:
            out[_key(item)] = json.loads(item.value_json)
    return out


# ------------------------------------------------------------------------------------- the test




@pytest.mark.slow
def test_full_llrd_with_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_dir = tmp_path / "wandb_save"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-ft"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    repo_wandb = (REPO / "wandb").exists()

    args = [
        "fit",
        "--config", str(BASE),
        "--config", str(OVERLAY),
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={TRAIN_BATCHES}",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",  # two steps: log both (the config's 10 would log none)
        "--data.init_args.limit=64",
        "--data.init_args.batch_size=16",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]
    try:
        cli = run_cli(args=args)
        assert type(cli.trainer.logger).__name__ == "WandbLogger"
        assert cli.trainer.global_step == TRAIN_BATCHES
        # the base config's callbacks survived the overlay (its trainer section has no callbacks list)
        assert {type(c).__name__ for c in cli.trainer.callbacks} >= {"ModelCheckpoint", "LearningRateMonitor"}
        # checkpoints in one stable folder (not under the W&B run id), with last.ckpt: `--ckpt_path last` finds them
        stable = (tmp_path / "run" / "checkpoints").resolve()
        assert Path(cli.trainer.checkpoint_callback.dirpath) == stable and (stable / "last.ckpt").is_file()
        group_names = [g["name"] for g in cli.trainer.optimizers[0].param_groups]
        depth = {g["name"]: g["layer_id"] for g in cli.trainer.optimizers[0].param_groups}
    finally:
        if wandb.run is not None:
            wandb.finish()  # close the offline run before reading its files
        # and stop wandb's service process: its writer may still hold buffered records after finish()
        # returns (CI once read a log holding only its file header); teardown waits until it has exited
        wandb.teardown()

    if not repo_wandb:
        assert not (REPO / "wandb").exists(), "the run wrote a wandb/ folder into the repository"
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {save_dir / 'wandb'}, found {runs}"
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1
    records = read_wandb_log(logs[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds, f"{logs[0]} holds no records ({logs[0].stat().st_size} bytes): wandb did not flush the run"
    assert kinds[0] == "header" and "run" in kinds

    run = _of_type(records, "run")[0]
    assert run.project == "lightning-ft"  # from configs/wandb.yaml
    assert logs[0].name == f"run-{run.run_id}.wandb"
    exits = _of_type(records, "exit")
    assert exits and exits[-1].exit_code == 0, "the run was not finished cleanly"

    # (a) hyperparameters: the model's (full_llrd.yaml) and the datamodule's (overrides) reached the run
    config = merged(records, "config")
    declared = yaml.safe_load(BASE.read_text())["model"]
    assert config["layer_decay"] == DECAY
    assert config["backbone"] == "tf_efficientnet_lite0"
    for key, value in declared.items():
        assert config[key] == value, f"config {key}: run has {config.get(key)!r}, full_llrd.yaml says {value!r}"
    assert config["limit"] == 64 and config["batch_size"] == 16

    # (b) metrics: every training step's loss, the epoch's train/val metrics, test_after_fit's test metrics
    rows = history(records)
    steps = [r for r in rows if "train/loss_step" in r]
    assert [r["trainer/global_step"] for r in steps] == list(range(TRAIN_BATCHES))
    assert all(math.isfinite(r["train/loss_step"]) and r["train/loss_step"] > 0 for r in steps)
    for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/f1", "test/acc"):
        values = [r[key] for r in rows if key in r]
        assert len(values) == 1, f"{key}: logged {len(values)} times"
    for key in ("train/acc", "val/acc", "test/acc"):
        assert 0.0 <= next(r[key] for r in rows if key in r) <= 1.0
    summary = merged(records, "summary")
    assert {"val/acc", "test/acc", "train/loss_epoch"} <= summary.keys()
    assert summary["trainer/global_step"] == TRAIN_BATCHES

    # (c) per-group lrs from LearningRateMonitor, at every step: head = peak of the schedule, each
    # group k levels below it at head * DECAY**k
    lr_rows = [r for r in rows if "lr-AdamW/head" in r]
    assert [r["trainer/global_step"] for r in lr_rows] == list(range(TRAIN_BATCHES))
    head_depth = depth["head"]
    assert head_depth >= 10
    for row in lr_rows:
        logged = {k.removeprefix("lr-AdamW/"): v for k, v in row.items() if k.startswith("lr-AdamW/")}
        assert set(logged) == set(group_names), "a param group's lr is missing from the run"
        head = logged["head"]
        assert 0 < head <= config["lr"]
        for name, value in logged.items():
            k = head_depth - depth[name]
            assert value == pytest.approx(head * DECAY**k, rel=1e-9), f"{name}: {value} vs head {head} * {DECAY}**{k}"
        # read independently of the in-memory depth map: the stem is DECAY**k below the head, k whole
        k_stem = math.log(logged["stem"] / head) / math.log(DECAY)
        assert k_stem == pytest.approx(round(k_stem), abs=1e-6) and round(k_stem) == head_depth
        assert logged["blocks.0.0"] / head == pytest.approx(DECAY ** (head_depth - 1))
    assert lr_rows[0]["lr-AdamW/head"] == pytest.approx(config["lr"])  # no warm-up step in 2 steps: peak
    assert lr_rows[1]["lr-AdamW/head"] < lr_rows[0]["lr-AdamW/head"]  # then cosine decay, logged per step
