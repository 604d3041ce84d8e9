"""The library's layers: imports point down, never sideways between sub-packages, never in circles.

Every import of HeadCTMoLRELib code is read with ``ast`` (module level and inside functions alike: a lazy
import is a dependency too) and mapped to its room: a sub-package (``ct``, ``model``, ...) or a module of
the library's root (``findings``, ``cli``, ...). A room may import rooms of a LOWER rank, and itself.
A new file of the library must be given a rank here, which is where its place in the layers is decided.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import HeadCTMoLRELib

LIB = Path(HeadCTMoLRELib.__file__).resolve().parent

# rank: a room imports only rooms of a strictly lower rank (or itself)
LAYERS = {
    "exports": 0,  # the lazy re-export helper of the packages' __init__ files
    "__init__": 1, "resources": 1, "settings": 1,  # version, Resources/ lookup, settings checks
    "atomic_files": 1,  # crash-safe writes (standard library only)
    "threads": 1,  # CPU thread policy (standard library; torch only when applied)
    "findings": 2, "metrics": 2, "calibration": 2, "terminal": 2,  # the catalog, numbers, text tables
    "ct": 3, "phantoms": 3,  # CT in (real or synthetic); neither knows the other
    "model": 4,
    "inference": 5, "outputs": 5,
    "datasets": 5,  # public dataset importers (ct, findings); training copies their sidecar
    "training": 6,
    "evaluation": 7,  # reads cases and predictions through training.cases
    "slicer": 8, "benchmark": 8, "benchmark_runtime": 7.9,  # benchmark uses benchmark_runtime
    "reports": 7.5,  # HTML reports and DICOM SR / maps (never slicer)
    "batch": 9.5,  # headct-molre batch: many cases through inference and reports
    "cli": 10,
}


def room(module: str) -> str:
    """'HeadCTMoLRELib.ct.loader' -> 'ct'; 'HeadCTMoLRELib.cli' -> 'cli'; 'HeadCTMoLRELib' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_library_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (LIB.parent / relative).with_suffix(".py").is_file() or (LIB.parent / relative / "__init__.py").is_file()


def imports_of(path: Path, module_level_only: bool = False, name: str | None = None) -> set[str]:
    """Library modules a file imports (``from P import m`` counts P and, when m is a module, P.m);
    ``name`` is the file's dotted module name (default: from its place in the library)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "HeadCTMoLRELib":
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if is_library_module(f"{target}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "HeadCTMoLRELib")
    return {m for m in found if is_library_module(m)}


def library_files() -> list[Path]:
    return sorted(LIB.rglob("*.py"))


def test_every_room_of_the_library_has_a_rank():
    rooms = {room(module_name(p)) for p in library_files()}
    assert not rooms - set(LAYERS), (
        f"give these rooms a rank in Testing/test_layers.py LAYERS (which rooms may they import?): "
        f"{sorted(rooms - set(LAYERS))}")


def upward_imports(files: list[tuple[str, Path]]) -> list[str]:
    """'file: room imports target' for each import of a room of the same or a higher rank."""
    problems = []
    for source, path in files:
        for target in imports_of(path, name=source):
            a, b = room(source), room(target)
            if a != b and b != "__init__" and LAYERS.get(b, 99) >= LAYERS.get(a, -1):
                problems.append(f"{source}: {a} (rank {LAYERS.get(a)}) imports {target} ({b}, rank {LAYERS.get(b)})")
    return problems


def test_imports_point_down():
    problems = upward_imports([(module_name(p), p) for p in library_files()])
    assert not problems, "imports that point up or sideways:\n" + "\n".join(problems)


def test_the_layer_check_sees_upward_and_sideways_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..model import bundle\n\ndef f():\n    from ..phantoms import generator\n", encoding="utf-8")
    problems = upward_imports([("HeadCTMoLRELib.ct.probe", probe)])
    assert any("imports HeadCTMoLRELib.model.bundle" in p for p in problems)
    assert any("imports HeadCTMoLRELib.phantoms.generator" in p for p in problems), "lazy imports count too"


def test_no_import_circles_at_module_level():
    graph = defaultdict(set)
    for path in library_files():
        source = module_name(path)
        graph[source] |= {t for t in imports_of(path, module_level_only=True) if t != source}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # a package importing its own modules (lazy re-exports) is not a circle
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif state.get(nxt) is None:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_public_entry_points_keep_their_names():
    from HeadCTMoLRELib import inference
    from HeadCTMoLRELib.ct import loader
    from HeadCTMoLRELib.model import bundle

    assert HeadCTMoLRELib.load_ct is loader.load_ct
    assert HeadCTMoLRELib.ct.load_ct is loader.load_ct
    assert HeadCTMoLRELib.load_bundle is bundle.load_bundle
    assert HeadCTMoLRELib.model.load_bundle is bundle.load_bundle
    assert HeadCTMoLRELib.predict is inference.predict
    with pytest.raises(AttributeError):
        HeadCTMoLRELib.ct.no_such_name  # noqa: B018


@pytest.mark.parametrize("package", ["ct", "model", "training", "evaluation", "phantoms", "slicer"])
def test_every_exported_name_resolves(package):
    import importlib

    module = importlib.import_module(f"HeadCTMoLRELib.{package}")
    for name in module.__all__:
        assert getattr(module, name) is not None, f"HeadCTMoLRELib.{package}.{name}"
        assert not is_library_module(f"HeadCTMoLRELib.{package}.{name}"), (
            f"HeadCTMoLRELib.{package} exports {name!r}, which is also the name of one of its modules")


def test_importing_the_packages_imports_no_torch():
    code = ("import sys\nimport HeadCTMoLRELib, HeadCTMoLRELib.ct, HeadCTMoLRELib.model, HeadCTMoLRELib.training,"
            " HeadCTMoLRELib.evaluation, HeadCTMoLRELib.slicer\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(LIB.parent), "PATH": ""})
    assert result.returncode == 0, result.stderr
