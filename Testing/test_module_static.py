"""Static checks of the Slicer module: what the desktop Slicer would only reveal when a user opens the panel.

The desktop application (Qt, PythonQt, CTK) cannot run here, so HeadCTMoLRE/HeadCTMoLRE.py is never
imported: it is parsed with ``ast`` and checked against its .ui file, its CMakeLists.txt and the rules of
Slicer's parameterNodeWrapper (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from HeadCTMoLRELib.slicer import dependencies

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "HeadCTMoLRE"
LIB_DIR = MODULE_DIR / "HeadCTMoLRELib"
MODULE_FILE = MODULE_DIR / "HeadCTMoLRE.py"
UI_FILE = REPO / "Resources" / "UI" / "HeadCTMoLRE.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"

# Modules a scripted module may import when Slicer starts: Slicer's own Python modules, plus the
# packages Slicer ships (dependencies.SLICER_PROVIDED), plus the standard library.
SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "SampleData", "sitkUtils", "DICOMLib", "mrml"}

# Widget class -> value types its parameterNodeWrapper GUI connector accepts (guiConnectors.py).
# "choice": str/int/float/bool with a Choice(...) annotation; "node": a vtkMRML...Node class.
WIDGET_TYPES = {
    "QCheckBox": {"bool"},
    "ctkCheckBox": {"bool"},
    "QPushButton": {"bool"},
    "ctkCheckablePushButton": {"bool"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QDoubleSpinBox": {"float", "int"},
    "ctkSliderWidget": {"float", "int"},
    "ctkDoubleSpinBox": {"float", "int"},
    "ctkDoubleSlider": {"float", "int"},
    "qMRMLSliderWidget": {"float", "int"},
    "qMRMLSpinBox": {"float", "int"},
    "QComboBox": {"choice"},
    "ctkComboBox": {"choice"},
    "QLineEdit": {"str"},
    "QLabel": {"str"},
    "QTextEdit": {"str"},
    "ctkPathLineEdit": {"Path"},
    "ctkDirectoryButton": {"Path"},
    "qMRMLNodeComboBox": {"node"},
}

# Calls that open a dialog, install something or import torch: never reachable from setup().
FORBIDDEN_IN_SETUP = {
    "confirmOkCancelDisplay", "confirmYesNoDisplay", "errorDisplay", "warningDisplay", "infoDisplay",
    "messageBox", "tryWithErrorDisplay", "pip_install", "pip_ensure", "installTorch", "getOpenFileName",
    "getOpenFileNames", "getExistingDirectory", "getSaveFileName", "QMessageBox", "QFileDialog", "exec_",
    "_ensureDependencies", "device_info", "start_device_info", "start", "start_fine_tune", "run", "fine_tune",
    "start_export_dicom", "export_dicom",
}
# Entry points that a headless Slicer (WITH_GENERIC_TESTS, no main window) calls on the module.
HEADLESS_ENTRY_POINTS = ("HeadCTMoLREWidget.__init__", "HeadCTMoLREWidget.setup", "HeadCTMoLREWidget.enter",
                         "HeadCTMoLRE.__init__", "HeadCTMoLRELogic.__init__")


# ------------------------------------------------------------------------------------------ parsing
def parse_ui(path: Path = UI_FILE) -> dict:
    """Widgets of a Qt Designer file: {name: class}, parameter bindings {name: (widget, class)}, and more."""
    root = ET.parse(path).getroot()
    widgets, bindings, node_types = {}, {}, {}
    for widget in root.iter("widget"):
        name, cls = widget.get("name"), widget.get("class")
        widgets[name] = cls
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[prop.findtext("string")] = (name, cls)
            if prop.get("name") == "nodeTypes":
                node_types[name] = [s.text for s in prop.iter("string")]
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    connections = [(c.findtext("sender"), c.findtext("receiver")) for c in root.iter("connection")]
    return {"root": root.find("widget"), "widgets": widgets, "bindings": bindings, "node_types": node_types,
            "custom": custom, "connections": connections}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def ui_names_used(tree: ast.AST) -> set[str]:
    """Every ``self.ui.<name>`` in the module."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def _decorator_name(decorator: ast.expr) -> str:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def parameter_fields(tree: ast.Module) -> dict[str, ast.expr]:
    """Annotated fields of the @parameterNodeWrapper class: {name: annotation}."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(_decorator_name(d) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id: s.annotation for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise AssertionError(f"{MODULE_FILE}: no class decorated with @parameterNodeWrapper")


def field_kind(annotation: ast.expr) -> tuple[str, set[str], str]:
    """(base type: bool/int/float/str/Path/node/other, annotation call names, node class name)."""
    validators: set[str] = set()
    if (isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name)
            and annotation.value.id == "Annotated"):
        elements = annotation.slice.elts
        annotation = elements[0]
        validators = {_decorator_name(e) for e in elements[1:] if isinstance(e, ast.Call)}
    name = annotation.attr if isinstance(annotation, ast.Attribute) else getattr(annotation, "id", "")
    if name in ("bool", "int", "float", "str", "Path"):
        return name, validators, ""
    if name.startswith("vtkMRML") and name.endswith("Node"):
        return "node", validators, name
    return "other", validators, name


def widget_accepts(widget_class: str, kind: str, validators: set[str]) -> bool:
    """Whether Slicer's GUI connectors can bind a widget of this class to a field of this kind."""
    accepted = WIDGET_TYPES.get(widget_class, set())
    if "choice" in accepted:
        return kind in ("str", "int", "float", "bool") and "Choice" in validators
    return kind in accepted


