"""The project's import graph, files as nodes: counts, cycles, the longest chain, back edges.

Run ``python -m tests.import_graph`` for the figures (files, subpackages, modules directly in
``pipeline/``, imports between files, cycles, the longest import chain). ``tests/test_layout.py``
uses it to hold the shape: no cycle, and every file under ``pipeline/`` within its line budget.
An import inside a function counts like one at the top: it is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported_names(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's own ``__init__`` excluded)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in _imported_names(path):
            # the longest prefix that is one of our files: `from a.b import c` names a.b or a.b.c
            parts = imported.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in files:
                    if candidate != name and not name.startswith(candidate + "."):
                        targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest path of imports (modules in a cycle are skipped)."""
    in_cycle = {m for c in cycles(graph) for m in c}

    @cache
    def longest_from(v: str) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for w in graph.get(v, ()):
            if w not in in_cycle:
                chain = longest_from(w)
                if len(chain) > len(best):
                    best = chain
        return (v, *best)

    chains = [longest_from(v) for v in sorted(graph) if v not in in_cycle]
    return list(max(chains, key=len)) if chains else []


def figures(root: Path = ROOT) -> dict[str, object]:
    """The numbers the layout is judged by."""
    graph = import_graph(root)
    files = module_files(root)
    pipeline = root / "pipeline"
    return {
        "files": len(files),
        "subpackages": sum(1 for p in pipeline.iterdir() if (p / "__init__.py").is_file()),
        "modules directly in pipeline/": sum(
            1 for p in pipeline.glob("*.py") if p.name != "__init__.py"
        ),
        "imports between files": sum(len(t) for t in graph.values()),
        "cycles": cycles(graph),
        "longest chain": longest_chain(graph),
        "largest files": sorted(
            ((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in files.values()),
            reverse=True,
        )[:5],
    }


def main() -> None:
    for key, value in figures().items():
        if key == "longest chain":
            print(f"{key}: {len(value)} files: {' -> '.join(value)}")  # type: ignore[arg-type]
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
