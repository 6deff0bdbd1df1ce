"""Gradual unfreezing, side by side: lightning_ft vs Lightning's BackboneFinetuning vs finetuning-scheduler.

Same model, data, seed, optimizer (AdamW), learning rate and schedule (linear warm-up then cosine,
per step) for every tool; the phases start at the same epochs:

    phase 0  epochs [0, E)    the head alone
    phase 1  epochs [E, 2E)   + the upper half of the layer groups (EfficientNet-Lite0 stages 4-6, conv_head)
    phase 2  epochs [2E, 3E)  everything

* ours:       ``FineTuneModule`` + ``lightning_ft.callbacks.GradualUnfreezing(milestones=...)`` with its
  defaults: the frozen BatchNorm statistics re-estimated once on the training inputs before the
  first step, then kept in eval mode (``frozen_bn="auto"``, i.e. ``"recalibrate"`` here): the
  baseline of every ratio and of every accuracy difference;
* ours_eval, ours_train_bn: the same with ``frozen_bn="eval"`` (frozen BatchNorm in eval mode with
  the pretrained statistics, the default before 2026-11-29) and ``frozen_bn="train"`` (frozen
  BatchNorm in train mode, statistics follow each batch, as finetuning-scheduler does); not run
  unless named in ``--tools``;
* lightning:  ``lightning.pytorch.callbacks.BackboneFinetuning`` has two phases only (head, then the
  whole ``pl_module.backbone``): its thaw is put at our last phase, so its phase 1 is still head-only;
* fts:        ``finetuning_scheduler.FinetuningScheduler`` with an explicit schedule (parameter names,
  ``epoch_transitions_only=True``, ``max_transition_epoch`` per phase). Skipped when not installed.

Each tool runs in its own subprocess (so the peak RSS is its own). Per phase it reports the mean
*training* epoch time -- from ``on_train_epoch_start`` to the last ``on_train_batch_end`` of the
epoch: Lightning runs validation after the last training batch and *before* ``on_train_epoch_end``,
so that hook would count validation -- the ratio to ours (their time / our time, measured in the
same command), the peak RSS during the phase's training batches (``VmHWM`` after resetting it through
``/proc/self/clear_refs`` at each epoch start; Linux only) and the process's ``ru_maxrss``, and the
final test accuracy. It also times a no-grad forward pass (``model.eval()``, ``torch.no_grad()``)
over the same training batches, E passes (the first one cold, as epoch 0 of a fit), and prints our
head-only epoch time divided by it (goal: <= 1.2).

With ``--seeds S [S ...]`` every tool runs once per seed (each run in its own subprocess); the seed
also sets the DigitsDataModule's train/val/test split, so each seed is a different split as well as
a different initialisation and batch order. The speed tables are those of the first seed; a last
table gives, per tool, the test accuracy over the seeds (mean ± standard deviation and each seed's
value) and its paired per-seed difference to ``ours`` (mean ± standard deviation).

If any run fails (its subprocess exits non-zero or writes no result), the tables still show what
the other runs measured, a ``FAILED`` line names the run and its error, and the exit status is 1.
finetuning-scheduler, when it is not installed, is skipped with a note (exit status 0).

    .venv/bin/python benchmarks/unfreezing.py            # full mode (the README numbers)
    .venv/bin/python benchmarks/unfreezing.py --quick    # a few batches, 1 epoch per phase (< 60 s)
    # frozen BatchNorm and accuracy (issue 11): the three frozen_bn modes and both other tools, 5 seeds
    .venv/bin/python benchmarks/unfreezing.py --tools ours,ours_eval,ours_train_bn,fts,lightning --seeds 0 1 2 3 4

Nothing is written into the repository: checkpoints, FTS schedule dumps and logs go to a temporary
directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

TOOLS = ("ours", "ours_eval", "ours_train_bn", "lightning", "fts")
DEFAULT_TOOLS = ("ours", "lightning", "fts")
FROZEN_BN = {"ours": "auto", "ours_eval": "eval", "ours_train_bn": "train"}  # GradualUnfreezing(frozen_bn=)
LABELS = {
    "ours": "lightning_ft GradualUnfreezing",
    "ours_eval": "lightning_ft GradualUnfreezing, frozen_bn='eval'",
    "ours_train_bn": "lightning_ft GradualUnfreezing, frozen_bn='train'",
    "lightning": "Lightning BackboneFinetuning",
    "fts": "finetuning-scheduler",
    "forward": "no-grad forward pass",
}
QUICK_BATCHES = 4  # --quick: training batches per epoch (and forward batches)
QUICK_EVAL_BATCHES = 2


# --------------------------------------------------------------------------------------- helpers
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0): writing 5 to clear_refs makes the high-water mark the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20  # KiB on Linux, bytes on macOS


def _cpu_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------- worker
# The steps of one run, in its own subprocess: torch, Lightning and lightning_ft are imported inside these
# functions, never in the parent, which only starts the runs and prints the tables.
def _worker(tool: str, args: argparse.Namespace, out_path: str, tmp: str) -> None:
    """Run one tool (or the no-grad forward baseline) and write its measurements as JSON."""
    _quiet_libraries()
    import lightning as L
    import torch

    result: dict[str, Any] = {"tool": tool, "torch_threads": torch.get_num_threads()}
    L.seed_everything(args.seed, workers=True, verbose=False)
    model = _build_model(tool, args)
    dm = _build_data(model, args.seed)
    phases = _phase_groups(model)
    result["phases"] = [[g.name for g in groups] for groups in phases]
    if tool == "forward":
        result.update(_time_forward(model, dm, args))
    else:
        result.update(_fit(tool, model, dm, phases, args, tmp))
        result["test_acc"] = _test_accuracy(model, dm, args, tmp)
    result["max_rss_mib"] = _max_rss_mib()
    with open(out_path, "w") as fh:
        json.dump(result, fh)


def _quiet_libraries() -> None:
    """No warnings, and only the errors of Lightning's and finetuning-scheduler's loggers: a short run log."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "finetuning_scheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _build_model(tool: str, args: argparse.Namespace) -> Any:
    """EfficientNet-Lite0 (pretrained, 1 band, 64 px) with AdamW, warm-up + cosine per step and no layer decay.

    Ours (and the forward baseline) get a plain ``FineTuneModule``; BackboneFinetuning and FTS get one whose
    optimizer holds the head only, as they expect, and for BackboneFinetuning a scheduler that follows the
    param group it adds.
    """
    from lightning_ft import FineTuneModule

    model_kwargs = dict(
        backbone="tf_efficientnet_lite0", pretrained="efficientnet_lite0", num_classes=10, in_chans=1, img_size=64,
        lr=args.lr, weight_decay=args.weight_decay, layer_decay=None, warmup=0.1, min_lr_ratio=0.01,
    )
    if tool in (*FROZEN_BN, "forward"):
        return FineTuneModule(**model_kwargs)
    model = _head_optimizer_module()(**model_kwargs)
    if tool == "lightning":
        model.scheduler_cls = _growing_lambda_lr()
    return model


