"""Apply a :class:`~steering.steer.artifact.SteeringArtifact` to any HF causal LM with hooks.

    from steering import SteeringArtifact, steer
    art = SteeringArtifact.load("foxp2_runs/steer/gemma3-270m-hi/foxp2")
    with steer(model, art, gamma=1.0):
        out = model.generate(**batch, max_new_tokens=32)

**Positions.** ``position="all"`` edits every token. ``position="prompt_end"`` (default) edits
the last prompt token and the first ``decode_steps`` generated tokens (each generated token's
own forward) at full strength, and every later generated token at the fraction ``sustain`` of
it (0: not at all): the steer decides the language of the answer's start, and a light
sustained push keeps the answer from drifting back to English. Positions are *columns* of the
(left-padded) sequence: every row's prompt ends in the last column of the first forward. A
top-level pre-hook on the model tracks which columns each forward holds:

- a call with a non-empty KV cache continues the current sequence at the cache's length;
- a call without one is a new prompt, unless its input ids start with the current prompt's
  ids (a plain forward loop without the cache re-feeds the whole sequence each step): then it
  is the same sequence again and the prompt end stays.

So ``generate()`` with and without the cache, and a hand-written loop, edit the same tokens
(tested). Right-padded batches are refused (the prompt end would differ per row); a caller
that knows per-row prompt ends (the evaluation's held-out sentences, where each sentence's
first token stands for the prompt end) pins them with :meth:`Steerer.pin_prompt_end`.

Hooks are removed when the context exits, also on error. Decode steps past the steered ones
skip the edit entirely (no extra work), which keeps steered generation within a few percent
of plain generation.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_train.models.sites import first_tensor, site_module
from steering.steer.artifact import (POSITION_MODES, ArtifactError, LayerEdit, SteeringArtifact,
                                     check_strengths)
from steering.steer.fingerprint import fingerprint_mismatches, model_fingerprint

log = logging.getLogger(__name__)


class _Columns:
    """Which columns the current forward holds and where the prompt ends (module docstring)."""

    def __init__(self):
        self.prompt_ids: Optional[Tensor] = None
        self.prompt_len: int = 0
        self.start = 0
        self.length = 0
        self.pinned_end: Optional[Tensor] = None  # (batch,) per-row prompt-end columns

    def observe(self, input_ids: Optional[Tensor], seq_len: int, past_len: int,
                attention_mask: Optional[Tensor]) -> None:
        self.length = seq_len
        if past_len > 0:
            self.start = past_len
            return
        self.start = 0
        if self.pinned_end is not None:
            return
        same = (input_ids is not None and self.prompt_ids is not None
                and input_ids.shape[0] == self.prompt_ids.shape[0]
                and input_ids.shape[1] >= self.prompt_ids.shape[1]
                and torch.equal(input_ids[:, :self.prompt_ids.shape[1]],
                                self.prompt_ids.to(input_ids.device)))
        if not same:
            if attention_mask is not None and attention_mask.ndim == 2 \
                    and bool((attention_mask[:, -1] == 0).any()):
                raise ArtifactError("the batch is right-padded; steering needs left padding "
                                    "(tokenizer.padding_side = 'left') so that every prompt "
                                    "ends in the last column")
            self.prompt_ids = None if input_ids is None else input_ids.detach().clone()
            self.prompt_len = seq_len

    def weights(self, mode: str, decode_steps: int, sustain: float, device
                ) -> Optional[Tensor]:
        """(batch or 1, seq) float strength of each token's edit (1: full, ``sustain``: later
        generated tokens, 0: none); None when nothing is edited."""
        if mode == "all":
            return torch.ones(1, self.length, device=device)
        if self.pinned_end is None:
            end = self.prompt_len - 1
            # nothing to edit: before the prompt end, or past the full-strength steps unsustained
            if self.start + self.length - 1 < end or (
                    sustain == 0 and self.start > end + decode_steps):
                return None
        else:
            end = self.pinned_end.to(device)[:, None]
        cols = torch.arange(self.start, self.start + self.length, device=device)[None]
        w = ((cols >= end) & (cols <= end + decode_steps)).float()
        if sustain > 0:
            w = w + sustain * (cols > end + decode_steps).float()
        return w if self.pinned_end is None or bool(w.any()) else None


def _past_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


class Steerer:
    """The live steer returned by :func:`steer` (hooks, strengths, position tracking)."""

    def __init__(self, model, artifact: SteeringArtifact, gamma: float, position: str,
                 decode_steps: int, sustain: float = 0.0):
        check_strengths(gamma=gamma)
        if position not in POSITION_MODES:
            raise ArtifactError(f"position={position!r}; use one of {POSITION_MODES}")
        if int(decode_steps) < 0:
            raise ArtifactError(f"decode_steps={decode_steps}: must be ≥ 0")
        if not 0 <= sustain <= 1:
            raise ArtifactError(f"sustain={sustain}: must be in [0, 1]")
        self.model, self.artifact = model, artifact
        self.gamma, self.position, self.decode_steps = float(gamma), position, int(decode_steps)
        self.sustain = float(sustain)
        self.columns = _Columns()
        self.handles: list = []
        self.n_edited_calls = 0
        self._cast: dict = {}
        self._saes: dict = {}

    # ------------------------------------------------------------------ controls
    def pin_prompt_end(self, columns: Optional[Tensor]) -> None:
        """Use these per-row prompt-end columns (None: track prompts again)."""
        self.columns.pinned_end = None if columns is None else columns.detach().long().cpu()

    def reset(self) -> None:
        """Forget the current prompt (the next forward starts a new one)."""
        self.columns = _Columns()

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        def track(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            ref = ids if ids is not None else embeds
            if ref is None:
                return None
            self.columns.observe(ids, int(ref.shape[1]), _past_length(kwargs),
                                 kwargs.get("attention_mask"))
            return None

        self.handles.append(self.model.register_forward_pre_hook(track, with_kwargs=True))
        for edit in self.artifact.edits:
            if not (edit.has_push or edit.has_removal or edit.has_gain):
                continue
            module, where = site_module(self.model, edit.site)
            if where == "output":
                self.handles.append(module.register_forward_hook(self._output_hook(edit)))
            else:
                self.handles.append(module.register_forward_pre_hook(self._input_hook(edit)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _output_hook(self, edit: LayerEdit):
        def hook(_module, _inputs, output):
            x = first_tensor(output)
            y = self.apply(edit, x)
            if y is x:
                return None
            if isinstance(output, (tuple, list)):
                return type(output)([y, *output[1:]])
            return y
        return hook

    def _input_hook(self, edit: LayerEdit):
        def pre_hook(_module, args):
            y = self.apply(edit, args[0])
            return None if y is args[0] else (y, *args[1:])
        return pre_hook

    # ------------------------------------------------------------------ the edit
    def _tensor(self, edit: LayerEdit, name: str, like: Tensor) -> Tensor:
        key = (id(edit), name, like.device, like.dtype)
        if key not in self._cast:
            value = getattr(edit, name)
            if name == "remove_decoder":  # u = Dᵀ m, precomputed once
                value = edit.remove_mean.float() @ edit.remove_decoder.float()
            self._cast[key] = value.to(device=like.device,
                                       dtype=like.dtype if value.is_floating_point()
                                       else value.dtype)
        return self._cast[key]

    def apply(self, edit: LayerEdit, x: Tensor) -> Tensor:
        """x (batch, seq, width) → edited x at the steered positions (x itself if none)."""
        weight = self.columns.weights(self.position, self.decode_steps, self.sustain, x.device)
        if weight is None or self.gamma == 0:
            return x
        lam = self.gamma * self.artifact.lam
        beta = self.gamma * self.artifact.beta
        if edit.space == "replace":
            delta = self._replace_delta(edit, x, lam, beta)
        else:
            delta = torch.zeros_like(x)
            if edit.has_gain and lam != 0:
                idx = self._tensor(edit, "scale_index", x)
                gain = self._tensor(edit, "scale", x).float()
                delta[..., idx] += (lam * gain * x[..., idx].float()).to(x.dtype)
            if edit.has_push and lam != 0:
                scale = lam * self._gate(edit, x)[..., None] if edit.has_gate else lam
                if edit.space == "neurons":
                    idx = self._tensor(edit, "add_index", x)
                    delta[..., idx] += (scale * self._tensor(edit, "add", x).float()).to(x.dtype)
                else:
                    delta += (scale * self._tensor(edit, "add", x).float()).to(x.dtype)
            if edit.has_removal and beta != 0:
                m = self._tensor(edit, "remove_mean", x)
                m_sq = (m.float() * m.float()).sum().clamp_min(1e-12)
                if edit.space == "neurons":
                    idx = self._tensor(edit, "remove_index", x)
                    coef = ((x[..., idx].float() @ m.float()) / m_sq).clamp(0, 1)
                    delta[..., idx] -= (beta * coef[..., None] * m.float()).to(x.dtype)
                else:
                    pre = F.linear(x.float(), self._tensor(edit, "remove_encoder", x).float(),
                                   self._tensor(edit, "remove_bias", x).float())
                    coef = ((F.relu(pre) @ m.float()) / m_sq).clamp(0, 1)
                    u = self._tensor(edit, "remove_decoder", x).float()
                    delta -= (beta * coef[..., None] * u).to(x.dtype)
        self.n_edited_calls += 1
        return x + delta * weight[..., None].to(x.dtype)

    def _gate(self, edit: LayerEdit, x: Tensor) -> Tensor:
        """g(x) = clamp(1 − t(x), 0, 1) per token (t: the target coordinate, artifact doc)."""
        if edit.gate_encoder is not None:
            readout = F.relu(F.linear(x.float(), self._tensor(edit, "gate_encoder", x).float(),
                                      self._tensor(edit, "gate_bias", x).float()))
        else:
            readout = x[..., self._tensor(edit, "gate_index", x)].float()
        delta = self._tensor(edit, "gate_delta", x).float()
        base = self._tensor(edit, "gate_base", x).float()
        t = ((readout - base) @ delta) / (delta @ delta).clamp_min(1e-12)
        return (1 - t).clamp(0, 1)

    def _replace_delta(self, edit: LayerEdit, x: Tensor, lam: float, beta: float) -> Tensor:
        """Paper-literal: W_dec(z + δz) + b_dec − x at the steered tokens."""
        from sae_train.saes.io import load_sae

        if edit.sae_path not in self._saes:
            self._saes[edit.sae_path] = load_sae(edit.sae_path).to(x.device).eval()
        sae = self._saes[edit.sae_path]
        flat = x.reshape(-1, x.shape[-1]).to(sae.W_dec.dtype)
        z = sae.encode(flat)
        if edit.has_push:
            z[:, edit.add_index.to(z.device)] += lam * edit.add.to(z.device, z.dtype)
        if edit.has_removal:
            idx, m = edit.remove_index.to(z.device), edit.remove_mean.to(z.device, z.dtype)
            coef = ((z[:, idx] @ m) / (m @ m).clamp_min(1e-12)).clamp(0, 1)
            z[:, idx] -= beta * coef[:, None] * m
        return (sae.decode(z) - flat).reshape(x.shape).to(x.dtype)


@contextmanager
def steer(model, artifact: SteeringArtifact | str, gamma: float | None = None,
          position: str | None = None, decode_steps: int | None = None,
          sustain: float | None = None, check_model: bool = True, tokenizer=None):
    """Context manager: ``model`` steered by ``artifact`` (a loaded artifact or its folder).

    ``gamma`` scales λ and β together (default: the artifact's γ); ``position``,
    ``decode_steps`` and ``sustain`` override the artifact's position mode. Yields the
    :class:`Steerer`; its hooks are removed on exit, also when the body raises.

    An artifact that records its model's fingerprint is refused on a model that does not match
    it (and, with ``tokenizer``, on another vocabulary): :func:`check_model_matches`.
    ``check_model=False`` steers anyway (an artifact without a fingerprint is not checked).
    """
    if not isinstance(artifact, SteeringArtifact):
        artifact = SteeringArtifact.load(artifact)
    if check_model:
        check_model_matches(model, artifact, tokenizer)
    steerer = Steerer(model, artifact, artifact.gamma if gamma is None else gamma,
                      artifact.position if position is None else position,
                      artifact.decode_steps if decode_steps is None else decode_steps,
                      artifact.sustain if sustain is None else sustain)
    steerer.install()
    try:
        yield steerer
    finally:
        steerer.remove()


def check_model_matches(model, artifact: SteeringArtifact, tokenizer=None) -> None:
    """Raise :class:`ArtifactError` naming every field where ``model`` (and ``tokenizer``)
    differ from the fingerprint ``artifact`` was saved with; nothing to check without one."""
    if not artifact.model_fingerprint:
        return
    current = model_fingerprint(model, tokenizer)
    differ = fingerprint_mismatches(artifact.model_fingerprint, current)
    if differ:
        raise ArtifactError(f"the {artifact.method} artifact was built for another model ("
                            f"{'; '.join(differ)}); pass check_model=False (foxp2-generate: "
                            "check_model=false) to steer anyway")


def prompt_with_prefix(artifact: Optional[SteeringArtifact], prompt: str) -> str:
    """The prompt as the method sees it (the prompting baseline prepends an instruction)."""
    if artifact is None or not artifact.prompt_prefix:
        return prompt
    return artifact.prompt_prefix + prompt
