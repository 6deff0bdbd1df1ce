"""The inputs/targets contract: what a batch is, for every step of FineTuneModule and for the callbacks.

A **batch** is one of

* ``(inputs, targets)``: a list or tuple, as a ``Dataset`` of pairs collates (items after the
  second, an index say, are passed over);
* ``{"inputs": inputs, "targets": targets}``: a dict (other keys are passed over);
* ``inputs`` alone, or ``(inputs,)``: prediction, or a batch without labels;
* ``{"source": batch, "target": batch}``: domain adaptation, a labelled source batch and a target
  batch whose targets, if any, are not trained on.

**Inputs** are a tensor with the batch first (images ``(B, C, H, W)``), or a dict of such tensors for
inputs that come in parts: an image time series ``{"image": (B, T, C, H, W), "mask": (B, T),
"dates": (B, T)}``, text tokens ``{"input_ids": (B, L), "attention_mask": (B, L)}``. Every tensor of
a dict has the same batch size.

**Targets** are a tensor ``(B,)`` of class indices, or a dict ``{task: (B,) tensor}`` with one entry
per task. A sample without a label is *marked*, not dropped: its class index is :data:`MISSING`
(``-100``, the ``ignore_index`` of ``torch.nn.functional.cross_entropy``), so a batch keeps its
rows in step across tasks and across the inputs. A loss or metric over a batch skips the marked
rows; a batch with no label at all contributes no loss.

torch only: no Lightning here. :class:`lightning_ft.FineTuneModule` runs every step through
:func:`split_batch`; a callback that serves batches (``FeatureCache``) serves batches of this form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

__all__ = [
    "MISSING",
    "Inputs",
    "Targets",
    "batch_size",
    "check_class_targets",
    "check_inputs",
    "is_domain_batch",
    "labelled",
    "split_batch",
]

MISSING = -100  # a target without a label (torch's cross-entropy ignore_index)

Inputs = Union[torch.Tensor, dict[str, torch.Tensor]]
Targets = Union[torch.Tensor, dict[str, torch.Tensor], None]

DOMAINS = ("source", "target")  # the keys of a domain-adaptation batch


def is_domain_batch(batch: Any) -> bool:
    """A ``{"source": batch, "target": batch}`` batch (domain adaptation)."""
    return isinstance(batch, Mapping) and all(k in batch for k in DOMAINS)


def split_batch(batch: Any) -> tuple[Inputs, Targets]:
    """``(inputs, targets)`` of a batch of any of the contract's forms (targets ``None`` if it has none).

    Raises a ``ValueError`` naming the problem for anything else (a domain-adaptation batch included:
    split its ``"source"`` and ``"target"`` parts one by one).
    """
    if is_domain_batch(batch):
        raise ValueError(
            "This is a domain-adaptation batch ({'source': ..., 'target': ...}); split batch['source'] and "
            "batch['target'] one by one."
        )
    if isinstance(batch, Mapping):
        if "inputs" not in batch:
            raise ValueError(
                f"A dict batch needs an 'inputs' key (and 'targets' for training); this one has "
                f"{sorted(map(str, batch))}. Return {{'inputs': ..., 'targets': ...}} from the Dataset, or (inputs, targets)."
            )
        inputs, targets = batch["inputs"], batch.get("targets")
    elif isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and 1 <= len(batch):
        inputs = batch[0]
        targets = batch[1] if len(batch) > 1 else None
    else:
        raise ValueError(
            f"A batch is (inputs, targets), {{'inputs': ..., 'targets': ...}} or inputs alone; got "
            f"{type(batch).__name__}. See lightning_ft.batch for the contract."
        )
    check_inputs(inputs)
    return inputs, targets


def check_inputs(inputs: Any) -> None:
    """Inputs are a tensor, or a non-empty dict of tensors with one batch size."""
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 0:
            raise ValueError("Inputs must have a batch dimension; got a 0-d tensor.")
        return
    if isinstance(inputs, Mapping) and inputs and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in inputs.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"Every tensor of dict inputs has the batch first and the same batch size; got {sizes}.")
        return
    kind = type(inputs).__name__
    if isinstance(inputs, Mapping):
        kind = "dict of " + ", ".join(sorted({type(v).__name__ for v in inputs.values()})) if inputs else "empty dict"
    raise ValueError(f"Inputs must be a tensor or a dict of tensors, got {kind}.")


def batch_size(inputs: Inputs) -> int:
    """The number of samples in ``inputs`` (a tensor or a dict of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    return int(next(iter(inputs.values())).shape[0])


def labelled(targets: torch.Tensor) -> torch.Tensor:
    """The rows that carry a label (``targets != MISSING``)."""
    return targets != MISSING


def check_class_targets(y: Any, num_classes: int, task: str | None = None) -> torch.Tensor:
    """Class-index targets: a 1-D integer tensor of ``0 .. num_classes-1``, :data:`MISSING` for no label.

    Returns ``y``; raises a ``ValueError`` that says what is wrong and how to fix it.
    """
    where = f" of task '{task}'" if task else ""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"Targets{where} must be a tensor of class indices, got {type(y).__name__}.")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(
            f"Targets{where} must be a 1-D integer tensor of class indices, got dtype {y.dtype} and shape "
            f"{tuple(y.shape)}. Mark a sample without a label with lightning_ft.batch.MISSING ({MISSING})."
        )
    bad = ((y < 0) | (y >= num_classes)) & labelled(y)
    if bool(bad.any()):
        raise ValueError(
            f"Label {int(y[bad][0])}{where} is outside [0, {num_classes - 1}]: the model has num_classes="
            f"{num_classes}. Set num_classes to the number of classes in the data (labels 0..num_classes-1); "
            f"a sample without a label is marked {MISSING}."
        )
    return y
