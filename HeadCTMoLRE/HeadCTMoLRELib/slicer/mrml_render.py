"""Slice views of a shown prediction: layer set-up and offscreen axial PNG snapshots (no OpenGL, no Qt).

A ``vtkMRMLSliceLogic`` composites background (CT), foreground (attention, with opacity) and label
(experts, outlined or filled) layers into an RGBA image in the slice view's own pixel frame, which
``vtkPNGWriter`` saves. Axial views use Slicer's radiological convention: patient right on the image's
left, anterior at the top.
"""

from __future__ import annotations

import os
from pathlib import Path

import vtk

from . import app as slicer_app

__all__ = ["show_in_slice_views", "render_axial_snapshot", "DEFAULT_OPACITY"]

DEFAULT_OPACITY = 0.35
SNAPSHOT_LAYOUT_NAME = "HeadCTMoLRESnapshot"


def _layer_ids(nodes):
    def node_id(node):
        return node.GetID() if node is not None else None

    return node_id(nodes.ct), node_id(nodes.attention), node_id(nodes.experts)


def _set_composite(composite, nodes, opacity: float) -> None:
    background, foreground, label = _layer_ids(nodes)
    composite.SetBackgroundVolumeID(background)
    composite.SetForegroundVolumeID(foreground)
    composite.SetForegroundOpacity(opacity)
    composite.SetLabelVolumeID(label)
    composite.SetLabelOpacity(1.0)


def show_in_slice_views(scene, nodes, opacity: float = DEFAULT_OPACITY) -> int:
    """Put CT / attention / experts into every slice view's background / foreground / label layers.

    Returns the number of views set up (0 in a bare slicer-core scene that has no views yet).
    """
    count = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(count):
        _set_composite(scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode"), nodes, opacity)
    return count


def render_axial_snapshot(scene, nodes, ras_s: float, path: str | os.PathLike, *, size: tuple[int, int] = (512, 512),
                          opacity: float = DEFAULT_OPACITY, label_outline: bool = True,
                          show_experts: bool = True) -> Path:
    """Write a PNG of the axial slice at RAS S = ``ras_s`` mm with the overlays of ``nodes``.

    size: (width, height) pixels; the view is fitted to the CT so the whole head is visible. The slice
    view's own nodes are removed afterwards, so the scene (and a later .mrb) is unchanged.
    """
    logics = slicer_app.scene_logics(scene)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    slice_logic = _new_slice_logic(scene, logics.app_logic)
    slice_node = slice_logic.GetSliceNode()
    composite = slice_logic.GetSliceCompositeNode()
    try:
        slice_node.SetOrientation("Axial")
        slice_node.SetDimensions(int(size[0]), int(size[1]), 1)
        slice_node.SetUseLabelOutline(bool(label_outline))
        _set_composite(composite, nodes, opacity)
        if not show_experts:
            composite.SetLabelVolumeID(None)
        slice_logic.FitSliceToAll()
        slice_logic.SetSliceOffset(float(ras_s))
        writer = vtk.vtkPNGWriter()
        writer.SetInputConnection(slice_logic.GetImageDataConnection())
        writer.SetFileName(str(path))
        writer.Write()
    finally:
        slice_logic.SetMRMLScene(None)
        for node in (slice_node, composite):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
    if not path.is_file():
        raise OSError(f"could not write the snapshot {path}; check that the folder is writable.")
    return path


def _new_slice_logic(scene, app_logic):
    import slicer

    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(app_logic)
    slice_logic.SetMRMLScene(scene)
    taken = {scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetLayoutName()
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))}
    layout, index = SNAPSHOT_LAYOUT_NAME, 1
    while layout in taken:
        index += 1
        layout = f"{SNAPSHOT_LAYOUT_NAME}{index}"
    slice_logic.AddSliceNode(layout)
    return slice_logic
