"""Steers that run outside the library: a llama.cpp control vector or a plain HF model folder.

Both exports bake one strength γ into the weights (default: the artifact's γ) and are possible
only for steers that edit every position (``position="all"``) with a *constant* shift: llama.cpp
adds a control vector at every token, and a bias acts on every token too, so a prompt-end steer
(which edits the last prompt token and a few generated ones) cannot be written either way. An
edit whose size depends on the activation cannot be a constant either: the English term
(β ≠ 0 with ``remove_*``), the saturating gate (``gate_*``), a per-neuron gain (``scale``) and
the paper-literal ``replace`` mode are refused, each with the reason.

What a constant push becomes, per decoder layer ℓ (λ' = γ·λ)::

    resid   push a       →  λ'·a                          added to the output of layer ℓ
    neurons push a on N  →  W_down[:, N] · (λ'·a)          the MLP output's shift at layer ℓ

:func:`export_control_vector` writes their per-layer sum as ``direction.ℓ`` (llama.cpp adds
``direction.ℓ`` to the output of 0-based decoder layer ℓ; it rejects ``direction.0``, so edits at
layer 0 are refused). It is exact where the MLP output is added to the residual as it is
(Llama, Mistral, Qwen, Gemma 1, GPT-2). **Gemma 2 / Gemma 3** send the MLP output through
``post_feedforward_layernorm`` (an RMSNorm) before the residual add, so a neuron push there is
not a constant residual shift: the exported W_down·shift is then an approximation (its size and
direction after the norm depend on each token's MLP output). Such layers are flagged:
:class:`ControlVectorPlan` ``exact=False``, ``approximate_layers``, a warning, and the record
``<name>.foxp2.json`` written next to the GGUF file. Residual-space pushes stay exact there.
Given ``calibration`` (a tokenised batch), those layers get instead the *mean* residual effect
of their neuron pushes over its real tokens, N(o) − N(o − W_down·shift) with N the post-MLP
norm and o the MLP output under the steer: closer on text like the batch, still flagged.

:func:`export_hf_folder` writes the steered model as a Hugging Face folder that
``AutoModelForCausalLM.from_pretrained`` loads without this project: the per-layer shift becomes
the bias of that layer's ``down_proj`` (the MLP output is added to the residual just before the
layer's output, so a bias there is the same as a push on the layer output, and W_down·shift is
the same as a push on the neurons). That needs a config that can hold MLP biases with no norm
after the MLP: Llama-style configs with ``mlp_bias`` (``mlp_bias=True`` also gives gate/up
biases; they are written as zeros). Other architectures are refused with the reason.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from sae_train.export.control_vector import write_control_vector
from sae_train.models.sites import architecture_layout, decoder_layers, first_tensor, text_config
from steering.steer.artifact import ArtifactError, LayerEdit, SteeringArtifact
from steering.steer.runtime import steer

RECORD_SUFFIX = ".foxp2.json"
POST_MLP_NORM = "post_feedforward_layernorm"  # Gemma 2/3: the MLP output is normed first


class ExportError(ArtifactError):
    """A steer that cannot be written in the requested form (the message says why)."""


@dataclass(frozen=True)
class ControlVectorPlan:
    """The residual vectors of a control vector and how faithful they are."""

    vectors: dict[int, Tensor]  # 0-based decoder layer → float32 vector of width n_embd
    exact: bool  # True: adding the vectors at the layer outputs is the steer itself
    approximate_layers: tuple[int, ...] = ()  # layers whose neuron push passes a post-MLP norm
    notes: tuple[str, ...] = field(default_factory=tuple)
    calibrated_tokens: int = 0  # tokens the approximate layers' mean effect was measured on

    def record(self) -> dict:
        return {"exact": self.exact, "approximate_layers": list(self.approximate_layers),
                "calibrated_tokens": self.calibrated_tokens,
                "layers": sorted(self.vectors), "notes": list(self.notes),
                "norms": {str(k): float(v.norm()) for k, v in sorted(self.vectors.items())}}


# ---------------------------------------------------------------------------- checks
def _require_all_positions(artifact: SteeringArtifact, what: str) -> None:
    if artifact.position != "all":
        raise ExportError(
            f"{artifact.method}: position={artifact.position!r} cannot be {what}: it edits only "
            "the prompt end and the first generated tokens, while a "
            f"{what} acts on every position. Export a steer tuned with position='all' "
            "(foxp2-steer … position=all), or run this one with steering.steer(model, artifact)")


def _non_constant_reason(edit: LayerEdit, lam: float, beta: float) -> Optional[str]:
    """Why this edit is not a constant shift at strengths (λ', β'); None when it is."""
    where = f"layer {edit.layer} ({edit.space})"
    if edit.space == "replace":
        return (f"{where}: replace mode re-encodes each token with the SAE (the shift depends "
                "on the activation)")
    if edit.has_removal and beta != 0:
        return (f"{where}: the English term (β={beta:g} with remove_*) removes a fraction of "
                "the English code that depends on each token's activation")
    if edit.has_push and lam != 0 and edit.has_gate:
        return (f"{where}: the saturating gate (gate_*) scales the push by clamp(1 − t(x), 0, 1),"
                " which depends on each token's activation")
    if edit.has_gain and lam != 0:
        return f"{where}: a per-neuron gain (scale) multiplies the activation"
    return None


def _strengths(artifact: SteeringArtifact, gamma: Optional[float]) -> tuple[float, float]:
    g = artifact.gamma if gamma is None else float(gamma)
    return g * artifact.lam, g * artifact.beta


def _constant_edits(artifact: SteeringArtifact, gamma: Optional[float], what: str
                    ) -> tuple[list[LayerEdit], float]:
    """The edits with a non-zero constant push and λ'; raises naming every non-constant one."""
    _require_all_positions(artifact, what)
    lam, beta = _strengths(artifact, gamma)
    problems = [r for e in artifact.edits if (r := _non_constant_reason(e, lam, beta))]
    if problems:
        raise ExportError(f"{artifact.method} cannot be a {what}, which holds one constant "
                          "vector per layer: " + "; ".join(problems)
                          + ". Run it with steering.steer(model, artifact) instead")
    edits = [e for e in artifact.edits if e.has_push and lam != 0]
    if not edits:
        raise ExportError(f"{artifact.method}: nothing to export (no push, or λ·γ = 0)")
    return edits, lam


