"""The steering runtime: KV-cache / padding / generate-vs-loop equivalence, hook removal,
artifact round trip, and each edit space doing what its formula says."""

from __future__ import annotations

import json

import pytest
import torch

from sae_train.models.sites import decoder_layers, site_module
from steering.language.defaultness import left_pad
from steering.steer.artifact import ArtifactError, LayerEdit, SteeringArtifact
from steering.steer.runtime import steer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Hi.", "Describe a quiet morning in a small town by the sea.", "Why do we sleep?"]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _artifact(model, position="prompt_end", decode_steps=2, space="resid") -> SteeringArtifact:
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    n = model.config.intermediate_size
    if space == "resid":
        edits = [LayerEdit(layer=l, space="resid", add=torch.randn(d, generator=g) * 3.0,
                           remove_encoder=torch.randn(4, d, generator=g),
                           remove_bias=torch.zeros(4), remove_mean=torch.rand(4, generator=g),
                           remove_decoder=torch.randn(4, d, generator=g) * 0.1)
                 for l in (0, 1)]
    else:
        edits = [LayerEdit(layer=l, space="neurons", add=torch.randn(5, generator=g) * 3,
                           add_index=torch.arange(5), remove_index=torch.arange(10, 16),
                           remove_mean=torch.rand(6, generator=g)) for l in (0, 1)]
    return SteeringArtifact(method="test", target="es", edits=edits, lam=1.0, beta=0.5,
                            position=position, decode_steps=decode_steps)


def _batch(tokenizer, prompts=PROMPTS):
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_pad(ids, pad)


def _generate(model, ids, attn, n, use_cache):
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False,
                         use_cache=use_cache, pad_token_id=0)
    return out[:, ids.shape[1]:]


@torch.no_grad()
def _loop(model, ids, attn, n):
    """A plain greedy loop without the KV cache: the whole sequence every step."""
    for _ in range(n):
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                       use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        attn = torch.cat([attn, torch.ones_like(nxt)], 1)
    return ids[:, -n:]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("position", ["prompt_end", "sustain", "all"])
def test_cache_loop_and_padding_equivalence(load_tiny, arch, position):
    model, tokenizer, _ = load_tiny(arch)
    art = _artifact(model, "prompt_end" if position == "sustain" else position)
    if position == "sustain":  # full strength for 2 decode steps, then 0.4 of it
        art = art.with_strengths(sustain=0.4)
    ids, attn = _batch(tokenizer)
    base = _generate(model, ids, attn, 8, True)
    with steer(model, art) as s:
        cached = _generate(model, ids, attn, 8, True)
        uncached = _generate(model, ids, attn, 8, False)
        looped = _loop(model, ids, attn, 8)
        single = [_generate(model, *_batch(tokenizer, [p]), 8, True)[0] for p in PROMPTS]
    assert s.n_edited_calls > 0
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, looped)
    for row, alone in zip(cached, single):  # left padding does not change a row's output
        assert torch.equal(row, alone)
    assert not torch.equal(base, cached), "the steer changed nothing"


