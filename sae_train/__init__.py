"""SAEs on cached LLM activations: the activation cache, SAE architectures and training.

The stages as Python functions (the Hydra apps ``sae-cache`` / ``sae-train`` run the same code):
:func:`cache_activations`, :func:`train_saes`, :func:`compose_config` (see :mod:`sae_train.api`).
Imported lazily, so ``import sae_train`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "cache_activations", "compose_config", "train_saes"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sae_train import api

        return getattr(api, name)
    raise AttributeError(f"module 'sae_train' has no attribute {name!r}")
