"""Export formats for other tools (llama.cpp control vectors)."""

from sae_train.export.control_vector import (ControlVector, read_control_vector,
                                             write_control_vector)

__all__ = ["ControlVector", "read_control_vector", "write_control_vector"]
