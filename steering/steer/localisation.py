"""The files of one ``foxp2-localise`` run, read once: what every steering method builds from.

Formats: :mod:`steering.localise.run` (``directions.safetensors``, ``localise/summary.json``,
``localise/layers.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class BuildError(ValueError):
    """A localisation that cannot give the requested steer (names what is missing)."""


class Localisation:
    """The files of one ``foxp2-localise`` run, read once."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        directions = self.folder / "directions.safetensors"
        summary = self.folder / "localise" / "summary.json"
        for p in (directions, summary):
            if not p.is_file():
                raise BuildError(f"{self.folder} is not a finished localisation: {p} is missing "
                                 "(run foxp2-localise first)")
        with safe_open(str(directions), "pt") as f:
            self.meta = f.metadata() or {}
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.summary = json.loads(summary.read_text())
        layers_file = self.folder / "localise" / "layers.json"
        self.records = json.loads(layers_file.read_text()) if layers_file.is_file() else {}
        self.window: list[int] = [int(x) for x in self.tensors["window"].tolist()]
        self.layers: list[int] = [int(x) for x in self.tensors["layers"].tolist()]
        self.target = self.meta.get("target", self.summary.get("target"))
        self.english = self.meta.get("english", self.summary.get("english", "en"))
        self.saes = json.loads(self.meta.get("saes", "{}"))
        if "english_feature_ids" not in {k.split(".", 2)[-1] for k in self.tensors}:
            raise BuildError(f"{directions} has no English features (written by an older "
                             "foxp2-localise); re-run foxp2-localise")

    def content_digest(self, lape: bool = False) -> str:
        """sha256 of what the steers are built from: every tensor of directions.safetensors,
        the window and target; with ``lape``, LAPE's per-layer sets (only the ``lape``
        baseline reads them). Not when the localisation ran: a resumed run that adds LAPE
        (``tracing.lape=true`` after ``false``) keeps every other method's stored result."""
        h = hashlib.sha256(json.dumps([self.target, self.english, self.window]).encode())
        for name in sorted(self.tensors):
            tensor = self.tensors[name].contiguous()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel()
                     else b"")
        if lape:
            h.update(json.dumps({layer: rec.get("lape") for layer, rec in self.records.items()},
                                sort_keys=True).encode())
        return h.hexdigest()

    def t(self, layer: int, name: str) -> Tensor:
        key = f"layers.{layer}.{name}"
        if key not in self.tensors:
            raise BuildError(f"{self.folder}/directions.safetensors has no {key}")
        return self.tensors[key]

    def encoder_rows(self, layer: int, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder rows and effective biases of latents ``ids`` (support_* in the directions
        file; older files: read from the SAE the localisation used)."""
        if f"layers.{layer}.support_encoder" in self.tensors and \
                torch.equal(ids, self.t(layer, "support")):
            return self.t(layer, "support_encoder"), self.t(layer, "support_bias")
        from sae_train.saes.io import load_sae

        path = self.saes.get(f"layers.{layer}.resid")
        if path is None or not Path(path).is_dir():
            raise BuildError(f"no encoder rows for layer {layer}: the directions file lacks "
                             f"support_encoder and the SAE {path!r} is not there")
        sae = load_sae(path)
        w = sae.encoder_weight.detach().float()
        bias = sae.b_enc.detach().float() - w @ sae.b_dec.detach().float()
        return w[ids.long()], bias[ids.long()]

    def best_causal_layer(self) -> int:
        gains = {int(l): r.get("causal_gain") for l, r in self.summary["layers"].items()}
        gains = {l: g for l, g in gains.items() if g is not None and np.isfinite(g)}
        if not gains:
            raise BuildError("no layer has a single-layer causal gain in localise/summary.json")
        return max(gains, key=gains.get)

    def provenance(self) -> dict:
        return {"localise": str(self.folder.resolve()), "window": self.window,
                "model": self.summary.get("provenance", {}).get("model"),
                "localise_created": self.summary.get("provenance", {}).get("created")}
