"""The activation cache: write once per (model, corpus, sites), read many times."""

from sae_train.cache.manifest import CacheError
from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import write_activation_cache

__all__ = ["ActivationCache", "CacheError", "write_activation_cache"]