def _head_optimizer_module() -> type:
    """The class ``HeadOptimizerModule`` (defined here: torch and lightning_ft are imported in the worker only)."""
    import torch

    from lightning_ft import FineTuneModule
    from lightning_ft.optim import WarmupCosine

    class HeadOptimizerModule(FineTuneModule):
        """FineTuneModule whose optimizer holds the head only (what BackboneFinetuning and FTS expect:
        they add param groups for what they thaw), with the same AdamW, lr and warm-up + cosine schedule."""

        scheduler_cls: type = torch.optim.lr_scheduler.LambdaLR

        def configure_optimizers(self) -> dict[str, Any]:
            hp = self.hparams
            optimizer = torch.optim.AdamW(self.head.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
            total = int(self.trainer.estimated_stepping_batches)
            schedule = WarmupCosine(total, int(hp.warmup * total), hp.min_lr_ratio)
            scheduler = self.scheduler_cls(optimizer, schedule)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return HeadOptimizerModule


def _growing_lambda_lr() -> type:
    """The class ``GrowingLambdaLR`` (defined here: torch is imported in the worker only)."""
    import torch

    class GrowingLambdaLR(torch.optim.lr_scheduler.LambdaLR):
        """LambdaLR that gives param groups added later the first group's base lr and lambda.

        Plain LambdaLR raises ``ValueError: zip() argument 2 is shorter than argument 1`` at the first
        step after BackboneFinetuning adds the backbone's group; this is the workaround a user needs."""

        def get_lr(self) -> list[float]:
            missing = len(self.optimizer.param_groups) - len(self.base_lrs)
            if missing > 0:
                self.base_lrs = list(self.base_lrs) + [self.base_lrs[0]] * missing
                self.lr_lambdas = list(self.lr_lambdas) + [self.lr_lambdas[0]] * missing
            return super().get_lr()

    return GrowingLambdaLR


def _build_data(model: Any, seed: int) -> Any:
    """The digits, prepared as the model expects (size, band, mean/std), split by ``seed``, 32 a batch."""
    from lightning_ft.data import DigitsDataModule

    cfg = model.data_config
    return DigitsDataModule(
        batch_size=32, image_size=cfg["input_size"][-1], channels=cfg["input_size"][0],
        mean=cfg["mean"], std=cfg["std"], seed=seed,
    )


def _phase_groups(model: Any) -> list[list[Any]]:
    """The layer groups each phase adds, from lightning_ft's depth map (stem ... head): the head, then the
    upper half of the groups, then the rest."""
    from lightning_ft import layer_groups

    groups = layer_groups(model)
    head, body = groups[-1], groups[:-1]
    top = body[len(groups) - len(groups) // 2:]
    rest = [g for g in body if g not in top]
    return [[head], top, rest]


def _quick_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The Trainer's batch limits in --quick mode (none otherwise)."""
    if not args.quick:
        return {}
    return dict(limit_train_batches=QUICK_BATCHES, limit_val_batches=QUICK_EVAL_BATCHES,
                limit_test_batches=QUICK_EVAL_BATCHES)


def _time_forward(model: Any, dm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The no-grad forward baseline: E passes (the first cold, as the E epochs of phase 0) of ``model.eval()``
    under ``torch.no_grad()`` over the training batches, each timed, and the peak RSS meanwhile."""
    import torch

    dm.setup("fit")
    loader = dm.train_dataloader()
    n = QUICK_BATCHES if args.quick else len(loader)
    model.eval()
    passes = []
    _reset_peak_rss()
    with torch.no_grad():
        for _ in range(args.epochs_per_phase):
            t0 = time.perf_counter()
            for i, (x, _y) in enumerate(loader):
                if i >= n:
                    break
                model(x)
            passes.append(time.perf_counter() - t0)
    return dict(passes_s=passes, batches=n, peak_rss_mib=(_proc_status_kib("VmHWM") or 0) / 1024.0)


def _fit(tool: str, model: Any, dm: Any, phases: list[list[Any]], args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """Train the three phases with the tool's callbacks: the RSS before the fit, the fit's time, and each epoch's
    measurements (:func:`_phase_timer`)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    timer = _phase_timer(args.epochs_per_phase)
    callbacks = [timer, *_tool_callbacks(tool, phases, args, tmp)]  # first: its epoch start runs before any transition
    checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)  # FTS brings one: it requires one
    trainer = L.Trainer(
        callbacks=callbacks, accelerator="cpu", devices=1, max_epochs=3 * args.epochs_per_phase, logger=False,
        enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp, log_every_n_steps=50, **_quick_limits(args),
    )
    result: dict[str, Any] = {"rss_before_fit_mib": (_proc_status_kib("VmRSS") or 0) / 1024.0}
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    result["fit_s"] = time.perf_counter() - t0
    result["epochs"] = timer.epochs
    result["epochs_run"] = trainer.current_epoch
    return result


def _tool_callbacks(tool: str, phases: list[list[Any]], args: argparse.Namespace, tmp: str) -> list[Any]:
    """The tool's callbacks for the same three phases, starting at epochs 0, E and 2E."""
    E = args.epochs_per_phase
    head, top, rest = phases
    if tool in FROZEN_BN:
        from lightning_ft.callbacks import GradualUnfreezing

        return [GradualUnfreezing(monitor=None, milestones={E: [g.name for g in top], 2 * E: "all"},
                                  frozen_bn=FROZEN_BN[tool], verbose=False)]
    if tool == "lightning":
        from lightning.pytorch.callbacks import BackboneFinetuning

        # backbone lr at the thaw = the head's current lr (ratio 1.0), aligned with it afterwards
        return [BackboneFinetuning(unfreeze_backbone_at_epoch=2 * E, backbone_initial_ratio_lr=1.0, should_align=True)]
    if tool == "fts":
        from finetuning_scheduler import FinetuningScheduler, FTSCheckpoint

        names = lambda gs: [n for g in gs for n in g.param_names]  # noqa: E731
        schedule = {
            0: {"params": names(head), "max_transition_epoch": E},
            1: {"params": names(top), "max_transition_epoch": 2 * E, "lr": args.lr},
            2: {"params": names(rest), "max_transition_epoch": 3 * E, "lr": args.lr},
        }
        return [
            FinetuningScheduler(
                ft_schedule=schedule, epoch_transitions_only=True, restore_best=False, apply_lambdas_new_pgs=True,
                log_dir=tmp, logging_level=logging.ERROR,
            ),
            FTSCheckpoint(monitor="val/loss", save_top_k=0, dirpath=os.path.join(tmp, "ckpt")),  # FTS requires one
        ]
    raise ValueError(f"unknown tool {tool!r}")


def _phase_timer(epochs_per_phase: int) -> Any:
    """A callback that records, per training epoch, its training time (epoch start -> last training batch end:
    no validation), the time inside the batches, the peak RSS during its batches, and what it trains."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class PhaseTimer(Callback):
        """Training time per epoch (epoch start -> last training batch end: no validation) and peak RSS."""

        def __init__(self) -> None:
            self.epochs: list[dict[str, Any]] = []
            self.hwm_ok = True

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.hwm_ok = _reset_peak_rss() and self.hwm_ok
            self._batches = 0
            self._batch_time = 0.0
            self._peak_kib = 0
            self._t0 = self._last = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._tb = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            self._batch_time += now - self._tb
            self._last = now
            self._batches += 1
            self._peak_kib = max(self._peak_kib, _proc_status_kib("VmHWM") or 0)

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            params = list(pl_module.parameters())
            self.epochs.append(
                {
                    "epoch": trainer.current_epoch,
                    "phase": trainer.current_epoch // epochs_per_phase,
                    "train_s": self._last - self._t0,
                    "batches_s": self._batch_time,
                    "batches": self._batches,
                    "peak_rss_mib": self._peak_kib / 1024.0 if self.hwm_ok else None,
                    "requires_grad": sum(p.numel() for p in params if p.requires_grad),
                    "optimized": sum(p.numel() for p in params if p.requires_grad and id(p) in in_opt),
                    "param_groups": sum(len(opt.param_groups) for opt in trainer.optimizers),
                    "lr_last_group": float(trainer.optimizers[0].param_groups[-1]["lr"]),
                }
            )

    return PhaseTimer()


def _test_accuracy(model: Any, dm: Any, args: argparse.Namespace, tmp: str) -> float:
    """The trained model's accuracy on the test split (its first QUICK_EVAL_BATCHES batches in --quick mode)."""
    import lightning as L

    tester = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp,
        **({"limit_test_batches": QUICK_EVAL_BATCHES} if args.quick else {}),
    )
    metrics = tester.test(model, datamodule=dm, verbose=False)
    return float(metrics[0]["test/acc"])


# ---------------------------------------------------------------------------------------- parent
def _run_worker(tool: str, seed: int, args: argparse.Namespace, tmp: str) -> tuple[dict[str, Any] | None, str]:
    """Run one tool for one seed in its own subprocess: (its measurements, "") or (None, why it failed)."""
    name = f"{tool}-seed{seed}"
    out = os.path.join(tmp, f"{name}.json")
    log = os.path.join(tmp, f"{name}.log")
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", tool, "--out", out, "--tmp", os.path.join(tmp, name),
        "--seed", str(seed), "--epochs-per-phase", str(args.epochs_per_phase), "--lr", str(args.lr),
        "--weight-decay", str(args.weight_decay),
    ] + (["--quick"] if args.quick else [])
    os.makedirs(os.path.join(tmp, name), exist_ok=True)
    busy0, kids0 = _cpu_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=os.path.join(tmp, name))
    wall = time.perf_counter() - t0
    busy1, kids1 = _cpu_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU the rest of the machine used meanwhile (cores, averaged over the run): contention check
    others = None
    if busy0 is not None and busy1 is not None:
        mine = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        others = max(0.0, (busy1 - busy0) - mine) / wall
    if proc.returncode != 0 or not os.path.exists(out):
        with open(log) as fh:
            lines = fh.read().strip().splitlines()
        errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
        reason = errors[-1] if errors else (lines[-1] if lines else "no output")
        if proc.returncode == 0:
            reason = f"no result written; {reason}"
        tail = "\n".join("    " + ln for ln in lines[-15:])
        return None, f"exit {proc.returncode}: {reason}\n{tail}"
    with open(out) as fh:
        data = json.load(fh)
    data["process_s"] = wall
    data["others_cores"] = others
    return data, ""


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _phase_stats(data: dict[str, Any], phase: int) -> dict[str, Any]:
    eps = [e for e in data["epochs"] if e["phase"] == phase]
    if not eps:
        return {}
    peaks = [e["peak_rss_mib"] for e in eps if e["peak_rss_mib"] is not None]
    return {
        "mean_s": sum(e["train_s"] for e in eps) / len(eps),
        "last_s": eps[-1]["train_s"],
        "per_epoch": [e["train_s"] for e in eps],
        "peak_rss": max(peaks) if peaks else None,
        "requires_grad": eps[-1]["requires_grad"],
        "optimized": eps[-1]["optimized"],
        "groups": eps[-1]["param_groups"],
    }


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(values: list[float], unit: str = "") -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f}{unit} ± {_fmt(std, '.1f')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_BATCHES} batches per epoch, 1 epoch per phase (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run every tool once per seed (default: just --seed); the speed tables are the first "
                             "seed's; the seed also sets the data split")
    parser.add_argument("--epochs-per-phase", type=int, default=None, help="E (default: 2; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr, every tool and every phase")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="AdamW weight decay (default 0: BackboneFinetuning cannot spare biases/norms, so all tools match)")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                        help="comma-separated subset of " + ",".join(TOOLS) + " (ours always runs: the baseline)")
    parser.add_argument("--no-forward", action="store_true",
                        help="skip the no-grad forward reference run (its table); for quick checks of the others")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs_per_phase is None:
        args.epochs_per_phase = 1 if args.quick else 2
    if args.epochs_per_phase < 1:
        parser.error("--epochs-per-phase must be >= 1")

    if args.worker:
        _worker(args.worker, args, args.out, args.tmp)
        return 0

    import importlib.util

    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else [args.seed]))  # in order, no repeats
    tools = list(dict.fromkeys(t.strip() for t in args.tools.split(",") if t.strip()))
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
    if "ours" in tools:
        tools.remove("ours")
    tools.insert(0, "ours")  # the baseline of every ratio and accuracy difference, first
    notes: list[str] = []
    if "fts" in tools and importlib.util.find_spec("finetuning_scheduler") is None:
        tools.remove("fts")
        notes.append("finetuning-scheduler is not installed: skipped (pip install finetuning-scheduler).")

    E = args.epochs_per_phase
    seed0 = seeds[0]
    start = datetime.datetime.now().astimezone()
    print(f"# Gradual unfreezing benchmark ({'quick' if args.quick else 'full'} mode), {start:%Y-%m-%d %H:%M %Z}")
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}, load average before: {_loadavg()}")
    print("model: tf_efficientnet_lite0 (pretrained efficientnet_lite0), in_chans=1, 64 px; "
          f"DigitsDataModule(batch_size=32, seed={seed0 if len(seeds) == 1 else '<the run seed>'})")
    print(f"optimizer: AdamW lr={args.lr} weight_decay={args.weight_decay}, warm-up 10% + cosine per step; "
          f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
          f"{E} epoch(s) per phase, 3 phases" + (f"; {QUICK_BATCHES} train batches per epoch" if args.quick else ""))
    print("each seed sets the initialisation, the batch order and the data split (DigitsDataModule(seed=...)): "
          "every seed is also a different train/val/test split; "
          + (f"the speed tables are seed {seed0}'s." if len(seeds) > 1 else "one seed."))
    print(f"tools: {', '.join(tools)}")
    print(f"phases: 0 = head, epochs [0, {E}); 1 = + upper half of the layer groups, [{E}, {2 * E}); 2 = all, [{2 * E}, {3 * E})")
    if "lightning" in tools:
        print("Lightning's BackboneFinetuning has two phases (head, whole backbone): its thaw is put at our phase 2, "
              "so in its phase 1 only the head is optimized.")
    sys.stdout.flush()

    tmp = tempfile.mkdtemp(prefix="lft_bench_unfreezing_")
    runs: dict[int, dict[str, dict[str, Any]]] = {seed: {} for seed in seeds}  # seed -> tool -> measurements
    failed: list[str] = []
    try:
        # the no-grad forward baseline once (speed only), with the first seed
        reference = [] if args.no_forward else [(seed0, "forward")]
        for seed, tool in [(seed, tool) for seed in seeds for tool in tools] + reference:
            data, error = _run_worker(tool, seed, args, tmp)
            if data is None:
                first, _, tail = error.partition("\n")
                failed.append(f"{tool} seed {seed} ({LABELS[tool]}): {first}")
                print(f"[{tool} seed {seed}] FAILED: {LABELS[tool]}: {first}\n{tail}", flush=True)
                continue
            runs[seed][tool] = data
            busy = data["others_cores"]
            print(f"[{tool} seed {seed}] done in {data['process_s']:.1f} s"
                  + (f", test accuracy {100 * data['test_acc']:.1f}%" if "test_acc" in data else "")
                  + f"; other processes used {_fmt(busy)} cores meanwhile, load average {_loadavg()}", flush=True)
            if seed == seed0 and busy is not None and busy > 0.25:
                notes.append(f"{tool}: other processes used {busy:.2f} of {os.cpu_count()} cores during its run: "
                             "its timings are taken under load (CPU contention inflates them many-fold).")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = runs[seed0]
    if "ours" in results:
        _speed_tables(results, tools, notes, seed0, len(seeds) > 1)
    else:
        print(f"\nOur run (seed {seed0}) failed: no speed tables and no ratios.")
    _accuracy_table(runs, tools, seeds)

    print("\nnotes:")
    if "ours" in results:
        print("- ours re-estimates the frozen BatchNorm statistics in on_train_start, over the whole training set "
              "(also in --quick mode): counted in its fit time, not in its epoch times.")
    if "ours_eval" in results:
        print("- ours_eval keeps the pretrained statistics of the frozen BatchNorm (eval mode throughout).")
    if "ours_train_bn" in results:
        print("- ours_train_bn keeps frozen BatchNorm in train mode: its running statistics follow the batches, "
              "as fts's do (its weights stay frozen).")
    if "lightning" in results:
        print("- lightning: the module's optimizer holds the head only (BackboneFinetuning adds the backbone's group at the thaw); "
              "its LambdaLR is extended to the added group (a plain LambdaLR raises ValueError at the first step after the thaw); "
              "backbone lr at the thaw = the head's current lr. BackboneFinetuning.freeze_before_training keeps BatchNorm "
              "parameters trainable and in train mode while the backbone is 'frozen', so its head-only phases backpropagate "
              "through the whole backbone (params requiring grad above vs optimized in brackets).")
    if "fts" in results:
        print("- fts: explicit schedule over the same parameter names, epoch_transitions_only=True, restore_best=False, "
              "apply_lambdas_new_pgs=True, FTSCheckpoint(save_top_k=0); its frozen BatchNorm layers stay in train mode "
              "(running statistics keep moving); ours re-estimates the frozen BatchNorm statistics once, then keeps them in eval mode.")
    for n in notes:
        print("- " + n)
    print(f"load average after: {_loadavg()}; total {time.perf_counter() - _T0:.0f} s")
    if failed:
        print(f"\nFAILED: {len(failed)} run(s) of {len(seeds) * len(tools) + 1}:")
        for f in failed:
            print(f"FAILED: {f}")
        return 1
    return 0


