"""Imports sit at module level; one inside a function says why on the line above its block
(``# deferred: <reason>``: an optional extra, a slow import only one path needs, a circular
import, the CLI's start-up)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _unexplained(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            # the comment above this import, or above the run of imports it belongs to
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith(("import ", "from ", ")")):
                i -= 1
            above = lines[i].strip() if i >= 0 else ""
            if "# deferred:" not in lines[node.lineno - 1] and not above.startswith("# deferred:"):
                out.append(f"{path.relative_to(REPO)}:{node.lineno}: {lines[node.lineno - 1]}")
    return out


def test_every_import_inside_a_function_says_why() -> None:
    files = sorted([*(REPO / "slowqk").rglob("*.py"), *(REPO / "patches").rglob("*.py")])
    assert len(files) > 40
    problems = [p for f in files for p in _unexplained(f)]
    assert not problems, "\n".join(problems)
