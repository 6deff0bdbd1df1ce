"""Domain-adaptation losses, multi-task weighting and label-free scores: the maths in functions, thin modules beside them (torch only)."""

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
from lightning_ft.losses.adaptation import (
    ADAPTATION_LOSSES,
    adaptation_of,
    domain_forward,
    drop_adaptation_state,
)
from lightning_ft.losses.label_free import entropy, information_maximization, prediction_sums
from lightning_ft.losses.multitask import TaskWeighting, bounded_log_vars, fixed_weighted, uncertainty_weighted
from lightning_ft.losses.discrepancy import CORALLoss, MeanAlignmentLoss, MMDLoss, coral, mean_alignment, mmd, mmd_linear
from lightning_ft.losses.self_training import (
    EntropyLoss,
    MCCLoss,
    PseudoLabelLoss,
    minimum_class_confusion,
    pseudo_label_loss,
)

__all__ = [
    "ADAPTATION_LOSSES",
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
    "TaskWeighting",
    "adaptation_of",
    "bounded_log_vars",
    "cdan_loss",
    "coral",
    "dann_loss",
    "domain_forward",
    "drop_adaptation_state",
    "entropy",
    "fixed_weighted",
    "gather_with_grad",
    "grl_coefficient",
    "information_maximization",
    "mean_alignment",
    "minimum_class_confusion",
    "mmd",
    "mmd_linear",
    "prediction_sums",
    "pseudo_label_loss",
    "reverse_gradient",
    "uncertainty_weighted",
]
