"""Every shipped LightningCLI config runs through the real entry point (``lightning_ft.cli.run``, what the console script calls).

Base configs (those with a ``model:`` section) are discovered with a glob, so a new config in
``configs/`` is covered without editing this file. Each runs ``fit`` for two steps on 64 digits, then
(``test_after_fit``) the test split, everything written under ``tmp_path``. Besides "it ran", each
run is checked for what its hyperparameters promise:

* ``freeze_backbone: true``: the backbone's weights *and* BatchNorm buffers are bitwise unchanged,
  the head's weights changed;
* otherwise the backbone trained;
* ``layer_decay``: the optimizer's param groups have lrs ``head_lr * layer_decay**k`` (k levels below
  the head), after the scheduler stepped.

Overlay configs (no ``model:`` section, e.g. ``wandb.yaml``) only make sense composed with a base
config; each must be listed in ``OVERLAY_TESTS`` with the test that covers it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_ft.callbacks import GradualUnfreezing
from lightning_ft.cli import run
from lightning_ft.data import write_digits_folder
from lightning_ft.module import FineTuneModule

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
CONFIGS = REPO / "configs"

# overlay config -> the test module that runs it composed with a base config
OVERLAY_TESTS = {"wandb.yaml": "tests/integration/test_wandb_offline.py"}

TRAIN_BATCHES = 2


def _load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _base_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml") if "model" in _load(p))


def _overlay_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.yaml") if "model" not in _load(p))


def tiny_overrides(root: Path) -> list[str]:
    """CLI overrides that make any base config a seconds-long offline run writing only under ``root``."""
    return [
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={TRAIN_BATCHES}",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.init_args.limit=64",
        "--data.init_args.batch_size=16",
    ]




@pytest.fixture
def initial_state(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """The module's state_dict as training starts (pretrained weights loaded, head initialised)."""
    state: dict[str, torch.Tensor] = {}

    def on_train_start(self: FineTuneModule) -> None:
        state.clear()
        state.update({k: v.detach().clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(FineTuneModule, "on_train_start", on_train_start, raising=False)
    return state


def test_configs_are_discovered() -> None:
    names = {p.name for p in _base_configs()}
    assert {"demo.yaml", "linear_probe.yaml", "full_llrd.yaml", "image_folder.yaml"} <= names
    assert "wandb.yaml" not in names


@pytest.mark.parametrize("overlay", _overlay_configs(), ids=lambda p: p.name)
def test_overlay_configs_have_a_composed_test(overlay: Path) -> None:
    assert overlay.name in OVERLAY_TESTS, (
        f"configs/{overlay.name} has no model: section, so it is an overlay that the base-config test "
        "cannot run alone; add a test that composes it with a base config and list it in OVERLAY_TESTS."
    )
    assert (REPO / OVERLAY_TESTS[overlay.name]).is_file()
    # an overlay must not carry callbacks: a later --config's list replaces the base config's
    assert "callbacks" not in (_load(overlay).get("trainer") or {})


@pytest.mark.slow
@pytest.mark.parametrize("config", _base_configs(), ids=lambda p: p.stem)
def test_base_config_fits_and_tests(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    initial_state: dict[str, torch.Tensor],
) -> None:
    monkeypatch.chdir(tmp_path)  # anything relative lands in tmp_path, never in the repo
    monkeypatch.setattr(sys, "argv", ["lightning-ft"])  # not pytest's arguments
    root = tmp_path / "run"
    extra = []
    if _load(config)["data"]["class_path"].endswith("ImageFolderDataModule"):  # a folder as datasets ship it
        extra = [f"--data.init_args.root={write_digits_folder(tmp_path / 'folder', size=24, per_class=3)}"]
    cli = run(args=["fit", "--config", str(config), *tiny_overrides(root), *extra])

    declared = _load(config)
    model: FineTuneModule = cli.model
    hp = model.hparams
    # the config's model section reached the module
    for key, value in declared["model"].items():
        assert hp[key] == value, f"model.{key}: config says {value!r}, module has {hp[key]!r}"

    # fit ran exactly the configured number of optimizer steps, on CPU
    assert cli.trainer.global_step == TRAIN_BATCHES
    assert cli.trainer.current_epoch == 1
    assert next(model.parameters()).device.type == "cpu"
    assert initial_state, "on_train_start never ran"

    # test_after_fit ran the test split and printed its accuracy
    if declared.get("test_after_fit"):
        out = capsys.readouterr().out
        assert "test accuracy:" in out
        acc = float(out.split("test accuracy:")[1].split()[0])
        assert 0.0 <= acc <= 1.0
        assert "test/acc" in cli.trainer.callback_metrics

    # checkpoints and the saved config are under the run root, not in the repo
    ckpt = cli.trainer.checkpoint_callback
    if ckpt is not None:
        assert ckpt.best_model_path and Path(ckpt.best_model_path).is_file()
        assert Path(ckpt.best_model_path).resolve().is_relative_to(tmp_path.resolve())
    saved = list(root.rglob("config.yaml"))
    assert len(saved) == 1
    assert _load(saved[0])["model"]["backbone"] == declared["model"]["backbone"]

    after = model.state_dict()
    backbone_keys = [k for k in initial_state if k.startswith("backbone.")]
    head_keys = [k for k in initial_state if k.startswith("head.") and initial_state[k].is_floating_point()]
    assert backbone_keys and head_keys
    head_changed = [k for k in head_keys if not torch.equal(initial_state[k], after[k])]
    assert head_changed, "no head parameter changed in two optimizer steps"

    unfreezing = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradualUnfreezing)]
    if hp.freeze_backbone or (unfreezing and unfreezing[0].phase == 0):
        # linear probe (or the head-only first phase of gradual unfreezing): weights and BatchNorm running stats (and num_batches_tracked) untouched
        changed = [k for k in backbone_keys if not torch.equal(initial_state[k], after[k])]
        assert not changed, f"frozen backbone changed: {changed[:5]}"
        assert not any(p.requires_grad for p in model.backbone.parameters())
        assert all(p.requires_grad for p in model.head.parameters())
    else:
        weights = [k for k in backbone_keys if k in dict(model.named_parameters())]
        assert any(not torch.equal(initial_state[k], after[k]) for k in weights), "backbone did not train"

    optimizer = cli.trainer.optimizers[0]
    groups = optimizer.param_groups
    # every trainable parameter is optimized, exactly once
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert {id(p) for p in model.parameters() if p.requires_grad} <= set(in_groups)

    head = [g for g in groups if g["name"] == "head"]
    assert len(head) == 1
    head_lr, head_id = head[0]["lr"], head[0]["layer_id"]
    assert head[0]["initial_lr"] == pytest.approx(hp.lr)
    decay = hp.layer_decay if hp.layer_decay is not None else 1.0
    for g in groups:
        k = head_id - g["layer_id"]
        assert g["lr"] == pytest.approx(head_lr * decay**k, rel=1e-9), g["name"]
        assert g["initial_lr"] == pytest.approx(hp.lr * decay**k, rel=1e-9), g["name"]
    if hp.layer_decay is not None:
        # the depth map counted here from the architecture, not from the library's layer ids (which, all on
        # the head's id, would pass the ratio check above)
        levels = _levels_from_architecture(model.backbone)
        depth = len(levels)
        assert {g["layer_id"] for g in groups} == set(range(depth)) and head_id == depth - 1
        for g in groups:
            assert g["layer_id"] == levels.index(g["name"].removesuffix("/no_decay").split("+")[0]), g["name"]
        stem = next(g for g in groups if g["name"] == "stem")
        assert stem["lr"] / head_lr == pytest.approx(hp.layer_decay ** (depth - 1), rel=1e-9)


