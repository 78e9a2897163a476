"""The import graph of rdscale, in-function imports included.

Two rules, both read from the source (no import side effects):
- no cycle between rdscale modules, whether the imports sit at the top of a module or inside a function;
- an rdscale module imported inside a function must be on ALLOWED_LAZY, each entry with its reason.
Ray may be imported only under rdscale/cluster/.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rdscale"

# (importing module, imported module): why it cannot sit at the top of the importing module. An imported name that is
# a package covers the modules inside it (the CLI's dispatcher: one place, one reason, one module per verb).
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("rdscale.cli.main", "rdscale.cli"): "the CLI's dispatcher (_verb_module) imports only the module of the verb "
    "being run, each of which imports its stack (torch, Lance, Ray, search) at its top: `rdscale --help`, "
    "`rdscale config` and `rdscale info --help` import none of them",
    ("rdscale.run.executor", "rdscale.cluster.executor"): "make_executor imports Ray's executor only for a run "
    "that asks for Ray: a `ray.address: local` run, and `rdscale extract` on an install without Ray, never do",
    ("rdscale.cli.search", "rdscale.cluster.index"): "Ray (cluster.index defines @ray.remote tasks) only for "
    "`rdscale index --ray`; every other index build and search would pay Ray's import",
}


def _allowed(importer: str, imported: str) -> bool:
    return any(importer == a and (imported == b or imported.startswith(b + ".")) for a, b in ALLOWED_LAZY)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: set[str]) -> str | None:
    """The rdscale module that `name` (a module or module.attribute) refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]], list[tuple[str, int]]]:
    """(edges, in-function imports as (importer, imported, line), ray imports outside cluster/ as (module, line))."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[tuple[str, str, int]] = []
    ray_outside: list[tuple[str, int]] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                parents[child] = parent

        def in_function(node: ast.AST) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    return True
            return False

        def in_type_checking(node: ast.AST) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    return True
            return False

        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            else:
                continue
            if in_type_checking(node):
                continue
            for target in targets:
                if (target == "ray" or target.startswith("ray.")) and not module.startswith("rdscale.cluster"):
                    ray_outside.append((module, node.lineno))
                hit = _known(target, modules)
                if hit is None or hit == module:
                    continue
                # `from rdscale.pkg import mod` names a module; `from rdscale.pkg import func` names pkg.
                edges[module].add(hit)
                if in_function(node):
                    lazy.append((module, hit, node.lineno))
    return edges, lazy, ray_outside


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges to a package's __init__ from inside that package (re-exports are not a cycle of behaviour)."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}


def test_no_import_cycles():
    found = cycles(_package_edges(import_graph()[0]))
    assert not found, "import cycles (in-function imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_in_function_imports_are_allowlisted():
    _, lazy, _ = import_graph()
    extra = sorted({(a, b) for a, b, _ in lazy if not _allowed(a, b)})
    assert len(ALLOWED_LAZY) <= 8
    assert not extra, f"{len(extra)} in-function imports of rdscale modules not on ALLOWED_LAZY: {extra}"


def test_ray_is_imported_only_in_cluster():
    _, _, ray_outside = import_graph()
    assert not ray_outside, f"ray imported outside rdscale/cluster/: {ray_outside}"


def test_an_allowlisted_package_covers_only_its_own_modules():
    assert _allowed("rdscale.cli.main", "rdscale.cli.search") and _allowed("rdscale.cli.main", "rdscale.cli")
    assert not _allowed("rdscale.cli.main", "rdscale.cluster.executor")
    assert not _allowed("rdscale.cli.main", "rdscale.clix") and not _allowed("rdscale.cli.eval", "rdscale.cli.main")


def test_the_checker_sees_a_cycle_hidden_in_a_function():
    edges = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert cycles(edges) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":  # a report while the refactor is under way
    edges, lazy, ray_outside = import_graph()
    for c in cycles(_package_edges(edges)):
        print("cycle:", " <-> ".join(c))
    print(len(lazy), "in-function imports of rdscale modules;", len({(a, b) for a, b, _ in lazy}), "distinct pairs")
    for a, b, line in sorted(lazy):
        print(f"  {a}:{line} -> {b}{'  (allowed)' if _allowed(a, b) else ''}")
    print("ray outside cluster/:", ray_outside)
