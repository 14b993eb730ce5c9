"""Neural FOXP2's own methods, all in the steering window W.

``foxp2``          feature mode (resid): push a_ℓ = (V_r V_rᵀ μΔ_S)·W_dec[S] / |W| — the part of
                   the target-minus-English mean code on the support S_ℓ that lies in the top-r
                   difference subspace, decoded — plus the English term on the most
                   English-selective features N_en (their mean code m = μ_en[N_en]).
``foxp2_neurons``  neuron mode: push (μ^act_t − μ^act_en) on the traced N_t, English term on the
                   traced N_en with m = μ^act_en[N_en]. Not split by |W| (MLP writes are
                   increments of the stream, not its state).
``foxp2_replace``  the paper-literal reconstruction-replace with the same δz (SAE error included).
``foxp2_pos``      the primary FOXP2 mode (``foxp2`` or ``foxp2_neurons``, the request's
                   ``ablation_of``) with β = 0 (tuned over λ only).
``foxp2_neg``      the same with λ = 0 (tuned over β only).
"""

from __future__ import annotations

import torch

from steering.steer.artifact import LayerEdit, SteeringArtifact
from steering.steer.build import (BuildError, feature_english_term, feature_gate, feature_push,
                                  neuron_edit)
from steering.steer.methods.spec import BuildRequest, MethodSpec, Tuning


def feature_edits(request: BuildRequest) -> list[LayerEdit]:
    """Feature mode at every window layer: the decoded push, the English term, the gate."""
    loc = request.localisation
    return [LayerEdit(layer=layer, space="resid", add=feature_push(loc, layer, request.split),
                      **feature_english_term(loc, layer),
                      **(feature_gate(loc, layer) if request.saturating else {}))
            for layer in request.window]


def traced_neuron_edits(request: BuildRequest) -> list[LayerEdit]:
    """Neuron mode at every window layer on the traced N_t (push) and N_en (English term)."""
    loc = request.localisation
    return [neuron_edit(loc, layer, loc.t(layer, "target_neurons"),
                        loc.t(layer, "english_neurons"), request.saturating)
            for layer in request.window]


def build_foxp2(request: BuildRequest) -> SteeringArtifact:
    return request.artifact("foxp2", feature_edits(request))


def build_foxp2_neurons(request: BuildRequest) -> SteeringArtifact:
    return request.artifact("foxp2_neurons", traced_neuron_edits(request), space="neurons")


def build_foxp2_replace(request: BuildRequest) -> SteeringArtifact:
    loc, edits = request.localisation, []
    for layer in request.window:
        support, basis = loc.t(layer, "support"), loc.t(layer, "basis")
        mu = (loc.t(layer, "mu_target") - loc.t(layer, "mu_english"))[support]
        delta = basis @ (basis.T @ mu) / request.split if basis.numel() else torch.zeros(0)
        ids = loc.t(layer, "english_feature_ids")
        path = loc.saes.get(f"layers.{layer}.resid")
        if path is None:
            raise BuildError(f"no SAE path for layers.{layer}.resid in the localisation")
        edits.append(LayerEdit(layer=layer, space="replace", add=delta,
                               add_index=support.long(), remove_index=ids.long(),
                               remove_mean=loc.t(layer, "mu_english")[ids], sae_path=path))
    return request.artifact("foxp2_replace", edits)


def _ablation(method: str, request: BuildRequest) -> SteeringArtifact:
    """``method`` (foxp2_pos / foxp2_neg) of the request's FOXP2 mode: one term switched off."""
    lam = 0.0 if method == "foxp2_neg" else 1.0
    beta = 0.0 if method == "foxp2_pos" else 1.0
    if request.ablation_of == "foxp2":
        return request.artifact(method, feature_edits(request), lam=lam, beta=beta)
    return request.artifact(method, traced_neuron_edits(request), lam=lam, beta=beta,
                            space="neurons")


def build_foxp2_pos(request: BuildRequest) -> SteeringArtifact:
    return _ablation("foxp2_pos", request)


def build_foxp2_neg(request: BuildRequest) -> SteeringArtifact:
    return _ablation("foxp2_neg", request)


FOXP2 = MethodSpec("foxp2", build_foxp2, Tuning("both"),
                   "feature mode: decoded difference-subspace push + English term",
                   role="foxp2")
FOXP2_NEURONS = MethodSpec("foxp2_neurons", build_foxp2_neurons, Tuning("both"),
                           "neuron mode on the traced N_t / N_en", role="foxp2")
FOXP2_REPLACE = MethodSpec("foxp2_replace", build_foxp2_replace, Tuning("both"),
                           "the paper-literal reconstruction-replace (SAE error included)",
                           role="foxp2")
FOXP2_POS = MethodSpec("foxp2_pos", build_foxp2_pos, Tuning("lam"),
                       "the primary FOXP2 mode, push only (β = 0)",
                       same_as_primary_at_beta_zero=True, role="control")
FOXP2_NEG = MethodSpec("foxp2_neg", build_foxp2_neg, Tuning("beta"),
                       "the primary FOXP2 mode, English term only (λ = 0)", role="control")
