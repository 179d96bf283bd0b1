"""Imports sit at module level and the package has no import cycle; an import inside a function
says on the line above its block which slow or optional import it defers
(``# deferred: <module> is slow to import ...`` / ``... is an optional extra ...``), or that the
CLI defers its subcommands' imports to start fast. None is deferred to break a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# the kinds of reason a deferred import may give; the first two name the module they defer
_NAMED = re.compile(
    r"# deferred: (?P<modules>[\w.-]+(, [\w.-]+)*) (is|are) (slow to import|an optional extra)\b"
)
_CLI = "# deferred: subcommands import what they use, so the CLI starts fast"


def _reason(lines: list[str], lineno: int) -> str:
    """The ``# deferred:`` comment that covers the import on line ``lineno``, or ''."""
    if "# deferred:" in lines[lineno - 1]:
        return lines[lineno - 1][lines[lineno - 1].index("# deferred:") :]
    i = lineno - 2  # the comment above this import, or above the run of imports it belongs to
    while i >= 0 and lines[i].strip().startswith(("import ", "from ", ")")):
        i -= 1
    above = lines[i].strip() if i >= 0 else ""
    return above if above.startswith("# deferred:") else ""


def _unexplained(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    out = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            reason = _reason(lines, node.lineno)
            imported = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            named = _NAMED.match(reason)
            top = {(m or "").split(".")[0] for m in imported}
            if named:
                ok = top <= set(named["modules"].replace("megatron-core", "megatron").split(", "))
            else:
                ok = reason == _CLI and all((m or "").startswith("slowqk") for m in imported)
            if not ok:
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                out.append(f"{where}: {lines[node.lineno - 1].strip()}  [{reason or 'no reason'}]")
    return out


def test_every_import_inside_a_function_says_why() -> None:
    files = sorted([*(REPO / "slowqk").rglob("*.py"), *(REPO / "patches").rglob("*.py")])
    assert len(files) > 40
    problems = [p for f in files for p in _unexplained(f)]
    assert not problems, "\n".join(problems)


def _module_name(path: Path) -> str:
    """``slowqk.x.y`` for a file of the package (``patches/`` ships as ``slowqk.patches``)."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "patches":
        parts = ["slowqk", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_files() -> dict[str, Path]:
    files = [*(REPO / "slowqk").rglob("*.py"), *(REPO / "patches").rglob("*.py")]
    return {_module_name(f): f for f in sorted(files)}


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports, anywhere in its
    source (function bodies and type-checking blocks included): ``from a import b`` is an edge to
    ``a.b`` where that is a module, else to ``a``."""
    modules = _package_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the list of its modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"slowqk.train", "slowqk.config.schema", "slowqk.patches.cpu_compat"} <= set(graph)
    assert "slowqk.config.schema" in graph["slowqk.config.checks"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_science_imports_nothing_else_of_the_package() -> None:
    graph = import_graph()
    science = {m for m in graph if m.startswith("slowqk.qk")}
    assert len(science) >= 4
    outside = {m: sorted(e - science) for m in science if (e := graph[m]) - science}
    assert not outside, outside


def test_the_recipe_modules_stay_small() -> None:
    sizes = {
        p.name: len(p.read_text().splitlines()) for p in (REPO / "slowqk" / "config").glob("*.py")
    }
    assert {"schema.py", "loading.py", "checks.py"} <= set(sizes)
    assert max(sizes.values()) <= 400, sizes
