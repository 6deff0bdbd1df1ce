"""``lightning-ft compare``: fine-tuning strategies over seeds on your data, and a report of why one won.

Give a base config (model + data, as for ``lightning-ft fit``) and strategies; every strategy runs
``fit`` then ``test`` through the real CLI, once per seed, and a report folder is written::

    lightning-ft compare --config configs/demo.yaml --strategies linear_probe lp_ft full --seeds 0 1 2 \\
        --output reports/demo

Strategies are overrides of the base config (:data:`STRATEGIES`); ``name=path.yaml`` adds your own
(a config composed after the base one). Any other ``--section.key=value`` argument goes to every run.

* **Runs** live in ``<output>/runs/<strategy>/seed<k>/``: the run's checkpoints and logs,
  ``result.json`` (its own test metrics, the per-epoch history, the analysis numbers) and
  ``analysis.npz`` (test logits, features). A rerun reuses every finished run whose command is the
  same; a failed run is rerun. ``--jobs N`` runs N at a time in separate processes.
* **Report**: ``report.md`` and ``results.csv`` (per strategy: mean, 95% t-interval over seeds,
  paired per-seed difference against the linear probe), ``runs.csv`` (one row per run, failed runs
  with their error), ``per_class.csv``, and PNGs: ``learning_curves.png`` (phase transitions
  marked), ``layer_change.png`` (linear CKA pretrained vs fine-tuned, and ``||W - W0|| / ||W0||``,
  per layer group), and per strategy ``confusion_<s>.png``, ``reliability_<s>.png`` (before and
  after temperature scaling fitted on the validation logits) and ``features_<s>.png`` (PCA and t-SNE
  of the pretrained and the fine-tuned backbone's features on the test split). With a W&B logger in
  the config (or ``--wandb_project``) the PNGs and the table are logged to a W&B run as well.
* **A shifted test set** (``--shift_data``, a datamodule as ``{"class_path": ..., "init_args": ...}``
  JSON or a YAML file): every run is also tested on its test split, reported as ``shift/acc``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["STRATEGIES", "RunSpec", "Strategy", "compare", "main", "plan_runs", "run_one", "write_report"]


@dataclass(frozen=True)
class Strategy:
    """A fine-tuning strategy: CLI overrides of the base config, with ``{epochs}``, ``{half}`` (half the
    epochs), ``{lr}`` (the base lr) and ``{probe_lr}`` (10x the base lr) filled in."""

    description: str
    args: tuple[str, ...] = ()
    config: str | None = None  # a user's YAML composed after the base config
    from_probe: bool = False  # start from the weights of a linear probe of the same seed (LP-FT)


FEATURE_CACHE = '--trainer.callbacks+={{"class_path": "lightning_ft.callbacks.FeatureCache", "init_args": {{"share_dir": "{share}"}}}}'

NO_MIXING = ("--model.mixup_alpha=0.0", "--model.cutmix_alpha=0.0")  # cached features cannot be mixed
STRATEGIES: dict[str, Strategy] = {
    "linear_probe": Strategy(
        "backbone frozen (BatchNorm statistics too), a linear head on cached features, lr x10, no Mixup/CutMix",
        ("--model.freeze_backbone=true", "--model.lr={probe_lr}", "--model.weight_decay=0.0", *NO_MIXING, FEATURE_CACHE),
    ),
    "lp_ft": Strategy(
        "LP-FT (Kumar et al. 2022): the linear probe above (same seed, same epochs), then everything trains "
        "from its weights at the base lr for the base epochs",
        ("--model.freeze_backbone=false",), from_probe=True,
    ),
    "gradual": Strategy(
        "gradual unfreezing on a val/loss plateau (4 groups a step), layer decay 0.8",
        ('--trainer.callbacks+={{"class_path": "lightning_ft.callbacks.GradualUnfreezing", "init_args": '
         '{{"monitor": "val/loss", "patience": 1, "groups_per_step": 4, "verbose": false}}}}',
         "--model.layer_decay=0.8", *NO_MIXING, FEATURE_CACHE),
    ),
    "full": Strategy("everything trains from the start (the base config's recipe)", ("--model.freeze_backbone=false",)),
    "full_llrd": Strategy("everything trains, layer-wise lr decay 0.75",
                          ("--model.freeze_backbone=false", "--model.layer_decay=0.75")),
    "scratch": Strategy("the same model from random weights (no pretraining)",
                        ("--model.freeze_backbone=false", "--model.pretrained=null")),
}
BASELINE = "linear_probe"
QUICK_ARGS = ("--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2")


@dataclass
class RunSpec:
    """One run: a strategy at a seed, its full CLI arguments and folder."""

    strategy: str
    seed: int
    args: list[str]
    run_dir: str
    shift: dict[str, Any] | None = None
    analysis_samples: int = 1000
    threads: int | None = None
    probe: RunSpec | None = None  # LP-FT: the linear probe whose weights this run starts from
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            # the configs' contents too: an edited YAML must not reuse the runs of the old one
            contents = [hashlib.sha1(Path(f).read_bytes()).hexdigest() for f in _files_in(self.args)]
            parts = [self.args, self.shift, self.analysis_samples, contents] + ([self.probe.key] if self.probe else [])
            blob = json.dumps(parts, sort_keys=True)
            self.key = hashlib.sha1(blob.encode()).hexdigest()[:16]


def _files_in(args: Sequence[str]) -> list[str]:
    """The files the arguments name: ``--config PATH`` and ``--key=PATH`` values that are files (configs)."""
    files = []
    for prev, arg in zip(["", *args], args):
        value = arg if prev == "--config" else arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else None
        if value and not value.startswith(("{", "[")) and Path(value).is_file():
            files.append(value)
    return files


# ------------------------------------------------------------------ planning
def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def _config_value(configs: Sequence[str], extra: Sequence[str], dotted: str) -> Any:
    """The value of ``section.key`` after the configs (in order) and ``--section.key=value`` overrides."""
    value = None
    for path in configs:
        node: Any = _load_yaml(path)
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            value = node
    for arg in extra:
        if arg.startswith(f"--{dotted}="):
            import yaml

            value = yaml.safe_load(arg.split("=", 1)[1])
    return value


def _parse_strategies(names: Sequence[str]) -> dict[str, Strategy]:
    out: dict[str, Strategy] = {}
    for name in names:
        if "=" in name:
            label, path = name.split("=", 1)
            if not Path(path).is_file():
                raise ValueError(f"Strategy {label!r}: {path} is not a file. Give name=path/to/overlay.yaml.")
            out[label] = Strategy(f"your config {path}", (), config=path)
        elif name in STRATEGIES:
            out[name] = STRATEGIES[name]
        else:
            raise ValueError(
                f"Unknown strategy {name!r}. Built in: {', '.join(STRATEGIES)}; or give your own as name=path.yaml "
                "(a config composed after the base config)."
            )
    return out


def plan_runs(configs: Sequence[str], strategies: Sequence[str], seeds: Sequence[int], output: str | Path,
              extra: Sequence[str] = (), epochs: int | None = None, quick: bool = False,
              shift: dict[str, Any] | None = None, analysis_samples: int = 1000,
              threads: int | None = None) -> list[RunSpec]:
    """The runs of a comparison, in order (strategy-major), each with its full ``lightning-ft fit`` arguments.

    Checks what can be checked before anything runs: the configs exist, the strategies are known,
    the seeds are distinct and the number of epochs is known (``--epochs`` or ``trainer.max_epochs``).
    """
    if not configs:
        raise ValueError("Give the base config: lightning-ft compare --config configs/my_run.yaml ...")
    for path in configs:
        if not Path(path).is_file():
            raise ValueError(f"--config {path}: no such file.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {list(seeds)}.")
    chosen = _parse_strategies(strategies)
    if quick:
        epochs = 2
    if epochs is None:
        epochs = _config_value(configs, extra, "trainer.max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError("The number of epochs is unknown: set trainer.max_epochs in the config or pass --epochs N.")
    lr = float(_config_value(configs, extra, "model.lr") or 1e-3)
    logger = _config_value(configs, extra, "trainer.logger")
    logger_class = str(logger.get("class_path", "")) if isinstance(logger, dict) else ""
    output = Path(output).resolve()
    fill = {"epochs": epochs, "half": max(1, epochs // 2), "lr": lr, "probe_lr": 10 * lr,
            "share": str(output / "feature_tables")}
    specs = []
    for name, strategy in chosen.items():
        for seed in seeds:
            run_dir = output / "runs" / name / f"seed{seed}"
            probe = None
            if strategy.from_probe:  # its own probe run (the same arguments as linear_probe's: shared tables)
                probe = _spec("linear_probe", STRATEGIES["linear_probe"], seed, run_dir / "probe", configs, extra,
                              fill, epochs, quick, logger_class, output, shift, analysis_samples, threads)
            specs.append(_spec(name, strategy, seed, run_dir, configs, extra, fill, epochs, quick, logger_class, output,
                               shift, analysis_samples, threads, probe))
    return specs


def _spec(name: str, strategy: Strategy, seed: int, run_dir: Path, configs: Sequence[str], extra: Sequence[str],
          fill: dict[str, Any], epochs: int, quick: bool, logger_class: str, output: Path,
          shift: dict[str, Any] | None, analysis_samples: int, threads: int | None,
          probe: RunSpec | None = None) -> RunSpec:
    """One run's full ``lightning-ft fit`` arguments and folder."""
    args = ["fit"]
    for path in configs:
        args += ["--config", str(Path(path).resolve())]
    if strategy.config:
        args += ["--config", str(Path(strategy.config).resolve())]
    args += list(extra)  # yours first: the strategy's own settings (probe lr, layer decay, ...) win
    args += [a.format(**fill) for a in strategy.args]
    args += [f"--seed_everything={seed}", f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={run_dir}",
             "--test_after_fit=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--trainer.devices=1"]  # one device per run (a DDP launcher would re-run this command); --jobs for more
    if logger_class:  # each run logs into its own folder (and is named after its strategy and seed on W&B)
        args.append(f"--trainer.logger.init_args.save_dir={run_dir}")
        if "Wandb" in logger_class:
            args += [f"--trainer.logger.init_args.name={name}-seed{seed}",
                     f"--trainer.logger.init_args.group={output.name}"]
    if quick:
        args += list(QUICK_ARGS)
    return RunSpec(name, seed, args, str(run_dir), shift, 64 if quick else analysis_samples, threads, probe)