def test_prompt_end_edits_only_the_window_of_columns(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    art = _artifact(model, "prompt_end", decode_steps=2)
    ids, attn = _batch(tokenizer)
    module, _ = site_module(model, "layers.0.resid")
    seen = []
    with steer(model, art) as s:
        handle = module.register_forward_hook(
            lambda _m, _i, out: seen.append((s.columns.start, s.columns.length)))
        try:
            _generate(model, ids, attn, 6, True)
        finally:
            handle.remove()
    edited_calls = s.n_edited_calls // 2  # two edited layers
    # the prompt forward + decode steps at columns L, L+1 (the tokens after the prompt end)
    assert seen[0] == (0, ids.shape[1])
    assert edited_calls == 1 + 2


def test_hooks_removed_on_exit_and_on_error(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    before = _hooks(model)
    ids, attn = _batch(tokenizer)
    base = model(input_ids=ids, attention_mask=attn).logits
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, _artifact(model, "all")):
            assert _hooks(model) > before
            raise RuntimeError("boom")
    assert _hooks(model) == before
    assert torch.equal(model(input_ids=ids, attention_mask=attn).logits, base)


def test_right_padding_is_refused(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    ids, attn = _batch(tokenizer)
    ids, attn = ids.flip(1), attn.flip(1)
    with steer(model, _artifact(model)), pytest.raises(ArtifactError, match="left padding"):
        model(input_ids=ids, attention_mask=attn)


def test_resid_edit_matches_its_formula(load_tiny):
    """At the steered tokens h' − h = γλ·a − γβ·c(h)·u, c = clamp(⟨relu(Eh+b), m⟩/‖m‖², 0, 1)."""
    model, tokenizer, _ = load_tiny("llama")
    art = _artifact(model, "all")
    e = art.edits[0]
    ids, attn = _batch(tokenizer)
    module, _ = site_module(model, "layers.0.resid")
    got = {}
    handle = module.register_forward_hook(lambda _m, _i, out: got.setdefault("h", out))
    try:
        model(input_ids=ids, attention_mask=attn)
        h = got.pop("h").detach()
        with steer(model, art, gamma=2.0) as s:
            s.columns.length = h.shape[1]  # as if inside the forward
            h_steered = s.apply(e, h)
    finally:
        handle.remove()
    c = (torch.relu(h @ e.remove_encoder.T + e.remove_bias) @ e.remove_mean
         / e.remove_mean.pow(2).sum()).clamp(0, 1)
    assert ((c > 0) & (c < 1)).any()  # the unclamped regime is exercised
    u = e.remove_mean @ e.remove_decoder
    expected = h + 2.0 * 1.0 * e.add - 2.0 * 0.5 * c[..., None] * u
    torch.testing.assert_close(h_steered, expected, rtol=1e-4, atol=1e-4)


def test_neuron_edit_matches_its_formula(load_tiny):
    model, tokenizer, _ = load_tiny("gemma3")
    art = _artifact(model, "all", space="neurons")
    e = art.edits[1]
    a = torch.randn(2, 3, model.config.intermediate_size)
    with steer(model, art, gamma=1.0) as s:
        s.columns.length = 3
        out = s.apply(e, a)
    m = e.remove_mean
    c = ((a[..., e.remove_index] @ m) / (m @ m)).clamp(0, 1)
    expected = a.clone()
    expected[..., e.add_index] += e.add
    expected[..., e.remove_index] -= 0.5 * c[..., None] * m
    torch.testing.assert_close(out, expected)
    untouched = torch.ones(a.shape[-1], dtype=torch.bool)
    untouched[e.add_index] = untouched[e.remove_index] = False
    assert torch.equal(out[..., untouched], a[..., untouched])


def test_sustain_edits_later_tokens_at_its_fraction(load_tiny):
    """With sustain s, every generated token after the first decode_steps gets s × the edit;
    the prompt end and the first decode_steps get all of it; earlier prompt tokens nothing."""
    model, tokenizer, _ = load_tiny("llama")
    art = _artifact(model, "prompt_end", decode_steps=1, space="neurons").with_strengths(
        beta=0.0, sustain=0.25)
    ids, attn = _batch(tokenizer)
    with torch.no_grad(), steer(model, art) as s:
        _generate(model, ids, attn, 5, True)
    assert s.n_edited_calls == 2 * 5  # the prompt + 4 decode forwards at two layers
    edit, end = art.edits[1], s.columns.prompt_len - 1
    x = torch.zeros(1, 1, model.config.intermediate_size)
    for column, share in ((end - 1, 0.0), (end, 1.0), (end + 1, 1.0), (end + 2, 0.25),
                          (end + 9, 0.25)):
        s.columns.start, s.columns.length = column, 1
        y = s.apply(edit, x)
        torch.testing.assert_close(y[0, 0, edit.add_index], share * edit.add)


def test_artifact_round_trip_and_tamper_check(load_tiny, tmp_path):
    model, tokenizer, _ = load_tiny("llama")
    art = _artifact(model, "prompt_end").with_strengths(sustain=0.3)
    art.provenance = {"localise": "x"}
    folder = art.save(tmp_path / "a")
    loaded = SteeringArtifact.load(folder)
    assert loaded.describe() == art.describe()
    for a, b in zip(art.edits, loaded.edits):
        torch.testing.assert_close(a.add, b.add)
        torch.testing.assert_close(a.remove_encoder, b.remove_encoder)
    ids, attn = _batch(tokenizer)
    with steer(model, art):
        x = _generate(model, ids, attn, 5, True)
    with steer(model, str(folder)):
        y = _generate(model, ids, attn, 5, True)
    assert torch.equal(x, y)
    meta = json.loads((folder / "steer.json").read_text())
    assert meta["provenance"]["localise"] == "x" and meta["window"] == [0, 1]
    raw = bytearray((folder / "steer.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (folder / "steer.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        SteeringArtifact.load(folder)
    with pytest.raises(ArtifactError, match="missing"):
        SteeringArtifact.load(tmp_path / "nothing")


def test_bad_settings_are_refused():
    with pytest.raises(ArtifactError, match="position"):
        SteeringArtifact(method="m", target="es", edits=[], position="middle")
    with pytest.raises(ArtifactError, match="sustain"):
        SteeringArtifact(method="m", target="es", edits=[], sustain=1.5)
    with pytest.raises(ArtifactError, match="space"):
        LayerEdit(layer=0, space="attention")
    with pytest.raises(ArtifactError, match="remove_encoder"):
        LayerEdit(layer=0, space="resid", remove_mean=torch.ones(2))


def test_saturating_push_stops_at_the_target_mean(load_tiny):
    """g(x) = clamp(1 − t(x), 0, 1): full push at the English mean, none at the target mean,
    half-way in between; neurons outside the readout do not matter."""
    model, _, _ = load_tiny("gemma3")
    n = model.config.intermediate_size
    idx = torch.tensor([3, 7, 11])
    base, delta = torch.tensor([0.5, -0.2, 0.1]), torch.tensor([1.0, 2.0, -1.0])
    e = LayerEdit(layer=0, space="neurons", add=delta, add_index=idx, gate_index=idx,
                  gate_base=base, gate_delta=delta)
    art = SteeringArtifact(method="t", target="es", edits=[e], lam=1.0, beta=0.0,
                           position="all")
    x = torch.zeros(1, 3, n)
    x[0, 0, idx] = base  # English mean: t = 0 → full push
    x[0, 1, idx] = base + delta  # target mean: t = 1 → no push
    x[0, 2, idx] = base + 0.5 * delta  # half-way
    x[0, :, 0] = 100.0  # not a readout unit
    with steer(model, art) as s:
        s.columns.length = 3
        out = s.apply(e, x)
    pushed = out[0, :, idx] - x[0, :, idx]
    torch.testing.assert_close(pushed, torch.stack([delta, 0 * delta, 0.5 * delta]))


def test_replace_mode_is_the_sae_reconstruction_plus_the_code_edit(load_tiny, tmp_path):
    """Paper-literal mode: h' = W_dec(z + δz) + b_dec at the steered tokens, z = SAE(h)."""
    from sae_train.saes import load_sae
    from sae_train.saes.io import save_sae
    from sae_train.saes.registry import build_sae

    model, _, _ = load_tiny("llama")
    d = model.config.hidden_size
    torch.manual_seed(0)
    sae = build_sae({"kind": "topk", "n_latents": 128, "k": 8}, d)
    path = save_sae(sae, tmp_path / "sae")
    loaded = load_sae(path)
    push_ids, en_ids = torch.tensor([1, 5]), torch.tensor([7, 9, 11])
    m = torch.tensor([0.5, 1.0, 2.0])
    e = LayerEdit(layer=0, space="replace", add=torch.tensor([3.0, -1.0]), add_index=push_ids,
                  remove_index=en_ids, remove_mean=m, sae_path=str(path))
    art = SteeringArtifact(method="r", target="es", edits=[e], lam=1.0, beta=0.5,
                           position="all")
    h = torch.randn(2, 4, d) * 3
    with steer(model, art, gamma=1.0) as s:
        s.columns.length = 4
        out = s.apply(e, h)
    with torch.no_grad():
        z = loaded.encode(h.reshape(-1, d))
        z[:, push_ids] += torch.tensor([3.0, -1.0])
        c = ((z[:, en_ids] @ m) / (m @ m)).clamp(0, 1)
        z[:, en_ids] -= 0.5 * c[:, None] * m
        expected = loaded.decode(z).reshape(h.shape)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
