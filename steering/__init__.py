"""Neural FOXP2: find and steer the language neurons of a causal LM (uses sae_train).

The runtime API: ``SteeringArtifact.load(folder)`` and ``with steer(model, artifact, gamma=…)``.

Layout: three rooms on a shared base, walked in one direction (each part may import only from
itself and the parts above it; tests/test_steering_layout.py checks it)::

    language/   the shared base: token sets V_t, V_en and the defaultness ΔM (used by all)
    localise/   stages I–II (foxp2-localise): selectivity, lift, tracing, LAPE, spectra, window
    steer/      the edit: artifact, runtime hooks, the method registry (steer/methods/)
    evaluate/   tuning and scoring on held-out splits: judge, harness, native row, report;
                the foxp2-steer orchestrator (tuning is an evaluation on the tuning split)
    apps/       the Hydra entry points (foxp2-localise, -steer, -generate, -demo), with
                steering/config.py (both apps' schemas), steering/api.py (the stages as Python
                functions) and this file on top

A stage reads the previous stage's files (localise writes ``directions.safetensors``; steer
reads it through :class:`steering.steer.localisation.Localisation`), never its later ones.
"""

from steering.steer.artifact import LayerEdit, SteeringArtifact
from steering.steer.runtime import steer

__all__ = ["LayerEdit", "SteeringArtifact", "steer"]
