"""``lightning-ft compare``, run as users run it: the installed command on a YAML written as the README
shows, with a shifted test set. Checked: its exit status and a progress line per run; every report file
exists and every PNG opens; the table's numbers are the runs' own test metrics (re-tested from each
run's checkpoint in a new Trainer, and read back from each run's CSV log); finished runs are reused;
a failed run is reported (table, runs.csv, report, exit status 1), never dropped; the report reaches
an offline W&B run as media. And the checks made before anything runs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from lightning_ft.compare import STRATEGIES, plan_runs
from lightning_ft.data import MNISTSubsetDataModule
from lightning_ft.module import FineTuneModule

EXE = Path(sys.executable).with_name("lightning-ft")
STRATS = ["linear_probe", "lp_ft", "full"]
SEEDS = [0, 1]

BASE = """\
seed_everything: 0
test_after_fit: true
trainer:
  accelerator: cpu
  max_epochs: 2
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: logs
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: val/loss
        mode: min
model:
  backbone: test_resnet
  pretrained: weights.safetensors   # "pretrained" weights of the tiny test model, the same in every run
  num_classes: 10
  in_chans: 1
  img_size: 32
  lr: 0.003
data:
  class_path: lightning_ft.data.MNISTSubsetDataModule
  init_args:
    batch_size: 16
    limit: 64
