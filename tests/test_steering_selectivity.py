"""Selectivity: the formula on a hand case, and per-sentence codes read from a real cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import write_activation_cache
from sae_train.corpora.embedded import embedded_documents
from sae_train.models.sites import resolve_sites
from steering.localise.selectivity import (document_codes, feature_selectivity,
                                           paired_codes_from_cache, paired_documents,
                                           selectivity_from_cache)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_selectivity_formula_on_a_hand_case():
    z_t = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 1.0], [5.0, 1.0, 0.0]])
    z_en = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [2.0, 1.0, 1.0]])
    sel = feature_selectivity(z_t, z_en, eps=1e-6)
    # latent 0: means 3 vs 1, sample stds 2 and 1 → 2 / 3
    # latent 1: never differs → 0;  latent 2: means 1/3 vs 2/3, stds both 1/√3
    expected = torch.tensor([2 / 3, 0.0, (1 / 3 - 2 / 3) / (2 / np.sqrt(3))])
    torch.testing.assert_close(sel.sel, expected.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sel.std_target[0], torch.tensor(2.0))
    assert sel.top(1).tolist() == [0] and sel.n_pairs == 3
    dead = feature_selectivity(torch.zeros(4, 2), torch.zeros(4, 2))
    assert torch.equal(dead.sel, torch.zeros(2))  # ε keeps dead latents at exactly 0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        feature_selectivity(z_t[:1], z_en[:1])
    with pytest.raises(ValueError, match="same shape"):
        feature_selectivity(z_t, z_en[:, :2])


@pytest.fixture(scope="module")
def small_cache(load_tiny, tmp_path_factory):
    """12 en/es pairs of the tuning split, minus the Spanish side of one pair, plus unpaired
    English prompts; several shards, uneven batches."""
    model, tokenizer, _ = load_tiny("llama")
    docs = embedded_documents(languages=["en", "es"], splits=["tuning"])
    paired = [d for d in docs if 0 <= d.pair_id < 12 and not (d.pair_id == 3
                                                              and d.language == "es")]
    prompts = [d for d in docs if d.pair_id < 0][:3]
    sites = resolve_sites(model, ["layers.1.resid", "layers.1.mlp"])
    out = tmp_path_factory.mktemp("sel-cache") / "c"
    write_activation_cache(model, tokenizer, paired + prompts, sites, out, dtype="float32",
                           shard_tokens=61, batch_size=5, sort_by_length=True, progress=False)
    return ActivationCache(out)


def _brute_force(cache, site, doc_id, reduction, encode):
    meta = cache.metadata
    rows = np.flatnonzero(meta["doc_id"] == doc_id)
    acts = cache.read_all(site)[torch.from_numpy(rows)]
    if reduction == "last":
        return encode(acts[int(np.argmax(meta["position"][rows]))][None])[0]
    return encode(acts).mean(0)


@pytest.mark.parametrize("reduction", ["last", "mean"])
def test_paired_codes_from_cache_match_a_brute_force_reading(small_cache, reduction):
    cache = small_cache
    g = torch.Generator().manual_seed(0)
    w_enc = torch.randn(32, cache.width("layers.1.resid"), generator=g)

    def encode(x):
        return torch.relu(x @ w_enc.T)

    pairs, tgt, eng = paired_documents(cache, "es", "en", splits=["tuning"])
    assert pairs.tolist() == [p for p in range(12) if p != 3]  # the broken pair is dropped
    docs = {d["doc_id"]: d for d in cache.documents}
    assert all(docs[t]["pair_id"] == docs[e]["pair_id"] == p and docs[t]["language"] == "es"
               and docs[e]["language"] == "en" for p, t, e in zip(pairs, tgt, eng))
    codes = paired_codes_from_cache(cache, "layers.1.resid", "es", "en", splits=["tuning"],
                                    reduction=reduction, encode=encode, chunk_tokens=7)
    assert codes.target.shape == codes.english.shape == (11, 32)
    for k in range(len(pairs)):
        torch.testing.assert_close(codes.target[k], _brute_force(
            cache, "layers.1.resid", tgt[k], reduction, encode), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(codes.english[k], _brute_force(
            cache, "layers.1.resid", eng[k], reduction, encode), atol=1e-5, rtol=1e-5)
    assert (codes.tokens_per_doc["es"] > 1).all()
    torch.testing.assert_close(codes.difference(), codes.target - codes.english)


def test_last_and_mean_differ_and_raw_activations_pass_through(small_cache):
    cache = small_cache
    pairs, tgt, _ = paired_documents(cache, "es", "en", splits=["tuning"])
    last, _ = document_codes(cache, "layers.1.mlp", tgt, "last", chunk_tokens=5)
    mean, counts = document_codes(cache, "layers.1.mlp", tgt, "mean", chunk_tokens=5)
    assert last.shape == mean.shape == (len(tgt), cache.width("layers.1.mlp"))
    assert (last - mean).abs().max() > 1e-3
    meta = cache.metadata
    rows = np.flatnonzero(meta["doc_id"] == tgt[0])
    assert counts[0] == len(rows)
    torch.testing.assert_close(mean[0], cache.gather("layers.1.mlp", rows).mean(0))
    sel, codes = selectivity_from_cache(cache, "layers.1.mlp", lambda x: x, "es", "en",
                                        splits=["tuning"], reduction="mean")
    assert sel.n_pairs == 11 and sel.sel.shape == (cache.width("layers.1.mlp"),)
    torch.testing.assert_close(sel.sel, feature_selectivity(codes.target, codes.english).sel)


def test_bad_requests_name_the_problem(small_cache):
    with pytest.raises(ValueError, match="'hi'"):
        paired_documents(small_cache, "hi", "en")
    with pytest.raises(ValueError, match="no parallel"):
        paired_documents(small_cache, "es", "en", splits=["discovery"])
    with pytest.raises(ValueError, match="reduction"):
        document_codes(small_cache, "layers.1.resid", [0], "median")
    with pytest.raises(Exception, match="layers.9.resid"):
        document_codes(small_cache, "layers.9.resid", [0])
