"""The Slicer logics a scene needs, set up without Qt (slicer-core) or taken from the running application.

Inside the desktop application (``slicer.app`` exists) the scene already has an application logic, default
colour nodes, slice-orientation presets and an IO manager, and ``scene_logics`` hands those back. With
plain Python and the ``slicer-core`` wheel nothing of that exists, so ``scene_logics`` creates, once per
scene: a ``vtkSlicerApplicationLogic`` with its colour logic and default colour nodes (Grey, PET-Heat,
fMRI, ...), the slice-orientation presets (radiological: patient right on screen left), and the remote
IO + data IO manager pair that ``.mrb`` reading needs ("cannot retrieve remote cache directory from
DataIOManager" otherwise).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer
import vtk

__all__ = ["SceneLogics", "scene_logics", "default_scene", "in_slicer_application", "load_mrb", "save_mrb"]


def in_slicer_application() -> bool:
    """True inside the desktop Slicer (or Slicer's Python with an application object)."""
    return getattr(slicer, "app", None) is not None and hasattr(slicer.app, "applicationLogic")


@dataclass
class SceneLogics:
    """Logics attached to one scene. ``owned``: created here (slicer-core) rather than by the application."""

    scene: Any
    app_logic: Any
    owned: bool
    keep_alive: list = field(default_factory=list)  # VTK objects that must outlive this call
    cache_dir: Any = None


_STRONG: dict[int, SceneLogics] = {}


def default_scene():
    """``slicer.mrmlScene`` when it exists (desktop Slicer, or set by a caller), else a new scene set as it."""
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = scene
    return scene


def scene_logics(scene) -> SceneLogics:
    """The application logic (and friends) for ``scene``; created once per scene when Slicer's Qt is absent."""
    key = id(scene)
    found = _STRONG.get(key)
    if found is not None and found.scene is scene:
        return found
    if in_slicer_application() and scene is getattr(slicer, "mrmlScene", None):
        logics = SceneLogics(scene=scene, app_logic=slicer.app.applicationLogic(), owned=False)
    else:
        logics = _create_logics(scene)
    _STRONG[key] = logics
    return logics


def _create_logics(scene) -> SceneLogics:
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        color_logic.AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    if scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 0:
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)

    cache_dir = tempfile.TemporaryDirectory(prefix="headct-slicer-cache-")
    remote_io = slicer.vtkMRMLRemoteIOLogic()
    remote_io.SetMRMLScene(scene)
    remote_io.SetMRMLApplicationLogic(app_logic)
    remote_io.GetCacheManager().SetRemoteCacheDirectory(cache_dir.name)
    data_io = slicer.vtkDataIOManagerLogic()
    data_io.SetMRMLScene(scene)
    data_io.SetMRMLApplicationLogic(app_logic)
    data_io.SetAndObserveDataIOManager(remote_io.GetDataIOManager())
    remote_io.AddDataIOToScene()

    subject_hierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subject_hierarchy.SetMRMLScene(scene)
    subject_hierarchy.SetMRMLApplicationLogic(app_logic)
    return SceneLogics(scene=scene, app_logic=app_logic, owned=True,
                       keep_alive=[color_logic, remote_io, data_io, subject_hierarchy], cache_dir=cache_dir)


def release(scene) -> None:
    """Forget the logics created for ``scene`` (tests that make many scenes call this)."""
    _STRONG.pop(id(scene), None)


def save_mrb(scene, path: str | os.PathLike) -> Path:
    """Write the whole scene with its data (volumes, tables, colour tables, plots) as one ``.mrb`` file."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    scene_logics(scene)
    if not scene.WriteToMRB(str(path)):
        raise OSError(f"Slicer could not write the scene to {path}; check that the folder is writable "
                      "and has free space.")
    return path


def load_mrb(path: str | os.PathLike, scene=None, *, clear: bool = True):
    """Read a ``.mrb`` scene into ``scene`` (a new one when None); returns the scene.

    Inside the desktop application this is ``slicer.util.loadScene``; with slicer-core the remote IO and
    data IO manager logics are attached first. Raises OSError naming the file when reading fails.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise OSError(f"{path}: no such scene file.")
    if not zipfile.is_zipfile(path):
        raise OSError(f"{path}: not a Slicer .mrb scene (not a zip archive); the file is corrupt.")
    scene = scene if scene is not None else slicer.vtkMRMLScene()
    logics = scene_logics(scene)
    if not logics.owned:
        slicer.util.loadScene(str(path), {"clear": clear})
        return scene
    if not scene.ReadFromMRB(str(path), clear):
        raise OSError(f"{path}: Slicer could not read the scene (see the messages above); the archive may be "
                      "incomplete.")
    if clear or scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        _restore_defaults(logics)
    return scene


def _restore_defaults(logics: SceneLogics) -> None:
    """Clearing a scene removes the default colour nodes and slice presets; put them back."""
    scene = logics.scene
    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        logics.app_logic.GetColorLogic().AddDefaultColorNodes()