"""
SHIFT = '{"class_path": "lightning_ft.data.DigitsDataModule", "init_args": {"mnist_frame": true, "limit": 48}}'


def _write_weights(root: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    save_file(timm.create_model("test_resnet", pretrained=False, in_chans=1).state_dict(), root / "weights.safetensors")


def _compare(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    assert EXE.is_file(), f"console script not installed next to {sys.executable}: run scripts/setup.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([str(EXE), "compare", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_end_to_end(tmp_path: Path) -> None:
    """One test (one worker): the report is made once, then every check below reads it."""
    report = _make_report(tmp_path)
    check_a_progress_line_per_run_and_every_file(report)
    check_the_table_holds_the_runs_own_test_metrics(report)
    check_the_report_reaches_wandb_as_media(report)
    check_a_rerun_reuses_finished_runs_and_a_failed_run_is_reported(report)


def _make_report(root: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    (root / "base.yaml").write_text(BASE)
    _write_weights(root)
    result = _compare("--config", "base.yaml", "--strategies", *STRATS, "--seeds", *map(str, SEEDS), "--quick",
                      "--shift_data", SHIFT, "--output", "report", "--wandb_project", "lft-compare-test", cwd=root)
    assert result.returncode == 0, f"exit status {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}"
    return root, result


def check_a_progress_line_per_run_and_every_file(report) -> None:
    root, result = report
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(STRATS) * len(SEEDS), result.stdout
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"[{i}/{len(STRATS) * len(SEEDS)}] ") and "test/acc 0." in line and "shift/acc" in line
    out = root / "report"
    pngs = ["learning_curves.png", "layer_change.png"]
    pngs += [f"{kind}_{s}.png" for s in STRATS for kind in ("confusion", "reliability", "features")]
    for name in ["report.md", "results.csv", "runs.csv", "per_class.csv", *pngs]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in pngs:
        with Image.open(out / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200, (name, image.size)
    markdown = (out / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in pngs)
    assert all(f"`{s}`" in markdown for s in STRATS) and "shift/acc" in markdown
    per_class = _rows(out / "per_class.csv")
    assert len(per_class) == len(STRATS) * len(SEEDS) * 10
    # the frozen features were computed once (train + val) and shared by every probe: the linear probe's seeds
    # and LP-FT's own probes
    assert len(list((out / "feature_tables").glob("*.pt"))) == 2
    log = (out / "runs" / "linear_probe" / "seed1" / "log.txt").read_text()
    assert "train table loaded from" in log


def check_the_table_holds_the_runs_own_test_metrics(report) -> None:
    root, _ = report
    out = root / "report"
    runs = {(r["strategy"], int(r["seed"])): r for r in _rows(out / "runs.csv")}
    assert set(runs) == {(s, k) for s in STRATS for k in SEEDS}
    table = {r["strategy"]: r for r in _rows(out / "results.csv")}
    for strategy in STRATS:
        own = []
        for seed in SEEDS:
            run_dir = out / "runs" / strategy / f"seed{seed}"
            result = json.loads((run_dir / "result.json").read_text())
            # the run's own CSV log: the in-domain test first, then the shifted test set
            logged = [float(r["test/acc"]) for r in _rows(next((run_dir / "lightning_logs").rglob("metrics.csv")))
                      if r.get("test/acc")]
            assert len(logged) == 2, logged
            assert float(runs[strategy, seed]["test/acc"]) == pytest.approx(logged[0], abs=1e-6)
            assert float(runs[strategy, seed]["shift/acc"]) == pytest.approx(logged[1], abs=1e-6)
            assert result["metrics"]["test/acc"] == pytest.approx(logged[0], abs=1e-6)
            # the learning curves are the epochs' own logged values (train and val, each epoch)
            log_rows = _rows(next((run_dir / "lightning_logs").rglob("metrics.csv")))
            history = result["history"]
            if strategy == "lp_ft":  # the probe's epochs, then the fine-tuning's (more parameters train)
                probe = json.loads((run_dir / "probe" / "result.json").read_text())
                k = len(probe["history"])
                assert history[:k] == probe["history"] and history[k]["epoch"] == k
                assert history[k]["trainable"] > history[k - 1]["trainable"]
                # its probe is the linear probe of the same seed, run again with the same arguments
                assert probe["metrics"]["test/acc"] == pytest.approx(float(runs["linear_probe", seed]["test/acc"]))
                history = history[k:]
            for key in ("train/loss_epoch", "val/loss", "val/acc"):
                per_epoch = [float(r[key]) for r in log_rows if r.get(key)]
                assert [h[key] for h in history] == pytest.approx(per_epoch, abs=1e-6), key
            own.append(logged[0])
            if seed == SEEDS[0]:  # and re-tested from the run's best checkpoint in a new Trainer
                ckpt = result["checkpoint"]
                assert ckpt and Path(ckpt).parent.parent == run_dir
                model = FineTuneModule.load_from_checkpoint(ckpt, weights_only=True)  # no pretrained file needed
                data = MNISTSubsetDataModule(batch_size=16, limit=64)
                trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_test_batches=2,
                                    enable_model_summary=False)
                again = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
                assert again == pytest.approx(logged[0], abs=1e-6)
        mean = sum(own) / len(own)
        assert float(table[strategy]["test/acc mean"]) == pytest.approx(mean, abs=1e-9)
        per_seed = dict(item.split(":") for item in table[strategy]["test/acc per seed"].split())
        assert {int(k): float(v) for k, v in per_seed.items()} == pytest.approx(dict(zip(SEEDS, own)), abs=1e-4)
        if strategy != "linear_probe":
            base = [float(runs["linear_probe", k]["test/acc"]) for k in SEEDS]
            diff = sum(a - b for a, b in zip(own, base)) / len(own)
            assert float(table[strategy]["test/acc vs linear_probe"]) == pytest.approx(diff, abs=1e-9)


def check_the_report_reaches_wandb_as_media(report) -> None:
    root, result = report
    assert "W&B: report logged to project lft-compare-test" in result.stdout
    images = list((root / "report" / "wandb").glob("offline-run-*/files/media/images/*.png"))
    names = {p.name.split("_")[0] for p in images}
    assert {"learning", "layer", "confusion", "reliability", "features"} <= names, images


def check_a_rerun_reuses_finished_runs_and_a_failed_run_is_reported(report) -> None:
    root, _ = report
    (root / "broken.yaml").write_text("model:\n  lr: -1.0\n")
    (root / "report" / "runs" / "full" / "seed1" / "result.json").unlink()  # this one runs again
    result = _compare("--config", "base.yaml", "--strategies", *STRATS, "broken=broken.yaml", "--seeds",
                      *map(str, SEEDS), "--quick", "--shift_data", SHIFT, "--output", "report", cwd=root)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == (len(STRATS) + 1) * len(SEEDS)
    assert sum("(reused)" in line for line in lines) == len(STRATS) * len(SEEDS) - 1
    assert sum("FAILED" in line and "lr must be > 0" in line for line in lines) == len(SEEDS)
    assert "2 of 8 runs FAILED" in result.stdout
    table = {r["strategy"]: r for r in _rows(root / "report" / "results.csv")}
    assert table["broken"]["failed"] == "2" and table["broken"]["test/acc mean"] == "nan"
    runs = [r for r in _rows(root / "report" / "runs.csv") if r["strategy"] == "broken"]
    assert len(runs) == 2 and all(r["status"] == "failed" and "lr must be > 0" in r["error"] for r in runs)
    assert "## Failed runs" in (root / "report" / "report.md").read_text()


def test_bad_requests_are_refused_before_any_run(tmp_path: Path) -> None:
    config = tmp_path / "base.yaml"
    config.write_text(BASE)
    with pytest.raises(ValueError, match="Unknown strategy 'probe'. Built in: linear_probe"):
        plan_runs([str(config)], ["probe"], [0], tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        plan_runs([str(tmp_path / "nope.yaml")], ["full"], [0], tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        plan_runs([str(config)], ["full"], [0, 0], tmp_path)
    with pytest.raises(ValueError, match="is not a file"):
        plan_runs([str(config)], ["mine=missing.yaml"], [0], tmp_path)
    config.write_text(BASE.replace("  max_epochs: 2\n", ""))
    with pytest.raises(ValueError, match="pass --epochs N"):
        plan_runs([str(config)], ["full"], [0], tmp_path)
    specs = plan_runs([str(config)], ["linear_probe", "lp_ft"], [0, 1], tmp_path, epochs=6)
    assert [(s.strategy, s.seed) for s in specs] == [("linear_probe", 0), ("linear_probe", 1), ("lp_ft", 0), ("lp_ft", 1)]
    lp_ft = specs[2]  # LP-FT: its own linear probe (the same arguments as linear_probe's, in its folder), then all
    assert lp_ft.probe is not None and "--trainer.max_epochs=6" in lp_ft.args
    assert [a for a in lp_ft.probe.args if "seed0" not in a] == [a for a in specs[0].args if "seed0" not in a]
    assert Path(lp_ft.probe.run_dir) == Path(lp_ft.run_dir) / "probe"
    assert "--model.freeze_backbone=false" in lp_ft.args and specs[3].probe.key != lp_ft.probe.key
    assert "--model.lr=0.03" in " ".join(specs[0].args)  # 10x the base lr (0.003)
    config.write_text(config.read_text().replace("log_every_n_steps: 1", "log_every_n_steps: 2"))  # edited: new runs
    edited = plan_runs([str(config)], ["linear_probe", "lp_ft"], [0, 1], tmp_path, epochs=6)
    assert all(a.key != b.key for a, b in zip(specs, edited))
    assert specs[0].key != specs[1].key and set(STRATEGIES) >= {"linear_probe", "lp_ft", "gradual", "full",
                                                                "full_llrd", "scratch"}


def test_the_command_exits_2_naming_a_bad_argument(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    result = _compare("--config", "base.yaml", "--strategies", "probe", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Unknown strategy 'probe'" in result.stderr
    result = _compare("--config", "base.yaml", "stray", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "--section.key=value" in result.stderr
    result = _compare("--config", "base.yaml", "--shift_data", '{"class_path": "lightning_ft.data.NoSuchData"}',
                      cwd=tmp_path, timeout=120)  # refused before any run trains
    assert result.returncode == 2 and "--shift_data: AttributeError" in result.stderr and "NoSuchData" in result.stderr


@pytest.mark.slow
def test_a_run_the_analysis_cannot_read_keeps_its_metrics(tmp_path: Path) -> None:
    """Time-series inputs (a dict): the run trains and tests, its metrics are in the table, and the report
    says why it has no plots -- the analysis failing does not fail (or drop) the run."""
    from lightning_ft.compare import compare, write_report

    config = Path(__file__).resolve().parents[2] / "configs" / "crop_time_series.yaml"
    specs = plan_runs([str(config)], ["full"], [0], tmp_path, extra=["--data.init_args.limit=32"], quick=True)
    lines: list[str] = []
    (result,) = compare(specs, tmp_path, echo=lines.append)
    assert result["status"] == "ok", result.get("error")
    assert "dict inputs or several tasks" in result["analysis_error"] and "test/acc" in result["metrics"]
    files = write_report([result], tmp_path, ["full"], echo=lines.append)
    text = files["report"].read_text()
    assert "## Runs without analysis" in text and "dict inputs" in text
    assert "learning_curves" in files and "confusion_full" not in files
    (again,) = compare(specs, tmp_path, echo=lines.append)  # reused, not rerun for its missing plots
    assert lines[-1].endswith("(reused)") and again["metrics"] == result["metrics"]


@pytest.mark.slow
def test_each_run_gets_its_own_wandb_run(tmp_path: Path) -> None:
    """Lightning's WandbLogger reuses an open wandb run: without closing it, every run after the first of a
    comparison would log into the first one (and drop its metrics)."""
    from lightning_ft.compare import compare

    (tmp_path / "base.yaml").write_text(BASE.replace("""  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: logs
