"""The package's import graph has no cycle, read statically from every module's source (imports
inside functions and under TYPE_CHECKING included, since they cycle all the same once called), and
the checkpoint leaf module depends on nothing of vlmtrain but errors and config."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlmtrain"


def module_names() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The vlmtrain modules that importing (and running) module ``name`` imports. ``from a import b``
    counts as ``a.b`` when that is a module, else ``a``; importing ``a.b`` also imports package ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.add(sub if sub in modules else base)
    out = set()
    for t in targets:
        while t and t not in modules:  # `import vlmtrain.x.attr`-style leftovers
            t = t.rpartition(".")[0]
        while t:  # the module and every package above it
            if t != name and t in modules:
                out.add(t)
            t = t.rpartition(".")[0]
    return out


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {n: imports_of(n, p, set(modules)) for n, p in modules.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_imports():
    g = graph()
    assert "vlmtrain.models.build" in g["vlmtrain.data.mixture"]  # imported inside build_mixture
    assert "vlmtrain.errors" in g["vlmtrain.config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_checkpoint_leaf_imports_only_errors_and_config():
    g = graph()
    assert g["vlmtrain.models.run_checkpoint"] <= {"vlmtrain", "vlmtrain.models", "vlmtrain.errors", "vlmtrain.config"}
    assert g["vlmtrain.errors"] <= {"vlmtrain"}
