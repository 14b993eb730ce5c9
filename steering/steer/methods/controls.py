"""The controls: no edit, an instruction in the prompt, and random neurons.

``none``       no edit (the unsteered model; evaluated once, it is the reference).
``prompting``  no edit; the prompt asks for the language ("Answer in Spanish.").
``random``     neuron mode on random neurons, the traced sizes per layer (seeded), the push
               (their own μ^act_t − μ^act_en) rescaled to foxp2_neurons' norm per layer.
"""

from __future__ import annotations

import torch

from steering.steer.artifact import SteeringArtifact
from steering.steer.build import LANGUAGE_NAMES, neuron_edit
from steering.steer.methods.spec import NO_TUNING, BuildRequest, MethodSpec, Tuning


def build_none(request: BuildRequest) -> SteeringArtifact:
    return request.artifact("none", [])


def build_prompting(request: BuildRequest) -> SteeringArtifact:
    target = request.localisation.target
    name = LANGUAGE_NAMES.get(target, target)
    return request.artifact("prompting", [], prompt_prefix=f"Answer in {name}. ")


def build_random(request: BuildRequest) -> SteeringArtifact:
    loc, edits = request.localisation, []
    g = torch.Generator().manual_seed(request.seed)
    for layer in request.window:
        n_neurons = loc.t(layer, "neuron_mu_target").numel()
        n_t = loc.t(layer, "target_neurons").numel()
        n_en = loc.t(layer, "english_neurons").numel()
        perm = torch.randperm(n_neurons, generator=g)
        edit = neuron_edit(loc, layer, perm[:n_t], perm[n_t:n_t + n_en], request.saturating)
        # the push rescaled to FOXP2's norm at this layer (the gate's delta with it, so
        # it saturates at the push's own size as FOXP2's does): a control for "which
        # neurons", not for "how hard"
        traced = neuron_edit(loc, layer, loc.t(layer, "target_neurons"),
                             loc.t(layer, "english_neurons")).add
        scale = float(traced.norm()) / max(float(edit.add.norm()), 1e-12) \
            if edit.add.numel() else 1.0
        edit.add = edit.add * scale
        if edit.gate_delta is not None:
            edit.gate_delta = edit.gate_delta * scale
        edits.append(edit)
    return request.artifact("random", edits, sizes_from="foxp2_neurons",
                            push_norm_from="foxp2_neurons")


NONE = MethodSpec("none", build_none, NO_TUNING, "the unsteered model (the reference)",
                  role="control")
PROMPTING = MethodSpec("prompting", build_prompting, NO_TUNING,
                       "an instruction in the prompt, no edit")
RANDOM = MethodSpec("random", build_random, Tuning("both"),
                    "random neurons of the traced sizes, push at foxp2_neurons' norm", role="control")