# ------------------------------------------------------------------ one run
def _recorder() -> Any:
    from lightning.pytorch.callbacks import Callback

    class RunRecorder(Callback):
        """The weights as fit starts, and per epoch the train/val metrics and the trainable parameter count."""

        def __init__(self) -> None:
            self.initial: dict[str, Any] | None = None
            self.history: list[dict[str, float]] = []
            self._trainable = 0
            self._pending: dict[str, float] | None = None

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.initial = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._finish(trainer)
            self._trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            # the module logs its train metrics in its own on_train_epoch_end, which Lightning calls after the
            # callbacks': the row is completed at the next epoch's start (or at the end of fit)
            self._pending = {"epoch": trainer.current_epoch, "trainable": self._trainable}

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self._finish(trainer)

        def _finish(self, trainer: Any) -> None:
            row, self._pending = self._pending, None
            if row is None:
                return
            for k, v in trainer.callback_metrics.items():
                if k.split("/")[0] in ("train", "val") and getattr(v, "numel", lambda: 0)() == 1:
                    row[k] = float(v)
            self.history.append(row)

    return RunRecorder()


def _cli_with_recorder(args: list[str], recorder: Any, start_from: str | None = None) -> Any:
    from lightning_ft.cli import FineTuneCLI, run

    class CompareCLI(FineTuneCLI):
        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            self.trainer.callbacks.append(recorder)
            if start_from:  # LP-FT: the probe's weights (its backbone is the pretrained one, its head trained)
                import torch

                state = torch.load(start_from, map_location="cpu", weights_only=True)["state_dict"]
                self.model.load_state_dict(state)

    return run(args, cli_class=CompareCLI)


