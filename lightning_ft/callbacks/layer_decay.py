"""LayerwiseLRDecay: layer-wise lr decay for a LightningModule that builds its own optimizer.

The module keeps writing ``AdamW(self.parameters(), lr=1e-3)`` plus any torch scheduler. Before the
first step (``on_fit_start``, after Lightning built them and before a checkpoint's optimizer state
is loaded) the callback rebuilds the optimizer with named layer-decayed groups -- the same groups
and lrs as ``FineTuneModule(layer_decay=...)`` -- and moves the scheduler onto it: every per-group
value the scheduler keeps (base lrs, lambdas, OneCycle/Cyclic peaks, plateau floors) is copied
from the group the parameters came from and scaled by the layer's factor, so the scheduler gives
each new group the curve it would have had from the start.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from lightning_ft.groups import layer_groups
from lightning_ft.callbacks._common import check_strategy
from lightning_ft.optim import align_scheduler, check_layer_decay, layer_decay_groups, no_weight_decay_names

__all__ = ["LayerwiseLRDecay"]

# scheduler attributes holding one value per param group; True = the value is a learning rate
_PER_GROUP_ATTRS = {
    "base_lrs": True,
    "_last_lr": True,
    "min_lrs": False,  # plateau floors: absolute, as when FineTuneModule builds the groups
    "max_lrs": True,
    "lr_lambdas": False,
    "base_momentums": False,
    "max_momentums": False,
}
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class LayerwiseLRDecay(Callback):
    """Turn a module's own optimizer into named, layer-decayed param groups.

    Args:
        decay: group ``k`` levels below the head gets ``lr * decay**k`` (``lr`` = the module's).
        head: names/prefixes of the head for modules without a timm backbone (default: the last group).
        no_weight_decay: also drop weight decay on biases, norms, position embeddings and tokens
            (as FineTuneModule does).
        include_frozen: put every module parameter in the (single) optimizer, frozen ones included,
            so GradualUnfreezing can thaw them without adding param groups.
    """

    def __init__(
        self,
        decay: float = 0.75,
        head: str | list[str] | None = None,
        no_weight_decay: bool = True,
        include_frozen: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        check_layer_decay(decay, "decay")
        self.decay = decay
        self.head = head
        self.no_weight_decay = no_weight_decay
        self.include_frozen = include_frozen
        self.verbose = verbose

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, type(self).__name__)
            layer_groups(pl_module, head=self.head)  # fail early: no head / bad head names

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizers = [opt for opt in trainer.optimizers if type(opt).__name__ != "_MockOptimizer"]  # Lightning's stand-in
        if not optimizers:
            raise ValueError("LayerwiseLRDecay needs an optimizer: configure_optimizers returned none.")
        if any("lr_scale" in g for opt in optimizers for g in opt.param_groups):
            if self.verbose:
                rank_zero_info("LayerwiseLRDecay: the optimizer already has layer-decayed groups; left as is.")
            return
        new_optimizers = [self._rebuild(opt, pl_module, single=len(optimizers) == 1) for opt in optimizers]
        by_old = {id(old): rebuilt for old, rebuilt in zip(optimizers, new_optimizers)}
        for config in trainer.lr_scheduler_configs:
            new, sources = by_old[id(config.scheduler.optimizer)]
            config.scheduler = _retarget(config.scheduler, new, sources)
            align_scheduler(config.scheduler, new)
        trainer.strategy.optimizers = [new for new, _ in new_optimizers]
        if self.verbose:
            names = [g["name"] for g in trainer.optimizers[0].param_groups]
            rank_zero_info(f"LayerwiseLRDecay: {len(names)} param groups, decay {self.decay}: {', '.join(names[:4])}, ...")

    def _rebuild(
        self, optimizer: Optimizer, pl_module: L.LightningModule, single: bool
    ) -> tuple[Optimizer, list[tuple[int, float]]]:
        params = dict(pl_module.named_parameters())
        owner = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        if single and self.include_frozen:
            for p in params.values():
                owner.setdefault(id(p), 0)
        groups = layer_groups(pl_module, head=self.head)
        skip = no_weight_decay_names(pl_module) if self.no_weight_decay else set()
        new_groups: list[dict[str, Any]] = []
        sources: list[tuple[int, float]] = []  # (old group index, lr scale) per new group
        multiple = len(optimizer.param_groups) > 1
        for old_index, old in enumerate(optimizer.param_groups):
            mine = {n for n, p in params.items() if owner.get(id(p)) == old_index}
            if not mine:
                continue
            built = layer_decay_groups(
                {n: params[n] for n in mine}, groups, lr=float(old["lr"]),
                weight_decay=float(old.get("weight_decay", 0.0)), layer_decay=self.decay, skip=skip,
            )
            for g in built:
                extra = {k: v for k, v in old.items() if k not in ("params", "lr", "weight_decay", "name")}
                for key in _LR_KEYS[1:]:
                    if key in extra:
                        extra[key] = extra[key] * g["lr_scale"]
                if multiple:
                    g["name"] = f"{old.get('name', f'group{old_index}')}/{g['name']}"
                new_groups.append({**extra, **g})
                sources.append((old_index, g["lr_scale"]))
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
        new = type(optimizer)(new_groups, **defaults)
        return new, sources


def _retarget(scheduler: Any, optimizer: Optimizer, sources: list[tuple[int, float]] | None) -> Any:
    """Point a scheduler at the rebuilt optimizer, expanding its per-group state."""
    if sources is None:
        return scheduler
    for inner in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        _retarget(inner, optimizer, sources)
    scheduler.optimizer = optimizer
    for attr, is_lr in _PER_GROUP_ATTRS.items():
        values = getattr(scheduler, attr, None)
        if isinstance(values, (list, tuple)) and values:
            expanded = [values[src] * scale if is_lr else values[src] for src, scale in sources]
            setattr(scheduler, attr, list(expanded))
    if hasattr(scheduler, "_last_lr") or hasattr(scheduler, "base_lrs"):
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    _track_step(optimizer)
    return scheduler


def _track_step(optimizer: Optimizer) -> None:
    """Mark ``optimizer.step`` calls as torch schedulers do at construction (their order check)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__
    opt_ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper
