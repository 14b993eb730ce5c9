"""Artifacts written before the steering/ reshape (tests/data/steer_artifacts_v1, format
version 1) still load, and steer the tiny Llama exactly as the code that wrote them did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steering import LayerEdit, SteeringArtifact, steer
from steering.steer.runtime import prompt_with_prefix

DATA = Path(__file__).parent / "data" / "steer_artifacts_v1"
PROMPTS = ["Question: What is the weather like today?\nAnswer:",
           "Question: Name a fruit.\nAnswer:"]
METHODS = ("foxp2", "foxp2_neurons", "prompting")


def test_stored_artifacts_load_with_their_fields():
    foxp2 = SteeringArtifact.load(DATA / "foxp2")
    assert (foxp2.method, foxp2.target, foxp2.english) == ("foxp2", "es", "en")
    assert (foxp2.lam, foxp2.beta, foxp2.position, foxp2.sustain) == (4.0, 1.0, "prompt_end", 0.33)
    assert [e.layer for e in foxp2.edits] == [0, 1]
    assert all(isinstance(e, LayerEdit) and e.space == "resid" for e in foxp2.edits)
    assert foxp2.edits[0].gate_encoder is not None and foxp2.edits[0].remove_decoder is not None
    neurons = SteeringArtifact.load(DATA / "foxp2_neurons")
    assert {e.space for e in neurons.edits} == {"neurons"}
    assert SteeringArtifact.load(DATA / "prompting").prompt_prefix == "Answer in Spanish. "


@pytest.mark.parametrize("method", METHODS)
def test_stored_artifacts_steer_as_before(method, load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    expected = load_file(str(DATA / "expected.safetensors"))
    art = SteeringArtifact.load(DATA / method)
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt_with_prefix(art, prompt), return_tensors="pt").input_ids
        with torch.no_grad():
            plain = model(ids).logits[0, -1]
            with steer(model, art):
                gen = model.generate(ids, max_new_tokens=8, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or 0)
                logits = model(gen).logits[0, -1]
        assert torch.equal(gen[0], expected[f"{method}.{i}.tokens"]), (method, i)
        torch.testing.assert_close(logits, expected[f"{method}.{i}.logits"], rtol=1e-5,
                                   atol=1e-5)
        if method != "prompting":  # the edit does something at the prompt end
            with torch.no_grad(), steer(model, art):
                steered = model(ids).logits[0, -1]
            assert not torch.allclose(steered, plain, atol=1e-4), (method, i)
