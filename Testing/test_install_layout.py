"""The extension as CMake installs it: only the files HeadCTMoLRE/CMakeLists.txt lists, in the folders
slicerMacroBuildScriptedModule puts them (<qt-scripted-modules>/HeadCTMoLRE.py, .../HeadCTMoLRELib/...,
.../Resources/...). A file missing from the lists, or code that finds its data through the source tree,
fails here before a user's installed extension does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from test_module_static import MODULE_CMAKE, MODULE_DIR, REPO, cmake_list


def install_like_cmake(destination: Path) -> Path:
    """Copy the listed scripts and resources as `make install` does; returns <qt-scripted-modules>."""
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", {"MODULE_NAME": "HeadCTMoLRE"})
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", {"MODULE_NAME": "HeadCTMoLRE"})
    modules = destination / "qt-scripted-modules"
    for relative in scripts:
        (modules / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODULE_DIR / relative, modules / relative)
    for relative in resources:
        (modules / "Resources" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "Resources" / relative, modules / "Resources" / relative)
    return modules


CHECK = r"""
import importlib, pkgutil, sys
from pathlib import Path
import HeadCTMoLRELib
root = Path(HeadCTMoLRELib.__file__).resolve().parent
assert root.parent == Path(sys.argv[1]).resolve(), root
names = [m.name for m in pkgutil.walk_packages([str(root)], "HeadCTMoLRELib.")]
for name in names:
    importlib.import_module(name)
from HeadCTMoLRELib import findings, resources
from HeadCTMoLRELib.model import bundle
from HeadCTMoLRELib.slicer import worker
assert resources.resources_dir().resolve() == root.parent / "Resources", resources.resources_dir()
assert len(findings.default_catalog()) == 75
assert worker.library_parent() == root.parent, worker.library_parent()
assert resources.default_sample_path().is_file()
manifest = bundle.read_manifest(resources.resource_path("Models", "demo"))
bundle.verify_files(resources.resource_path("Models", "demo"), manifest)
print(len(names), "modules")
"""


def test_installed_extension_imports_every_module_and_finds_its_resources(tmp_path):
    modules = install_like_cmake(tmp_path)
    result = subprocess.run([sys.executable, "-c", CHECK, str(modules)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={"PYTHONPATH": str(modules), "PATH": "",
                                                            "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    on_disk = len([p for p in (MODULE_DIR / "HeadCTMoLRELib").rglob("*.py") if p.name != "__init__.py"])
    assert int(result.stdout.split()[0]) >= on_disk
