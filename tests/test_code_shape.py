"""No function in sae_train/ is longer than 80 lines (long ones are split into named steps)."""

from __future__ import annotations

import ast
from pathlib import Path

LIMIT = 80


def test_no_function_over_80_lines(repo_root):
    too_long = []
    for path in sorted((repo_root / "sae_train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LIMIT:
                    too_long.append(f"{path.relative_to(repo_root)}:{node.lineno} "
                                    f"{node.name} ({length} lines)")
    assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)
