"""Sparse autoencoders: one small module per architecture behind a registry.

    from sae_train.saes import build_sae, load_sae
    sae = build_sae({"kind": "topk", "n_latents": 16384, "k": 32}, d_in=640)
    out = sae(x)                       # SAEOutput(reconstruction, latent_values, latent_indices, losses)
    sae = load_sae("runs/x/layers.6.resid")   # ours, sparsify or SAELens folders
    codes = sae.encode(h)              # (batch, n_latents), raw activations in
"""

from sae_train.saes.base import (SAEConfig, SAEConfigError, SAEOutput, SparseAutoencoder,
                                 fraction_of_variance_unexplained, geometric_median,
                                 input_scale_from_sample)
from sae_train.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae_train.saes.io import (EXPORT_FORMATS, SAEFormatError, load_pretrained_sae, load_sae,
                               load_saes, save_sae)
from sae_train.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae_train.saes.registry import SAE_CLASSES, build_sae, register_sae, sae_class, sae_config
from sae_train.saes.relu import ReLUConfig, ReLUSAE
from sae_train.saes.topk import TopKConfig, TopKSAE

__all__ = [
    "SAEConfig", "SAEConfigError", "SAEOutput", "SparseAutoencoder", "TopKConfig", "TopKSAE",
    "BatchTopKConfig", "BatchTopKSAE", "ReLUConfig", "ReLUSAE", "JumpReLUConfig", "JumpReLUSAE",
    "SAE_CLASSES", "build_sae", "register_sae", "sae_class", "sae_config", "load_sae",
    "load_saes", "save_sae", "SAEFormatError", "EXPORT_FORMATS", "load_pretrained_sae", "fraction_of_variance_unexplained",
    "geometric_median", "input_scale_from_sample",
]
