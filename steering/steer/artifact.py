"""The steering artifact: everything a steered model needs, in one folder that loads anywhere.

A :class:`SteeringArtifact` is one ``steer.safetensors`` (the tensors) plus one ``steer.json``
(method, target, strengths, position mode, per-layer layout, provenance), written atomically
into one folder per (model, language, method). It is method-agnostic: Neural FOXP2 in feature,
neuron or replace mode and every baseline of the evaluation (CAA, LAPE, random support,
positive-/negative-only) are the same three kinds of per-layer edit, so one runtime
(:mod:`steering.steer.runtime`) and one harness (:mod:`steering.evaluate.harness`) serve all of
them.

Per-layer edit (:class:`LayerEdit`), at γ = 1 (``lam``, ``beta`` are the tuned λ, β)::

    x ← x + γ·λ·a  −  γ·β · c(x) · u,      c(x) = clamp(⟨g(E x + b), m⟩ / ‖m‖², 0, 1)

- ``space="resid"``: x is the decoder layer's output h_ℓ (``layers.ℓ.resid``). ``a`` is a
  full-width push (FOXP2 feature mode: W_decᵀ·Pμ on the target features; CAA: the residual
  mean difference). The English term reads the English SAE features N_en: E, b their encoder
  rows and effective bias (b_enc − W_enc·b_dec, so E x + b are their pre-activations on raw h),
  g = ReLU, m = μ_en on N_en, u = W_dec[N_en]ᵀ m. It removes the fraction β of the English
  mean code that the token carries: on English text c ≈ 1, on target text c ≈ 0, which is
  why it costs little in-language. c is clamped to [0, 1] (at most the English mean is
  removed: outlier tokens such as BOS, whose norm is far beyond any text token's, would
  otherwise get c ≫ 1 and wreck every later position through attention).
- ``space="neurons"``: x is the MLP neuron activation vector (``layers.ℓ.mlp``: the down
  projection's input). ``a`` is non-zero on N_t only (stored sparse: ``add_index``,
  ``add``), E = the selection of N_en, g = identity, u = m on N_en.
- ``space="replace"``: the paper-literal edit h ← W_dec(z + δz) + b_dec with z = SAE(h) (it
  injects the SAE's reconstruction error; offered for comparison only). δz = λ·Pμ on the
  target features, −β·c·m on N_en, the SAE read from ``sae_path``.

**Saturating push** (the default for Neural FOXP2; a departure from the paper's constant
δz⁺ = λ·Pμ): the push is multiplied by g(x) = clamp(1 − t(x), 0, 1), where t(x) is the token's
coordinate on the English→target axis of the target units (0 at the English mean, 1 at the
target mean). A token that already reads as target gets no push, an English one the full push:
the steer moves English toward the target and stops there instead of pushing target text past
its own mean, which is what costs KL and NLL on target-language text (measured on the demo:
docs/results.md). Baselines (CAA) keep their constant push.

Norm-awareness: every push is a *measured* difference (codes, neurons or residuals of the
target minus English discovery sentences), so it is in the layer's own units whatever the
residual norm there (≈130 at layer 0, ≈30,000 at layer 17 of Gemma-3-270m). Residual pushes
persist down the stream, so a window of W residual edits would add W copies of the shift;
builders divide each resid layer's push by W (``window_split`` in the provenance). Neuron
pushes write through W_down into the stream once per layer, so they are not split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FORMAT = "foxp2-steer"
FORMAT_VERSION = 1
TENSORS_NAME = "steer.safetensors"
META_NAME = "steer.json"
SPACES = ("resid", "neurons", "replace")
POSITION_MODES = ("prompt_end", "all")
_TENSOR_FIELDS = ("add", "add_index", "remove_index", "remove_encoder", "remove_bias",
                  "remove_mean", "remove_decoder", "gate_index", "gate_encoder", "gate_bias",
                  "gate_base", "gate_delta", "scale_index", "scale")
# |λ|, |β|, |γ| above this are a typo or a corrupted file, not a steer.
MAX_STRENGTH = 1e6
# The fields the parameters checksum covers (steer.json's "parameters_sha256"), besides the
# per-layer layout ("edits") and the model fingerprint.
CHECKED_FIELDS = ("method", "target", "english", "lam", "beta", "gamma", "position",
                  "decode_steps", "sustain", "prompt_prefix")


class ArtifactError(ValueError):
    """A steering artifact that cannot be used (names what is wrong)."""


@dataclass
class LayerEdit:
    """The edit at one layer (formula in the module docstring)."""

    layer: int
    space: str
    add: Optional[Tensor] = None  # resid/replace: (width,); neurons: (|N_t|,) values
    add_index: Optional[Tensor] = None  # neurons: (|N_t|,) int64; replace: target latents
    remove_index: Optional[Tensor] = None  # neurons: N_en; replace: English latents
    remove_encoder: Optional[Tensor] = None  # resid: (|N_en|, d)
    remove_bias: Optional[Tensor] = None  # resid: (|N_en|,)
    remove_mean: Optional[Tensor] = None  # m: (|N_en|,)
    remove_decoder: Optional[Tensor] = None  # resid: (|N_en|, d)
    sae_path: Optional[str] = None  # replace only
    # Saturating push (optional): the push is scaled by clamp(1 − t(x), 0, 1) with the target
    # coordinate t(x) = ⟨r(x) − gate_base, gate_delta⟩ / ‖gate_delta‖², r(x) the readout of the
    # target units (resid: relu(gate_encoder·x + gate_bias); neurons: x[gate_index]).
    gate_index: Optional[Tensor] = None
    gate_encoder: Optional[Tensor] = None
    gate_bias: Optional[Tensor] = None
    gate_base: Optional[Tensor] = None
    gate_delta: Optional[Tensor] = None
    # Per-neuron gain (neurons only; learned LinEAS-style maps): x[scale_index] += γ·λ·scale ⊙
    # x[scale_index], on the activations before the push is added.
    scale_index: Optional[Tensor] = None
    scale: Optional[Tensor] = None

    def __post_init__(self):
        if self.space not in SPACES:
            raise ArtifactError(f"layer {self.layer}: space={self.space!r}; use one of {SPACES}")
        if self.space == "neurons" and self.add is not None and self.add_index is None:
            raise ArtifactError(f"layer {self.layer}: a neuron push needs add_index")
        if self.remove_mean is not None:
            if self.space == "resid" and (self.remove_encoder is None
                                          or self.remove_decoder is None):
                raise ArtifactError(f"layer {self.layer}: the English term in resid space needs "
                                    "remove_encoder and remove_decoder")
            if self.space in ("neurons", "replace") and self.remove_index is None:
                raise ArtifactError(f"layer {self.layer}: the English term needs remove_index")
        if self.scale is not None and (self.space != "neurons" or self.scale_index is None
                                       or self.scale_index.shape != self.scale.shape):
            raise ArtifactError(f"layer {self.layer}: a gain needs space='neurons' and a "
                                "scale_index of the scale's shape")
        if self.space == "replace" and not self.sae_path:
            raise ArtifactError(f"layer {self.layer}: replace mode needs the SAE's sae_path")

    @property
    def has_gate(self) -> bool:
        return self.gate_delta is not None and self.gate_delta.numel() > 0 \
            and float(self.gate_delta.norm()) > 0

    @property
    def site(self) -> str:
        return f"layers.{self.layer}.{'mlp' if self.space == 'neurons' else 'resid'}"

    @property
    def has_push(self) -> bool:
        return self.add is not None and self.add.numel() > 0

    @property
    def has_gain(self) -> bool:
        return self.scale is not None and self.scale.numel() > 0

    @property
    def has_removal(self) -> bool:
        return self.remove_mean is not None and self.remove_mean.numel() > 0 \
            and float(self.remove_mean.norm()) > 0

    def sizes(self) -> dict:
        n_t = 0 if self.add is None else (int(self.add_index.numel()) if self.add_index
                                          is not None else int((self.add != 0).sum()))
        n_en = 0 if self.remove_mean is None else int(self.remove_mean.numel())
        push = 0.0 if self.add is None or self.space == "neurons" else float(self.add.norm())
        return {"layer": self.layer, "space": self.space, "n_push": n_t, "n_remove": n_en,
                "push_norm": push}


@dataclass
class SteeringArtifact:
    """A steer for one model and target language (see the module docstring)."""

    method: str
    target: str
    edits: list[LayerEdit]
    lam: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    english: str = "en"
    position: str = "prompt_end"
    # Decode steps steered at full strength after the prompt end (position="prompt_end").
    decode_steps: int = 4
    # Strength on every later generated token, as a fraction of the full strength (0: those
    # tokens are not edited; 1: the whole answer is steered at full strength). A light
    # sustained push keeps an answer from drifting back to English once it has switched.
    sustain: float = 0.0
    # Text prepended to every prompt (the prompting baseline); "" for activation steers.
    prompt_prefix: str = ""
    provenance: dict = field(default_factory=dict)
    # The model it was built for (steering.steer.fingerprint); {} when unknown (old artifacts).
    # steer() refuses a model that does not match it.
    model_fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        check_strengths(lam=self.lam, beta=self.beta, gamma=self.gamma)
        if self.position not in POSITION_MODES:
            raise ArtifactError(f"position={self.position!r}; use one of {POSITION_MODES}")
        if self.decode_steps < 0:
            raise ArtifactError(f"decode_steps={self.decode_steps}: must be ≥ 0")
        if not 0 <= self.sustain <= 1:
            raise ArtifactError(f"sustain={self.sustain}: must be in [0, 1]")
        layers = [e.layer for e in self.edits]
        if len(set((e.layer, e.space) for e in self.edits)) != len(self.edits):
            raise ArtifactError(f"two edits for the same layer and space: {layers}")

    @property
    def window(self) -> list[int]:
        return sorted({e.layer for e in self.edits})

    def with_strengths(self, lam: float | None = None, beta: float | None = None,
                       gamma: float | None = None, **changes) -> "SteeringArtifact":
        """A copy with other strengths (tensors shared, not copied)."""
        from dataclasses import replace

        return replace(self, lam=self.lam if lam is None else lam,
                       beta=self.beta if beta is None else beta,
                       gamma=self.gamma if gamma is None else gamma, **changes)

    def describe(self) -> dict:
        return {"method": self.method, "target": self.target, "window": self.window,
                "lam": self.lam, "beta": self.beta, "gamma": self.gamma,
                "position": self.position, "decode_steps": self.decode_steps,
                "sustain": self.sustain, "prompt_prefix": self.prompt_prefix,
                "edits": [e.sizes() for e in self.edits]}

    # ------------------------------------------------------------------ files
    def parameters(self) -> dict:
        """What the parameters checksum covers: :data:`CHECKED_FIELDS`, the per-layer layout and
        the model fingerprint, in canonical types."""
        out = {name: getattr(self, name) for name in CHECKED_FIELDS}
        out.update(lam=float(self.lam), beta=float(self.beta), gamma=float(self.gamma),
                   decode_steps=int(self.decode_steps), sustain=float(self.sustain),
                   edits=_layout(self.edits), model_fingerprint=dict(self.model_fingerprint))
        return out

    def save(self, folder: str | Path, model=None, tokenizer=None) -> Path:
        """Write ``<folder>/steer.safetensors`` and ``<folder>/steer.json`` (atomically).

        With ``model`` (and ``tokenizer``) its fingerprint is recorded first
        (``self.model_fingerprint``), so that :func:`steering.steer.runtime.steer` can refuse
        another model. steer.json carries the sha256 of the tensors file and of
        :meth:`parameters` (checked by :meth:`load`)."""
        from safetensors.torch import save_file

        if model is not None:
            from steering.steer.fingerprint import model_fingerprint

            self.model_fingerprint = model_fingerprint(model, tokenizer)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"edits.{i}.{name}": getattr(e, name).detach().cpu().contiguous().clone()
                   for i, e in enumerate(self.edits) for name in _TENSOR_FIELDS
                   if getattr(e, name) is not None}
        layout = _layout(self.edits)
        tmp = folder / (TENSORS_NAME + ".tmp")
        save_file(tensors or {"empty": torch.zeros(0)}, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, folder / TENSORS_NAME)
        digest = hashlib.sha256((folder / TENSORS_NAME).read_bytes()).hexdigest()
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
                "target": self.target, "english": self.english, "lam": self.lam,
                "beta": self.beta, "gamma": self.gamma, "position": self.position,
                "decode_steps": self.decode_steps, "sustain": self.sustain,
                "prompt_prefix": self.prompt_prefix, "window": self.window, "edits": layout,
                "tensors_sha256": digest, "model_fingerprint": self.model_fingerprint,
                **_parameter_checksums(self.parameters()),
                "provenance": {**self.provenance,
                               "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
        tmp = folder / (META_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=_json_default))
        os.replace(tmp, folder / META_NAME)
        return folder

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True,
             allow_edited: bool = False) -> "SteeringArtifact":
        """Read a folder written by :meth:`save` (safetensors only, no pickle).

        ``verify`` checks the tensors file and the parameters against the checksums in
        steer.json (artifacts written before the parameters checksum have only the first) and
        refuses a file edited after it was saved; ``allow_edited=True`` logs a warning instead.
        Every failure is an :class:`ArtifactError` naming the file and what is wrong."""
        folder = Path(folder)
        meta_path, tensor_path = folder / META_NAME, folder / TENSORS_NAME
        if not folder.is_dir():
            raise ArtifactError(f"{folder} is not a steering artifact: "
                                + ("it is a file, not a folder" if folder.exists()
                                   else "the folder is missing"))
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise ArtifactError(f"{folder} is not a steering artifact: {p.name} is missing")
        meta = _read_meta(meta_path)
        if verify:
            digest = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
            if digest != meta.get("tensors_sha256"):
                _edited(f"{tensor_path} does not match the checksum in {meta_path} (modified "
                        "or truncated)", allow_edited)
        art = _from_meta(cls, meta, meta_path, _read_tensors(tensor_path))
        if verify and "parameters_sha256" in meta:
            _check_parameters(art, meta, meta_path, allow_edited)
        if not art.model_fingerprint:
            log.info("%s has no model fingerprint (written before foxp2 recorded one): steer() "
                     "cannot check that the model matches", folder)
        return art


def check_strengths(**strengths) -> None:
    """Refuse a non-finite or absurd strength (``lam=inf``, ``gamma=nan``, ``|β| > 1e6``)."""
    for name, value in strengths.items():
        if value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ArtifactError(f"{name}={value!r}: a strength must be a number") from None
        if not math.isfinite(v):
            raise ArtifactError(f"{name}={value}: a strength must be finite")
        if abs(v) > MAX_STRENGTH:
            raise ArtifactError(f"{name}={value}: |{name}| > {MAX_STRENGTH:g} is not a steer "
                                "strength (a typo or a corrupted file?)")


def _layout(edits: list[LayerEdit]) -> list[dict]:
    return [{"layer": int(e.layer), "space": e.space, "sae_path": e.sae_path,
             "tensors": [n for n in _TENSOR_FIELDS if getattr(e, n) is not None]}
            for e in edits]


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _parameter_checksums(params: dict) -> dict:
    return {"parameters_sha256": _digest(params),
            "parameters_field_sha256": {k: _digest(v)[:16] for k, v in params.items()}}


def _edited(message: str, allow_edited: bool) -> None:
    if not allow_edited:
        raise ArtifactError(f"{message}; pass allow_edited=True (foxp2-generate: "
                            "allow_edited=true) to use it anyway")
    log.warning("%s; used anyway (allow_edited)", message)


def _check_parameters(art: "SteeringArtifact", meta: dict, meta_path: Path,
                      allow_edited: bool) -> None:
    params = art.parameters()
    if _digest(params) == meta["parameters_sha256"]:
        return
    fields = meta.get("parameters_field_sha256") or {}
    changed = [k for k, v in params.items() if fields.get(k) != _digest(v)[:16]]
    shown = ", ".join(f"{k}: {_short(params[k])}" for k in changed) or "parameters_sha256"
    _edited(f"{meta_path} was edited after it was saved: its parameters checksum does not "
            f"match ({shown})", allow_edited)


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{meta_path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{meta_path}: format {found!r}, expected {FORMAT!r} (not a "
                            "steering artifact)")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{meta_path}: format_version {version!r} is newer than this foxp2 "
                            f"({FORMAT_VERSION}) or not a version; upgrade foxp2")
    return meta


def _read_tensors(tensor_path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error type on a damaged file
        raise ArtifactError(f"{tensor_path} is not a readable safetensors file "
                            f"({' '.join(str(err).split())})") from None


def _from_meta(cls, meta: dict, meta_path: Path, tensors: dict) -> "SteeringArtifact":
    try:
        edits = []
        for i, entry in enumerate(meta["edits"]):
            kwargs = {name: tensors[f"edits.{i}.{name}"] for name in entry["tensors"]}
            edits.append(LayerEdit(layer=int(entry["layer"]), space=entry["space"],
                                   sae_path=entry.get("sae_path"), **kwargs))
        return cls(method=meta["method"], target=meta["target"], edits=edits,
                   lam=float(meta["lam"]), beta=float(meta["beta"]),
                   gamma=float(meta["gamma"]), english=meta.get("english", "en"),
                   position=meta["position"], decode_steps=int(meta["decode_steps"]),
                   sustain=float(meta.get("sustain", 0.0)),
                   prompt_prefix=meta.get("prompt_prefix", ""),
                   provenance=meta.get("provenance", {}),
                   model_fingerprint=meta.get("model_fingerprint") or {})
    except ArtifactError as err:
        raise ArtifactError(f"{meta_path}: {err}") from None
    except KeyError as err:
        raise ArtifactError(f"{meta_path}: {err.args[0]!r} is missing (a tensor of the layout, "
                            "or a field)") from None
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{meta_path}: a field has a wrong value ({err})") from None


def _json_default(obj: Any):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
