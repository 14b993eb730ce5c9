"""Hydra entry points of the steering package (`foxp2-localise`, ...).

They read the same ``conf/`` folder as the ``sae_train`` apps (:func:`config_dir`).
"""

from __future__ import annotations

from sae_train.apps import config_dir

__all__ = ["config_dir"]
