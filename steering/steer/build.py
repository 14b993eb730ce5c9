"""The pieces every steering method is built from, read from one localisation.

A method's build function (:mod:`steering.steer.methods`) assembles
:class:`~steering.steer.artifact.LayerEdit` s from these: the feature-mode push, gate and English
term of a resid layer, the neuron-mode edit of a set of MLP neurons, and CAA's residual mean
differences (from the activation cache). Every method's artifact is built at λ = β = 1; the
tuning stage picks the strengths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from steering.steer.artifact import LayerEdit
from steering.steer.localisation import BuildError, Localisation


LANGUAGE_NAMES = {"es": "Spanish", "hi": "Hindi", "en": "English", "fr": "French",
                  "de": "German", "pt": "Portuguese", "it": "Italian", "zh": "Chinese",
                  "ja": "Japanese", "ru": "Russian", "ar": "Arabic", "bn": "Bengali",
                  "mr": "Marathi", "ne": "Nepali", "ur": "Urdu"}

__all__ = ["LANGUAGE_NAMES", "BuildError", "Localisation", "ResidualMeans", "feature_english_term",
           "feature_gate", "feature_push", "neuron_edit", "residual_mean_differences"]


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


class ResidualMeans:
    """CAA's per-layer residual mean differences, read from the cache on first use and kept
    (each layer is computed alone, so the order of requests does not change a value)."""

    def __init__(self, cache_dir: str | Path | None, target: str, english: str,
                 known: dict[int, Tensor] | None = None):
        self.cache_dir, self.target, self.english = cache_dir, target, english
        self.means: dict[int, Tensor] = dict(known or {})

    def __call__(self, layers: Sequence[int], method: str) -> dict[int, Tensor]:
        missing = [l for l in layers if l not in self.means]
        if missing:
            if self.cache_dir is None:
                raise BuildError(f"{method} needs the activation cache (cache_dir)")
            self.means.update(residual_mean_differences(self.cache_dir, missing, self.target,
                                                        self.english))
        return {l: self.means[l] for l in layers}
