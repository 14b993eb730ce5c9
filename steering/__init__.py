"""Neural FOXP2: find and steer the language neurons of a causal LM (uses sae_train).

The runtime API: ``SteeringArtifact.load(folder)`` and ``with steer(model, artifact, gamma=…)``.
"""

from steering.steer.artifact import LayerEdit, SteeringArtifact
from steering.steer.runtime import steer

__all__ = ["LayerEdit", "SteeringArtifact", "steer"]
