"""The llama.cpp control-vector GGUF writer: what it writes reads back exactly, with the layout
llama.cpp's loader expects (architecture, layer count, direction.{layer} float32 1-D tensors)."""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from sae_train.export import read_control_vector, write_control_vector  # noqa: E402


def test_write_then_read_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    vectors = {3: torch.randn(64, generator=g), 1: torch.randn(64, generator=g).to(torch.bfloat16),
               7: torch.randn(64, generator=g, dtype=torch.float64)}
    path = write_control_vector(tmp_path / "cv" / "es.gguf", vectors, model_hint="gemma3")

    back = read_control_vector(path)
    assert back.model_hint == "gemma3" and back.layer_count == 3
    assert list(back.per_layer_vectors) == [1, 3, 7]
    for layer, vector in vectors.items():
        assert torch.equal(back.per_layer_vectors[layer], vector.float())

    # What llama.cpp's loader checks, read with gguf directly.
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3", "direction.7"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [64]


@pytest.mark.parametrize("vectors, message", [
    ({}, "empty"),
    ({0: torch.ones(4)}, "direction.0 is rejected"),
    ({1: torch.ones(2, 4)}, "1-D"),
    ({1: torch.ones(4), 2: torch.ones(5)}, "differs"),
    ({1: torch.tensor([1.0, float("nan")])}, "non-finite"),
])
def test_bad_vectors_are_refused(tmp_path, vectors, message):
    with pytest.raises(ValueError, match=message):
        write_control_vector(tmp_path / "x.gguf", vectors, model_hint="m")


def test_reading_another_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", torch.zeros(2, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a control vector"):
        read_control_vector(path)
