"""`sae-cache`: cache activations of a model over a corpus (Hydra app).

    sae-cache                                    # demo model, embedded corpus, all resid sites
    sae-cache model=tiny_llama cache.dir=/tmp/c sites='[layers.0.resid,layers.1.mlp]'
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sae_train.apps import config_dir, report_user_errors
from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import write_activation_cache
from sae_train.config import register_configs
from sae_train.corpora import load_documents
from sae_train.models.loading import load_model, tokenizer_hash
from sae_train.models.sites import resolve_sites

log = logging.getLogger("sae-cache")
register_configs()


def site_patterns(sites) -> list[str]:
    """``sites`` as given on the command line: one pattern or a list of them."""
    if isinstance(sites, str):
        return [sites]
    return [str(s) for s in OmegaConf.to_container(sites) if s] \
        if OmegaConf.is_config(sites) else list(sites)


def run_cache(cfg: DictConfig) -> dict:
    """Run the caching job described by ``cfg``; returns the finished manifest."""
    OmegaConf.to_object(cfg.cache)  # bounds on every option (CacheConfig.__post_init__)
    torch.manual_seed(cfg.seed)
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model, tokenizer, info = load_model(cfg.model)
    sites = resolve_sites(model, site_patterns(cfg.sites))
    docs = load_documents(cfg.data)
    log.info("%d documents, %d sites (%s … %s) → %s", len(docs), len(sites), sites[0].name,
             sites[-1].name, cfg.cache.dir)
    provenance = {
        "model": {"name": info.name, "revision": info.revision, "commit_hash": info.commit_hash,
                  "fingerprint": info.fingerprint, "dtype": info.dtype},
        "tokenizer": tokenizer_hash(tokenizer),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    out = Path(cfg.cache.dir)
    was_complete = (out / "manifest.json").exists()
    manifest = write_activation_cache(
        model, tokenizer, docs, sites, out, dtype=cfg.cache.dtype,
        shard_tokens=cfg.cache.shard_tokens, batch_size=cfg.cache.batch_size,
        max_length=cfg.cache.max_length, max_tokens=cfg.cache.max_tokens,
        sort_by_length=cfg.cache.sort_by_length, provenance=provenance, progress=cfg.progress,
    )
    if was_complete and cfg.cache.verify:
        ActivationCache(out, verify=True)  # re-opening a finished cache: check every shard
    size = sum(f.stat().st_size for f in out.rglob("*.npy"))
    log.info("cache %s: %d tokens, %d shards, %.1f MB on disk, %.1f s", out, manifest["n_tokens"],
             len(manifest["shards"]), size / 1e6, time.perf_counter() - start)
    return manifest


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="cache")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_cache(cfg)


if __name__ == "__main__":
    main()
