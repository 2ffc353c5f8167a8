"""The package's layers, read from the source (every import statement, at module level or inside a function):
sat/ imports neither preprocess/ nor the main scripts nor bench/ or tests/, its modules import each other
without a cycle, neither main script imports the other, and no file reaches into another module's private
(`_name`) functions or globals."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

OUTSIDE_THE_PACKAGE = {"preprocess", "main_train", "main_inference", "bench", "tests"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of a file; `from package import
    submodule` counts as importing the submodule."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, []) if _is_module(sub) else (base, [alias.name]))
    return found


def package_graph() -> dict[str, set[str]]:
    """Every sat module -> the modules (of any package) its source imports."""
    return {_module_name(p): {m for m, _ in _imports(p)} for p in sorted((ROOT / "sat").rglob("*.py"))}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_imports_nothing_outside_it():
    leaks = sorted(f"{m} -> {i}" for m, imported in package_graph().items() for i in imported
                   if i.split(".")[0] in OUTSIDE_THE_PACKAGE)
    assert not leaks, f"sat imports modules that are not part of the installed package: {leaks}"


def test_the_package_has_no_import_cycles():
    assert not _cycles(package_graph()), f"import cycles: {_cycles(package_graph())}"


# Arrows point downwards: a module of a layer imports nothing of the layers above it.
LOWER_KNOWS_NOT = {
    "sat.kernels": ("sat.models", "sat.sparsity", "sat.config", "sat.train", "sat.checkpoint", "sat.data", "sat.warmup",
                    "sat.compile_report"),
    "sat.models": ("sat.checkpoint", "sat.train", "sat.runs", "sat.runlog", "sat.run_state", "sat.evaluate"),
    "sat.shapes": ("sat.",),
}


def test_lower_layers_import_nothing_from_higher_ones():
    upward = sorted(f"{m} -> {i}" for m, imported in package_graph().items() for i in imported
                    for layer, above in LOWER_KNOWS_NOT.items()
                    if (m == layer or m.startswith(layer + ".")) and i.startswith(above))
    assert not upward, f"imports against the layers: {upward}"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c", "x"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_neither_main_script_imports_the_other():
    for script, other in (("main_train", "main_inference"), ("main_inference", "main_train")):
        imported = {m.split(".")[0] for m, _ in _imports(ROOT / f"{script}.py")}
        assert other not in imported, f"{script}.py imports {other}"


def _private_uses(path: Path) -> list[str]:
    """`from module import _name`, `module._name` and `setattr(module, "_name", ...)` of a project module (sat,
    the main scripts, bench)."""
    tree = ast.parse(path.read_text(), str(path))
    own = {"sat", "main_train", "main_inference", "bench"}
    uses, aliases = [], set()
    for module, names in _imports(path):
        if module.split(".")[0] not in own:
            continue
        uses += [f"from {module} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and a.name.split(".")[0] in own}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in own:
            aliases |= {a.asname or a.name for a in node.names if _is_module(f"{node.module}.{a.name}")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            uses.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
        if (isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[0], ast.Name)
                and node.args[0].id in aliases and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")):  # monkeypatch.setattr(module, "_name", ...)
            uses.append(f"{node.args[0].id}.{node.args[1].value} set (line {node.lineno})")
    return uses


def test_no_file_uses_another_modules_private_names():
    files = [*(ROOT / "sat").rglob("*.py"), ROOT / "main_train.py", ROOT / "main_inference.py",
             *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    found = {str(p.relative_to(ROOT)): u for p in sorted(files) if (u := _private_uses(p))}
    assert not found, f"private names used across modules: {found}"
