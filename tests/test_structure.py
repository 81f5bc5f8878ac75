"""The package's shape, read from its source with ``ast``: the import graph (every import,
module-level or inside a function) has no circle and no arrow from a lower layer to a
higher one; modules and functions stay short; functions take few parameters.

The layers, bottom to top (README, Layout; a module may import its own layer and below):

0. foundation: errors, the one config, the run-folder layout, atomic I/O, input checks,
   the view registry, pure metric formulas, the family tables;
1. data: calibration windows, distribution over processes, the result table, statistics;
2. model: loading, the layer stack, the memory plan;
3. measurement: probes, held-out evaluation, conversion;
4. analysis: ``analyze``;
5. applications: prune, train, report, the pytest plugin;
6. front: the CLI and the package front (``depthprobe/__init__.py``), which may know all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "depthprobe"

#: module (or package prefix) -> layer; the longest matching prefix wins
LAYERS: dict[str, int] = {
    "depthprobe._version": 0,
    "depthprobe.errors": 0,
    "depthprobe.hooking": 0,
    "depthprobe.config": 0,
    "depthprobe.runs": 0,
    "depthprobe.views": 0,
    "depthprobe.safeio": 0,
    "depthprobe.journal": 0,
    "depthprobe.autoregister": 0,
    "depthprobe.inputs": 0,
    "depthprobe.labels": 0,
    "depthprobe.caveats": 0,
    "depthprobe.probes.metrics": 0,
    "depthprobe.model.families": 0,
    "depthprobe.model.discover": 0,
    "depthprobe.convert.norms": 0,
    "depthprobe.data": 1,
    "depthprobe.images": 3,  # image inputs, cut into the engine's batches (probes.batch)
    "depthprobe.facegen": 1,  # the generated face / shape data sets
    "depthprobe.distributed": 1,
    "depthprobe.results": 1,
    "depthprobe.stats": 1,
    "depthprobe.model": 2,
    "depthprobe.probes": 3,
    "depthprobe.evaluate": 3,
    "depthprobe.convert": 3,
    "depthprobe.analysis": 4,
    "depthprobe.vision": 4,  # analyze_images: the vision counterpart of analysis.py
    "depthprobe.prune": 5,
    "depthprobe.train": 5,
    "depthprobe.report": 5,
    "depthprobe.testing": 5,
    "depthprobe.cli": 6,
    "depthprobe.__main__": 6,
    "depthprobe": 6,
}

#: known arrows other branches remove; the coordinator deletes this list after merging
UPWARD_EXCEPTIONS: set[tuple[str, str]] = set()

#: modules over 450 lines or with functions over 60 lines, in files other helpers own;
#: owned by engine/failfast branch (the coordinator deletes this list after merging)
SIZE_EXCEPTIONS: set[str] = set()
FUNCTION_EXCEPTIONS: set[str] = set()  # "path:function"

PARAMETER_EXCEPTIONS: set[str] = set()  # "path:function"

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
MAX_FUNCTIONS_OVER = 3  # functions of any kind with more than MAX_PARAMETERS parameters


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every depthprobe module ``name`` imports, anywhere in its source."""
    out: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from depthprobe.probes import drop` imports the module depthprobe.probes.drop
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                out.add(target)
    return out


def _layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module names, first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "depthprobe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from depthprobe.sub import high\n")
    (pkg / "sub" / "__init__.py").write_text("from . import high\n")
    (pkg / "sub" / "high.py").write_text("import depthprobe.low\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        graph = import_graph()
    finally:
        PACKAGE = saved
    assert graph["depthprobe.low"] == {"depthprobe.sub.high"}  # inside a function
    assert graph["depthprobe.sub"] == {"depthprobe.sub.high"}  # relative
    assert _cycle(graph) == ["depthprobe.low", "depthprobe.sub.high", "depthprobe.low"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer():
    assert all(any(m == p or m.startswith(p + ".") for p in LAYERS) for m in _modules())


def test_no_import_circle():
    graph = {m: {t for t in targets if (m, t) not in UPWARD_EXCEPTIONS} for m, targets in import_graph().items()}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_no_lower_layer_imports_a_higher_one():
    upward = sorted((m, t) for m, targets in import_graph().items() for t in targets
                    if _layer(t) > _layer(m) and (m, t) not in UPWARD_EXCEPTIONS)
    assert upward == [], "\n".join(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for m, t in upward)


def test_loading_a_model_imports_no_trainer_or_converter():
    graph = import_graph()
    seen, todo = set(), ["depthprobe.model.load"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += [t for t in graph[module] if (module, t) not in UPWARD_EXCEPTIONS]
    assert not {m for m in seen if m.startswith(("depthprobe.train", "depthprobe.convert", "depthprobe.report"))}


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _num_parameters(fn: ast.FunctionDef) -> int:
    a = fn.args
    count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    is_method = a.args and a.args[0].arg in ("self", "cls")
    return count - bool(is_method)


def _sources() -> list[tuple[str, ast.AST, int]]:
    return [(str(p.relative_to(PACKAGE.parent)), ast.parse(p.read_text()), len(p.read_text().splitlines()))
            for p in sorted(PACKAGE.rglob("*.py"))]


def test_modules_and_functions_are_short():
    long_modules = [f"{path}: {lines} lines" for path, _, lines in _sources()
                    if lines > MAX_MODULE_LINES and path not in SIZE_EXCEPTIONS]
    long_functions = [f"{path}:{fn.lineno} {fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
                      for path, tree, _ in _sources() for fn in _functions(tree)
                      if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
                      and path not in SIZE_EXCEPTIONS and f"{path}:{fn.name}" not in FUNCTION_EXCEPTIONS]
    assert long_modules == [] and long_functions == [], "\n".join(long_modules + long_functions)


def test_functions_take_few_parameters():
    over = [(path, fn) for path, tree, _ in _sources() for fn in _functions(tree)
            if _num_parameters(fn) > MAX_PARAMETERS and f"{path}:{fn.name}" not in PARAMETER_EXCEPTIONS]
    public = [f"{path}:{fn.lineno} {fn.name}" for path, fn in over if not fn.name.startswith("_")]
    assert public == [], "public functions over 8 parameters:\n" + "\n".join(public)
    assert len(over) <= MAX_FUNCTIONS_OVER, "\n".join(f"{p}:{fn.lineno} {fn.name} ({_num_parameters(fn)})"
                                                      for p, fn in over)


@pytest.mark.parametrize("source, expected", [
    ("def f(a, b, *c, d, e=1, **f): pass", 6),
    ("class A:\n    def m(self, a, b): pass", 2),
    ("def f(a, /, b): pass", 2),
])
def test_parameter_count(source, expected):
    assert _num_parameters(_functions(ast.parse(source))[0]) == expected


def test_hooks_are_registered_in_one_place():
    """Every torch hook goes through depthprobe.hooking (removed when its ``with`` ends)."""
    raw = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
           for path in sorted(PACKAGE.rglob("*.py")) if path.name != "hooking.py" or path.parent != PACKAGE
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Attribute) and node.attr.startswith("register_") and node.attr.endswith("hook")]
    assert raw == []
