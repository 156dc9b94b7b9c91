"""The import graph stays one-way and acyclic (ARCHITECTURE.md, "Rooms and the direction of imports").

Every import in the project's own modules counts, including imports inside functions (a cycle closed by
a function-level import is still a cycle: it only moves the failure from import time to call time).
Layers, lowest first: kernels ← arch ← training ← recipes / benchmarks / entry points. A lower layer
never imports a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "arch", "training", "recipes", "benchmarks")
ENTRY_POINTS = ("train.py", "evaluate.py")
# what each layer may import from the project (itself included)
ALLOWED = {
    "kernels": {"kernels"},
    "arch": {"kernels", "arch"},
    "training": {"kernels", "arch", "training"},
    "recipes": {"kernels", "arch", "training", "recipes"},
    "benchmarks": {"kernels", "arch", "training", "recipes", "benchmarks"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages=PACKAGES, entry_points=ENTRY_POINTS) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    for entry in entry_points:
        if (root / entry).exists():
            found[Path(entry).stem] = root / entry
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module → that module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path = ROOT, **kw) -> dict[str, set[str]]:
    modules = project_modules(root, **kw)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        layer = name.split(".")[0]
        if layer not in ALLOWED:
            continue  # entry points may import anything
        bad += [f"{name} imports {t}" for t in sorted(targets) if t.split(".")[0] not in ALLOWED[layer]]
    return bad


def test_the_project_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports count): " + "; ".join(" ↔ ".join(c) for c in found)


def test_lower_layers_never_import_higher_ones():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order kernels ← arch ← training ← recipes/benchmarks:\n" + "\n".join(bad)


def test_the_guard_finds_a_planted_cycle_and_an_upward_import(tmp_path):
    (tmp_path / "arch").mkdir()
    (tmp_path / "training").mkdir()
    (tmp_path / "arch" / "__init__.py").write_text("")
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "arch" / "a.py").write_text("def f():\n    from arch import b  # function-level: still an edge\n")
    (tmp_path / "arch" / "b.py").write_text("from arch.a import f\nfrom training.loop import g\n")
    (tmp_path / "training" / "loop.py").write_text("import arch.b\n")
    graph = import_graph(tmp_path, packages=("arch", "training"), entry_points=())
    assert cycles(graph) == [["arch.a", "arch.b", "training.loop"]]
    assert upward_imports(graph) == ["arch.b imports training.loop"]
