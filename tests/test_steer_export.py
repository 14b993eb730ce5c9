"""Steers outside the library: the plain HF folder reloads without this project and gives the
in-library steer's logits; the llama.cpp control vector holds W_down·shift and the resid push,
is exact on Llama and flagged as an approximation on Gemma 3; everything else is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from sae_train.models.sites import decoder_layers, text_config
from steering.language.defaultness import left_pad
from steering.steer.artifact import LayerEdit, SteeringArtifact
from steering.steer.export import (ExportError, control_vector_plan, export_control_vector,
                                   export_hf_folder)
from steering.steer.runtime import steer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Hi.", "Describe a quiet morning in a small town by the sea.", "Why do we sleep?"]
CALIBRATION = ["The river runs past the old mill.", "What do cats eat?",
               "Write a short note to a friend about the weekend."]
NEURONS = torch.tensor([3, 9, 17, 40, 41, 100])


def _constant_artifact(model, position="all", layers=(1, 2), **kwargs) -> SteeringArtifact:
    """A resid push and a neuron push at layers[0], a second neuron push at layers[1]."""
    g = torch.Generator().manual_seed(0)
    d = text_config(model).hidden_size
    edits = [LayerEdit(layer=layers[0], space="resid", add=torch.randn(d, generator=g) * 2),
             LayerEdit(layer=layers[0], space="neurons", add=torch.randn(6, generator=g) * 3,
                       add_index=NEURONS),
             LayerEdit(layer=layers[1], space="neurons", add=torch.randn(6, generator=g) * 3,
                       add_index=NEURONS.flip(0))]
    return SteeringArtifact(method="test", target="es", edits=edits, lam=1.5, gamma=0.8,
                            position=position, **kwargs)


def _batch(tokenizer):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return left_pad(ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


@torch.no_grad()
def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.float()


@contextmanager
def _added_at_layer_outputs(model, vectors):
    """What llama.cpp does with a control vector: direction.N added to decoder layer N's output,
    with plain forward hooks."""
    def hook_for(v):
        def hook(_module, _inputs, out):
            if isinstance(out, tuple):
                return (out[0] + v.to(out[0].dtype), *out[1:])
            return out + v.to(out.dtype)
        return hook

    layers = decoder_layers(model)
    handles = [layers[i].register_forward_hook(hook_for(v)) for i, v in vectors.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, batch, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
b = torch.load(batch)
with torch.no_grad():
    logits = model(input_ids=b["ids"], attention_mask=b["mask"]).logits
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("steering", "sae_train"))
assert "steering" not in sys.modules and not ours, ours
torch.save(logits.float(), out)
"""


def test_hf_folder_reloads_without_the_project_and_steers_the_same(load_tiny, tmp_path):
    model, tokenizer, _ = load_tiny("llama")
    art = _constant_artifact(model)
    ids, mask = _batch(tokenizer)
    plain = _logits(model, ids, mask)
    with steer(model, art):
        expected = _logits(model, ids, mask)
    assert (expected - plain).abs().max() > 0.1  # the steer does something

    folder = export_hf_folder(art, model, tmp_path / "steered", tokenizer=tokenizer)
    # the model itself is left as it was
    assert model.config.mlp_bias is False
    assert all(layer.mlp.down_proj.bias is None for layer in decoder_layers(model))
    assert torch.equal(_logits(model, ids, mask), plain)
    assert (folder / "model.safetensors").is_file() and (folder / "foxp2_steer.json").is_file()

    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", _RELOAD, str(folder), str(tmp_path / "batch.pt"),
                          str(tmp_path / "logits.pt")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=0)


def test_control_vector_holds_the_shifts_and_is_exact_on_llama(load_tiny, tmp_path):
    from sae_train.export.control_vector import read_control_vector

    pytest.importorskip("gguf")
    model, tokenizer, _ = load_tiny("llama")
    art = _constant_artifact(model)
    lam = art.gamma * art.lam
    path = export_control_vector(art, tmp_path / "es.gguf", model)
    back = read_control_vector(path)
    assert back.model_hint == "llama" and list(back.per_layer_vectors) == [1, 2]

    w_down = {i: decoder_layers(model)[i].mlp.down_proj.weight.detach().float() for i in (1, 2)}
    resid, n1, n2 = art.edits
    want1 = lam * resid.add + w_down[1][:, NEURONS] @ (lam * n1.add)
    want2 = w_down[2][:, NEURONS.flip(0)] @ (lam * n2.add)
    torch.testing.assert_close(back.per_layer_vectors[1], want1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.per_layer_vectors[2], want2, atol=1e-5, rtol=1e-5)
    assert '"exact": true' in path.with_suffix(".foxp2.json").read_text()

    ids, mask = _batch(tokenizer)
    with steer(model, art):
        expected = _logits(model, ids, mask)
    with _added_at_layer_outputs(model, back.per_layer_vectors):
        got = _logits(model, ids, mask)
    assert (expected - _logits(model, ids, mask)).abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # another strength is baked in linearly
    half = control_vector_plan(art, model, gamma=art.gamma / 2)
    torch.testing.assert_close(half.vectors[1], want1 / 2, atol=1e-5, rtol=1e-5)


