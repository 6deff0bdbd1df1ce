"""TemperatureScaling: calibrate a classifier's probabilities on the validation set, every validation.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T > 0`` fitted to minimise
the validation NLL: predictions (and accuracy) do not change, confidences do. This callback does it
on any LightningModule whose ``forward`` returns logits ``(B, C)`` and whose steps call ``self(x)``
(FineTuneModule, and the usual user module):

* **Validation** (the first validation loader; not the sanity check): a forward hook on the
  LightningModule catches the logits of each batch, ``on_validation_batch_end`` pairs them with the
  batch's targets (:func:`lightning_ft.batch.split_batch`; :data:`~lightning_ft.batch.MISSING` rows
  are left out). The forward must run exactly once per validation step. Under DDP the rows of all
  ranks are gathered, so every rank fits the same ``T``.
* **End of each validation epoch** (``on_validation_epoch_end``, which Lightning runs before
  ``on_validation_end``, where ``ModelCheckpoint`` saves): ``T`` is fitted on these logits
  (:func:`lightning_ft.analysis.calibration.fit_temperature`) and ``val/ece_uncalibrated``
  (before), ``val/ece_calibrated`` (after) and ``val/temperature`` are logged. So the ``T`` a checkpoint holds
  was fitted on that checkpoint's weights, the best epoch's included; after ``fit`` it is the last
  validation's. Validation itself is never scaled (``val/loss`` is the model's own).
* **Checkpoint**: ``T`` is this callback's state (python floats: loads with ``weights_only=True``).
  Lightning restores callback states for ``test``/``predict``/``validate`` with ``ckpt_path`` too, so
  ``trainer.test(model, ckpt_path=...)`` in a new Trainer with this callback uses the checkpoint's ``T``.
* **Test and predict**: the hook returns ``logits / T`` instead of the logits, so ``test/acc`` is
  unchanged while ``test/loss`` and predicted probabilities are calibrated; ``test/ece_calibrated``,
  ``test/ece_uncalibrated`` and ``test/temperature`` are logged at the end of the test epoch (the
  first test loader). Without a fitted ``T`` (no validation ran, or the checkpoint has none) they
  run with ``T = 1`` and a warning.

The names say ``_uncalibrated``/``_calibrated`` because ``val/ece`` and ``test/ece`` are a module's own
(FineTuneModule logs them from the logits its steps see: unscaled in validation, scaled in test, so
they equal ``val/ece_uncalibrated`` and ``test/ece_calibrated``); ECE is torchmetrics' top-label L1
calibration error over ``n_bins`` equal-width bins (:func:`lightning_ft.analysis.calibration.calibration_errors`).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_ft.analysis.calibration import _looks_like_probabilities, calibration_errors, fit_temperature
from lightning_ft.batch import MISSING, split_batch

__all__ = ["TemperatureScaling"]

_COLLECT, _CHECK, _SCALE = "collect", "check", "scale"  # what the hook does in the current stage


class TemperatureScaling(Callback):
    """Fit a softmax temperature on the validation logits at every validation; divide the logits by it in
    test and predict; keep it in the checkpoint.

    ``temperature`` is the ``T`` in use (``None`` before the first fit), ``fitted_epoch`` and
    ``fitted_step`` where it was fitted, ``history`` one record per fit of this run
    (``epoch``, ``step``, ``temperature``, ``ece``, ``ece_calibrated``, ``rows``).

    Args:
        n_bins: equal-width confidence bins of the logged calibration errors (ECE).
        max_iter: LBFGS iterations of the temperature fit.
        verbose: print ``T`` and the validation ECE before and after at each fit (rank 0).
    """

    def __init__(self, n_bins: int = 15, max_iter: int = 100, verbose: bool = True) -> None:
        super().__init__()
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"TemperatureScaling(n_bins={n_bins!r}): a positive number of bins.")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"TemperatureScaling(max_iter={max_iter!r}): a positive number of iterations.")
        self.n_bins = n_bins
        self.max_iter = max_iter
        self.verbose = verbose
        self.temperature: float | None = None
        self.fitted_epoch: int | None = None
        self.fitted_step: int | None = None
        self.ece: float | None = None
        self.ece_calibrated: float | None = None
        self.history: list[dict[str, Any]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: list[bool] = []  # per forward call in progress: is it a step redirected through forward?
        self._mode: str | None = None  # _COLLECT / _CHECK / _SCALE while a stage runs, else None
        self._batch: list[torch.Tensor] | None = None  # outputs caught in the current step (collected loader)
        self._raw: list[torch.Tensor] = []  # test: the unscaled outputs of the current step
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._raw_logits: list[torch.Tensor] = []  # test: the unscaled logits paired with _targets
        self._checked_training = False
        self._checked_probabilities = False
        self._restored = False
        self._warned: set[str] = set()
        self._collect_test = True

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "epoch": self.fitted_epoch, "step": self.fitted_step,
                "ece": self.ece, "ece_calibrated": self.ece_calibrated}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        t = state_dict.get("temperature")
        self.temperature = float(t) if t is not None else None
        self.fitted_epoch, self.fitted_step = state_dict.get("epoch"), state_dict.get("step")
        self.ece, self.ece_calibrated = state_dict.get("ece"), state_dict.get("ece_calibrated")
        self._restored = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.fitted_step is not None and trainer.global_step != self.fitted_step:
            self._warn_once(
                "stale",
                f"TemperatureScaling: a checkpoint of step {trainer.global_step} stores the temperature fitted at the "
                f"validation of step {self.fitted_step}, on other weights (a ModelCheckpoint that saves between "
                "validations: every_n_train_steps, or save_on_train_epoch_end). Save checkpoints at validation "
                "(the default), or refit T with trainer.validate(model, ckpt_path=...) before testing.",
            )

    # ----------------------------------------------------------------- setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not is_overridden("forward", pl_module, L.LightningModule):
            raise ValueError(
                f"TemperatureScaling divides the logits that {type(pl_module).__name__}.forward returns, but the "
                "module defines no forward. Define forward(x) -> logits (B, C) and call self(x) in the steps."
            )
        if stage == "fit":
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.save_weights_only:
                    rank_zero_warn(
                        "TemperatureScaling: ModelCheckpoint(save_weights_only=True) saves no callback state, so its "
                        "checkpoints do not keep the fitted temperature (testing from them runs with T=1). Use "
                        "save_weights_only=False."
                    )
        self._checked_training = False
        self._restored = False  # set by load_state_dict when this stage loads a checkpoint (after setup)
        self._reset()
        self._remove_hook()
        self._handles = [pl_module.register_forward_pre_hook(self._pre_hook), pl_module.register_forward_hook(self._hook)]

    def _remove_hook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mode = None
        self._reset()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hook()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hook()  # Lightning calls no teardown after an exception: the module is left as it was

    def _reset(self) -> None:
        self._batch, self._raw, self._logits, self._targets, self._raw_logits = None, [], [], [], []
        self._calls = []  # left over by a forward call that raised
        self._checked_probabilities = False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------ hook
    def _pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        # Lightning's forward redirection (DDP and the other wrapping strategies) runs a step through the wrapper by
        # setting ``forward`` on the module instance to a closure (not a method of the module; it puts the bound
        # method back before the step runs): that call is a step (its output a loss, predictions or None) with the
        # module's own forward call inside it. Only the latter is the model's output.
        patched = vars(module).get("forward")
        self._calls.append(patched is not None and getattr(patched, "__self__", None) is not module)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self._calls.pop() if self._calls else False:
            return None
        if self._mode is None:
            if not self._checked_training:  # the first training forward: fail now, not after an epoch
                self._checked_training = True
                self._check_output(output, module)
            return None
        self._check_output(output, module)
        scaled = output
        if self._mode == _SCALE and self.temperature is not None:
            scaled = output / self.temperature
        if self._batch is not None:
            self._batch.append(scaled.detach())
            if self._mode == _SCALE:
                self._raw.append(output.detach())
        return scaled if scaled is not output else None

    def _check_output(self, output: Any, module: torch.nn.Module) -> None:
        name = type(module).__name__
        if isinstance(output, torch.Tensor) and output.ndim == 2 and output.shape[1] >= 2 and output.is_floating_point():
            return
        if isinstance(output, dict):
            what = f"a dict ({', '.join(sorted(map(str, output)))}: one entry per task?)"
        elif isinstance(output, (tuple, list)):
            what = f"a {type(output).__name__} of {len(output)}"
        elif isinstance(output, torch.Tensor):
            what = f"a tensor of shape {tuple(output.shape)} and dtype {output.dtype}"
        else:
            what = f"a {type(output).__name__}"
        raise ValueError(
            f"TemperatureScaling needs {name}.forward to return logits: a floating-point tensor (B, C) with C >= 2 "
            f"classes; it returned {what}. It calibrates one classifier: return its logits from forward (features, "
            "auxiliary outputs and several tasks belong in other methods), or drop TemperatureScaling."
        )

    # ------------------------------------------------------------ validation
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._mode = _CHECK if trainer.sanity_checking else _COLLECT

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._batch = [] if self._mode == _COLLECT and dataloader_idx == 0 else None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        caught, self._batch = self._batch, None
        if caught is None:
            return
        self._pair(caught, batch, "validation", pl_module, required=True)

    def _pair(self, caught: list[torch.Tensor], batch: Any, stage: str, pl_module: L.LightningModule,
              required: bool) -> bool:
        """Keep this step's logits with its batch's targets; ``False`` (or an error when ``required``) if they do not pair."""
        name = type(pl_module).__name__
        problem = None
        if len(caught) != 1:
            problem = (f"{name}.forward ran {len(caught)} times in this {stage} step; TemperatureScaling pairs the "
                       "logits of exactly one forward call per step with the batch's targets. Call self(x) once in "
                       f"the {stage} step (compute other outputs through other methods).")
        else:
            _, targets = split_batch(batch)
            logits = caught[0]
            if targets is None or not isinstance(targets, torch.Tensor):
                problem = (f"the {stage} batches have {'no targets' if targets is None else 'targets per task'}; "
                           "TemperatureScaling needs (inputs, class indices) batches.")
            elif targets.ndim != 1 or len(targets) != len(logits):
                problem = (f"the {stage} step's logits have shape {tuple(logits.shape)} but its targets shape "
                           f"{tuple(targets.shape)}: one class index per row of logits is needed.")
        if problem is not None:
            if required:
                raise RuntimeError(f"TemperatureScaling cannot fit a temperature: {problem}")
            self._warn_once(f"pair-{stage}", f"TemperatureScaling logs no {stage} calibration error: {problem}")
            return False
        logits = logits.float()
        if not self._checked_probabilities:
            self._checked_probabilities = True
            if _looks_like_probabilities(logits):
                raise ValueError(
                    f"TemperatureScaling divides logits, but {name}.forward returns probabilities (rows in [0, 1] "
                    "summing to 1): scaled and softmaxed again they would not be calibrated "
                    "(gpleiss/temperature_scaling#29). Return logits from forward and apply the softmax in "
                    "predict_step or the loss."
                )
        self._logits.append(logits)
        self._targets.append(targets.to(logits.device, torch.long))
        return True

    @staticmethod
    def _gathered(pl_module: L.LightningModule, trainer: L.Trainer, logits_list: list[torch.Tensor],
                  targets_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows caught on every rank (the same on all), or ``None`` when no rank caught any.

        Every rank must call it (collectives); ranks with fewer rows pad with ``MISSING`` rows."""
        device = pl_module.device
        logits = torch.cat(logits_list) if logits_list else None
        targets = torch.cat(targets_list) if targets_list else None
        if trainer.world_size == 1:
            return None if logits is None or targets is None else (logits, targets)
        rows, classes = (len(logits), logits.shape[1]) if logits is not None else (0, 0)
        sizes = pl_module.all_gather(torch.tensor([rows, classes], device=device)).reshape(-1, 2)
        most, classes = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        if most == 0:
            return None
        padded = torch.zeros(most, classes, device=device)  # padding rows are MISSING: left out of every fit
        padded_targets = torch.full((most,), MISSING, dtype=torch.long, device=device)
        if logits is not None and targets is not None:
            padded[:rows], padded_targets[:rows] = logits.to(device), targets.to(device)
        return (pl_module.all_gather(padded).reshape(-1, classes),
                pl_module.all_gather(padded_targets).reshape(-1))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._mode != _COLLECT:
            return
        rows = self._gathered(pl_module, trainer, self._logits, self._targets)
        self._logits, self._targets = [], []
        if rows is None:
            return
        logits, targets = rows[0].cpu(), rows[1].cpu()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            temperature = fit_temperature(logits, targets, max_iter=self.max_iter)
        for w in caught:
            self._warn_once(f"fit-{w.message}", f"TemperatureScaling: {w.message}")
        before = calibration_errors(logits, targets, n_bins=self.n_bins)["ece"]
        after = calibration_errors(logits / temperature, targets, n_bins=self.n_bins)["ece"]
        self.temperature, self.ece, self.ece_calibrated = temperature, before, after
        self.fitted_epoch, self.fitted_step = trainer.current_epoch, trainer.global_step
        used = int((targets != MISSING).sum())
        self.history.append({"epoch": self.fitted_epoch, "step": self.fitted_step, "temperature": temperature,
                             "ece": before, "ece_calibrated": after, "rows": used})
        # the same values on every rank (the rows were gathered): sync_dist only keeps Lightning from warning
        for key, value in (("val/ece_uncalibrated", before), ("val/ece_calibrated", after), ("val/temperature", temperature)):
            pl_module.log(key, value, sync_dist=True)
        if self.verbose:
            rank_zero_info(f"TemperatureScaling: T={temperature:.4f} fitted on {used} validation rows "
                           f"(epoch {self.fitted_epoch}, step {self.fitted_step}); ECE {before:.4f} -> {after:.4f}.")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mode = None
        self._reset()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.temperature is None or self.fitted_step is None:
            self._warn_once("unfitted-fit", "TemperatureScaling fitted no temperature in this fit: no validation "
                                            "ran (a val_dataloader with labelled batches is needed).")
        elif trainer.global_step != self.fitted_step:
            self._warn_once(
                "stale-fit",
                f"TemperatureScaling: T was fitted at the validation of step {self.fitted_step}, but training went on "
                f"to step {trainer.global_step} without another validation, so T belongs to earlier weights. "
                "trainer.validate(model) refits it on the final weights.",
            )

    # ------------------------------------------------------- test and predict
    def _start_scaling(self, trainer: L.Trainer, stage: str) -> None:
        if trainer.ckpt_path is not None and not self._restored:
            self.temperature = self.fitted_epoch = self.fitted_step = None  # not the T of these weights
            self._warn_once(f"no-state-{stage}", f"TemperatureScaling: the checkpoint {trainer.ckpt_path} holds no "
                            "temperature (saved without this callback, or with save_weights_only=True).")
        if self.temperature is None:
            self._warn_once(f"unfitted-{stage}",
                            f"TemperatureScaling has no fitted temperature: {stage} runs with T=1 (uncalibrated). Fit "
                            f"it by validating (trainer.fit with validation data, or trainer.validate) first, or "
                            f"{stage} from a checkpoint saved with this callback.")
        self._reset()
        self._mode = _SCALE

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_scaling(trainer, "test")
        self._collect_test = True

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._batch = [] if self._collect_test and dataloader_idx == 0 else None
        self._raw = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        caught, raw, self._batch, self._raw = self._batch, self._raw, None, []
        if caught is None:
            return
        if self._pair(caught, batch, "test", pl_module, required=False):
            self._raw_logits.append(raw[0].float())
        else:
            self._collect_test = False
            self._logits, self._targets, self._raw_logits = [], [], []

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._gathered(pl_module, trainer, self._logits, self._targets)
        raw_rows = self._gathered(pl_module, trainer, self._raw_logits, self._targets)
        self._logits, self._targets, self._raw_logits = [], [], []
        pl_module.log("test/temperature", 1.0 if self.temperature is None else self.temperature, sync_dist=True)
        if rows is None or raw_rows is None or not bool((rows[1] != MISSING).any()):
            return
        scaled = calibration_errors(rows[0].cpu(), rows[1].cpu(), n_bins=self.n_bins)["ece"]
        unscaled = calibration_errors(raw_rows[0].cpu(), raw_rows[1].cpu(), n_bins=self.n_bins)["ece"]
        pl_module.log("test/ece_calibrated", scaled, sync_dist=True)
        pl_module.log("test/ece_uncalibrated", unscaled, sync_dist=True)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mode = None
        self._reset()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_scaling(trainer, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mode = None
        self._reset()
