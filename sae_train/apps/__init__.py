"""Hydra entry points (`sae-cache`, ...)."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the Hydra configs: the repository's ``conf/`` in a checkout or an
    editable install, else the copy shipped in the wheel as ``sae_train/_conf``."""
    repo_conf = Path(__file__).resolve().parents[2] / "conf"
    if (repo_conf / "cache.yaml").is_file():
        return str(repo_conf)
    packaged = Path(__file__).resolve().parents[1] / "_conf"
    if (packaged / "cache.yaml").is_file():
        return str(packaged)
    raise FileNotFoundError(f"Hydra configs not found at {repo_conf} or {packaged}")


# `--help` of every app renders from its structured config (conf/hydra/help/foxp2.yaml).
from sae_train.apps.help import register_help_resolver  # noqa: E402

register_help_resolver()
