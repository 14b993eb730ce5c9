"""The real `sae-cache` Hydra app: a run on a tiny model, and mistakes caught at start."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from sae_train.cache.reader import ActivationCache


def _sae_cache(args, env, root):
    cmd = [sys.executable, "-c", "from sae_train.apps.cache_app import main; main()",
           f"paths.root={root}", "progress=false", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    result.output = result.stdout + result.stderr  # Hydra logs to stdout, errors to stderr
    return result


def test_app_caches_tiny_gemma3_and_checks_config(tmp_path, foxp2_cache_root, load_tiny):
    load_tiny("gemma3")
    env = {**os.environ, "FOXP2_CACHE": str(foxp2_cache_root)}
    out = tmp_path / "cache"
    result = _sae_cache(["model=tiny_gemma3", f"cache.dir={out}", "sites=layers.*.resid",
                         "data.languages=[en,hi]", "cache.max_tokens=3000",
                         "cache.shard_tokens=1024"], env, tmp_path)
    assert result.returncode == 0, result.output
    cache = ActivationCache(out, verify=True)
    assert cache.n_tokens == 3000 and [len(s) for s in [cache.manifest["shards"]]] == [3]
    assert cache.site_names == [f"layers.{i}.resid" for i in range(4)]
    assert set(np.unique(cache.metadata["language"])) <= {0, 1} and cache.languages == ["en", "hi"]
    assert "3000 tokens, 3 shards" in result.output

    # A finished cache re-run is a no-op that re-verifies the shards.
    again = _sae_cache(["model=tiny_gemma3", f"cache.dir={out}", "sites=layers.*.resid",
                        "data.languages=[en,hi]", "cache.max_tokens=3000",
                        "cache.shard_tokens=1024"], env, tmp_path)
    assert again.returncode == 0 and "is complete" in again.output


def test_typos_and_wrong_types_fail_at_start(tmp_path, foxp2_cache_root):
    env = {**os.environ, "FOXP2_CACHE": str(foxp2_cache_root)}
    typo = _sae_cache(["model=tiny_llama", "cache.shard_tokenz=5"], env, tmp_path)
    assert typo.returncode != 0 and "shard_tokenz" in typo.output
    wrong_type = _sae_cache(["model=tiny_llama", "cache.batch_size=many"], env, tmp_path)
    assert wrong_type.returncode != 0 and "batch_size" in wrong_type.output
    bad_site = _sae_cache(["model=tiny_llama", "sites=layers.9.resid", f"cache.dir={tmp_path}/x"],
                          env, tmp_path)
    assert bad_site.returncode != 0 and "model has 4 layers (0–3)" in bad_site.output
