"""lightning_ft: fine-tune pretrained models well, in PyTorch Lightning."""

from lightning_ft.backbones import create_backbone
from lightning_ft.groups import LayerGroup, format_layer_groups, layer_groups
from lightning_ft.weights import PRETRAINED_ASSETS
from lightning_ft.heads import (
    AttentionPoolHead,
    LinearHead,
    MLPHead,
    PrototypeHead,
    TaskHeads,
    TemporalHead,
    build_head,
)
from lightning_ft.module import FineTuneModule
from lightning_ft.optim import WarmupCosine, param_groups_layer_decay

__version__ = "0.1.0"

__all__ = [
    "PRETRAINED_ASSETS",
    "AttentionPoolHead",
    "FineTuneModule",
    "LayerGroup",
    "LinearHead",
    "MLPHead",
    "PrototypeHead",
    "TaskHeads",
    "TemporalHead",
    "WarmupCosine",
    "__version__",
    "build_head",
    "create_backbone",
    "format_layer_groups",
    "layer_groups",
    "param_groups_layer_decay",
]
