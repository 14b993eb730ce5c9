"""``lape``: neuron mode on LAPE's language-specific neurons of the window layers (target and
English sets, ``localise/layers.json``), the same push and English term as ``foxp2_neurons``."""

from __future__ import annotations

import torch

from steering.steer.artifact import SteeringArtifact
from steering.steer.build import BuildError, neuron_edit
from steering.steer.methods.spec import BuildRequest, MethodSpec, Tuning


def build_lape(request: BuildRequest) -> SteeringArtifact:
    loc, edits = request.localisation, []
    for layer in request.window:
        rec = loc.records.get(str(layer), {}).get("lape")
        if rec is None:
            raise BuildError(f"localise/layers.json has no LAPE sets for layer {layer} (a "
                             "localisation run with tracing.lape=false?): rerun foxp2-localise "
                             "with tracing.lape=true (its lifts are resumed)")
        edits.append(neuron_edit(loc, layer, torch.tensor(rec["target_neurons"]),
                                 torch.tensor(rec["english_neurons"]), request.saturating))
    return request.artifact("lape", edits)


LAPE = MethodSpec("lape", build_lape, Tuning("both"), "neuron mode on LAPE's neurons",
                  reads_lape=True)
