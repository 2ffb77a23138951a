"""The package's shape (docs/architecture.md): no import circle between modules, dependencies of the
rooms one way, torch and Ray only where they belong, and no module grown past its size."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "malaria_detect"
TORCH_FREE = ("cells", "fields", "serve", "data", "record", "imaging", "modelfile", "counting", "tables", "errors",
              "cli", "__init__", "training.config")
MAX_LINES = 360


def _module(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module under malaria_detect, at module level?, absolute module name) of each import."""
    tree = ast.parse(path.read_text())
    me = _module(path).split(".")
    pkg = me if path.name == "__init__.py" else me[:-1]
    if me == ["__init__"]:
        pkg = []
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = (node.module or "").removeprefix("malaria_detect").lstrip(".")
            for a in node.names:  # `from pkg import module` names a module; `from module import name` the module
                yield ".".join(x for x in (mod, a.name) if x), id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.removeprefix("malaria_detect."), id(node) in top


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    g = {}
    for m, p in mods.items():
        g[m] = set()
        for name, at_top in _imports(p):
            if module_level_only and not at_top:
                continue
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m:
                g[m].add(name)
    return g


def test_no_import_circle_between_modules():
    g = _graph(module_level_only=False)  # lazy imports count too: they are circles all the same
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(g[m]):
            if n.startswith(m + ".") or m == "__init__":  # a package's own __init__ re-exporting its modules
                continue
            if state.get(n) == "open":
                raise AssertionError("import circle: " + " -> ".join(path + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_the_prediction_and_serving_rooms_never_import_torch_or_ray_at_module_level():
    for p in PKG.rglob("*.py"):
        m = _module(p)
        if not any(m == r or m.startswith(r + ".") for r in TORCH_FREE):
            continue
        for name, at_top in _imports(p):
            assert not (at_top and name.split(".")[0] in ("torch", "ray", "safetensors", "onnx")), (m, name)


def test_cells_never_reach_into_fields_and_the_shared_rooms_depend_on_no_room():
    g = _graph(module_level_only=False)
    for m, deps in g.items():
        if m.startswith("cells"):
            assert not any(d.startswith(("fields", "serve", "cli", "scale", "training")) for d in deps), (m, deps)
        if m in ("record", "imaging", "modelfile", "counting", "tables", "errors"):
            rooms = ("cells", "fields", "data", "training", "evaluation", "scale", "serve", "cli")
            assert not any(d.startswith(rooms) for d in deps), (m, deps)


def test_no_module_is_over_its_size():
    big = {_module(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big
