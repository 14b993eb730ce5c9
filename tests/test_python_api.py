"""The README's "Python API" block runs as written on the tiny model, offline, without Hydra."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from sae_train import compose_config, train_saes


def readme_example(repo_root, name: str = "python-api-example") -> str:
    text = (repo_root / "README.md").read_text()
    match = re.search(rf"<!-- {name}[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md lost its {name} block"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_api_block_caches_and_trains(repo_root, tmp_path, monkeypatch,
                                                    foxp2_cache_root, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    scope: dict = {}
    exec(compile(readme_example(repo_root), "README.md:python-api-example", "exec"), scope)

    manifest, result, sae = scope["manifest"], scope["result"], scope["sae"]
    assert manifest["complete"] and manifest["n_tokens"] > 20_000
    assert [s["name"] if isinstance(s, dict) else s for s in manifest["sites"]] == \
        ["layers.1.resid", "layers.1.mlp"]
    saes = (tmp_path / "runs" / "saes").resolve()
    assert result.out_dir == saes and result.exported["layers.1.resid"] == saes / "layers.1.resid"
    # Learned something: predicting the mean is FVU 1 (measured ~0.3 at these sizes).
    assert result.metrics["val/layers.1.resid/fvu"] < 0.5

    # The export takes raw cached activations: its held-out FVU matches the logged one.
    from sae_train.cache import ActivationCache

    cache = ActivationCache(tmp_path / "runs" / "cache")
    x = cache.gather("layers.1.resid", cache.select(splits=["evaluation"])).float()
    with torch.no_grad():
        out = sae(x).reconstruction
    fvu = ((out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu == pytest.approx(result.metrics["val/layers.1.resid/fvu"], rel=0.05)

    # The steering block continues in the same folder and scope: localise, then steer.
    exec(compile(readme_example(repo_root, "steering-api-example"),
                 "README.md:steering-api-example", "exec"), scope)
    summary, report, artifact = scope["summary"], scope["report"], scope["artifact"]
    assert summary["window"]["layers"] == [1]
    assert (tmp_path / "runs" / "localise-es" / "directions.safetensors").is_file()
    assert set(report["methods"]) == {"none", "native", "foxp2_neurons", "caa_window"}
    assert (tmp_path / "runs" / "steer-es" / "report" / "report.md").is_file()
    assert artifact.method == "foxp2_neurons" and artifact.target == "es"
    assert [e.layer for e in artifact.edits] == [1]
    assert report["methods"]["none"]["metrics"]["n_prompts"] == 8


def test_compose_config_outside_hydra(tmp_path):
    cfg = compose_config("train", "sae=relu", paths={"root": str(tmp_path)},
                         sae={"l1_coefficient": 0.5})
    assert cfg.sae.kind == "relu" and cfg.sae.l1_coefficient == 0.5
    # The Hydra run folder is replaced by the one the app would use; nothing needs HydraConfig.
    assert cfg.out_dir.startswith(str(tmp_path / "train"))
    assert cfg.checkpoint.dir == f"{cfg.out_dir}/checkpoints"

    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        compose_config("train", sae={"kk": 3})              # misspelt key, as on the CLI
    with pytest.raises(ValidationError):
        compose_config("cache", cache={"batch_size": "many"})  # wrong type
    with pytest.raises(ValueError, match="use 'cache'"):
        compose_config("localise")
    from steering.api import compose_config as compose_steering

    loc = compose_steering("localise", "model=tiny_llama", lift={"n_prompts": 4})
    assert loc.lift.n_prompts == 4 and loc.model.name == "tiny:llama"
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        compose_steering("steer", tuning={"kl_budjet": 1.0})
    with pytest.raises(ValueError, match="use 'localise'"):
        compose_steering("cache")
    with pytest.raises(TypeError, match="either config="):
        train_saes("sae=relu", config=cfg)