def cmake_list(text: str, variable: str, substitutions: dict[str, str]) -> list[str]:
    """Items of ``set(<variable> ...)`` in CMake text, comments removed, ${VAR} substituted."""
    match = re.search(rf"set\(\s*{variable}\b(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    items = []
    for line in match.group(1).splitlines():
        for token in line.split("#", 1)[0].split():
            for key, value in substitutions.items():
                token = token.replace("${" + key + "}", value)
            items.append(token)
    return items


def library_file(module: str) -> Path | None:
    """The file of a HeadCTMoLRELib module or package (``HeadCTMoLRELib.ct.loader`` -> ct/loader.py), or None."""
    parts = module.split(".")[1:]
    for path in (LIB_DIR.joinpath(*parts).with_suffix(".py"), LIB_DIR.joinpath(*parts, "__init__.py")):
        if parts and path.is_file() or not parts and path.name == "__init__.py":
            return path
    return None


def package_exports(init_file: Path) -> set[str]:
    """Names in a package ``__init__``'s ``__all__`` (its lazy re-exports)."""
    for node in ast.parse(init_file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def top_level_imports(tree: ast.Module, package: str | None = None) -> list[str]:
    """Absolute names of the modules imported when the file is imported (not inside functions).
    ``package`` is the dotted package of the file (for relative imports); ``from P import name`` also
    counts ``P.name`` when that is a module of ours."""
    names = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x / from ..x import y
                    parts = (package or "").split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module
                names.append(target)
                target_file = library_file(target) if target.split(".")[0] == "HeadCTMoLRELib" else None
                if target_file is not None and target_file.name == "__init__.py":
                    # from a package: a module of it, or a name it exports; anything else is missing
                    exported = package_exports(target_file)
                    names.extend(f"{target}.{alias.name}" for alias in node.names if alias.name not in exported)
            elif isinstance(node, (ast.Try, ast.If)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def allowed_at_slicer_start(module: str) -> bool:
    root = module.split(".")[0]
    return (root in sys.stdlib_module_names or root in SLICER_MODULES
            or root in set(dependencies.SLICER_PROVIDED) or root == "HeadCTMoLRELib")


def import_violations(tree: ast.Module, package: str | None = None, seen: set[str] | None = None,
                      where: str = "HeadCTMoLRE.py") -> list[str]:
    """'file: imports X' for every module import (transitively through HeadCTMoLRELib) that Slicer lacks."""
    seen = set() if seen is None else seen
    problems = []
    for name in top_level_imports(tree, package):
        if not allowed_at_slicer_start(name):
            problems.append(f"{where}: imports {name} at module level")
            continue
        if name.startswith("HeadCTMoLRELib.") and name not in seen:
            seen.add(name)
            path = library_file(name)
            if path is None:
                problems.append(f"{where}: imports {name}, which does not exist")
                continue
            sub = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            problems += import_violations(sub, package, seen,
                                          where=f"HeadCTMoLRELib/{path.relative_to(LIB_DIR).as_posix()}")
    return problems


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """'Class.method' and 'function' -> definition, for the module's top level."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    return found


def _called_names(function: ast.FunctionDef) -> set[str]:
    """Names called in a function: ``self.x()`` -> 'x', ``a.b.c()`` -> 'c', ``f()`` -> 'f', and every
    attribute or name mentioned (``qt.QFileDialog`` counts even without a call)."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.name.split(".")[0] for alias in node.names)
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
    return names


def reachable(tree: ast.Module, entry_points) -> dict[str, set[str]]:
    """Functions reachable from the entry points by direct calls -> the names each one mentions."""
    functions = _functions(tree)
    by_short_name: dict[str, list[str]] = {}
    for qualified in functions:
        by_short_name.setdefault(qualified.split(".")[-1], []).append(qualified)
    todo, out = [e for e in entry_points if e in functions], {}
    while todo:
        current = todo.pop()
        if current in out:
            continue
        definition = functions[current]
        out[current] = _called_names(definition)
        owner = current.rsplit(".", 1)[0] if "." in current else None
        for node in ast.walk(definition):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
                target = f"{owner}.{func.attr}"
                if target in functions:
                    todo.append(target)
            elif isinstance(func, ast.Name) and func.id in functions:
                todo.append(func.id)
            elif isinstance(func, ast.Name) and func.id in {q.split(".")[0] for q in functions}:
                todo.append(f"{func.id}.__init__")  # constructing a class of this module
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                target = f"{func.value.id}.{func.attr}"  # Base.__init__(self) of a class defined here
                if target in functions:
                    todo.append(target)
    return out


def setup_violations(tree: ast.Module, entry_points=HEADLESS_ENTRY_POINTS) -> list[str]:
    problems = []
    for function, names in sorted(reachable(tree, entry_points).items()):
        for bad in sorted(names & FORBIDDEN_IN_SETUP):
            problems.append(f"{function} (reachable from setup) uses {bad}")
        for bad in sorted(names & {"torch", "PyTorchUtils", "transformers", "peft"}):
            problems.append(f"{function} (reachable from setup) imports {bad}")
    return problems


# --------------------------------------------------------------------------------------- the checks
def test_ui_file_is_well_formed_designer_xml_with_declared_custom_widgets():
    ui = parse_ui()
    assert ui["root"].get("class") == "qMRMLWidget", "the top widget must be a qMRMLWidget (MRML scene signal)"
    custom_needed = {cls for cls in ui["widgets"].values() if not cls.startswith("Q")}
    assert custom_needed <= ui["custom"], f"custom widgets used but not declared: {custom_needed - ui['custom']}"
    assert len(ui["widgets"]) == len(list(ui["root"].iter("widget"))), "widget names must be unique"
    for sender, receiver in ui["connections"]:
        assert sender in ui["widgets"] and receiver in ui["widgets"], (sender, receiver)


def test_every_mrml_widget_gets_the_scene_through_a_ui_connection():
    ui = parse_ui()
    top = ui["root"].get("name")
    receivers = {receiver for sender, receiver in ui["connections"] if sender == top}
    mrml_widgets = {name for name, cls in ui["widgets"].items() if cls in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert mrml_widgets <= receivers, f"no setMRMLScene connection for {mrml_widgets - receivers}"


def test_every_self_ui_name_used_by_the_module_exists_in_the_ui_file():
    used = ui_names_used(module_tree())
    missing = used - set(parse_ui()["widgets"])
    assert used, "the module uses no self.ui.<widget> at all"
    assert not missing, f"HeadCTMoLRE.py uses self.ui.{sorted(missing)} but {UI_FILE.name} has no such widget"


def test_every_slicer_parameter_name_is_a_field_of_a_compatible_type():
    ui = parse_ui()
    fields = parameter_fields(module_tree())
    assert ui["bindings"], "no widget has a SlicerParameterName property"
    for parameter, (widget, widget_class) in ui["bindings"].items():
        assert parameter in fields, f"{UI_FILE.name}: {widget} is bound to '{parameter}', not a parameter-node field"
        kind, validators, node_class = field_kind(fields[parameter])
        assert widget_accepts(widget_class, kind, validators), (
            f"{widget} ({widget_class}) cannot represent field '{parameter}' of type {kind} {sorted(validators)}")
        if kind == "node":
            assert node_class in ui["node_types"].get(widget, []), (
                f"{widget}: nodeTypes {ui['node_types'].get(widget)} must include {node_class}")


def test_widget_compatibility_table_rejects_what_slicer_rejects():
    assert widget_accepts("QSpinBox", "int", set())
    assert not widget_accepts("QSpinBox", "str", set())
    assert not widget_accepts("QComboBox", "str", set()), "a str combo box needs Choice (guiConnectors raises)"
    assert widget_accepts("QComboBox", "str", {"Choice"})
    assert not widget_accepts("ctkPathLineEdit", "str", set())
    kind, validators, _ = field_kind(ast.parse("Annotated[float, WithinRange(0, 1)]", mode="eval").body)
    assert (kind, validators) == ("float", {"WithinRange"})


def test_cmake_lists_every_library_file_and_nothing_else():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", {"MODULE_NAME": "HeadCTMoLRE"})
    on_disk = {"HeadCTMoLRE.py"} | {f"HeadCTMoLRELib/{p.relative_to(LIB_DIR).as_posix()}"
                                         for p in LIB_DIR.rglob("*.py")}
    assert len(scripts) == len(set(scripts)), "duplicate entries in MODULE_PYTHON_SCRIPTS"
    assert not on_disk - set(scripts), f"add to MODULE_PYTHON_SCRIPTS: {sorted(on_disk - set(scripts))}"
    assert not set(scripts) - on_disk, f"listed but missing on disk: {sorted(set(scripts) - on_disk)}"


def test_cmake_lists_every_resource_file_and_nothing_else():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", {"MODULE_NAME": "HeadCTMoLRE"})
    folder = REPO / "Resources"
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}
    assert len(resources) == len(set(resources)), "duplicate entries in MODULE_PYTHON_RESOURCES"
    assert not on_disk - set(resources), f"add to MODULE_PYTHON_RESOURCES: {sorted(on_disk - set(resources))}"
    assert not set(resources) - on_disk, f"listed but missing on disk: {sorted(set(resources) - on_disk)}"


def test_cmake_builds_a_scripted_module_with_generic_tests_and_the_self_test():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(.*NAME \$\{MODULE_NAME\}.*WITH_GENERIC_TESTS", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    assert "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources" in text, "resources must be installed"


def test_top_level_cmake_declares_the_extension_and_depends_on_pytorch():
    text = TOP_CMAKE.read_text(encoding="utf-8")
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), f"EXTENSION_{key} missing or empty"
    assert re.search(r'set\(EXTENSION_DEPENDS "?PyTorch"?\)', text)
    assert "add_subdirectory(HeadCTMoLRE)" in text
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text


def test_module_imports_only_what_slicer_provides_at_start_up():
    problems = import_violations(module_tree())
    assert not problems, "\n".join(problems)


def test_import_check_flags_torch_and_missing_library_modules():
    tree = ast.parse("import os\nimport torch\nfrom HeadCTMoLRELib import no_such_module\n")
    problems = import_violations(tree, where="x.py")
    assert any("torch" in p for p in problems) and any("no_such_module" in p for p in problems)
    assert not any(" os" in p for p in problems)


def test_nothing_reachable_from_setup_opens_a_dialog_installs_or_imports_torch():
    problems = setup_violations(module_tree())
    assert "HeadCTMoLREWidget.setup" in reachable(module_tree(), HEADLESS_ENTRY_POINTS)
    assert not problems, "\n".join(problems)


def test_setup_check_flags_a_dialog_behind_a_helper_method():
    tree = ast.parse(
        "class HeadCTMoLREWidget:\n"
        "    def setup(self):\n        self._helper()\n"
        "    def _helper(self):\n        slicer.util.pip_install('x')\n"
        "    def onApply(self):\n        slicer.util.errorDisplay('not reachable from setup')\n")
    problems = setup_violations(tree)
    assert problems == ["HeadCTMoLREWidget._helper (reachable from setup) uses pip_install"]


def test_module_has_the_five_template_classes():
    classes = {node.name: node for node in module_tree().body if isinstance(node, ast.ClassDef)}
    bases = {name: {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases} for name, node in classes.items()}
    assert "ScriptedLoadableModule" in bases["HeadCTMoLRE"]
    assert "ScriptedLoadableModuleWidget" in bases["HeadCTMoLREWidget"]
    assert {"ScriptedLoadableModuleLogic", "HeadCTMoLRECore"} <= bases["HeadCTMoLRELogic"]
    assert "ScriptedLoadableModuleTest" in bases["HeadCTMoLRETest"]
    assert "HeadCTMoLREParameterNode" in classes


# ----------------------------------------------------------------------------------- dependencies
def _pyproject_dependencies() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return {dependencies.requirement_name(r).lower(): r for r in data["project"]["dependencies"]}


def test_slicer_requirements_cover_every_pyproject_dependency():
    pyproject = _pyproject_dependencies()
    accounted = ({dependencies.requirement_name(r).lower() for r in dependencies.REQUIREMENTS} | {"torch"}
                 | {n.lower() for n in dependencies.SLICER_PROVIDED} | {n.lower() for n in dependencies.NOT_NEEDED_IN_SLICER})
    assert not set(pyproject) - accounted, f"decide how Slicer gets: {sorted(set(pyproject) - accounted)}"


def test_slicer_requirements_use_the_pyproject_version_ranges_and_never_slicer_packages():
    pyproject = _pyproject_dependencies()
    for requirement in dependencies.REQUIREMENTS:
        name = dependencies.requirement_name(requirement).lower()
        assert not dependencies.is_slicer_provided(requirement), f"{requirement} would replace Slicer's own package"
        if name in pyproject:
            assert requirement.replace(" ", "") == pyproject[name].replace(" ", ""), (requirement, pyproject[name])


def test_missing_requirements_compares_installed_versions():
    assert dependencies.missing_requirements(["numpy>=1.0"]) == []
    assert dependencies.missing_requirements(["numpy>=999"]) == ["numpy>=999"]
    assert dependencies.missing_requirements(["no-such-package-headct>=1"]) == ["no-such-package-headct>=1"]
    assert dependencies.requirement_name("pylibjpeg-libjpeg>=2.1") == "pylibjpeg-libjpeg"


def test_constraints_file_pins_slicer_numpy_to_the_installed_version(tmp_path):
    import numpy

    text = dependencies.write_constraints_file(tmp_path / "c.txt").read_text(encoding="utf-8")
    assert f"numpy=={numpy.__version__}" in text.splitlines()


def test_python_version_gate_refuses_slicer_5_8_python():
    assert dependencies.python_too_old((3, 9))
    assert not dependencies.python_too_old((3, 12))


def test_dependency_module_imports_no_torch():
    tree = ast.parse((LIB_DIR / "slicer" / "dependencies.py").read_text(encoding="utf-8"))
    names = {n.split(".")[0] for n in top_level_imports(tree, "HeadCTMoLRELib.slicer")}
    assert names <= set(sys.stdlib_module_names), names


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
