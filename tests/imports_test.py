"""The package's import graph: no cycles, no function-local package imports.

Read from the source with `ast` (nothing is imported), so a cycle hidden by a
function-local import is found too.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "recontrast_jax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def packages_run(dotted: str) -> list[str]:
    """The package modules that importing `dotted` runs: each parent, then itself.

    `from recontrast_jax.methods import patchcore` first runs
    `recontrast_jax/methods/__init__.py`, so that is an edge of the graph too.
    """
    parts = dotted.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [p for p in prefixes if p in MODULES]


def package_imports(tree: ast.AST):
    """(import node, imported package module, at module level) of every import."""
    found = []

    def visit(node, top_level):
        for child in ast.iter_child_nodes(node):
            if is_type_checking_block(child):
                continue
            nested = top_level and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    for target in packages_run(alias.name):
                        found.append((child, target, top_level))
            elif isinstance(child, ast.ImportFrom) and child.module in MODULES:
                for alias in child.names:
                    for target in packages_run(f"{child.module}.{alias.name}"):
                        found.append((child, target, top_level))
            visit(child, nested)

    visit(tree, True)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {target for _, target, _ in package_imports(tree)} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules, or None (depth-first)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_package_modules_are_imported_at_module_level(name):
    tree = ast.parse(MODULES[name].read_text())
    local = [
        f"line {node.lineno}: {target}"
        for node, target, top_level in package_imports(tree)
        if not top_level
    ]
    assert not local, f"{name} imports package modules inside functions: {local}"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_local_imports_are_seen():
    tree = ast.parse("import os\ndef f():\n    from recontrast_jax import reports\n")
    assert [(t, top) for _, t, top in package_imports(tree)] == [
        ("recontrast_jax", False),
        ("recontrast_jax.reports", False),
    ]


def test_a_package_init_that_imports_its_submodules_closes_a_cycle():
    """`from recontrast_jax.methods import memory_bank` in a method module runs
    `methods/__init__.py` first, so an `__init__` importing the method modules
    would be a cycle."""
    tree = ast.parse("from recontrast_jax.methods import memory_bank\n")
    assert [t for _, t, _ in package_imports(tree)] == [
        "recontrast_jax",
        "recontrast_jax.methods",
        "recontrast_jax.methods.memory_bank",
    ]
    graph = import_graph()
    graph["recontrast_jax.methods"] = {"recontrast_jax.methods.patchcore"}
    assert find_cycle(graph) is not None
