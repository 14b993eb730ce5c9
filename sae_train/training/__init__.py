"""SAE training with Lightning: the shared LightningModule, metrics, callbacks and configs."""

from sae_train.training.export import ExportSAEs
from sae_train.training.metrics import (ExplainedVariance, FeatureDensity,
                                        FractionOfVarianceUnexplained, MeanL0, dead_fraction,
                                        density_histogram)
from sae_train.training.module import (NonFiniteLossError, SAETrainingModule,
                                       default_learning_rate)
from sae_train.training.spliced_eval import (SplicedEvalCallback, SplicedLMEvaluator,
                                             splice_site)

__all__ = [
    "SAETrainingModule", "NonFiniteLossError", "default_learning_rate", "ExportSAEs",
    "FractionOfVarianceUnexplained", "ExplainedVariance", "MeanL0", "FeatureDensity",
    "dead_fraction", "density_histogram", "SplicedEvalCallback", "SplicedLMEvaluator",
    "splice_site",
]
