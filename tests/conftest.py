"""Shared fixtures: tiny real models (materialised once per session) and small caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def foxp2_cache_root(tmp_path_factory) -> Path:
    """A private model cache for the test session (tiny models are built into it once)."""
    root = tmp_path_factory.mktemp("foxp2-cache")
    os.environ["FOXP2_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def load_tiny(foxp2_cache_root):
    """``load_tiny("llama")`` → (model, tokenizer, info), fp32 on CPU, cached per session."""
    from sae_train.config import ModelConfig
    from sae_train.models.loading import load_model

    loaded = {}

    def _load(arch: str):
        if arch not in loaded:
            loaded[arch] = load_model(ModelConfig(name=f"tiny:{arch}", slug=f"tiny-{arch}",
                                                  dtype="float32", device="cpu",
                                                  cache_dir=str(foxp2_cache_root)))
        return loaded[arch]

    return _load


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one thread on a 2-core machine (no OpenMP spin-waiting);
    use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