def _instantiate(spec: dict[str, Any]) -> Any:
    from lightning.pytorch.cli import instantiate_class

    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"--shift_data must be {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r}.")
    return instantiate_class((), spec)  # Lightning's own: class_path + init_args, as in a config


def _collect(model: Any, loader: Any, limit: int, features: bool = False) -> dict[str, np.ndarray]:
    """Logits, targets (and pooled backbone features) of up to ``limit`` samples of ``loader``'s dataset: a
    seeded random subset (splits are often ordered by class; the first rows would be a few classes)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from lightning_ft.batch import split_batch

    dataset = loader.dataset
    n_all = len(dataset)
    if n_all > limit:
        index = torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:limit].sort().values
        loader = DataLoader(Subset(dataset, index.tolist()), batch_size=loader.batch_size or 64,
                            collate_fn=loader.collate_fn)
    logits, targets, feats, inputs, n = [], [], [], [], 0
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch)
            if not isinstance(x, torch.Tensor) or getattr(model, "tasks", None):
                raise ValueError("the analysis (calibration, per-class metrics, features, layer change) reads one "
                                 "task on tensor inputs; this run has dict inputs or several tasks")
            x = x.to(model.device)
            pooled, out = model.forward_features(x)
            logits.append(out.float().cpu())
            targets.append(torch.as_tensor(y).cpu())
            if features:
                feats.append(pooled.float().cpu())
                inputs.append(x.cpu())
            n += len(y)
            if n >= limit:
                break
    out = {"logits": torch.cat(logits)[:limit].numpy(), "targets": torch.cat(targets)[:limit].numpy()}
    if features:
        out["features"] = torch.cat(feats)[:limit].numpy()
        out["inputs"] = torch.cat(inputs)[:limit]  # a tensor, for the pretrained model's pass (not saved)
    return out


def _first_loader(loaders: Any) -> Any:
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders


def _analyse(cli: Any, recorder: Any, spec: RunSpec, result: dict[str, Any], run_dir: Path) -> None:
    """Temperature scaling and calibration, per-class metrics, features and layer change of a finished run."""
    import torch

    from lightning_ft.analysis.calibration import calibration_errors, fit_temperature, reliability_bins
    from lightning_ft.analysis.layers import layer_cka, weight_change
    from lightning_ft.analysis.metrics import per_class_metrics

    model = cli.model.to(cli.trainer.strategy.root_device).eval()  # Lightning's teardown moved it to the CPU
    dm = cli.datamodule
    limit = spec.analysis_samples
    val = _collect(model, _first_loader(dm.val_dataloader()), limit)
    test = _collect(model, _first_loader(dm.test_dataloader()), limit, features=True)
    temperature = fit_temperature(torch.from_numpy(val["logits"]), torch.from_numpy(val["targets"]))
    t_logits, t_y = torch.from_numpy(test["logits"]), torch.from_numpy(test["targets"])
    before = calibration_errors(t_logits, t_y)
    after = calibration_errors(t_logits / temperature, t_y)
    result["calibration"] = {"temperature": temperature, "before": before, "after": after}
    result["per_class"] = per_class_metrics(t_logits, t_y, class_names=getattr(model, "class_names", None))
    pretrained = copy.deepcopy(model)
    pretrained.load_state_dict(recorder.initial)
    pretrained.eval()
    inputs = test.pop("inputs")
    batches = [inputs[i:i + 64].to(model.device) for i in range(0, len(inputs), 64)]
    with torch.no_grad():
        pre_feats = torch.cat([pretrained.forward_features(b)[0].float().cpu() for b in batches]).numpy()
    result["cka"] = layer_cka(pretrained, model, batches)
    result["weight_change"] = weight_change(model, recorder.initial)
    arrays = {"test_logits": test["logits"], "test_targets": test["targets"], "features_fine_tuned": test["features"],
              "features_pretrained": pre_feats, "val_logits": val["logits"], "val_targets": val["targets"]}
    rel_before = reliability_bins(t_logits.softmax(-1), t_y)
    rel_after = reliability_bins((t_logits / temperature).softmax(-1), t_y)
    for tag, bins in (("before", rel_before), ("after", rel_after)):
        for k, v in bins.items():
            arrays[f"reliability_{tag}_{k}"] = np.asarray(v)
    shift = getattr(cli, "_shift_loader", None)
    if shift is not None:
        s = _collect(model, shift, limit)
        arrays["shift_logits"], arrays["shift_targets"] = s["logits"], s["targets"]
    np.savez_compressed(run_dir / "analysis.npz", **arrays)


def _metrics(trainer: Any, prefix: str = "test/") -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Fit and test one run through the CLI, analyse it, write ``result.json``; a failure is returned, not raised."""
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"strategy": spec.strategy, "seed": spec.seed, "key": spec.key, "args": spec.args,
                              "run_dir": str(run_dir), "status": "failed"}
    start = time.perf_counter()
    log = open(run_dir / "log.txt", "w")
    handler = logging.StreamHandler(log)
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning_ft")]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    argv = sys.argv
    try:
        for lg in loggers:
            lg.handlers, lg.propagate = [handler], False
        sys.argv = ["lightning-ft"]
        start_from, probe_history = None, []
        if spec.probe is not None:
            probe = _reusable(spec.probe) or run_one(spec.probe)
            if probe.get("status") != "ok" or not probe.get("checkpoint"):
                raise RuntimeError(f"its linear probe (in {spec.probe.run_dir}) failed: {probe.get('error', 'no checkpoint')}")
            start_from, probe_history = probe["checkpoint"], probe["history"]
            result["probe_metrics"] = probe["metrics"]
        recorder = _recorder()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cli = _cli_with_recorder(spec.args, recorder, start_from)
                metrics = _metrics(cli.trainer)
                if "test/acc" not in metrics:
                    raise RuntimeError(f"the run logged no test/acc (logged: {sorted(cli.trainer.callback_metrics)})")
                result["metrics"] = metrics
                if spec.shift is not None:
                    try:
                        dm = _instantiate(spec.shift)
                        dm.trainer = cli.trainer  # it prepares inputs as the model's data config says
                        dm.setup("test")
                        cli._shift_loader = _first_loader(dm.test_dataloader())
                        shifted = cli.trainer.test(cli.model, dataloaders=cli._shift_loader, verbose=False)
                        result["metrics"].update({k.replace("test/", "shift/"): float(v)
                                                  for k, v in shifted[0].items() if k.startswith("test/")})
                    except Exception as error:  # the run's own metrics stand; the report says what failed
                        result["shift_error"] = f"{type(error).__name__}: {error}"[:1000]
                        cli._shift_loader = None
                        log.write(traceback.format_exc())
                callback = cli.trainer.checkpoint_callback
                result["checkpoint"] = getattr(callback, "best_model_path", "") or ""
                offset = len(probe_history)  # LP-FT: the probe's epochs first, then these
                result["history"] = probe_history + [{**row, "epoch": row["epoch"] + offset} for row in recorder.history]
                try:
                    _analyse(cli, recorder, spec, result, run_dir)
                except Exception as error:  # the run itself finished: its metrics stand, the plots skip it
                    result["analysis_error"] = f"{type(error).__name__}: {error}"[:1000]
                    log.write(traceback.format_exc())
        result["status"] = "ok"
    except BaseException as error:  # noqa: BLE001 -- a failed run is reported, and the others go on
        if isinstance(error, KeyboardInterrupt):
            raise
        result["error"] = f"{type(error).__name__}: {error}".strip()[:2000]
        log.write(traceback.format_exc())
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()  # Lightning's WandbLogger leaves its run open: the next run would log into it
        sys.argv = argv
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate
        log.close()
    result["seconds"] = round(time.perf_counter() - start, 2)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1, default=_json_default))
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _reusable(spec: RunSpec) -> dict[str, Any] | None:
    path = Path(spec.run_dir) / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    analysed = (Path(spec.run_dir) / "analysis.npz").is_file() or "analysis_error" in result
    if spec.strategy == "linear_probe" and result.get("checkpoint") and not Path(result["checkpoint"]).is_file():
        return None  # LP-FT starts from it
    ok = result.get("status") == "ok" and result.get("key") == spec.key and analysed
    return result if ok else None


