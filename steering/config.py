"""The two steering apps' schemas, in one place for ``conf/*.yaml``'s readers.

Each schema lives with its stage, one commented field per key:
``foxp2-localise`` → :class:`steering.localise.config.LocaliseAppConfig` (``localise_schema``),
``foxp2-steer`` → :class:`steering.evaluate.config.SteerAppConfig` (``steer_schema``).
This module only re-exports them (it sits with the apps, on top of every stage).
"""

from steering.evaluate.config import (FrontierConfig, SteerAppConfig, SteerEvalConfig,
                                      SteerTuningConfig, WandbReportConfig, register_steer_configs)
from steering.localise.config import (SPLIT_NAMES, DefaultnessConfig, LiftConfig, LocaliseAppConfig,
                                      LocaliseConfigError, SelectivityConfig, SpectraConfig,
                                      TokenSetsConfig, TracingConfig, WindowConfig,
                                      register_localise_configs)

__all__ = ["SPLIT_NAMES", "DefaultnessConfig", "FrontierConfig", "LiftConfig",
           "LocaliseAppConfig", "LocaliseConfigError", "SelectivityConfig", "SpectraConfig",
           "SteerAppConfig", "SteerEvalConfig", "SteerTuningConfig", "TokenSetsConfig",
           "TracingConfig", "WandbReportConfig", "WindowConfig", "register_localise_configs",
           "register_steer_configs"]
