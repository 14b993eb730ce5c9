"""llama.cpp control vectors: one residual-stream vector per layer in a GGUF file.

The format llama.cpp reads with ``--control-vector file.gguf`` (``common_control_vector_load``
in ``common/common.cpp``, applied by ``llama_adapter_cvec`` in ``src/llama-adapter.cpp``):

- ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (a free-form model
  name) and ``controlvector.layer_count`` (the number of direction tensors);
- one 1-D float32 tensor ``direction.{N}`` of width ``n_embd`` per steered layer.

Layer numbering: llama.cpp adds ``direction.N`` to the output of decoder layer N, counting
from 0 — the graph calls ``build_cvec(cur, il)`` at the end of layer ``il`` and the loader puts
``direction.N`` in slot ``il = N``. That is this project's site ``layers.{N}.resid`` (the
decoder layer's output), so the keys of ``per_layer_vectors`` are written unchanged. llama.cpp
rejects ``direction.0`` (the first layer's output cannot be steered), so layer 0 is refused
here. The vectors are added as they are, times the strength given on llama.cpp's command line.

This module knows nothing about steering; it only needs ``gguf`` (the ``demo`` or ``test``
extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARCHITECTURE = "controlvector"


@dataclass(frozen=True)
class ControlVector:
    """A control vector read back from GGUF."""

    # decoder layer (0-based, = layers.{i}.resid) → float32 vector of width n_embd
    per_layer_vectors: dict[int, torch.Tensor]
    model_hint: str
    layer_count: int


def write_control_vector(path: str | Path, per_layer_vectors: dict[int, torch.Tensor],
                         model_hint: str) -> Path:
    """Write ``per_layer_vectors`` (decoder layer index → vector of width ``n_embd``, any float
    dtype or device) as a llama.cpp control-vector GGUF file at ``path``; returns the path.

    Raises ``ValueError`` for no vectors, layer 0 or a negative layer, a vector that is not
    1-D, widths that differ, or non-finite values.
    """
    import gguf

    if not per_layer_vectors:
        raise ValueError("per_layer_vectors is empty: give at least one {layer: vector}")
    width = None
    arrays: dict[int, np.ndarray] = {}
    for layer in sorted(per_layer_vectors):
        vector = per_layer_vectors[layer]
        if not isinstance(layer, (int, np.integer)) or layer < 1:
            raise ValueError(f"layer {layer!r}: llama.cpp steers the outputs of decoder layers "
                             "1 … n_layers-1 (direction.0 is rejected); give 0-based layer "
                             "indices ≥ 1, as in layers.{i}.resid")
        array = torch.as_tensor(vector).detach().to("cpu", torch.float32).numpy()
        if array.ndim != 1:
            raise ValueError(f"layer {layer}: the vector has shape {tuple(array.shape)}; a "
                             "control vector is one 1-D vector of width n_embd per layer")
        if width is not None and array.shape[0] != width:
            raise ValueError(f"layer {layer}: width {array.shape[0]} differs from the other "
                             f"layers' {width}; every vector must have the model's n_embd")
        if not np.isfinite(array).all():
            raise ValueError(f"layer {layer}: the vector has non-finite values")
        width = array.shape[0]
        arrays[int(layer)] = np.ascontiguousarray(array)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(arrays))
    for layer, array in arrays.items():
        writer.add_tensor(f"direction.{layer}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_control_vector(path: str | Path) -> ControlVector:
    """Read a control-vector GGUF file (ours or llama.cpp's) with ``gguf.GGUFReader``."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: _field_value(field) for name, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"{path}: general.architecture is {arch!r}, not {ARCHITECTURE!r}; "
                         "this is not a control vector")
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise ValueError(f"{path}: tensor {tensor.name!r} is not direction.<layer>")
        vectors[int(index)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).ravel())
    return ControlVector(per_layer_vectors=dict(sorted(vectors.items())),
                         model_hint=str(fields.get(f"{ARCHITECTURE}.model_hint", "")),
                         layer_count=int(fields.get(f"{ARCHITECTURE}.layer_count", len(vectors))))


def _field_value(field) -> object:
    """A scalar or string metadata value of a GGUFReader field."""
    import gguf

    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return None  # (no arrays in a control vector)
    return field.parts[field.data[0]].tolist()[0]
