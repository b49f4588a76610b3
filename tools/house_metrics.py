"""Measures of the package's shape: module sizes, longest functions, imports inside functions, import circles.

    python tools/house_metrics.py [--json]

The import graph counts every ``import`` statement of the package, at module level and inside
functions alike (an import inside a function only postpones a circle, it does not remove it).
``from X import name`` is an edge to ``X.name`` when that is a module, else to ``X``. The
implicit import of a parent package is not an edge: it runs first, whatever the order of the
other imports. ``tests/test_import_graph.py`` fails on any circle this finds.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Dict, Iterator, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "liftplus_fast"


def package_modules(root: str = ROOT, package: str = PACKAGE) -> Dict[str, str]:
    """``{dotted module name: file path}`` of every Python module of ``package``."""
    out = {}
    base = os.path.join(root, package)
    for folder, _, files in os.walk(base):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(folder, name)
    return out


class _Imports(ast.NodeVisitor):
    """Every import of one module with whether it sits inside a function."""

    def __init__(self):
        self.depth = 0
        self.found: List[Tuple[ast.AST, bool]] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        self.found.append((node, self.depth > 0))

    visit_ImportFrom = visit_Import


def _targets(node: ast.AST, module: str, is_package: bool, modules: Set[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in modules:
                yield alias.name
        return
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:
            yield sub
        elif base in modules:
            yield base


def imports_inside_functions(root: str = ROOT, package: str = PACKAGE) -> int:
    """How many import statements of the package sit inside functions (of any module, third-party too)."""
    count = 0
    for path in package_modules(root, package).values():
        with open(path, encoding="utf-8") as f:
            visitor = _Imports()
            visitor.visit(ast.parse(f.read(), path))
        count += sum(inside for _, inside in visitor.found)
    return count


def import_edges(root: str = ROOT, package: str = PACKAGE) -> List[Tuple[str, str, bool, int]]:
    """``(importer, imported, inside a function, line)`` for every import between package modules."""
    modules = package_modules(root, package)
    names = set(modules)
    edges = []
    for module, path in sorted(modules.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        visitor = _Imports()
        visitor.visit(tree)
        is_package = path.endswith("__init__.py")
        for node, inside in visitor.found:
            for target in _targets(node, module, is_package, names):
                if target != module:
                    edges.append((module, target, inside, node.lineno))
    return edges


def import_circles(edges) -> List[List[str]]:
    """The strongly connected components of more than one module (each a circle of imports), sorted."""
    graph: Dict[str, Set[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


def functions(root: str = ROOT, package: str = PACKAGE) -> List[Tuple[int, str]]:
    """``(lines, "module:qualified name")`` of every function and method, longest first."""
    out = []
    for module, path in package_modules(root, package).items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)

        def walk(node, prefix, module=module):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    out.append((child.end_lineno - start + 1, f"{module}:{prefix}{child.name}"))
                    walk(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}{child.name}.")

        walk(tree, "")
    return sorted(out, reverse=True)


def measure(root: str = ROOT) -> dict:
    """Every measure as one JSON-ready dict."""
    modules = package_modules(root)
    lines = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in modules.items()}
    edges = import_edges(root)
    inside = [e for e in edges if e[2]]
    return {
        "package_lines": sum(lines.values()),
        "modules": len(modules),
        "largest_modules": sorted(((n, m) for m, n in lines.items()), reverse=True)[:8],
        "train_py_lines": lines.get(f"{PACKAGE}.train"),
        "longest_functions": functions(root)[:10],
        "imports_inside_functions": imports_inside_functions(root),
        "function_level_imports_of_package_modules": len(inside),
        "function_level_imports": [f"{a} -> {b} (line {line})" for a, b, _, line in inside],
        "import_circles": import_circles(edges),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the measures as JSON")
    args = parser.parse_args(argv)
    m = measure()
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"package: {m['package_lines']} lines in {m['modules']} modules; train.py {m['train_py_lines']} lines")
    print("largest modules: " + ", ".join(f"{name} {n}" for n, name in m["largest_modules"]))
    print("longest functions:")
    for n, name in m["longest_functions"]:
        print(f"  {n:4d}  {name}")
    print(f"import statements inside functions: {m['imports_inside_functions']}")
    print(f"imports of package modules inside functions: {m['function_level_imports_of_package_modules']}")
    for line in m["function_level_imports"]:
        print(f"  {line}")
    print(f"import circles: {len(m['import_circles'])}")
    for circle in m["import_circles"]:
        print("  " + " <-> ".join(circle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
