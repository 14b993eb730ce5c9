"""LAPE language neurons: planted neurons recovered exactly; cache and model paths agree."""

from __future__ import annotations

import pytest
import torch

from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import write_activation_cache
from sae_train.corpora.embedded import embedded_documents, load_embedded_corpus
from sae_train.models.sites import resolve_sites
from steering.localise.lape import (activation_probabilities_from_cache,
                                    activation_probabilities_from_model, language_entropy,
                                    lape_neurons)

LANGS = ["en", "es", "hi"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_probs(seed: int = 0):
    """4 layers × 500 neurons × 3 languages: background fires similarly in every language
    (high entropy); 20 planted neurons (1% of 2000) fire for one or two languages only."""
    gen = torch.Generator().manual_seed(seed)
    probs = 0.2 + 0.3 * torch.rand(4, 500, 3, generator=gen)
    planted = {
        "en": [(0, 3), (1, 250), (3, 499), (2, 17)],
        "es": [(0, 10), (0, 11), (2, 100), (3, 42)],
        "hi": [(1, 7), (1, 8), (2, 300), (3, 0), (3, 1), (0, 499)],
    }
    for lang, cells in planted.items():
        k = LANGS.index(lang)
        for layer, neuron in cells:
            probs[layer, neuron] = 0.01 + 0.02 * torch.rand(3, generator=gen)
            probs[layer, neuron, k] = 0.8 + 0.15 * torch.rand(1, generator=gen)
    shared = [(1, 60), (2, 61), (3, 62), (0, 63), (1, 64), (2, 65)]  # es + en, not hi
    for layer, neuron in shared:
        probs[layer, neuron] = torch.tensor([0.9, 0.85, 0.02])
    # Decoy: the lowest entropy of all, but it never fires often enough to pass the τ filter.
    probs[2, 200] = torch.tensor([0.1, 0.0, 0.0])
    return probs, planted, shared


def test_planted_language_neurons_are_recovered_exactly():
    probs, planted, shared = planted_probs()
    found = lape_neurons(probs, LANGS, entropy_quantile=0.01, prob_quantile=0.95)
    assert set(found) == set(LANGS)
    for lang in LANGS:
        assert set(found[lang]) == {0, 1, 2, 3}
        got = {(layer, int(n)) for layer, ns in found[lang].items() for n in ns}
        want = set(planted[lang]) | (set(shared) if lang in ("en", "es") else set())
        assert got == want, lang
        for ns in found[lang].values():
            assert ns.dtype == torch.long and (ns[1:] > ns[:-1]).all()
    assert torch.isclose(language_entropy(probs)[2, 200], torch.tensor(0.0))  # decoy: H = 0


def test_layer_labels_quantiles_and_bad_shapes():
    probs, planted, _ = planted_probs()
    found = lape_neurons(probs, LANGS, layers=[10, 11, 12, 13])
    assert set(found["hi"]) == {10, 11, 12, 13}
    assert found["hi"][11].tolist() == [7, 8]
    # a stricter entropy quantile keeps fewer neurons, all among the planted ones
    few = lape_neurons(probs, LANGS, entropy_quantile=0.004)
    n_few = len({(l, int(n)) for lang in LANGS for l, ns in few[lang].items() for n in ns})
    assert n_few == 8
    with pytest.raises(ValueError, match="languages"):
        lape_neurons(probs, ["en", "es"])
    with pytest.raises(ValueError, match="layer indices"):
        lape_neurons(probs, LANGS, layers=[0, 1])


@pytest.fixture(scope="module")
def tiny_mlp_cache(load_tiny, tmp_path_factory):
    model, tokenizer, _ = load_tiny("llama")
    docs = embedded_documents(splits=["evaluation"], include_prompts=False)
    path = tmp_path_factory.mktemp("lape") / "cache"
    write_activation_cache(model, tokenizer, docs, resolve_sites(model, "layers.*.mlp"), path,
                           dtype="float32", shard_tokens=1500, progress=False)
    return ActivationCache(path)


def test_cache_and_model_paths_agree_and_lape_runs_end_to_end(load_tiny, tiny_mlp_cache):
    model, tokenizer, _ = load_tiny("llama")
    from_cache = activation_probabilities_from_cache(tiny_mlp_cache, splits=["evaluation"],
                                                     chunk_tokens=700)  # several chunks
    assert from_cache.probs.shape == (4, 128, 3) and from_cache.layers == [0, 1, 2, 3]
    assert from_cache.languages == LANGS
    corpus = load_embedded_corpus(splits=["evaluation"])
    from_model = activation_probabilities_from_model(
        model, tokenizer, {lang: corpus.texts[lang] for lang in LANGS}, batch_size=16)
    assert from_model.n_tokens == from_cache.n_tokens
    # Same tokens, different batching/padding: only values within float noise of 0 may flip.
    assert (from_model.probs - from_cache.probs).abs().max() < 2e-3
    # Probabilities by hand for one site: fraction of positive hi tokens at layers.2.mlp.
    hi_rows = tiny_mlp_cache.select(splits=["evaluation"], languages=["hi"])
    direct = (tiny_mlp_cache.gather("layers.2.mlp", hi_rows) > 0).float().mean(0)
    torch.testing.assert_close(from_cache.probs[2, :, 2], direct)

    neurons = from_cache.lape_neurons()
    total = 0
    for lang in LANGS:
        assert set(neurons[lang]) == {0, 1, 2, 3}
        for layer, ns in neurons[lang].items():
            assert ns.dtype == torch.long and (ns.numel() == 0 or 0 <= int(ns.min()) < 128)
            total += ns.numel()
    assert 1 <= total <= 3 * round(0.01 * 4 * 128)


def test_gate_criterion_counts_positive_gate_projections(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    texts = {"en": ["The river was calm this morning."], "es": ["El río estaba tranquilo."]}
    gate = activation_probabilities_from_model(model, tokenizer, texts, layers=[1],
                                               active="gate")
    value = activation_probabilities_from_model(model, tokenizer, texts, layers=[1])
    # Direct: P(gate_proj(x) > 0) (SiLU(g) > 0 ⇔ g > 0) over the text tokens of each language.
    seen = {}
    handle = model.model.layers[1].mlp.gate_proj.register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("g", out))
    try:
        for k, lang in enumerate(texts):
            ids = tokenizer(texts[lang])["input_ids"][0]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            expected = (seen["g"][0, 1:] > 0).float().mean(0)  # position 0 is BOS
            torch.testing.assert_close(gate.probs[0, :, k], expected)
    finally:
        handle.remove()
    assert not torch.allclose(gate.probs, value.probs)
    with pytest.raises(ValueError, match="active"):
        activation_probabilities_from_model(model, tokenizer, texts, active="up")


def test_stored_probabilities_are_computed_once_per_key(load_tiny, tmp_path):
    from steering.localise.lape import stored_activation_probabilities

    model, tokenizer, _ = load_tiny("llama")
    texts = {lang: load_embedded_corpus(splits=["evaluation"]).texts[lang][:6] for lang in LANGS}
    calls = []

    def compute():
        calls.append(1)
        return activation_probabilities_from_model(model, tokenizer, texts, [0, 2], batch_size=4)

    key = {"model": "tiny", "layers": [0, 2]}
    first, reused = stored_activation_probabilities(tmp_path / "derived", key, compute)
    assert not reused and len(calls) == 1
    again, reused = stored_activation_probabilities(tmp_path / "derived", key, compute)
    assert reused and len(calls) == 1  # read back, not recomputed
    torch.testing.assert_close(again.probs, first.probs, rtol=0, atol=0)
    assert (again.layers, again.languages, again.n_tokens, again.active) == \
        (first.layers, first.languages, first.n_tokens, first.active)
    _, reused = stored_activation_probabilities(tmp_path / "derived", {**key, "layers": [0]},
                                                compute)
    assert not reused and len(calls) == 2  # another key: computed
    (tmp_path / "file").write_text("")  # a store that cannot be created: computed, not raised
    _, reused = stored_activation_probabilities(tmp_path / "file" / "derived", key, compute)
    assert not reused and len(calls) == 3
