"""Drop-in callbacks: they work on FineTuneModule and, unchanged, on your own LightningModule."""

from lightning_ft.callbacks.adaptation import DomainAdaptation
from lightning_ft.callbacks.adapt_batchnorm import AdaptBatchNorm
from lightning_ft.callbacks.feature_cache import FeatureCache
from lightning_ft.callbacks.layer_decay import LayerwiseLRDecay
from lightning_ft.callbacks.predictions import PredictionWriter
from lightning_ft.callbacks.prototypes import SupportPrototypes
from lightning_ft.callbacks.temperature import TemperatureScaling
from lightning_ft.callbacks.unfreezing import GradualUnfreezing, LinearProbing
from lightning_ft.callbacks.update_monitor import UpdateMonitor

__all__ = ["AdaptBatchNorm", "DomainAdaptation", "FeatureCache", "GradualUnfreezing", "LayerwiseLRDecay", "LinearProbing",
           "PredictionWriter", "SupportPrototypes", "TemperatureScaling", "UpdateMonitor"]
