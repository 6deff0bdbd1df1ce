"""Weighing the losses of several tasks into one: fixed weights, or learned homoscedastic uncertainty (torch only).

Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-task learning using uncertainty to weigh
losses for scene geometry and semantics", CVPR 2018) learns one log-variance ``s_k = log sigma_k^2``
per task. Here every task contributes ``0.5 exp(-s_k) L_k + 0.5 s_k``, which is
``L_k / (2 sigma_k^2) + log sigma_k``: the paper's regression form (its eq. 7, and the authors' example
code). For a classification loss the paper writes ``L / sigma^2 + log sigma`` (eq. 10), i.e.
``exp(-s') L + 0.5 s'`` with ``s' = log sigma^2``; with ``s' = s + log 2`` that is the same function up to
a constant (``0.5 log 2``), so one form serves both kinds of task: only the meaning of ``s`` shifts by
``log 2``. A task at ``s = 0`` weighs ``0.5``; the optimum is ``s_k = log L_k``.

The unbounded form has a known failure (yaringal/multi-task-learning-example#6): when a task's loss
goes to about 0, its optimal ``s_k = log L_k`` goes to ``-inf``, the total loss becomes as negative as
the optimiser likes, and that task's weight ``exp(-s_k)`` explodes. Here the learned parameter is
``raw`` and the log-variance used is ``s = bound * tanh(raw / bound)``, which lies in
``(-bound, bound)``: each task weighs between ``0.5 exp(-bound)`` and ``0.5 exp(bound)`` (about 0.025
and 10 for the default ``bound = 3``) and the total is bounded below by ``-K * bound / 2``.

A task without any label in the batch (``present`` False) contributes nothing, neither its loss nor
its ``s`` term, so its log-variance gets no gradient from that batch instead of drifting down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["TaskWeighting", "bounded_log_vars", "fixed_weighted", "uncertainty_weighted"]


def _present_mask(losses: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    if present is None:
        return torch.ones(losses.shape, dtype=torch.bool, device=losses.device)
    if present.shape != losses.shape:
        raise ValueError(f"present {tuple(present.shape)} must have the shape of losses {tuple(losses.shape)}.")
    return present.to(device=losses.device, dtype=torch.bool)


def bounded_log_vars(raw: torch.Tensor, bound: float = 3.0) -> torch.Tensor:
    """The effective log-variances ``s = bound * tanh(raw / bound)``, in ``(-bound, bound)``.

    Close to ``raw`` while ``|raw|`` is small compared with ``bound`` (the slope at 0 is 1).

    Args:
        raw: the learned, unbounded parameters.
        bound: the bound, > 0.

    Shape:
        raw ``(K,)`` -> ``(K,)``
    """
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}; 3.0 lets each task weigh between 0.025 and 10.")
    return bound * torch.tanh(raw / bound)


def uncertainty_weighted(
    losses: torch.Tensor,
    log_vars: torch.Tensor,
    present: torch.Tensor | None = None,
    bound: float = 3.0,
) -> torch.Tensor:
    """Homoscedastic-uncertainty weighting of task losses with bounded log-variances.

    ``total = sum over present k of 0.5 * exp(-s_k) * L_k + 0.5 * s_k`` with
    ``s = bound * tanh(log_vars / bound)`` and ``s = log sigma^2``: ``L / (2 sigma^2) + log sigma`` per
    task (Kendall, Gal & Cipolla, CVPR 2018); their classification form ``L / sigma^2 + log sigma`` is
    the same function of ``s + log 2``, up to a constant (see the module notes). Absent tasks add nothing and
    get zero gradient, both for their loss and their log-variance, even if their loss is NaN (the
    mean of an empty batch). No host synchronisation: absence is applied with ``torch.where``.

    Args:
        losses: one scalar loss per task.
        log_vars: the raw (unbounded) learned parameters, one per task; the effective log-variance is
            bounded in ``(-bound, bound)``.
        present: ``True`` for the tasks that have labels in this batch; ``None`` means all.
        bound: the bound of the effective log-variances; the total is ``> -K * bound / 2``.

    Returns:
        The total loss (a scalar).

    Shape:
        losses ``(K,)``, log_vars ``(K,)``, present ``(K,)`` bool -> scalar
    """
    if losses.dim() != 1 or log_vars.shape != losses.shape:
        raise ValueError(
            f"uncertainty_weighted needs losses (K,) and log_vars (K,), got {tuple(losses.shape)} and "
            f"{tuple(log_vars.shape)}. Stack the scalar task losses with torch.stack."
        )
    mask = _present_mask(losses, present)
    zero = losses.new_zeros(())
    s = torch.where(mask, bounded_log_vars(log_vars, bound), zero)
    loss = torch.where(mask, losses, zero)  # a NaN loss of an absent task cannot reach the total or the gradients
    return (0.5 * torch.exp(-s) * loss + 0.5 * s).sum()


def fixed_weighted(losses: torch.Tensor, weights: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """``sum over present k of weights_k * L_k``: the fixed weighted sum of task losses.

    Args:
        losses: one scalar loss per task.
        weights: one non-negative weight per task.
        present: ``True`` for the tasks that have labels in this batch; ``None`` means all.

    Returns:
        The total loss (a scalar).

    Shape:
        losses ``(K,)``, weights ``(K,)``, present ``(K,)`` bool -> scalar
    """
    if losses.dim() != 1 or weights.shape != losses.shape:
        raise ValueError(
            f"fixed_weighted needs losses (K,) and weights (K,), got {tuple(losses.shape)} and {tuple(weights.shape)}."
        )
    mask = _present_mask(losses, present)
    zero = losses.new_zeros(())
    return torch.where(mask, weights.to(losses.dtype) * torch.where(mask, losses, zero), zero).sum()


class TaskWeighting(nn.Module):
    """Weigh the losses of named tasks into one total: fixed weights or learned uncertainty.

    See :func:`fixed_weighted` and :func:`uncertainty_weighted`. In ``uncertainty`` mode the module
    holds the learned parameter ``log_vars`` ``(K,)`` (raw, unbounded; the effective log-variances are
    :meth:`effective_log_vars`): give it to the optimiser with the model (no weight decay).

    Args:
        tasks: the task names, in a fixed order.
        mode: ``"fixed"`` (``weights``, 1.0 where not given) or ``"uncertainty"`` (learned).
        weights: the weight of each task in ``fixed`` mode; tasks not named weigh 1.0.
        bound: bound of the effective log-variances in ``uncertainty`` mode.

    Shape:
        losses ``{task: scalar}``, present ``{task: bool or 0-dim bool tensor}`` -> scalar

    Example:
        ```python
        weighting = TaskWeighting(["crop", "irrigated"], mode="uncertainty")
        total = weighting({"crop": ce_crop, "irrigated": ce_irr}, present={"irrigated": count > 0})
        ```
    """

    def __init__(
        self,
        tasks: Sequence[str],
        mode: Literal["fixed", "uncertainty"] = "fixed",
        weights: dict[str, float] | None = None,
        bound: float = 3.0,
    ) -> None:
        super().__init__()
        tasks = list(tasks)
        if not tasks or any(not isinstance(t, str) or not t for t in tasks):
            raise ValueError(f"TaskWeighting needs a non-empty list of task names (non-empty strings), got {tasks!r}.")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"TaskWeighting: task names repeat in {tasks!r}; give each task once.")
        if mode not in ("fixed", "uncertainty"):
            raise ValueError(f"TaskWeighting mode must be 'fixed' or 'uncertainty', got {mode!r}.")
        if bound <= 0:
            raise ValueError(f"TaskWeighting bound must be > 0, got {bound}; 3.0 lets each task weigh 0.025 to 10.")
        self.tasks = tasks
        self.mode = mode
        self.bound = float(bound)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ValueError(
                f"TaskWeighting weights name unknown task(s) {unknown}. Tasks: {', '.join(tasks)}. "
                "Fix the names or add the tasks."
            )
        if mode == "uncertainty" and weights:
            raise ValueError(
                "TaskWeighting(mode='uncertainty') learns its weights; remove weights= or use mode='fixed'."
            )
        negative = {t: w for t, w in weights.items() if not w >= 0}
        if negative:
            raise ValueError(
                f"TaskWeighting weights must be >= 0 (0 switches a task off), got {negative}."
            )
        self.register_buffer(
            "fixed_weights", torch.tensor([float(weights.get(t, 1.0)) for t in tasks]), persistent=False
        )
        if mode == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def effective_log_vars(self) -> torch.Tensor:
        """The bounded log-variances ``s = bound * tanh(log_vars / bound)`` (``uncertainty`` mode).

        Shape:
            ``(K,)``
        """
        if self.mode != "uncertainty":
            raise RuntimeError("TaskWeighting(mode='fixed') has no log-variances; use weights_dict() to log weights.")
        return bounded_log_vars(self.log_vars, self.bound)

    def weights_dict(self) -> dict[str, float]:
        """The current weight of each task, for logging: the fixed weight, or ``0.5 * exp(-s)``."""
        with torch.no_grad():
            w = 0.5 * torch.exp(-self.effective_log_vars()) if self.mode == "uncertainty" else self.fixed_weights
            return dict(zip(self.tasks, w.detach().cpu().tolist(), strict=True))

    def forward(
        self, losses: Mapping[str, torch.Tensor], present: Mapping[str, bool | torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The total loss.

        Args:
            losses: a scalar loss per task. A task left out has no label in this batch: it counts as
                absent, like ``present[task] = False``.
            present: whether each task has labels in the batch (a bool or a 0-dim bool tensor, so no
                host synchronisation is needed); tasks not named are present if they have a loss.

        Returns:
            The weighted total (a scalar).

        Raises:
            ValueError: a task is unknown, no task has a loss, a loss is not a scalar, or a task
                without a loss is said to be present.
        """
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(
                f"TaskWeighting got losses for unknown task(s) {unknown}. Tasks: {', '.join(self.tasks)}. "
                "Fix the names, or give the task to TaskWeighting(tasks=...)."
            )
        if not losses:
            raise ValueError(f"TaskWeighting got no loss; give at least one of {', '.join(self.tasks)}.")
        present = dict(present or {})
        unknown = sorted(set(present) - set(self.tasks))
        if unknown:
            raise ValueError(f"TaskWeighting present names unknown task(s) {unknown}. Tasks: {', '.join(self.tasks)}.")
        contradictory = [t for t, p in present.items() if t not in losses and isinstance(p, bool) and p]
        if contradictory:
            raise ValueError(
                f"TaskWeighting: present says task(s) {contradictory} have labels but losses has none for them. "
                "Give their losses, or present=False."
            )
        for t, loss in losses.items():
            if loss.numel() != 1:
                raise ValueError(
                    f"TaskWeighting: the loss of task {t!r} has shape {tuple(loss.shape)}; reduce it to a scalar."
                )
        reference = next(iter(losses.values()))
        zero = reference.new_zeros(())
        stacked = torch.stack([losses[t].reshape(()) if t in losses else zero for t in self.tasks])
        device = stacked.device
        mask = torch.stack(
            [
                torch.as_tensor(present.get(t, True), device=device).reshape(()).bool()
                if t in losses
                else torch.zeros((), dtype=torch.bool, device=device)
                for t in self.tasks
            ]
        )
        if self.mode == "uncertainty":
            return uncertainty_weighted(stacked, self.log_vars, mask, self.bound)
        return fixed_weighted(stacked, self.fixed_weights, mask)