# ---------------------------------------------------------------------------- the shifts
def _down_proj(model: nn.Module, layer: int) -> nn.Module:
    layout = architecture_layout(model)
    return getattr(getattr(decoder_layers(model)[layer], layout.mlp), layout.down_proj)


def neuron_push_in_residual(model: nn.Module, layer: int, index: Tensor, push: Tensor) -> Tensor:
    """W_down[:, index] · push: the MLP output's shift when ``push`` is added to the neurons
    ``index`` of layer ``layer`` (float32, CPU; nn.Linear or GPT-2's Conv1D)."""
    down = _down_proj(model, layer)
    weight = down.weight.detach().float().cpu()
    if not isinstance(down, nn.Linear):  # GPT-2 Conv1D stores (in, out)
        weight = weight.T
    return weight[:, index.long().cpu()] @ push.detach().float().cpu()


def residual_shifts(model: nn.Module, edits: list[LayerEdit], lam: float) -> dict[int, Tensor]:
    """Per decoder layer, the sum of its constant pushes as a residual vector (module doc)."""
    shifts: dict[int, Tensor] = {}
    for edit in edits:
        push = lam * edit.add.detach().float().cpu()
        if edit.space == "neurons":
            push = neuron_push_in_residual(model, edit.layer, edit.add_index, push)
        shifts[edit.layer] = shifts.get(edit.layer, 0) + push
    return dict(sorted(shifts.items()))


def _has_post_mlp_norm(model: nn.Module, layer: int) -> bool:
    return getattr(decoder_layers(model)[layer], POST_MLP_NORM, None) is not None


