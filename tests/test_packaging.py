"""The wheel ships every package and the Hydra configs (pyproject lists packages explicitly
because conf/ is mapped into the wheel as sae_train._conf)."""

from __future__ import annotations

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from pathlib import Path


def test_pyproject_lists_every_package(repo_root: Path):
    config = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(repo_root).parts)
               for top in ("sae_train", "steering") for p in (repo_root / top).rglob("__init__.py")}
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages"
    missing = {p for p in listed - on_disk if p != "sae_train._conf"}
    assert missing == set(), "packages listed in pyproject.toml but absent on disk"
    assert config["package-dir"] == {"sae_train._conf": "conf"}
    assert (repo_root / "conf" / "cache.yaml").is_file()
