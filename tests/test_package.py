"""How the modules of `search/` import each other: no cycles, nothing platform-specific at the top."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

PACKAGE = Path(__file__).resolve().parents[1] / "search"


def _parsed() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package by dotted name (a package by its own name), with its file."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


def _modules() -> dict[str, ast.Module]:
    return {name: tree for name, (_, tree) in _parsed().items()}


def _import_sites(name: str, tree: ast.Module, known: set[str], *, is_package: bool) -> Iterator[tuple[str, int]]:
    """The package modules `name` imports anywhere (at the top or inside functions), each with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from search.x import f` -> search.x
                target = target.rpartition(".")[0]
            if target:
                yield target, node.lineno


def _imports(name: str, tree: ast.Module, known: set[str], *, is_package: bool) -> set[str]:
    """The package modules `name` imports, but for its own submodules."""
    # A package importing its own submodules is how it re-exports them, not a cycle.
    return {t for t, _ in _import_sites(name, tree, known, is_package=is_package)
            if t != name and not t.startswith(name + ".")}


def test_no_import_cycle_among_search_modules() -> None:
    trees = _modules()
    graph = {
        name: _imports(name, tree, set(trees), is_package=(PACKAGE.parent / name.replace(".", "/")).is_dir())
        for name, tree in trees.items()
    }
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for nxt in sorted(graph[name]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, [" -> ".join(c) for c in cycles]


def _layer(module: str) -> str:
    """The subpackage or top-level module a module belongs to: search.data._cache -> search.data."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_among_search_subpackages() -> None:
    """The subpackages and top-level modules of search/ form a line of layers, also counting imports
    inside functions: such an import keeps start-up light, but it still ties two layers together, and
    a loop of them means a job sits in the wrong layer (`data` -> `disk` -> `data`)."""
    parsed = _parsed()
    ties: dict[tuple[str, str], str] = {}  # (layer, layer it imports) -> the first file:line that does
    for name, (path, tree) in sorted(parsed.items()):
        for target, line in _import_sites(name, tree, set(parsed), is_package=path.name == "__init__.py"):
            if _layer(target) != _layer(name):
                ties.setdefault((_layer(name), _layer(target)), f"{path.relative_to(PACKAGE.parent)}:{line}")
    graph: dict[str, set[str]] = {}
    for a, b in ties:
        graph.setdefault(a, set()).add(b)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    # A tie a -> b closes a loop when a can be reached back from b.
    loops = [f"{a} -> {b}  ({where})" for (a, b), where in sorted(ties.items()) if a in reachable(b)]
    assert not loops, "import cycle between layers of search/:\n" + "\n".join(loops)


def test_no_module_imports_a_platform_only_module_at_the_top() -> None:
    """fcntl (POSIX) and msvcrt (Windows) are imported where a lock is taken, so every module imports everywhere."""
    top_level = []
    for name, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            top_level += [f"{name}: {n}" for n in names if n.split(".")[0] in ("fcntl", "msvcrt", "termios", "pwd")]
    assert not top_level, top_level


def test_ray_only_under_the_runner_and_plotly_only_under_the_report() -> None:
    owners = {"ray": "search.runner", "plotly": "search.report"}
    wrong = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                top = mod.split(".")[0]
                if top in owners and not (name == owners[top] or name.startswith(owners[top] + ".")):
                    wrong.append(f"{name} imports {mod}")
    assert not wrong, wrong
