"""The layout's rules, read off the source: no import runs in a circle, no two modules share a
name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    """Module name -> file, for megajax's package and the top-level commands."""
    files = [*sorted((ROOT / "megajax").rglob("*.py")), ROOT / "train.py", ROOT / "eval.py"]
    return {_module_name(f): f for f in files}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The megajax modules `name` imports anywhere in its file, functions included: `import
    a.b` names a.b; `from a import b` names a.b where that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 parents
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) - {name} for name, path in sources.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_names_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_runs_in_a_circle():
    graph = import_graph()
    assert "megajax.run" in graph["train"]  # imported inside main(): function bodies count
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_two_modules_share_a_name():
    by_name: dict[str, list[str]] = {}
    for name in _sources():
        if "." in name:  # packages too; not megajax itself, train.py or eval.py
            by_name.setdefault(name.rpartition(".")[2], []).append(name)
    shared = {k: v for k, v in by_name.items() if len(v) > 1}
    assert not shared, f"modules sharing a name: {shared}"