def _speed_tables(results: dict[str, dict[str, Any]], tools: list[str], notes: list[str], seed: int,
                  several: bool) -> None:
    """The per-epoch times, the per-phase and whole-run tables and the no-grad forward comparison of one seed."""
    phases = results["ours"]["phases"]
    print(f"\nphase 1 groups ({len(phases[1])}): {', '.join(phases[1])}")
    print(f"phase 2 adds ({len(phases[2])}): {', '.join(phases[2])}")
    if several:
        print(f"\nspeed: seed {seed}")

    # per-epoch detail
    print("\nper-epoch training time (s, epoch start -> last training batch end, no validation):")
    width = max(len(t) for t in tools)
    for tool in tools:
        if tool in results:
            eps = results[tool]["epochs"]
            print(f"  {tool:{width}s} " + "  ".join(f"e{e['epoch']}:{e['train_s']:.2f}" for e in eps))

    stats = {t: [_phase_stats(results[t], p) for p in range(3)] for t in tools if t in results}
    ours = stats["ours"]
    # the same phases? (BackboneFinetuning: only its last phase can match ours)
    for tool in tools:
        if tool == "ours" or tool not in stats:
            continue
        compared = [2] if tool == "lightning" else [0, 1, 2]
        bad = [p for p in compared if stats[tool][p] and ours[p] and stats[tool][p]["optimized"] != ours[p]["optimized"]]
        if bad:
            notes.append(f"{tool}: the optimized parameter counts differ from ours in phase(s) {bad}: the phases do not match.")
    names = {0: "0 head", 1: "1 +upper half", 2: "2 all"}

    print("\n## Per phase\n")
    print("| phase | tool | trainable params (optimized) | mean train epoch (s) | ratio to ours | peak RSS in phase (MiB) |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for p in range(3):
        for tool in tools:
            if tool not in stats or not stats[tool][p]:
                continue
            s = stats[tool][p]
            ratio = s["mean_s"] / ours[p]["mean_s"] if ours[p] else None
            label = LABELS[tool] + (" (head only: no partial phase)" if tool == "lightning" and p == 1 else "")
            params = f"{s['requires_grad']:,}" + (f" ({s['optimized']:,})" if s["optimized"] != s["requires_grad"] else "")
            print(f"| {names[p]} | {label} | {params} | {s['mean_s']:.2f} | {_fmt(ratio)} | {_fmt(s['peak_rss'], '.0f')} |")

    print("\n## Whole run\n")
    print("| tool | fit (s) | sum of train epochs (s) | ratio to ours | max RSS (MiB) | test accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    our_sum = sum(e["train_s"] for e in results["ours"]["epochs"])
    for tool in tools:
        if tool not in results:
            continue
        r = results[tool]
        total = sum(e["train_s"] for e in r["epochs"])
        print(f"| {LABELS[tool]} | {r['fit_s']:.1f} | {total:.1f} | {total / our_sum:.2f} | {r['max_rss_mib']:.0f} | {100 * r['test_acc']:.1f}% |")

    if "forward" in results:
        fw = results["forward"]
        f_mean = sum(fw["passes_s"]) / len(fw["passes_s"])
        head_eps = [e["train_s"] for e in results["ours"]["epochs"] if e["phase"] == 0]
        ratio = ours[0]["mean_s"] / f_mean
        warm = head_eps[-1] / fw["passes_s"][-1]
        print("\n## Head-only training vs a no-grad forward pass\n")
        print(f"no-grad forward over the same {fw['batches']} training batches (model.eval(), torch.no_grad()), "
              f"{len(fw['passes_s'])} pass(es): " + ", ".join(f"{t:.2f} s" for t in fw["passes_s"])
              + f"; peak RSS {fw['peak_rss_mib']:.0f} MiB")
        print("| measure | ours head-only epoch (s) | no-grad forward (s) | ratio | goal |")
        print("| --- | ---: | ---: | ---: | --- |")
        print(f"| mean over phase 0 (first epoch cold) | {ours[0]['mean_s']:.2f} | {f_mean:.2f} | {ratio:.2f} | <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'} |")
        if len(head_eps) > 1:
            print(f"| last (warm) epoch vs last pass | {head_eps[-1]:.2f} | {fw['passes_s'][-1]:.2f} | {warm:.2f} | <= 1.2: {'met' if warm <= 1.2 else 'NOT met'} |")


def _accuracy_table(runs: dict[int, dict[str, dict[str, Any]]], tools: list[str], seeds: list[int]) -> None:
    """Per tool: test accuracy over the seeds, and the paired per-seed difference to ours."""
    print(f"\n## Test accuracy over seeds ({', '.join(map(str, seeds))}; each seed is also a different data split)\n")
    print("| tool | seeds | test accuracy (mean ± std, %) | per seed (%) | paired difference to ours (mean ± std, points) |")
    print("| --- | ---: | ---: | --- | ---: |")
    for tool in tools:
        accs = {seed: 100 * runs[seed][tool]["test_acc"] for seed in seeds if tool in runs[seed]}
        if not accs:
            print(f"| {LABELS[tool]} | 0 | n/a | n/a | n/a |")
            continue
        per_seed = ", ".join(f"{seed}: {_fmt(accs.get(seed), '.1f')}" for seed in seeds)
        if tool == "ours":
            diff = "baseline"
        else:
            paired = [accs[seed] - 100 * runs[seed]["ours"]["test_acc"] for seed in accs if "ours" in runs[seed]]
            diff = (f"{statistics.mean(paired):+.1f} ± {_fmt(_mean_std(paired)[1], '.1f')} ({len(paired)} seed"
                    f"{'s' if len(paired) > 1 else ''})") if paired else "n/a"
        print(f"| {LABELS[tool]} | {len(accs)} | {_pm(list(accs.values()))} | {per_seed} | {diff} |")


_T0 = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