def test_control_vector_on_gemma3_flags_the_post_norm_approximation(load_tiny, tmp_path):
    pytest.importorskip("gguf")
    model, tokenizer, _ = load_tiny("gemma3")
    ids, mask = _batch(tokenizer)
    art = _constant_artifact(model)
    with pytest.warns(UserWarning, match="post_feedforward_layernorm"):
        path = export_control_vector(art, tmp_path / "es.gguf", model)
    plan = control_vector_plan(art, model)
    assert not plan.exact and plan.approximate_layers == (1, 2)
    assert '"exact": false' in path.with_suffix(".foxp2.json").read_text()
    with steer(model, art):
        expected = _logits(model, ids, mask)
    with _added_at_layer_outputs(model, plan.vectors):
        got = _logits(model, ids, mask)
    gap = float((got - expected).abs().max())
    assert gap > 1e-3, gap  # the measured gap is real: the flag is not a formality

    # calibrated on other text, the mean post-norm effect narrows the gap (still flagged)
    other = left_pad([tokenizer(t)["input_ids"] for t in CALIBRATION], tokenizer.pad_token_id)
    calibrated = control_vector_plan(art, model, calibration=other)
    assert not calibrated.exact and calibrated.calibrated_tokens == int(other[1].sum())
    with _added_at_layer_outputs(model, calibrated.vectors):
        gap_calibrated = float((_logits(model, ids, mask) - expected).abs().max())
    print(f"gemma3 control-vector gap: {gap:.4f}, calibrated {gap_calibrated:.4f}")
    assert gap_calibrated < gap

    # a resid-only steer is exact there too
    resid_only = art.with_strengths(edits=[art.edits[0]])
    plan = control_vector_plan(resid_only, model)
    assert plan.exact and plan.approximate_layers == ()
    with steer(model, resid_only):
        expected = _logits(model, ids, mask)
    with _added_at_layer_outputs(model, plan.vectors):
        torch.testing.assert_close(_logits(model, ids, mask), expected, atol=1e-4, rtol=0)


def _with_edit(art, **fields) -> SteeringArtifact:
    edit = LayerEdit(layer=2, space="neurons", add=torch.ones(3), add_index=torch.arange(3),
                     **fields)
    return art.with_strengths(edits=[art.edits[0], edit])


_REFUSED = {
    "prompt_end": (lambda a: a.with_strengths(position="prompt_end"), "prompt_end"),
    "gate": (lambda a: _with_edit(a, gate_index=torch.arange(3), gate_base=torch.zeros(3),
                                  gate_delta=torch.ones(3)), "saturating gate"),
    "removal": (lambda a: _with_edit(a, remove_index=torch.arange(5, 9),
                                     remove_mean=torch.ones(4)), "English term"),
    "gain": (lambda a: _with_edit(a, scale_index=torch.arange(3), scale=torch.ones(3)), "gain"),
}


@pytest.mark.parametrize("case", sorted(_REFUSED))
@pytest.mark.parametrize("export", ["hf", "gguf"])
def test_what_cannot_be_exported_is_refused(load_tiny, tmp_path, case, export):
    model, _, _ = load_tiny("llama")
    change, message = _REFUSED[case]
    art = change(_constant_artifact(model))
    with pytest.raises(ExportError, match=message):
        if export == "hf":
            export_hf_folder(art, model, tmp_path / "out")
        else:
            export_control_vector(art, tmp_path / "x.gguf", model)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.gguf").exists()


def test_a_zero_beta_english_term_is_no_obstacle(load_tiny):
    model, _, _ = load_tiny("llama")
    art = _with_edit(_constant_artifact(model), remove_index=torch.arange(5, 9),
                     remove_mean=torch.ones(4)).with_strengths(beta=0.0)
    assert sorted(control_vector_plan(art, model).vectors) == [1, 2]


def test_layer_zero_and_gemma3_folders_are_refused(load_tiny, tmp_path):
    model, _, _ = load_tiny("llama")
    with pytest.raises(ExportError, match="layer 0.*direction.0"):
        export_control_vector(_constant_artifact(model, layers=(0, 2)), tmp_path / "x.gguf",
                              model)
    gemma, _, _ = load_tiny("gemma3")
    with pytest.raises(ExportError, match="post_feedforward_layernorm"):
        export_hf_folder(_constant_artifact(gemma), gemma, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_that_already_has_mlp_biases_keeps_them(load_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tokenizer, _ = load_tiny("llama")
    config = base.config.__class__.from_dict({**base.config.to_dict(), "mlp_bias": True})
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    for layer in decoder_layers(model):
        torch.nn.init.normal_(layer.mlp.down_proj.bias, std=0.5)
    own = [layer.mlp.down_proj.bias.detach().clone() for layer in decoder_layers(model)]
    art = _constant_artifact(model)
    ids, mask = _batch(tokenizer)
    with steer(model, art):
        expected = _logits(model, ids, mask)
    folder = export_hf_folder(art, model, tmp_path / "steered")
    assert all(torch.equal(layer.mlp.down_proj.bias, b)
               for layer, b in zip(decoder_layers(model), own))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded, ids, mask), expected, atol=1e-4, rtol=0)
