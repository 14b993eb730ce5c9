"""Build the steering artifacts of Neural FOXP2 and of every baseline from one localisation.

Inputs: the localisation folder (``directions.safetensors``, ``localise/summary.json``,
``localise/layers.json``; :mod:`steering.localise.run`) and the activation cache (for the residual
mean differences of CAA). Every method is a :class:`~steering.steer.artifact.SteeringArtifact` at
λ = β = 1 (the tuning stage picks the strengths), so one runtime and one harness serve all.

Methods (``METHODS``), all in the localised window W unless stated:

``foxp2``          feature mode (resid): push a_ℓ = (V_r V_rᵀ μΔ_S)·W_dec[S] / |W| — the part of
                   the target-minus-English mean code on the support S_ℓ that lies in the top-r
                   difference subspace, decoded — plus the English term on the most
                   English-selective features N_en (their mean code m = μ_en[N_en]).
``foxp2_neurons``  neuron mode: push (μ^act_t − μ^act_en) on the traced N_t, English term on the
                   traced N_en with m = μ^act_en[N_en]. Not split by |W| (MLP writes are
                   increments of the stream, not its state).
``foxp2_replace``  the paper-literal reconstruction-replace with the same δz (SAE error included).
``foxp2_pos``      the primary FOXP2 mode (``foxp2`` or ``foxp2_neurons``) with β = 0 (tuned
                   over λ only).
``foxp2_neg``      the same with λ = 0 (tuned over β only).
``caa_layer``      residual mean difference (target − English sentence means, discovery pairs)
                   added at one layer: the one with the largest single-layer causal gain, or
                   the one the steer stage's layer scan picks on the tuning split.
``caa_window``     the same at every window layer, each divided by |W|.
``lape``           neuron mode on LAPE's language-specific neurons of the window layers (target
                   and English sets), same push and English term as ``foxp2_neurons``.
``random``         neuron mode on random neurons, the traced sizes per layer (seeded), the push
                   (their own μ^act_t − μ^act_en) rescaled to foxp2_neurons' norm per layer.
``prompting``      no edit; the prompt asks for the language ("Answer in Spanish.").
``none``           no edit (the unsteered model; evaluated once, it is the reference).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from steering.steer.artifact import LayerEdit, SteeringArtifact

log = logging.getLogger(__name__)

METHODS = ("none", "prompting", "foxp2", "foxp2_neurons", "foxp2_replace", "foxp2_pos",
           "foxp2_neg", "caa_layer", "caa_window", "lape", "random")
LANGUAGE_NAMES = {"es": "Spanish", "hi": "Hindi", "en": "English", "fr": "French",
                  "de": "German", "pt": "Portuguese", "it": "Italian", "zh": "Chinese",
                  "ja": "Japanese", "ru": "Russian", "ar": "Arabic", "bn": "Bengali",
                  "mr": "Marathi", "ne": "Nepali", "ur": "Urdu"}


class BuildError(ValueError):
    """A localisation that cannot give the requested steer (names what is missing)."""


class Localisation:
    """The files of one ``foxp2-localise`` run, read once."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        directions = self.folder / "directions.safetensors"
        summary = self.folder / "localise" / "summary.json"
        for p in (directions, summary):
            if not p.is_file():
                raise BuildError(f"{self.folder} is not a finished localisation: {p} is missing "
                                 "(run foxp2-localise first)")
        with safe_open(str(directions), "pt") as f:
            self.meta = f.metadata() or {}
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.summary = json.loads(summary.read_text())
        layers_file = self.folder / "localise" / "layers.json"
        self.records = json.loads(layers_file.read_text()) if layers_file.is_file() else {}
        self.window: list[int] = [int(x) for x in self.tensors["window"].tolist()]
        self.layers: list[int] = [int(x) for x in self.tensors["layers"].tolist()]
        self.target = self.meta.get("target", self.summary.get("target"))
        self.english = self.meta.get("english", self.summary.get("english", "en"))
        self.saes = json.loads(self.meta.get("saes", "{}"))
        if "english_feature_ids" not in {k.split(".", 2)[-1] for k in self.tensors}:
            raise BuildError(f"{directions} has no English features (written by an older "
                             "foxp2-localise); re-run foxp2-localise")

    def t(self, layer: int, name: str) -> Tensor:
        key = f"layers.{layer}.{name}"
        if key not in self.tensors:
            raise BuildError(f"{self.folder}/directions.safetensors has no {key}")
        return self.tensors[key]

    def encoder_rows(self, layer: int, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder rows and effective biases of latents ``ids`` (support_* in the directions
        file; older files: read from the SAE the localisation used)."""
        if f"layers.{layer}.support_encoder" in self.tensors and \
                torch.equal(ids, self.t(layer, "support")):
            return self.t(layer, "support_encoder"), self.t(layer, "support_bias")
        from sae_train.saes.io import load_sae

        path = self.saes.get(f"layers.{layer}.resid")
        if path is None or not Path(path).is_dir():
            raise BuildError(f"no encoder rows for layer {layer}: the directions file lacks "
                             f"support_encoder and the SAE {path!r} is not there")
        sae = load_sae(path)
        w = sae.encoder_weight.detach().float()
        bias = sae.b_enc.detach().float() - w @ sae.b_dec.detach().float()
        return w[ids.long()], bias[ids.long()]

    def best_causal_layer(self) -> int:
        gains = {int(l): r.get("causal_gain") for l, r in self.summary["layers"].items()}
        gains = {l: g for l, g in gains.items() if g is not None and np.isfinite(g)}
        if not gains:
            raise BuildError("no layer has a single-layer causal gain in localise/summary.json")
        return max(gains, key=gains.get)

    def provenance(self) -> dict:
        return {"localise": str(self.folder.resolve()), "window": self.window,
                "model": self.summary.get("provenance", {}).get("model"),
                "localise_created": self.summary.get("provenance", {}).get("created")}


# --------------------------------------------------------------------------- pieces
def feature_push(loc: Localisation, layer: int, split: int) -> Tensor:
    """a_ℓ = (V_r V_rᵀ μΔ_S)·W_dec[S] / split (zeros when the layer has no support)."""
    support, basis = loc.t(layer, "support"), loc.t(layer, "basis")
    dec = loc.t(layer, "support_decoder")
    if support.numel() == 0 or basis.numel() == 0:
        return torch.zeros(dec.shape[1] if dec.ndim == 2 else 0)
    mu = (loc.t(layer, "mu_target") - loc.t(layer, "mu_english"))[support]
    projected = basis @ (basis.T @ mu)
    return (projected @ dec) / split


def feature_gate(loc: Localisation, layer: int) -> dict:
    """The target coordinate of the support features (artifact docstring, saturating push)."""
    support = loc.t(layer, "support")
    mu_t, mu_en = loc.t(layer, "mu_target")[support], loc.t(layer, "mu_english")[support]
    encoder, bias = loc.encoder_rows(layer, support)
    return {"gate_encoder": encoder, "gate_bias": bias, "gate_base": mu_en,
            "gate_delta": mu_t - mu_en}


def feature_english_term(loc: Localisation, layer: int) -> dict:
    ids = loc.t(layer, "english_feature_ids")
    return {"remove_encoder": loc.t(layer, "english_encoder"),
            "remove_bias": loc.t(layer, "english_bias"),
            "remove_mean": loc.t(layer, "mu_english")[ids],
            "remove_decoder": loc.t(layer, "english_decoder")}


def neuron_edit(loc: Localisation, layer: int, target_ids: Tensor, english_ids: Tensor,
                saturating: bool = True) -> LayerEdit:
    mu_t, mu_en = loc.t(layer, "neuron_mu_target"), loc.t(layer, "neuron_mu_english")
    target_ids, english_ids = target_ids.long(), english_ids.long()
    delta = (mu_t - mu_en)[target_ids]
    gate = {"gate_index": target_ids, "gate_base": mu_en[target_ids], "gate_delta": delta} \
        if saturating else {}
    return LayerEdit(layer=layer, space="neurons", add=delta, add_index=target_ids,
                     remove_index=english_ids, remove_mean=mu_en[english_ids], **gate)


def residual_mean_differences(cache_dir: str | Path, layers: Sequence[int], target: str,
                              english: str, splits: Sequence[str] = ("discovery",)
                              ) -> dict[int, Tensor]:
    """Per layer: mean over pairs of (target sentence − English sentence) token-mean residuals."""
    from sae_train.cache.reader import ActivationCache
    from steering.localise.selectivity import paired_codes_from_cache

    cache = ActivationCache(cache_dir)
    out = {}
    for layer in layers:
        codes = paired_codes_from_cache(cache, f"layers.{layer}.resid", target, english,
                                        list(splits), reduction="mean", encode=None)
        out[layer] = (codes.target.float() - codes.english.float()).mean(0)
    return out


# --------------------------------------------------------------------------- methods
def build_method(method: str, loc: Localisation, *, cache_dir: str | Path | None = None,
                 window: Sequence[int] | None = None, seed: int = 0,
                 position: str = "prompt_end", decode_steps: int = 4, sustain: float = 0.0,
                 caa_means: dict[int, Tensor] | None = None,
                 saturating: bool = True, ablation_of: str = "foxp2",
                 caa_layer: int | None = None) -> SteeringArtifact:
    """The artifact of ``method`` (see the module docstring) at λ = β = 1.
    ``ablation_of``: which FOXP2 mode ``foxp2_pos`` / ``foxp2_neg`` ablate (``foxp2`` or
    ``foxp2_neurons``; the evaluation passes its primary method). ``caa_layer``: the layer of
    ``caa_layer`` (None: the localisation's best single-layer causal gain; the steer stage
    can choose it on the tuning split, ``tuning.caa_layer_stride``)."""
    if ablation_of not in ("foxp2", "foxp2_neurons"):
        raise BuildError(f"ablation_of={ablation_of!r}: use foxp2 or foxp2_neurons")
    if method not in METHODS:
        raise BuildError(f"unknown method {method!r}; use one of {list(METHODS)}")
    window = list(window) if window is not None else list(loc.window)
    missing = sorted(set(window) - set(loc.layers))
    if missing:
        raise BuildError(f"window layers {missing} were not analysed by the localisation "
                         f"(analysed: {loc.layers})")
    split = len(window)
    edits: list[LayerEdit] = []
    lam, beta, prefix = 1.0, 1.0, ""
    details: dict = {"window_split": split, "saturating": saturating}
    if method == "prompting":
        name = LANGUAGE_NAMES.get(loc.target, loc.target)
        prefix = f"Answer in {name}. "
    elif method == "foxp2" or (method in ("foxp2_pos", "foxp2_neg")
                               and ablation_of == "foxp2"):
        for layer in window:
            edits.append(LayerEdit(layer=layer, space="resid",
                                   add=feature_push(loc, layer, split),
                                   **feature_english_term(loc, layer),
                                   **(feature_gate(loc, layer) if saturating else {})))
        lam = 0.0 if method == "foxp2_neg" else 1.0
        beta = 0.0 if method == "foxp2_pos" else 1.0
    elif method in ("foxp2_neurons", "foxp2_pos", "foxp2_neg"):
        for layer in window:
            edits.append(neuron_edit(loc, layer, loc.t(layer, "target_neurons"),
                                     loc.t(layer, "english_neurons"), saturating))
        lam = 0.0 if method == "foxp2_neg" else 1.0
        beta = 0.0 if method == "foxp2_pos" else 1.0
        details["space"] = "neurons"
    elif method == "foxp2_replace":
        site_paths = loc.saes
        for layer in window:
            support, basis = loc.t(layer, "support"), loc.t(layer, "basis")
            mu = (loc.t(layer, "mu_target") - loc.t(layer, "mu_english"))[support]
            delta = basis @ (basis.T @ mu) / split if basis.numel() else torch.zeros(0)
            ids = loc.t(layer, "english_feature_ids")
            path = site_paths.get(f"layers.{layer}.resid")
            if path is None:
                raise BuildError(f"no SAE path for layers.{layer}.resid in the localisation")
            edits.append(LayerEdit(layer=layer, space="replace", add=delta,
                                   add_index=support.long(), remove_index=ids.long(),
                                   remove_mean=loc.t(layer, "mu_english")[ids], sae_path=path))
    elif method == "lape":
        for layer in window:
            rec = loc.records.get(str(layer), {}).get("lape")
            if rec is None:
                raise BuildError(f"localise/layers.json has no LAPE sets for layer {layer}")
            edits.append(neuron_edit(loc, layer, torch.tensor(rec["target_neurons"]),
                                     torch.tensor(rec["english_neurons"]), saturating))
    elif method == "random":
        g = torch.Generator().manual_seed(seed)
        for layer in window:
            n_neurons = loc.t(layer, "neuron_mu_target").numel()
            n_t = loc.t(layer, "target_neurons").numel()
            n_en = loc.t(layer, "english_neurons").numel()
            perm = torch.randperm(n_neurons, generator=g)
            edit = neuron_edit(loc, layer, perm[:n_t], perm[n_t:n_t + n_en], saturating)
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
        details["sizes_from"] = "foxp2_neurons"
        details["push_norm_from"] = "foxp2_neurons"
    elif method in ("caa_layer", "caa_window"):
        if method == "caa_layer":
            layers = [loc.best_causal_layer() if caa_layer is None else int(caa_layer)]
            if layers[0] not in loc.layers:
                raise BuildError(f"caa_layer={layers[0]} was not analysed by the localisation "
                                 f"(analysed: {loc.layers})")
        else:
            layers = window
        if caa_means is None or not set(layers) <= set(caa_means):
            if cache_dir is None:
                raise BuildError(f"{method} needs the activation cache (cache_dir)")
            caa_means = {**(caa_means or {}),
                         **residual_mean_differences(cache_dir, layers, loc.target,
                                                     loc.english)}
        div = 1 if method == "caa_layer" else split
        edits = [LayerEdit(layer=l, space="resid", add=caa_means[l] / div) for l in layers]
        beta = 0.0
        details["layers"] = layers
    return SteeringArtifact(method=method, target=loc.target, english=loc.english,
                            edits=edits, lam=lam, beta=beta, position=position,
                            decode_steps=decode_steps, sustain=sustain, prompt_prefix=prefix,
                            provenance={**loc.provenance(), **details})


# Which strengths each method tunes: "both" (λ, β grid), "lam", "beta" or "none".
TUNED = {"none": "none", "prompting": "none", "foxp2": "both", "foxp2_neurons": "both",
         "foxp2_replace": "both", "foxp2_pos": "lam", "foxp2_neg": "beta", "caa_layer": "lam",
         "caa_window": "lam", "lape": "both", "random": "both"}
