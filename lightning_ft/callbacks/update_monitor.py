"""UpdateMonitor: which parameters are actually being updated, per layer group.

At the loggers' interval the callback writes, for every layer group (the depth map of
:func:`lightning_ft.groups.layer_groups`, the same groups as layer-wise LR decay and gradual
unfreezing use, or groups you name):

* ``<prefix>/grad_norm/<group>``: the L2 norm over the gradients of the group's trainable
  parameters, as the optimizer is about to see them;
* ``<prefix>/update_ratio/<group>``: ``||W_after - W_before|| / ||W_before||`` over the same
  parameters across the optimizer step (``1e-3`` is the rule of thumb for training from scratch;
  fine-tuning runs lower); ``0`` means the group did not move (frozen, not in the optimizer, or an
  AMP step skipped for non-finite gradients).

It works unchanged on FineTuneModule and on any LightningModule with its own optimizer; it imports
nothing of :mod:`lightning_ft.module`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_ft.callbacks._common import _SUPPORTED_STRATEGIES
from lightning_ft.groups import layer_groups

__all__ = ["UpdateMonitor"]


class _Pending:
    """What one logging step holds between ``on_before_optimizer_step`` and ``on_train_batch_end``."""

    __slots__ = ("params", "before", "members", "grad_sq", "trainable")

    def __init__(self, params: list[nn.Parameter], before: list[torch.Tensor], members: torch.Tensor,
                 grad_sq: torch.Tensor, trainable: list[bool]) -> None:
        self.params = params  # the trainable parameters of the monitored groups, each once
        self.before = before  # their values before the step (a copy)
        self.members = members  # (2, memberships): parameter index, group index
        self.grad_sq = grad_sq  # per group: the sum of squared gradient norms
        self.trainable = trainable  # per group: whether it had a trainable parameter


class UpdateMonitor(Callback):
    """Log per layer group the gradient norm and the relative size of the optimizer's update.

    Answers "which parameters are actually being updated, and how much?" -- after a freeze, a thaw,
    a layer-decayed optimizer or an optimizer built over the wrong parameter list. For each group it
    logs ``<prefix>/grad_norm/<group>`` and ``<prefix>/update_ratio/<group>`` (``||ΔW|| / ||W||``
    over the step) through the Trainer's loggers, at the step Lightning's own step metrics are
    logged at.

    When: with ``logging_interval=None`` on exactly the steps Lightning writes step metrics to the
    loggers (its ``_logger_connector.should_update_logs``: every ``Trainer(log_every_n_steps=)``
    optimizer steps, counted as ``fit_loop.epoch_loop._batches_that_stepped + 1``, plus every step
    once ``trainer.should_stop`` is set); with an integer, every that many optimizer steps. With
    gradient accumulation only batches on which the optimizer steps count, and the gradient is the
    accumulated one. On other steps the callback does no work: no copy, no norm, no device sync.

    What is measured, on a logging step:

    * ``grad_norm`` in ``on_before_optimizer_step``: in Lightning 2.x this hook runs after the
      closure (forward and backward) and, with ``precision="16-mixed"``, after the GradScaler
      unscaled the gradients (``MixedPrecision.optimizer_step`` calls ``scaler.unscale_`` and then
      the hook), so the norm is in true units; it is taken before gradient clipping
      (``gradient_clip_val`` acts after the hook), i.e. it is the norm clipping compares with.
    * ``update_ratio``: the group's trainable weights are copied in the same hook and compared in
      ``on_train_batch_end``, after the optimizer step (and after the scheduler step, which does
      not touch weights). It is the update the optimizer really made: weight decay, momentum,
      clipping and skipped AMP steps included. A group whose weights were all zero before the
      step logs ``inf`` if they moved.
    * Only parameters with ``requires_grad`` at that step count (in the norms and in ``||W||``).
      **A group with no trainable parameter logs 0 for both** (frozen backbone; a group that
      GradualUnfreezing has not thawed yet), so every group has one series from the first step,
      and a thawed group's series leaves 0 at its thaw. A trainable parameter the optimizer does not
      hold shows a gradient norm (one that keeps growing: ``zero_grad`` resets only the optimizer's
      parameters) and an update ratio of 0: exactly what the callback is for.

    Cost: on logging steps one batched (``torch._foreach_*``) copy of the trainable weights, three
    batched norms and one device sync (the values go to the loggers as Python floats); the copy is
    freed at the end of the batch. Nothing on the other steps.

    Distributed: single device and DDP, like the other callbacks. No collective operation is called: under DDP
    every rank holds the same gradients and weights after the step, computes the same values, and
    Lightning's loggers write on rank 0 only. Sharded strategies (FSDP, DeepSpeed) are refused:
    each rank would measure its shard.

    Manual optimization: the first optimizer step of a batch takes the gradient norm and the copy;
    with several steps in one batch (two optimizers), the ratio covers all of the batch's steps.

    Args:
        logging_interval: log every this many optimizer steps; ``None``: when Lightning logs
            (``Trainer(log_every_n_steps=)``, 50 by default).
        groups: your own groups, ``{name: [parameter-name prefixes]}`` (``{"backbone": ["backbone"],
            "head": ["head", "neck"]}``; a prefix matches the parameter of that name and everything
            under the module of that name; groups may overlap). ``None``: the layer groups of
            :func:`lightning_ft.groups.layer_groups` (timm's order for a timm backbone; for other
            modules its generic map), stem first, head last, with the names it gives them.
        head: for modules without a timm backbone and ``groups=None``, the head's names/prefixes
            (as in LayerwiseLRDecay; default: the last child module).
        prefix: the metric names' first part; ``""`` for ``grad_norm/<group>`` and ``update_ratio/<group>``.
        verbose: say at the start of fit which groups are monitored and how often.

    Raises:
        ValueError: at ``setup`` when the Trainer has no logger (``logger=False``: there is nowhere
            to write), or a sharded strategy; at the start of fit when a prefix of ``groups`` names no
            parameter.
    """

    def __init__(
        self,
        logging_interval: int | None = None,
        groups: dict[str, list[str]] | None = None,
        head: str | list[str] | None = None,
        prefix: str = "updates",
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if logging_interval is not None and (
            isinstance(logging_interval, bool) or not isinstance(logging_interval, int) or logging_interval < 1
        ):
            raise ValueError(
                f"UpdateMonitor(logging_interval={logging_interval!r}): give a whole number of optimizer steps >= 1, "
                "or None to log when Lightning logs (Trainer(log_every_n_steps=))."
            )
        if groups is not None and (not groups or any(not prefixes for prefixes in groups.values())):
            raise ValueError(
                f"UpdateMonitor(groups={groups!r}): give each group at least one parameter-name prefix, e.g. "
                "{'backbone': ['backbone'], 'head': ['head']}, or groups=None for the layer groups."
            )
        self.logging_interval = logging_interval
        self.groups = groups
        self.head = head
        self.prefix = prefix
        self.verbose = verbose
        self._names: list[str] = []
        self._params: list[list[nn.Parameter]] = []
        self._pending: _Pending | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, groups=self.groups)

    # ------------------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy not in _SUPPORTED_STRATEGIES:
            raise ValueError(
                f"UpdateMonitor supports single-device training and DDP (strategy='ddp' or 'ddp_spawn'); this "
                f"Trainer uses {strategy}, which shards the parameters: each rank would measure its own shard. "
                "Use strategy='ddp' or remove UpdateMonitor."
            )
        if not trainer.loggers:
            raise ValueError(
                "UpdateMonitor writes to the Trainer's loggers, and this Trainer has none (logger=False). "
                "Give it one, e.g. Trainer(logger=CSVLogger('logs')), or remove UpdateMonitor."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        if self.groups is None:
            spec = [(g.name, list(g.param_names)) for g in layer_groups(pl_module, head=self.head)]
        else:
            spec = []
            for name, prefixes in self.groups.items():
                prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
                for p in prefixes:
                    if not any(n == p or n.startswith(f"{p}.") for n in named):
                        top = [n for n, _ in pl_module.named_children()]
                        raise ValueError(
                            f"UpdateMonitor group {name!r}: no parameter of {type(pl_module).__name__} is named "
                            f"{p!r} or lies under it. Top-level modules: {top}. Give module or parameter names "
                            "as in model.named_parameters()."
                        )
                spec.append((name, [n for n in named if any(n == p or n.startswith(f"{p}.") for p in prefixes)]))
        self._names = [name for name, _ in spec]
        self._params = [[named[n] for n in names] for _, names in spec]
        self._pending = None
        if self.verbose:
            interval = self.logging_interval or trainer.log_every_n_steps
            shown = ", ".join(self._names[:4]) + (f", ... {self._names[-1]}" if len(self._names) > 4 else "")
            rank_zero_info(
                f"UpdateMonitor: {len(self._names)} groups ({shown}), every {interval} optimizer steps: "
                f"{self._key('grad_norm', '<group>')}, {self._key('update_ratio', '<group>')}"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = None

    def _key(self, what: str, group: str) -> str:
        return f"{self.prefix}/{what}/{group}" if self.prefix else f"{what}/{group}"

    def _is_logging_step(self, trainer: L.Trainer) -> bool:
        """Lightning's decision for the step about to be taken (``_batches_that_stepped`` is raised after it)."""
        if self.logging_interval is None:
            return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
        return step % self.logging_interval == 0 or trainer.should_stop

    # ------------------------------------------------------------------------------ measuring
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._pending is not None or not self._params or not self._is_logging_step(trainer):
            return  # not a logging step (or a later optimizer step of the same batch): no work
        index: dict[int, int] = {}
        params: list[nn.Parameter] = []
        member_param: list[int] = []
        member_group: list[int] = []
        trainable = [False] * len(self._params)
        for g, group in enumerate(self._params):
            for p in group:
                if not p.requires_grad:
                    continue
                k = index.setdefault(id(p), len(params))
                if k == len(params):
                    params.append(p)
                member_param.append(k)
                member_group.append(g)
                trainable[g] = True
        if not params:  # everything frozen: zeros, nothing to measure
            self._pending = _Pending([], [], torch.empty(2, 0, dtype=torch.long), torch.zeros(len(self._params)),
                                     trainable)
            return
        device = params[0].device
        # from pageable memory without waiting for the device (the queued backward keeps running)
        members = torch.tensor([member_param, member_group], dtype=torch.long).to(device, non_blocking=True)
        with torch.no_grad():
            with_grad = [k for k, p in enumerate(params) if p.grad is not None]
            grad_sq_param = torch.zeros(len(params), dtype=torch.float32, device=device)
            if with_grad:
                norms = torch._foreach_norm([params[k].grad for k in with_grad], 2, dtype=torch.float32)
                if len(with_grad) == len(params):
                    grad_sq_param = torch.stack(norms).square()
                else:
                    at = torch.tensor(with_grad, dtype=torch.long).to(device, non_blocking=True)
                    grad_sq_param[at] = torch.stack(norms).square()
            grad_sq = _per_group(grad_sq_param, members, len(self._params))
            before = torch._foreach_mul([p.detach() for p in params], 1.0)  # one batched copy
        self._pending = _Pending(params, before, members, grad_sq, trainable)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        count = len(self._params)
        if pending.params:
            with torch.no_grad():
                weight_sq = _per_group(
                    torch.stack(torch._foreach_norm(pending.before, 2, dtype=torch.float32)).square(),
                    pending.members, count)
                torch._foreach_sub_(pending.before, [p.detach() for p in pending.params])  # now -ΔW, in place
                delta_sq = _per_group(
                    torch.stack(torch._foreach_norm(pending.before, 2, dtype=torch.float32)).square(),
                    pending.members, count)
                delta, weight = delta_sq.sqrt(), weight_sq.sqrt()
                ratio = torch.where(weight > 0, delta / weight.clamp_min(torch.finfo(torch.float32).tiny),
                                    torch.where(delta > 0, torch.inf, 0.0))
                values = torch.stack([pending.grad_sq.sqrt(), ratio]).tolist()  # the one device sync
        else:
            values = [[0.0] * count, [0.0] * count]
        metrics: dict[str, float] = {}
        for g, name in enumerate(self._names):
            trained = pending.trainable[g]
            metrics[self._key("grad_norm", name)] = values[0][g] if trained else 0.0
            metrics[self._key("update_ratio", name)] = values[1][g] if trained else 0.0
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this batch's metrics at
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _per_group(per_param: torch.Tensor, members: torch.Tensor, count: int) -> torch.Tensor:
    """Sum per-parameter values into their groups (a parameter may belong to several groups)."""
    out = torch.zeros(count, dtype=per_param.dtype, device=per_param.device)
    return out.index_add_(0, members[1], per_param[members[0]])
