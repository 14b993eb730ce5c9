"""Cached activations equal what the model computes, token by token, despite left padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import write_activation_cache
from sae_train.corpora.embedded import embedded_documents
from sae_train.models.sites import decoder_layers, resolve_sites, site_module


def _direct_activations(model, ids: list[int], sites) -> dict[str, torch.Tensor]:
    """One unpadded forward of one document; resid from hidden_states, others from hooks."""
    grabbed, handles = {}, []
    for site in sites:
        if site.kind == "resid":
            continue
        module, where = site_module(model, site)
        if where == "input":
            handles.append(module.register_forward_pre_hook(
                lambda m, inp, name=site.name: grabbed.__setitem__(name, inp[0][0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, inp, out, name=site.name: grabbed.__setitem__(name, out[0])))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        if site.kind == "resid":
            # hidden_states[l+1] is decoder layer l's output for every layer but the last
            grabbed[site.name] = out.hidden_states[site.layer + 1][0]
    return grabbed


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_cached_values_match_direct_forward(arch, load_tiny, tmp_path):
    model, tokenizer, _ = load_tiny(arch)
    n_layers = len(decoder_layers(model))
    sites = resolve_sites(model, ["layers.0.resid", f"layers.{n_layers - 2}.resid",
                                  "layers.1.mlp", "layers.2.mlp_out"])
    # Mixed languages and lengths; unsorted batches of 5 force uneven left padding.
    docs = embedded_documents(splits=["tuning"])[:37]
    manifest = write_activation_cache(model, tokenizer, docs, sites, tmp_path / "c",
                                      dtype="float32", shard_tokens=97, batch_size=5,
                                      sort_by_length=False, progress=False)
    cache = ActivationCache(tmp_path / "c", verify=True)
    meta = cache.metadata
    assert manifest["complete"] and cache.n_tokens == len(meta)
    assert len(manifest["shards"]) > 3  # several shards, cut mid-batch

    special = set(tokenizer.all_special_ids)
    checked = 0
    for doc in docs:
        rows = np.flatnonzero(meta["doc_id"] == doc.doc_id)
        ids = tokenizer(doc.text)["input_ids"]
        expected_positions = [p for p, t in enumerate(ids) if t not in special]
        assert meta["token_id"][rows].tolist() == [ids[p] for p in expected_positions]
        assert meta["position"][rows].tolist() == expected_positions
        assert cache.languages[meta["language"][rows[0]]] == doc.language
        direct = _direct_activations(model, ids, sites)
        for site in sites:
            cached = cache.gather(site.name, rows)
            want = direct[site.name][expected_positions]
            torch.testing.assert_close(cached, want, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == len(docs) * len(sites)


def test_last_layer_resid_is_block_output_not_final_norm(load_tiny, tmp_path):
    """hidden_states[-1] is after the final norm; the cache must hold the block output."""
    model, tokenizer, _ = load_tiny("llama")
    last = len(decoder_layers(model)) - 1
    sites = resolve_sites(model, [f"layers.{last}.resid"])
    docs = embedded_documents(splits=["evaluation"])[:3]
    write_activation_cache(model, tokenizer, docs, sites, tmp_path / "c", dtype="float32",
                           progress=False)
    cache = ActivationCache(tmp_path / "c")
    ids = tokenizer(docs[0].text)["input_ids"]
    captured = {}
    handle = decoder_layers(model)[last].register_forward_hook(
        lambda m, i, o: captured.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    rows = np.flatnonzero(cache.metadata["doc_id"] == docs[0].doc_id)
    torch.testing.assert_close(cache.gather(sites[0].name, rows), captured["out"][0, 1:],
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cache.gather(sites[0].name, rows), out.hidden_states[-1][0, 1:])


def test_bf16_storage_roundtrip(load_tiny, tmp_path):
    model, tokenizer, _ = load_tiny("gemma3")
    sites = resolve_sites(model, ["layers.1.resid"])
    docs = embedded_documents(splits=["evaluation"])[:6]
    for dtype in ("float32", "bfloat16"):
        write_activation_cache(model, tokenizer, docs, sites, tmp_path / dtype, dtype=dtype,
                               progress=False)
    full = ActivationCache(tmp_path / "float32").read_all("layers.1.resid")
    half = ActivationCache(tmp_path / "bfloat16").read_all("layers.1.resid")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full.to(torch.bfloat16).float())