""", """  logger:
    class_path: lightning.pytorch.loggers.WandbLogger
    init_args:
      project: lft-compare-runs
      offline: true
"""))
    _write_weights(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the config names weights.safetensors relative to it
    try:
        specs = plan_runs(["base.yaml"], ["full"], [0, 1], tmp_path / "report", quick=True)
        assert "--trainer.logger.init_args.name=full-seed1" in specs[1].args
        results = compare(specs, tmp_path / "report", echo=lambda line: None)
    finally:
        os.chdir(cwd)
    assert [r["status"] for r in results] == ["ok", "ok"], [r.get("error") for r in results]
    ids = []
    for seed in (0, 1):
        (run,) = (tmp_path / "report" / "runs" / "full" / f"seed{seed}" / "wandb").glob("offline-run-*")
        ids.append(run.name.rsplit("-", 1)[-1])
    assert ids[0] != ids[1]


def test_a_strategy_keeps_its_own_settings_over_overrides_for_every_run(tmp_path: Path) -> None:
    config = tmp_path / "base.yaml"
    config.write_text(BASE)
    (full_llrd,) = plan_runs([str(config)], ["full_llrd"], [0], tmp_path, extra=["--model.layer_decay=0.9"])
    decays = [a for a in full_llrd.args if a.startswith("--model.layer_decay=")]
    assert decays == ["--model.layer_decay=0.9", "--model.layer_decay=0.75"]  # the last one counts