def _levels_from_architecture(backbone: torch.nn.Module) -> list[str]:
    """Depth levels of a headless timm CNN, as timm's ``group_matcher(coarse=False)`` defines them: the stem,
    one level per block (EfficientNet: ``blocks.i.j``, the last one with ``conv_head``/``bn2``; ResNet:
    ``layeri.j``), then the head."""
    if hasattr(backbone, "blocks") and hasattr(backbone, "conv_stem"):
        blocks = [f"blocks.{i}.{j}" for i, stage in enumerate(backbone.blocks) for j in range(len(stage))]
    elif hasattr(backbone, "layer4"):
        blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(backbone, f"layer{i}")))]
    else:
        raise AssertionError(f"count the depth levels of {type(backbone).__name__} here for its layer-decay check")
    return ["stem", *blocks, "head"]


@pytest.mark.slow
def test_linear_probe_config_pointed_at_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented override: configs/linear_probe.yaml with an ImageFolderDataModule, its defaults kept
    (two workers, augment=None): FeatureCache accepts the loaders and the backbone stays frozen."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-ft"])
    folder = write_digits_folder(tmp_path / "folder", size=24, per_class=4)
    cli = run(args=["fit", "--config", str(CONFIGS / "linear_probe.yaml"), "--data=lightning_ft.data.ImageFolderDataModule",
                    f"--data.root={folder}", "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path / 'run'}",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                    "--test_after_fit=false"])
    dm = cli.datamodule
    assert type(dm).__name__ == "ImageFolderDataModule" and dm.num_workers == 2 and dm.cfg.augment is None
    assert len(dm.splits["train"]) == 30 and len(dm.splits["val"]) == 10  # one per class carved for validation
    assert cli.trainer.global_step == 2  # one batch of 32 per epoch
    assert cli.model.class_names == sorted(dm.classes) and cli.model.freeze_backbone
