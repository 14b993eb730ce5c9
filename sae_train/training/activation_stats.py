"""A fixed sample of training activations, for data-dependent initialisation (input scale, b_dec)."""

from __future__ import annotations

import numpy as np
import torch

from sae_train.cache.reader import ActivationCache


def sample_activations(cache: ActivationCache, site: str, indices: np.ndarray, n_tokens: int,
                       seed: int = 0) -> torch.Tensor:
    """(min(n_tokens, len(indices)), width) float32 rows of ``site`` drawn without replacement
    from ``indices`` (global token ids). The same seed gives the same rows on every rank."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError(f"no training tokens to estimate activation statistics of {site!r}")
    rng = np.random.default_rng([seed, 7919])
    chosen = rng.choice(len(indices), size=min(n_tokens, len(indices)), replace=False)
    rows = np.sort(indices[chosen])
    sample = cache.gather(site, rows).to(torch.float32)
    if not torch.isfinite(sample).all():
        bad = int((~torch.isfinite(sample)).any(dim=1).sum())
        raise ValueError(f"the cache at {cache.path} holds non-finite activations at {site!r} "
                         f"({bad} of {len(rows)} sampled tokens); re-create the cache")
    return sample
