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

__all__ = ["show_in_slice_views", "render_axial_snapshot", "render_axial_rgba", "render_annotated_snapshot",
           "DEFAULT_OPACITY"]

DEFAULT_OPACITY = 0.35
SNAPSHOT_LAYOUT_NAME = "HeadCTMoLRESnapshot"
ATTENTION_UNITS = "weight per slice, sum 1"


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


def _with_axial_view(scene, nodes, ras_s: float, size, opacity: float, label_outline: bool, show_experts: bool,
                     use):
    """Set up a temporary axial slice view at RAS S = ``ras_s`` and call ``use(slice_logic)``; the view's
    own nodes are removed afterwards, so the scene (and a later .mrb) is unchanged."""
    logics = slicer_app.scene_logics(scene)
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
        return use(slice_logic)
    finally:
        slice_logic.SetMRMLScene(None)
        for node in (slice_node, composite):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)


def render_axial_snapshot(scene, nodes, ras_s: float, path: str | os.PathLike, *, size: tuple[int, int] = (512, 512),
                          opacity: float = DEFAULT_OPACITY, label_outline: bool = True,
                          show_experts: bool = True) -> Path:
    """Write a PNG of the axial slice at RAS S = ``ras_s`` mm with the overlays of ``nodes`` (no annotations).

    size: (width, height) pixels; the view is fitted to the CT so the whole head is visible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(slice_logic):
        writer = vtk.vtkPNGWriter()
        writer.SetInputConnection(slice_logic.GetImageDataConnection())
        writer.SetFileName(str(path))
        writer.Write()

    _with_axial_view(scene, nodes, ras_s, size, opacity, label_outline, show_experts, write)
    if not path.is_file():
        raise OSError(f"could not write the snapshot {path}; check that the folder is writable.")
    return path


def render_axial_rgba(scene, nodes, ras_s: float, *, size: tuple[int, int] = (512, 512),
                      opacity: float = DEFAULT_OPACITY, label_outline: bool = True, show_experts: bool = True):
    """The composited axial slice at RAS S = ``ras_s`` as ((H, W, 4) uint8 RGBA with row 0 at the TOP,
    field of view width in mm). Radiological convention: patient right on the image's left, anterior up."""
    from vtk.util.numpy_support import vtk_to_numpy

    def grab(slice_logic):
        slice_logic.GetImageDataConnection().GetProducer().Update()
        image = slice_logic.GetImageDataConnection().GetProducer().GetOutputDataObject(0)
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        fov = float(slice_logic.GetSliceNode().GetFieldOfView()[0])
        return pixels[::-1].copy(), fov  # VTK rows go bottom-up

    return _with_axial_view(scene, nodes, ras_s, size, opacity, label_outline, show_experts, grab)


def _overlay_scale(node, value: float | None):
    """The attention overlay's colour scale as drawn: colours over the display's window (min..max)."""
    import numpy as np

    from .snapshot_legend import ColorScale

    display = node.GetDisplayNode() if node is not None else None
    color_node = display.GetColorNode() if display is not None else None
    if color_node is None:
        return None
    colors = color_node.GetScalarsToColors()
    low_t, high_t = colors.GetRange()
    samples = np.array([colors.GetColor(low_t + (high_t - low_t) * i / 255.0) for i in range(256)])
    return ColorScale(name="attention", units=ATTENTION_UNITS, low=float(display.GetWindowLevelMin()),
                      high=float(display.GetWindowLevelMax()), colors=samples, value=value)


def _expert_entries(color_node) -> list:
    if color_node is None:
        return []
    entries = []
    for index in range(1, color_node.GetNumberOfColors()):
        rgba = [0.0, 0.0, 0.0, 0.0]
        color_node.GetColor(index, rgba)
        entries.append((color_node.GetColorName(index), tuple(rgba[:3])))
    return entries


def render_annotated_snapshot(scene, nodes, ras_s: float, path: str | os.PathLike, *, title: str,
                              status_label: str = "", size: tuple[int, int] = (512, 512),
                              opacity: float = DEFAULT_OPACITY) -> Path:
    """A PNG a reader understands at a glance: the axial slice at RAS S = ``ras_s`` mm with the attention
    overlay and expert outlines, plus ``title`` (finding and probability), the slice position in mm, L/R and
    A/P markers, the attention colour bar with its units and this slice's value, the expert legend with
    the colour table's names, and ``status_label`` (see snapshot_legend)."""
    import numpy as np

    from .snapshot_legend import SnapshotLegend, annotate_axial_snapshot
    from .mrml_geometry import lps_to_ras

    rgba, fov = render_axial_rgba(scene, nodes, ras_s, size=size, opacity=opacity)
    value, expert = None, None
    prediction = nodes.prediction
    if prediction is not None and len(prediction.slice_valid):
        positions = lps_to_ras(np.asarray(prediction.slice_positions_mm))[:, 2]
        valid = np.asarray(prediction.slice_valid, dtype=bool)
        nearest = int(np.argmin(np.where(valid, np.abs(positions - ras_s), np.inf)))
        if prediction.attention is not None:
            value = float(prediction.attention[nearest])
        dominant = prediction.dominant_expert
        if dominant is not None and len(dominant) == len(valid) and dominant[nearest] >= 0:
            expert = int(dominant[nearest]) + 1
    legend = SnapshotLegend(title=title, slice_s_mm=float(ras_s), scale=_overlay_scale(nodes.attention, value),
                            experts=_expert_entries(nodes.expert_colors), slice_expert=expert,
                            status_label=status_label, field_of_view_mm=fov)
    return annotate_axial_snapshot(rgba, path, legend)


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