@torch.no_grad()
def post_norm_mean_shifts(model: nn.Module, artifact: SteeringArtifact, gamma: Optional[float],
                          neuron_shifts: dict[int, Tensor], calibration: tuple[Tensor, Tensor]
                          ) -> dict[int, Tensor]:
    """Per layer of ``neuron_shifts`` (layer → W_down·shift), the mean over the real tokens of
    ``calibration`` = (input_ids, attention_mask) of N(o) − N(o − W_down·shift): what the neuron
    push adds to the residual after the post-MLP norm N, o the MLP output under the steer."""
    layers, mlp = decoder_layers(model), architecture_layout(model).mlp
    outputs: dict[int, Tensor] = {}

    def capture(i):
        def hook(_module, _inputs, out):
            outputs[i] = first_tensor(out).detach().float()
        return hook

    handles = [getattr(layers[i], mlp).register_forward_hook(capture(i)) for i in neuron_shifts]
    ids, mask = calibration
    device = next(model.parameters()).device
    try:
        with steer(model, artifact, gamma=gamma):
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    real = mask.to(device).bool()
    out = {}
    for i, shift in neuron_shifts.items():
        norm, o = getattr(layers[i], POST_MLP_NORM), outputs[i]
        effect = norm(o).float() - norm(o - shift.to(o.device)).float()
        out[i] = effect[real].mean(0).cpu()
    return out


# ---------------------------------------------------------------------------- control vector
def control_vector_plan(artifact: SteeringArtifact, model: nn.Module,
                        gamma: Optional[float] = None,
                        calibration: Optional[tuple[Tensor, Tensor]] = None) -> ControlVectorPlan:
    """The per-layer residual vectors of ``artifact`` at strength ``gamma`` and their fidelity
    (module docstring; ``calibration``: an (input_ids, attention_mask) batch for the mean
    post-norm effect); raises :class:`ExportError` for what a control vector cannot hold."""
    edits, lam = _constant_edits(artifact, gamma, "llama.cpp control vector")
    at_zero = sorted({e.layer for e in edits if e.layer == 0})
    if at_zero:
        raise ExportError(
            f"{artifact.method}: an edit at decoder layer 0 cannot be a llama.cpp control "
            "vector (llama.cpp rejects direction.0, the first layer's output); steer from "
            "layer 1 on, or use export_hf_folder / steering.steer for this artifact")
    approx = sorted({e.layer for e in edits
                     if e.space == "neurons" and _has_post_mlp_norm(model, e.layer)})
    vectors = residual_shifts(model, edits, lam)
    notes, n_tokens = [], 0
    if approx:
        notes.append(
            f"layers {approx}: the MLP output passes {POST_MLP_NORM} (RMSNorm) before the "
            "residual add, so W_down·shift is not the residual shift a neuron push causes; "
            "the control vector approximates this steer there")
    if approx and calibration is not None:
        neuron = residual_shifts(model, [e for e in edits if e.layer in approx
                                         and e.space == "neurons"], lam)
        mean = post_norm_mean_shifts(model, artifact, gamma, neuron, calibration)
        for i in approx:
            vectors[i] = vectors[i] - neuron[i] + mean[i]
        n_tokens = int(calibration[1].sum())
        notes.append(f"those layers hold the mean post-norm effect over {n_tokens} tokens")
    return ControlVectorPlan(vectors=vectors, exact=not approx, approximate_layers=tuple(approx),
                             notes=tuple(notes), calibrated_tokens=n_tokens)


def export_control_vector(artifact: SteeringArtifact, path: str | Path, model: nn.Module,
                          gamma: Optional[float] = None,
                          calibration: Optional[tuple[Tensor, Tensor]] = None) -> Path:
    """Write ``artifact`` (at strength ``gamma``, default its own) as a llama.cpp control-vector
    GGUF file at ``path`` (run with ``llama-cli --control-vector path``); returns the path.

    Also writes ``<path stem>.foxp2.json``: the plan's record (exact or not, approximate layers,
    notes, per-layer norms). Warns when the vectors only approximate the steer (Gemma 2/3 neuron
    pushes, module docstring; ``calibration`` = (input_ids, attention_mask) narrows the gap there).
    Raises :class:`ExportError` for prompt-end steers, activation-dependent edits (English
    term, gate, gain, replace) and edits at layer 0.
    """
    plan = control_vector_plan(artifact, model, gamma, calibration)
    model_type = getattr(text_config(model), "model_type", None) or model.config.model_type
    path = write_control_vector(path, plan.vectors, model_hint=str(model_type))
    record = {"method": artifact.method, "target": artifact.target,
              "gamma": artifact.gamma if gamma is None else float(gamma),
              "lam": artifact.lam, "model_type": model_type, **plan.record()}
    path.with_suffix(RECORD_SUFFIX).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    if not plan.exact:
        warnings.warn(f"{path}: " + " ".join(plan.notes), stacklevel=2)
    return path


