"""Domain-adaptation losses: the maths in functions, thin modules beside them (torch only)."""

from lightning_ft.distributed import gather_with_grad
from lightning_ft.losses.adversarial import (
    CDANLoss,
    DANNLoss,
    DomainDiscriminator,
    GradientReversal,
    cdan_loss,
    dann_loss,
    grl_coefficient,
    reverse_gradient,
)
from lightning_ft.losses.discrepancy import CORALLoss, MeanAlignmentLoss, MMDLoss, coral, mean_alignment, mmd, mmd_linear
from lightning_ft.losses.self_training import (
    EntropyLoss,
    MCCLoss,
    PseudoLabelLoss,
    entropy,
    minimum_class_confusion,
    pseudo_label_loss,
)

__all__ = [
    "CDANLoss",
    "CORALLoss",
    "DANNLoss",
    "DomainDiscriminator",
    "EntropyLoss",
    "GradientReversal",
    "MCCLoss",
    "MMDLoss",
    "MeanAlignmentLoss",
    "PseudoLabelLoss",
    "cdan_loss",
    "coral",
    "dann_loss",
    "entropy",
    "gather_with_grad",
    "grl_coefficient",
    "mean_alignment",
    "minimum_class_confusion",
    "mmd",
    "mmd_linear",
    "pseudo_label_loss",
    "reverse_gradient",
]
