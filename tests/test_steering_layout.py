"""steering/ is walked in one direction: language → localise → steer → evaluate → apps.

A module may import (at any depth: top of the file, inside a function, under TYPE_CHECKING)
only from its own part and the parts before it; ``steering/__init__.py``,
``steering/config.py`` and ``steering/api.py`` sit with the apps (they re-export, or run the
stages). The order is stated at the top of steering/__init__.py; this test keeps it true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("language", "localise", "steer", "evaluate", "apps")
TOP_LEVEL = {"__init__": "apps", "config": "apps", "api": "apps"}  # steering/<name>.py → its part


def part_of(module: str) -> str | None:
    """``steering.localise.lift`` → "localise"; None for a module outside steering."""
    names = module.split(".")
    if names[0] != "steering":
        return None
    if len(names) == 1:
        return "apps"  # `from steering import …`: the package's public face
    return names[1] if names[1] in ORDER else TOP_LEVEL.get(names[1], names[1])


def steering_imports(path: Path) -> list[tuple[int, str]]:
    """Every module named by an import in ``path``, with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # `from steering import localise` names a part
            out += [(node.lineno, f"steering.{a.name}") for a in node.names
                    if node.module == "steering" and (a.name in ORDER or a.name in TOP_LEVEL)]
    return out


def layout_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / "steering").rglob("*.py")):
        rel = path.relative_to(root / "steering")
        own = rel.parts[0] if len(rel.parts) > 1 else TOP_LEVEL.get(rel.stem)
        if own not in ORDER:
            bad.append(f"steering/{rel}: not in a part of {ORDER} (add it to one)")
            continue
        for line, module in steering_imports(path):
            target = part_of(module)
            if target is None or target == own:
                continue
            if target not in ORDER:
                bad.append(f"steering/{rel}:{line} imports {module}, which is in no part")
            elif ORDER.index(target) > ORDER.index(own):
                bad.append(f"steering/{rel}:{line} ({own}) imports {module} ({target}), a "
                           f"later part")
    return bad


def test_every_module_imports_only_its_own_part_and_earlier_ones():
    assert layout_violations() == []


def test_the_check_fails_on_an_import_across_the_line(tmp_path):
    (tmp_path / "steering" / "localise").mkdir(parents=True)
    (tmp_path / "steering" / "language").mkdir()
    (tmp_path / "steering" / "localise" / "lift.py").write_text(
        "def f():\n    from steering.evaluate.harness import generate\n")
    (tmp_path / "steering" / "language" / "defaultness.py").write_text(
        "from steering.localise import lift\n")
    (tmp_path / "steering" / "localise" / "ok.py").write_text(
        "from steering.language.token_sets import LanguageTokenSets\n")
    bad = layout_violations(tmp_path)
    assert len(bad) == 2, bad
    assert "language/defaultness.py:1" in bad[0] and "(localise)" in bad[0]
    assert "localise/lift.py:2" in bad[1] and "steering.evaluate.harness" in bad[1]


@pytest.mark.parametrize("part", ORDER)
def test_every_part_is_a_package_listed_in_pyproject(part):
    assert (ROOT / "steering" / part / "__init__.py").is_file()
    assert f'"steering.{part}"' in (ROOT / "pyproject.toml").read_text()
