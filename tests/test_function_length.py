"""No function longer than MAX_LINES in the packages listed here (ast-based: from its ``def``
or first decorator to its last line, docstring included). Long orchestrators are split into
named steps; the lead adds packages to PACKAGES as they are reshaped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
PACKAGES = ["steering", "sae_train"]


def long_functions(package: Path, max_lines: int = MAX_LINES) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = node.end_lineno - start + 1
                if n > max_lines:
                    out.append(f"{path.relative_to(package.parent)}:{node.lineno} "
                               f"{node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_the_limit(package):
    assert long_functions(ROOT / package) == []


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path / "pkg") == [f"pkg/m.py:5 long ({MAX_LINES + 1} lines)"]
