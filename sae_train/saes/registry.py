"""Architecture name → (config dataclass, module class). The Hydra group ``sae=`` picks one."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

from sae_train.saes.base import SAEConfig, SAEConfigError, SparseAutoencoder
from sae_train.saes.batchtopk import BatchTopKSAE
from sae_train.saes.jumprelu import JumpReLUSAE
from sae_train.saes.relu import ReLUSAE
from sae_train.saes.topk import TopKSAE

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "relu": ReLUSAE,
    "jumprelu": JumpReLUSAE,
}


def register_sae(kind: str, cls: type[SparseAutoencoder]) -> None:
    """Add an architecture (its ``config_class`` must have ``kind`` defaulting to ``kind``)."""
    SAE_CLASSES[kind] = cls


def sae_class(kind: str) -> type[SparseAutoencoder]:
    if kind not in SAE_CLASSES:
        raise SAEConfigError(f"unknown SAE kind {kind!r}; available: {', '.join(SAE_CLASSES)} "
                             "(choose one with sae=<kind>)")
    return SAE_CLASSES[kind]


def sae_config(values: Mapping[str, Any] | SAEConfig) -> SAEConfig:
    """A validated config dataclass of the right kind from a mapping (or pass one through).

    Unknown keys fail, naming the key and the fields that exist for this kind.
    """
    if isinstance(values, SAEConfig):
        sae_class(values.kind)
        return values
    values = dict(values)
    kind = values.get("kind", "topk")
    config_class = sae_class(kind).config_class
    names = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SAEConfigError(f"sae config for kind {kind!r} has unknown keys {unknown}; its keys "
                             f"are {sorted(names)}")
    return config_class(**values)


def build_sae(config: Mapping[str, Any] | SAEConfig, d_in: int) -> SparseAutoencoder:
    """Instantiate the SAE described by ``config`` for activations of width ``d_in``."""
    config = sae_config(config)
    return sae_class(config.kind)(config, d_in)