# ------------------------------------------------------------------ all runs
def _progress(i: int, n: int, result: dict[str, Any], note: str = "") -> str:
    head = f"[{i}/{n}] {result['strategy']} seed {result['seed']}: "
    if result.get("status") != "ok":
        return head + f"FAILED after {result.get('seconds', 0):.0f} s: {result.get('error', '?')}"
    m = result["metrics"]
    shift = f", shift/acc {m['shift/acc']:.4f}" if "shift/acc" in m else ""
    took = note or f"{result.get('seconds', 0):.0f} s"
    return head + f"test/acc {m['test/acc']:.4f}{shift} ({took})"


def compare(specs: Sequence[RunSpec], output: str | Path, jobs: int = 1, echo: Any = print) -> list[dict[str, Any]]:
    """Run (or reuse) every run, printing a line per run; return the results in ``specs``' order."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    n = len(specs)
    results: dict[int, dict[str, Any]] = {}
    todo = []
    done = 0
    for i, spec in enumerate(specs):
        reused = _reusable(spec)
        if reused is not None:
            results[i] = reused
            done += 1
            echo(_progress(done, n, reused, "reused"))
        else:
            todo.append(i)
    if jobs <= 1:
        for i in todo:
            results[i] = run_one(specs[i])
            done += 1
            echo(_progress(done, n, results[i]))
    else:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // jobs)
        for i in todo:
            specs[i].threads = specs[i].threads or threads
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1) as pool:  # a fresh process per run: no state carries over
            futures = {pool.submit(run_one, specs[i]): i for i in todo}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as error:  # the worker process itself died
                    results[i] = {"strategy": specs[i].strategy, "seed": specs[i].seed, "status": "failed",
                                  "error": f"worker: {type(error).__name__}: {error}", "seconds": 0.0}
                done += 1
                echo(_progress(done, n, results[i]))
    return [results[i] for i in range(n)]


# ------------------------------------------------------------------ report
def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _summary_rows(results: list[dict[str, Any]], strategies: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    from lightning_ft.analysis.stats import paired_differences, summarize

    baseline = BASELINE if BASELINE in strategies else strategies[0]
    per = {s: {r["seed"]: r for r in results if r["strategy"] == s and r.get("status") == "ok"} for s in strategies}
    rows = []
    for s in strategies:
        runs = [r for r in results if r["strategy"] == s]
        row: dict[str, Any] = {"strategy": s, "runs": len(runs), "failed": sum(r.get("status") != "ok" for r in runs)}
        for metric in metrics:
            seeds = sorted(k for k, r in per[s].items() if metric in r["metrics"])
            values = [per[s][k]["metrics"][metric] for k in seeds]
            summary = summarize(values) if values else None
            row[f"{metric} mean"] = summary.mean if summary else float("nan")
            row[f"{metric} low"] = summary.low if summary else float("nan")
            row[f"{metric} high"] = summary.high if summary else float("nan")
            row[f"{metric} per seed"] = " ".join(f"{k}:{v:.4f}" for k, v in zip(seeds, values))
            if s != baseline:
                a = {k: r["metrics"][metric] for k, r in per[s].items() if metric in r["metrics"]}
                b = {k: r["metrics"][metric] for k, r in per[baseline].items() if metric in r["metrics"]}
                keys = sorted(set(a) | set(b))
                diff = paired_differences([a.get(k, float("nan")) for k in keys], [b.get(k, float("nan")) for k in keys],
                                          keys)
                row[f"{metric} vs {baseline}"] = diff.mean
                row[f"{metric} vs {baseline} low"] = diff.low
                row[f"{metric} vs {baseline} high"] = diff.high
        cal = [r["calibration"] for r in per[s].values() if "calibration" in r]
        for key, label in (("before", "ece"), ("after", "ece_ts")):
            vals = [c[key]["ece"] for c in cal]
            row[label] = float(np.mean(vals)) if vals else float("nan")
        temps = [c["temperature"] for c in cal]
        row["temperature"] = float(np.mean(temps)) if temps else float("nan")
        rows.append(row)
    return rows


def write_report(results: list[dict[str, Any]], output: str | Path, strategies: Sequence[str] | None = None,
                 wandb_project: str | None = None, echo: Any = print) -> dict[str, Path]:
    """Write the report folder from the runs' results (``result.json`` + ``analysis.npz``); return the files."""
    import torch

    from lightning_ft.analysis.metrics import confusion
    from lightning_ft.analysis.plots import (
        plot_confusion,
        plot_layer_change,
        plot_learning_curves,
        plot_projections,
        plot_reliability,
    )

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    strategies = list(strategies or dict.fromkeys(r["strategy"] for r in results))
    ok = [r for r in results if r.get("status") == "ok"]
    metrics = ["test/acc", "test/loss"] + (["shift/acc"] if any("shift/acc" in r["metrics"] for r in ok) else [])
    rows = _summary_rows(results, strategies, metrics)
    files: dict[str, Path] = {}

    # runs.csv: every run, failed ones with their error
    files["runs"] = output / "runs.csv"
    with open(files["runs"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "seed", "status", *metrics, "ece", "ece_ts", "temperature", "seconds", "error"])
        for r in results:
            m, c = r.get("metrics", {}), r.get("calibration", {})
            writer.writerow([r["strategy"], r["seed"], r.get("status"), *[m.get(k, "") for k in metrics],
                             c.get("before", {}).get("ece", ""), c.get("after", {}).get("ece", ""),
                             c.get("temperature", ""), r.get("seconds", ""), r.get("error", "")])
    files["results"] = output / "results.csv"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(files["results"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    files["per_class"] = output / "per_class.csv"
    with open(files["per_class"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "seed", "class", "precision", "recall", "f1", "auroc", "support"])
        for r in ok:
            for c in r.get("per_class", []):
                writer.writerow([r["strategy"], r["seed"], c.get("class"), c.get("precision"), c.get("recall"),
                                 c.get("f1"), c.get("auroc"), c.get("support")])

    # plots
    histories = {s: [r["history"] for r in ok if r["strategy"] == s] for s in strategies}
    histories = {s: h for s, h in histories.items() if h}
    marks = {s: _phase_marks(h[0]) for s, h in histories.items()}
    if histories:
        files["learning_curves"] = Path(plot_learning_curves(histories, output / "learning_curves.png", phase_marks=marks))
    analysed = [r for r in ok if "analysis_error" not in r and "cka" in r]
    layer_stats = {}
    for s in strategies:
        runs = [r for r in analysed if r["strategy"] == s]
        if runs:
            layer_stats[s] = {k: _mean_dicts([r[k] for r in runs]) for k in ("cka", "weight_change")}
    if layer_stats:
        files["layer_change"] = Path(plot_layer_change(layer_stats, output / "layer_change.png"))
    for s in strategies:
        runs = [r for r in analysed if r["strategy"] == s]
        if not runs:
            continue
        data = [np.load(Path(r.get("run_dir") or _run_dir(output, r)) / "analysis.npz") for r in runs]
        logits = np.concatenate([d["test_logits"] for d in data])
        targets = np.concatenate([d["test_targets"] for d in data])
        names = _class_names(runs[0], logits.shape[1])
        matrix = confusion(torch.from_numpy(logits), torch.from_numpy(targets), logits.shape[1])
        files[f"confusion_{s}"] = Path(plot_confusion(matrix, names, output / f"confusion_{s}.png",
                                                      title=f"{s}: test confusion ({len(runs)} seeds pooled)"))
        first = data[0]
        rel = {}
        for tag in ("before", "after"):
            rel[tag] = {k: first[f"reliability_{tag}_{k}"] for k in ("confidence", "accuracy", "count")}
            rel[tag]["ece"] = runs[0]["calibration"][tag]["ece"]
        files[f"reliability_{s}"] = Path(plot_reliability(rel["before"], rel["after"], output / f"reliability_{s}.png"))
        files[f"features_{s}"] = Path(plot_projections(
            {"pretrained": first["features_pretrained"], "fine-tuned": first["features_fine_tuned"]},
            first["test_targets"], output / f"features_{s}.png", class_names=names, seed=0))

    files["report"] = output / "report.md"
    files["report"].write_text(_markdown(rows, results, strategies, metrics, files, output))
    project = wandb_project
    if project:
        _log_wandb(project, files, rows, output, echo)
    return files


def _run_dir(output: Path, r: dict[str, Any]) -> Path:
    return output / "runs" / r["strategy"] / f"seed{r['seed']}"


def _class_names(result: dict[str, Any], n: int) -> list[str]:
    names = [c.get("class") for c in result.get("per_class", [])]
    return [str(x) for x in names] if len(names) == n else [str(i) for i in range(n)]


def _phase_marks(history: list[dict[str, float]]) -> list[int]:
    """Epochs at which more parameters trained than in the epoch before (a phase transition)."""
    return [int(b["epoch"]) for a, b in zip(history, history[1:]) if b.get("trainable", 0) > a.get("trainable", 0)]


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: float(np.nanmean([d.get(k, float("nan")) for d in dicts])) for k in keys}


def _markdown(rows: list[dict[str, Any]], results: list[dict[str, Any]], strategies: list[str], metrics: list[str],
              files: dict[str, Path], output: Path) -> str:
    baseline = BASELINE if BASELINE in strategies else strategies[0]
    seeds = sorted({r["seed"] for r in results})
    lines = ["# Fine-tuning strategies compared", "",
             f"{len(strategies)} strategies x {len(seeds)} seeds (seeds {', '.join(map(str, seeds))}). Mean over seeds "
             "with its 95% t-interval; the difference against "
             f"`{baseline}` is paired by seed (same data order and split). ECE on the test split before and after "
             "temperature scaling (T fitted on the validation logits).", ""]
    head = ["strategy", "runs (failed)"]
    for m in metrics:
        head.append(f"{m} (95% CI)")
        if m.endswith("acc"):
            head.append(f"{m} vs {baseline}")
    head += ["ECE", "ECE after T", "T"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['strategy']}`", f"{row['runs']} ({row['failed']})"]
        for m in metrics:
            cells.append(f"{_fmt(row[f'{m} mean'])} [{_fmt(row[f'{m} low'])}, {_fmt(row[f'{m} high'])}]")
            if m.endswith("acc"):
                if row["strategy"] == baseline:
                    cells.append("baseline")
                else:
                    d = row.get(f"{m} vs {baseline}", float("nan"))
                    cells.append(f"{_signed(d)} [{_signed(row.get(f'{m} vs {baseline} low'))}, "
                                 f"{_signed(row.get(f'{m} vs {baseline} high'))}]")
        cells += [_fmt(row["ece"]), _fmt(row["ece_ts"]), _fmt(row["temperature"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    unanalysed = [r for r in results if r.get("status") == "ok" and "analysis_error" in r]
    if unanalysed:
        lines += ["", "## Runs without analysis", "", "Their metrics are in the table; the plots leave them out.", ""]
        lines += [f"- `{r['strategy']}` seed {r['seed']}: {r['analysis_error']}" for r in unanalysed]
    unshifted = [r for r in results if r.get("status") == "ok" and "shift_error" in r]
    if unshifted:
        lines += ["", "## Runs not tested on the shifted set", ""]
        lines += [f"- `{r['strategy']}` seed {r['seed']}: {r['shift_error']}" for r in unshifted]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r['strategy']}` seed {r['seed']}: {r.get('error', '?')} (log: "
                  f"runs/{r['strategy']}/seed{r['seed']}/log.txt)" for r in failed]
    lines += ["", "## Strategies", ""]
    for s in strategies:
        desc = STRATEGIES[s].description if s in STRATEGIES else "your config"
        lines.append(f"- `{s}`: {desc}")
    lines += ["", "## Plots", ""]
    for key, path in files.items():
        if path.suffix == ".png":
            lines.append(f"![{key}]({path.relative_to(output)})")
    lines += ["", "Files: `results.csv` (this table), `runs.csv` (one row per run), `per_class.csv` (precision, "
              "recall, F1, one-vs-rest AUROC per class), `runs/<strategy>/seed<k>/` (checkpoints, logs, "
              "`result.json`).", ""]
    return "\n".join(lines)


def _signed(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}"


def _log_wandb(project: str, files: dict[str, Path], rows: list[dict[str, Any]], output: Path, echo: Any) -> None:
    try:
        import wandb
    except ImportError as error:
        raise ImportError("Logging the report to W&B needs wandb: pip install 'lightning_ft[wandb]'.") from error
    run = wandb.init(project=project, name=f"compare-{output.name}", job_type="compare", dir=str(output), reinit=True)
    try:
        media = {key: wandb.Image(str(path)) for key, path in files.items() if path.suffix == ".png"}
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        run.log({**media, "results": table})
    finally:
        run.finish()
    echo(f"W&B: report logged to project {project} (run {run.id})")


# ------------------------------------------------------------------ command line
def _wandb_project(configs: Sequence[str], extra: Sequence[str]) -> str | None:
    logger = _config_value(configs, extra, "trainer.logger")
    loggers = logger if isinstance(logger, list) else [logger]
    for entry in loggers:
        if isinstance(entry, dict) and "Wandb" in str(entry.get("class_path", "")):
            return (entry.get("init_args") or {}).get("project") or "lightning_ft"
    return None


def _shift_spec(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    import yaml

    spec = _load_yaml(value) if Path(value).is_file() else yaml.safe_load(value)
    if isinstance(spec, dict) and "data" in spec and "class_path" not in spec:
        spec = spec["data"]
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(
            "--shift_data takes a datamodule: a YAML file or JSON with class_path and init_args, e.g. "
            "'{\"class_path\": \"lightning_ft.data.DigitsDataModule\", \"init_args\": {\"mnist_frame\": true}}'."
        )
    return spec


def main(argv: list[str] | None = None) -> int:
    """``lightning-ft compare``: exit status 0 when every run finished, 1 when one failed (the report is written)."""
    parser = argparse.ArgumentParser(
        prog="lightning-ft compare",
        description="Run fine-tuning strategies over seeds on the data of a base config and write a report. "
                    "Other --section.key=value arguments go to every run.",
    )
    parser.add_argument("--config", action="append", required=True, help="base config(s), as for lightning-ft fit")
    parser.add_argument("--strategies", nargs="+", default=["linear_probe", "lp_ft", "full"],
                        help=f"built in: {', '.join(STRATEGIES)}; or name=path.yaml (default: linear_probe lp_ft full)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", default="reports/compare", help="the report folder (runs are kept under runs/)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the config's max_epochs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 2 batches per run: checks the pipeline")
    parser.add_argument("--shift_data", default=None, help="a datamodule whose test split is a shifted test set")
    parser.add_argument("--analysis_samples", type=int, default=1000, help="test samples analysed per run")
    parser.add_argument("--wandb_project", default=None,
                        help="log the report to this W&B project (default: the config's WandbLogger project, if any)")
    ns, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--") or "=" not in a]
    if bad:
        parser.error(f"unrecognised arguments {bad}: runs take overrides as --section.key=value")
    try:
        specs = plan_runs(ns.config, ns.strategies, ns.seeds, ns.output, extra, ns.epochs, ns.quick,
                          _shift_spec(ns.shift_data), ns.analysis_samples)
    except ValueError as error:
        parser.error(str(error))
    if ns.jobs < 1:
        parser.error("--jobs must be >= 1")
    if specs and specs[0].shift is not None:
        try:  # before any run trains: a wrong class path fails now, not after every fit
            _instantiate(specs[0].shift)
        except Exception as error:
            parser.error(f"--shift_data: {type(error).__name__}: {error}")
    print(f"compare: {len(specs)} runs ({', '.join(dict.fromkeys(s.strategy for s in specs))} x seeds "
          f"{' '.join(map(str, ns.seeds))}) -> {Path(ns.output).resolve()}", flush=True)
    results = compare(specs, ns.output, jobs=ns.jobs, echo=lambda line: print(line, flush=True))
    for spec, r in zip(specs, results):
        r.setdefault("run_dir", spec.run_dir)
    files = write_report(results, ns.output, list(dict.fromkeys(s.strategy for s in specs)),
                         wandb_project=ns.wandb_project or _wandb_project(ns.config, extra))
    print(f"report: {files['report']}")
    failed = sum(r.get("status") != "ok" for r in results)
    if failed:
        print(f"{failed} of {len(results)} runs FAILED (listed in the report)")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