# ---------------------------------------------------------------------------- HF folder
def _require_mlp_bias_support(model: nn.Module) -> None:
    config = text_config(model)
    layers = decoder_layers(model)
    if any(getattr(layer, POST_MLP_NORM, None) is not None for layer in layers):
        raise ExportError(
            f"{config.model_type}: the MLP output passes {POST_MLP_NORM} before the residual "
            "add, so no bias in this architecture adds a constant to the residual stream; a "
            "steered Gemma 2/3 cannot be a plain HF folder (use export_control_vector, an "
            "approximation there, or steering.steer)")
    if "mlp_bias" not in config.to_dict():
        raise ExportError(
            f"{config.model_type}: its config has no mlp_bias field, so the saved model cannot "
            "hold the steer as a down_proj bias (Llama-style configs with mlp_bias can); use "
            "export_control_vector or steering.steer")
    if not all(isinstance(_down_proj(model, i), nn.Linear) for i in range(len(layers))):
        raise ExportError(f"{config.model_type}: down_proj is not an nn.Linear")


@contextmanager
def _mlp_biases(model: nn.Module, down_bias: dict[int, Tensor]):
    """Temporarily give every MLP projection a bias (zeros where it had none), add ``down_bias``
    to down_proj's, and set ``mlp_bias=True``; the model is restored on exit."""
    config, layout = text_config(model), architecture_layout(model)
    before = config.mlp_bias
    added, shifted = [], []
    try:
        for i, layer in enumerate(decoder_layers(model)):
            for proj in getattr(layer, layout.mlp).children():
                if isinstance(proj, nn.Linear) and proj.bias is None:
                    w = proj.weight
                    proj.bias = nn.Parameter(torch.zeros(proj.out_features, dtype=w.dtype,
                                                         device=w.device), requires_grad=False)
                    added.append(proj)
            down = _down_proj(model, i)
            if i in down_bias:
                shifted.append((down, down.bias.detach().clone()))
                with torch.no_grad():
                    down.bias += down_bias[i].to(device=down.bias.device, dtype=down.bias.dtype)
        config.mlp_bias = True
        yield model
    finally:
        config.mlp_bias = before
        with torch.no_grad():
            for down, bias in shifted:
                down.bias.copy_(bias)
        for proj in added:
            proj.bias = None


def export_hf_folder(artifact: SteeringArtifact, model: nn.Module, out_dir: str | Path,
                     gamma: Optional[float] = None, tokenizer=None) -> Path:
    """Write the model steered by ``artifact`` (at ``gamma``, default its own) as a plain Hugging
    Face folder at ``out_dir`` (safetensors, plus ``tokenizer`` if given, plus the record
    ``foxp2_steer.json``); ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives the steered
    model with no import of this project. ``model`` is left as it was.

    Raises :class:`ExportError` for prompt-end steers, activation-dependent edits (English term,
    gate, gain, replace), and architectures that cannot hold a constant residual shift as a
    bias (module docstring)."""
    edits, lam = _constant_edits(artifact, gamma, "plain Hugging Face model (a bias)")
    _require_mlp_bias_support(model)
    shifts = residual_shifts(model, edits, lam)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _mlp_biases(model, shifts):
        model.save_pretrained(out_dir)  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    record = {"method": artifact.method, "target": artifact.target,
              "gamma": artifact.gamma if gamma is None else float(gamma),
              "lam": artifact.lam, "steered_layers": sorted(shifts),
              "how": "the per-layer shift is the bias of mlp.down_proj (gate/up biases are 0)",
              "artifact": artifact.describe()}
    (out_dir / "foxp2_steer.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return out_dir
