"""A Prediction -> MRML nodes: what the Slicer module shows, built without Qt.

``show_prediction(scene, prediction)`` creates, on the CT's own grid (same size, spacing, origin and
direction; see ``mrml_geometry``):

* ``attention``: scalar volume, each voxel = the attention weight of its head-frame slice (0 outside the
  head, which the display thresholds away so only the head is tinted), heat colours;
* ``experts``: label map, each voxel = 1 + the router's dominant expert of its slice (0 = none), with
  ``expert_colors``: a colour table "Expert 1" .. "Expert K" in distinct colours;
* ``findings_table``: one row per finding sorted by probability: finding, id, category, probability,
  threshold, flag ("positive" when probability >= threshold);
* ``plot_chart`` over ``plot_table``: attention and each expert's router weight against the slice
  position (RAS S, mm) of the valid slices;
* ``contribution``: the selected finding's per-slice logit contribution (``select_finding``).

All of them go into a subject-hierarchy folder "HeadCTMoLRE <name>" under the CT's study (or at the top
level), so they are listed together and saved with the scene (``save_scene_mrb``). Nodes carry the
attributes ``HeadCTMoLRE.role`` and ``HeadCTMoLRE.run`` so ``find_prediction_nodes`` finds them again after
a scene is reloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from . import app as slicer_app
from .mrml_geometry import (ct_volume_from_node, image_from_volume_node, lps_to_ras,  # noqa: F401 (re-exported)
                            volume_node_from_image)
from .mrml_render import render_axial_snapshot, show_in_slice_views  # noqa: F401 (re-exported)

__all__ = ["PredictionNodes", "show_prediction", "select_finding", "set_overlay_opacity", "set_expert_display",
           "save_scene_mrb", "load_scene_mrb", "find_prediction_nodes", "expert_palette", "volume_node_from_image",
           "image_from_volume_node", "ct_volume_from_node", "render_axial_snapshot", "show_in_slice_views"]

ROLE = "HeadCTMoLRE.role"
RUN = "HeadCTMoLRE.run"
SELECTED_FINDING = "HeadCTMoLRE.selectedFinding"
HEAT_COLOR_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLPETProceduralColorNodePET-Heat",
                  "vtkMRMLColorTableNodeIron")
DIVERGING_COLOR_IDS = ("vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodefMRI",
                       "vtkMRMLColorTableNodeRainbow")
BRAIN_WINDOW_HU = (80.0, 40.0)  # window, level
TABLE_COLUMNS = ("finding", "id", "category", "probability", "threshold", "flag")
SLICE_POSITION_COLUMN = "slice_position_mm"
ATTENTION_COLUMN = "attention"

# Distinct, colour-blind-friendly hues (Okabe-Ito first, then Tableau), RGB 0..1.
_PALETTE = ((0.90, 0.62, 0.00), (0.34, 0.71, 0.91), (0.00, 0.62, 0.45), (0.94, 0.89, 0.26),
            (0.00, 0.45, 0.70), (0.84, 0.37, 0.00), (0.80, 0.47, 0.65), (0.58, 0.40, 0.74),
            (0.55, 0.34, 0.29), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81))


@dataclass
class PredictionNodes:
    """References to the nodes of one shown prediction (any may be None when not applicable).

    ``folder_item``: subject-hierarchy item id of the "HeadCTMoLRE <name>" folder. ``prediction``: the
    inference.Prediction shown (needed by ``select_finding``; None after a scene reload).
    """

    ct: Any = None
    attention: Any = None
    experts: Any = None
    expert_colors: Any = None
    findings_table: Any = None
    plot_table: Any = None
    plot_chart: Any = None
    plot_series: list = field(default_factory=list)
    contribution: Any = None
    folder_item: int = 0
    name: str = ""
    prediction: Any = field(default=None, repr=False)

    def nodes(self) -> list:
        """Every node of this result (not the CT), for saving or removal."""
        out = [self.attention, self.experts, self.expert_colors, self.findings_table, self.plot_table,
               self.plot_chart, self.contribution, *self.plot_series]
        return [n for n in out if n is not None]


def expert_palette(num_experts: int) -> list[tuple[float, float, float]]:
    """``num_experts`` distinct RGB colours (0..1); cycles with darker shades past the base palette."""
    colours = []
    for index in range(num_experts):
        base = np.asarray(_PALETTE[index % len(_PALETTE)])
        shade = 0.7 ** (index // len(_PALETTE))
        colours.append(tuple(float(c) for c in base * shade))
    return colours


# ------------------------------------------------------------------------------------------- helpers
def _first_color_id(scene, candidates) -> str | None:
    return next((cid for cid in candidates if scene.GetNodeByID(cid) is not None), None)


def _tag(node, role: str, run: str):
    node.SetAttribute(ROLE, role)
    node.SetAttribute(RUN, run)
    return node


def _unique_run_name(scene, base: str) -> str:
    taken = {scene.GetNthNode(i).GetAttribute(RUN) for i in range(scene.GetNumberOfNodes())}
    name, index = base, 2
    while name in taken:
        name, index = f"{base} ({index})", index + 1
    return name


def _num_experts(prediction) -> int:
    router = getattr(prediction, "router_weights", None)
    return 0 if router is None else int(np.asarray(router).shape[-1])


# ------------------------------------------------------------------------------------------ overlays
def _valid_attention(prediction) -> np.ndarray:
    if prediction.attention is None:
        return np.zeros(0)
    return np.asarray(prediction.attention, dtype=np.float64)[np.asarray(prediction.slice_valid, dtype=bool)]


def _attention_node(scene, prediction, name: str):
    image = prediction.attention_image()
    node = volume_node_from_image(scene, image, f"{name} attention")
    display = node.GetDisplayNode()
    color_id = _first_color_id(scene, HEAT_COLOR_IDS)
    if color_id:
        display.SetAndObserveColorNodeID(color_id)
    weights = _valid_attention(prediction)
    peak = float(weights.max()) if weights.size and weights.max() > 0 else 1.0
    low = float(weights.min()) if weights.size else 0.0
    low = low if low < peak * 0.999 else 0.0
    display.AutoWindowLevelOff()
    # the colour scale spans the head's slices; the peak maps to orange, not to the scale's white end
    display.SetWindowLevelMinMax(low, low + (peak - low) / 0.6)
    # voxels outside the head are exactly 0: below the lower threshold -> transparent in slice views
    display.SetThreshold(peak * 1e-3, peak * 10.0)
    display.ApplyThresholdOn()
    display.SetInterpolate(False)
    return node


def _expert_colors_node(scene, num_experts: int, name: str):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} expert colors")
    table.SetTypeToUser()
    table.SetNumberOfColors(num_experts + 1)
    table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for index, (r, g, b) in enumerate(expert_palette(num_experts), start=1):
        table.SetColor(index, f"Expert {index}", r, g, b, 1.0)
    table.SetAttribute("Category", "HeadCTMoLRE")
    return table


def _experts_node(scene, prediction, name: str, colors):
    node = volume_node_from_image(scene, prediction.expert_image(), f"{name} experts", labelmap=True)
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return node


def _contribution_node(scene, prediction, finding_id: str, name: str, node=None):
    image = prediction.contribution_image(finding_id)
    node = volume_node_from_image(scene, image, f"{name} contribution", node=node)
    values = prediction.contributions[:, prediction.catalog.index_of(finding_id)]
    extent = float(np.max(np.abs(values))) if values.size else 0.0
    extent = extent if extent > 0 else 1.0
    display = node.GetDisplayNode()
    color_id = _first_color_id(scene, DIVERGING_COLOR_IDS)
    if color_id:
        display.SetAndObserveColorNodeID(color_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(-extent, extent)
    node.SetAttribute(SELECTED_FINDING, finding_id)
    return node


# ------------------------------------------------------------------------------------------ tables
def _column(name: str, values, numeric: bool = False):
    """A named table column: vtkDoubleArray of floats when ``numeric``, else vtkStringArray of text."""
    column = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(float(value) if numeric else str(value))
    return column


def findings_rows(prediction) -> list[dict]:
    """Findings sorted by probability (highest first) as table rows: finding, id, category, probability,
    threshold, flag ("positive" or "")."""
    rows = sorted(prediction.findings(), key=lambda f: f["probability"], reverse=True)
    return [{"finding": f["name"], "id": f["id"], "category": f["category"], "probability": f["probability"],
             "threshold": f["threshold"], "flag": "positive" if f["positive"] else ""} for f in rows]


def _findings_table_node(scene, prediction, name: str):
    rows = findings_rows(prediction)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} findings")
    for column in ("finding", "id", "category"):
        table.AddColumn(_column(column, [r[column] for r in rows]))
    for column in ("probability", "threshold"):
        table.AddColumn(_column(column, [r[column] for r in rows], numeric=True))
    table.AddColumn(_column("flag", [r["flag"] for r in rows]))
    table.SetUseColumnTitleAsColumnHeader(True)
    table.SetColumnDescription("probability", "model probability (0-1)")
    table.SetColumnDescription("threshold", "decision threshold of the model bundle")
    table.SetLocked(True)
    return table


def slice_curves(prediction) -> dict[str, np.ndarray]:
    """Per valid slice, ordered inferior -> superior: slice_position_mm (RAS S, mm), attention and
    expert_1..expert_K router weights (when the model has per-slice routing)."""
    valid = np.asarray(prediction.slice_valid, dtype=bool)
    positions = lps_to_ras(np.asarray(prediction.slice_positions_mm))[:, 2]
    order = np.argsort(positions[valid])
    curves = {SLICE_POSITION_COLUMN: positions[valid][order]}
    if prediction.attention is not None:
        curves[ATTENTION_COLUMN] = np.asarray(prediction.attention, dtype=np.float64)[valid][order]
    router = prediction.router_weights
    if router is not None and np.asarray(router).shape[0] == len(valid):
        weights = np.asarray(router, dtype=np.float64)[valid][order]
        for expert in range(weights.shape[1]):
            curves[f"expert_{expert + 1}"] = weights[:, expert]
    return curves


def _plot_nodes(scene, prediction, name: str, run: str):
    curves = slice_curves(prediction)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} slice weights")
    for column, values in curves.items():
        table.AddColumn(_column(column, values, numeric=True))
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} slice plot")
    chart.SetTitle("Attention and expert weights per slice")
    chart.SetXAxisTitle("Slice position S (mm)")
    chart.SetYAxisTitle("Weight")
    colours = {ATTENTION_COLUMN: (0.85, 0.1, 0.1)}
    colours.update({f"expert_{i + 1}": c for i, c in enumerate(expert_palette(len(curves)))})
    series_nodes = []
    for column in curves:
        if column == SLICE_POSITION_COLUMN:
            continue
        title = "Attention" if column == ATTENTION_COLUMN else column.replace("_", " ").capitalize()
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {title}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(SLICE_POSITION_COLUMN)
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if column == ATTENTION_COLUMN
                              else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetLineWidth(3 if column == ATTENTION_COLUMN else 2)
        series.SetColor(*colours[column])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series_nodes.append(_tag(series, "plot_series", run))
    return _tag(table, "plot_table", run), _tag(chart, "plot_chart", run), series_nodes


# ------------------------------------------------------------------------------------ subject hierarchy
def _results_folder(scene, ct_node, name: str) -> int:
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    scene_item = hierarchy.GetSceneItemID()
    ct_item = hierarchy.GetItemByDataNode(ct_node)
    parent = hierarchy.GetItemParent(ct_item) if ct_item else scene_item
    parent = parent or scene_item
    return hierarchy.CreateFolderItem(parent, f"HeadCTMoLRE {name}")


def _place_in_folder(scene, folder: int, nodes) -> None:
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, folder)
        else:  # slicer-core has no Qt plugin logic that adds items for new nodes
            hierarchy.CreateItem(folder, node)


# ------------------------------------------------------------------------------------------ public API
def show_prediction(scene, prediction, *, ct_node=None, name: str | None = None,
                    threshold_filter=None, finding_id: str | None = None) -> PredictionNodes:
    """Create the nodes of one prediction in ``scene`` and show them in the scene's slice views.

    prediction: inference.Prediction (or anything with its maps and arrays). ct_node: the input volume
    node (its grid must be the prediction's input grid); None creates one from ``prediction.volume.image``
    with a brain window. name: prefix of the node names (default: the CT node's name).
    threshold_filter: optional callable(row dict) -> bool keeping only some findings in the table
    (None keeps all 75). finding_id: finding whose contribution map is shown first (default: the most
    probable). Returns PredictionNodes.
    """
    slicer_app.scene_logics(scene)
    created_ct = ct_node is None
    if created_ct:
        source = getattr(prediction.volume, "provenance", {}) or {}
        ct_name = name or Path(str((source.get("source_paths") or ["CT"])[0])).name.split(".")[0] or "CT"
        ct_node = volume_node_from_image(scene, prediction.volume.image, ct_name)
        ct_node.GetDisplayNode().AutoWindowLevelOff()
        ct_node.GetDisplayNode().SetWindowLevel(*BRAIN_WINDOW_HU)
    base = name or ct_node.GetName()
    run = _unique_run_name(scene, base)
    nodes = PredictionNodes(ct=ct_node, name=run, prediction=prediction)
    nodes.attention = _tag(_attention_node(scene, prediction, run), "attention", run)
    experts = _num_experts(prediction)
    if experts and prediction.dominant_expert is not None:
        nodes.expert_colors = _tag(_expert_colors_node(scene, experts, run), "expert_colors", run)
        nodes.experts = _tag(_experts_node(scene, prediction, run, nodes.expert_colors), "experts", run)
    nodes.findings_table = _tag(_findings_table_node(scene, prediction, run), "findings_table", run)
    if threshold_filter is not None:
        _filter_table_rows(nodes.findings_table, threshold_filter)
    nodes.plot_table, nodes.plot_chart, nodes.plot_series = _plot_nodes(scene, prediction, run, run)
    first = finding_id or findings_rows(prediction)[0]["id"]
    nodes.contribution = _tag(_contribution_node(scene, prediction, first, run), "contribution", run)
    nodes.contribution.GetDisplayNode().SetVisibility(False)
    _tag(ct_node, ct_node.GetAttribute(ROLE) or "ct", ct_node.GetAttribute(RUN) or run)
    nodes.folder_item = _results_folder(scene, ct_node, run)
    _place_in_folder(scene, nodes.folder_item, nodes.nodes() + ([ct_node] if created_ct else []))
    _store_summary(nodes, prediction)
    show_in_slice_views(scene, nodes)
    return nodes


def _filter_table_rows(table, keep) -> None:
    data = table.GetTable()
    for row in reversed(range(data.GetNumberOfRows())):
        values = {data.GetColumnName(c): data.GetValue(row, c).ToString() for c in range(data.GetNumberOfColumns())}
        values["probability"] = float(values["probability"])
        values["threshold"] = float(values["threshold"])
        if not keep(values):
            data.RemoveRow(row)
    table.Modified()


def _store_summary(nodes: PredictionNodes, prediction) -> None:
    """Facts a reloaded scene still needs: top slice (RAS S) of each finding, provenance (JSON attribute)."""
    top = {f["id"]: float(lps_to_ras(f["top_slice_position_mm"])[2]) for f in prediction.findings()}
    nodes.findings_table.SetAttribute("HeadCTMoLRE.topSliceS", json.dumps(top))
    provenance = getattr(prediction, "provenance", {}) or {}
    nodes.findings_table.SetAttribute("HeadCTMoLRE.model", str((provenance.get("bundle") or {}).get("name", "")))
    nodes.findings_table.SetAttribute("HeadCTMoLRE.warnings", json.dumps(list(getattr(prediction, "warnings", []))))


def select_finding(scene, nodes: PredictionNodes, finding_id: str) -> float:
    """Show ``finding_id``'s per-slice contribution map and return the RAS S (mm) of the slice that
    contributed most to it, for the slice views to jump to.

    Needs ``nodes.prediction`` for the map; after a scene reload (no prediction) only the position is
    returned, from the table's stored top slices. Raises KeyError for an unknown finding id.
    """
    if nodes.prediction is not None:
        row = next((f for f in nodes.prediction.findings() if f["id"] == finding_id), None)
        if row is None:
            raise KeyError(f"unknown finding id {finding_id!r}; the model's catalog has no such finding.")
        nodes.contribution = _tag(_contribution_node(scene, nodes.prediction, finding_id, nodes.name,
                                                     node=nodes.contribution), "contribution", nodes.name)
        nodes.contribution.GetDisplayNode().SetVisibility(True)
        return float(lps_to_ras(row["top_slice_position_mm"])[2])
    top = json.loads(nodes.findings_table.GetAttribute("HeadCTMoLRE.topSliceS") or "{}")
    if finding_id not in top:
        raise KeyError(f"unknown finding id {finding_id!r}; the model's catalog has no such finding.")
    return float(top[finding_id])


def set_overlay_opacity(scene, nodes: PredictionNodes, opacity: float) -> None:
    """Opacity (0..1) of the attention overlay in every slice view (the composite nodes' foreground)."""
    opacity = float(min(max(opacity, 0.0), 1.0))
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == (nodes.attention.GetID() if nodes.attention else None):
            composite.SetForegroundOpacity(opacity)
    if nodes.attention is not None:
        nodes.attention.SetAttribute("HeadCTMoLRE.opacity", f"{opacity:g}")


def set_expert_display(scene, nodes: PredictionNodes, mode: str) -> None:
    """Draw the expert label map as "outline" or "fill" in every slice view."""
    if mode not in ("outline", "fill"):
        raise ValueError(f"expert display must be 'outline' or 'fill', got {mode!r}.")
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        scene.GetNthNodeByClass(index, "vtkMRMLSliceNode").SetUseLabelOutline(mode == "outline")
    if nodes.experts is not None:
        nodes.experts.SetAttribute("HeadCTMoLRE.expertDisplay", mode)


def save_scene_mrb(scene, path: str | os.PathLike) -> Path:
    """Write the scene (CT, overlays, colour table, tables, plot, hierarchy) as one ``.mrb`` file."""
    return slicer_app.save_mrb(scene, path)


def load_scene_mrb(path: str | os.PathLike, scene=None):
    """Read a ``.mrb`` into ``scene`` (new when None; cleared first); returns the scene."""
    return slicer_app.load_mrb(path, scene)


def find_prediction_nodes(scene, run: str | None = None) -> PredictionNodes:
    """The nodes of a shown prediction found by their attributes (e.g. after loading a saved scene).

    run: the result name (``PredictionNodes.name``); None takes the first found. Raises LookupError when
    the scene holds no HeadCTMoLRE result.
    """
    found: dict[str, Any] = {}
    series = []
    runs = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        role, node_run = node.GetAttribute(ROLE), node.GetAttribute(RUN)
        if not role or not node_run:
            continue
        if role != "ct" and node_run not in runs:
            runs.append(node_run)
        if run is not None and node_run != run:
            continue
        if role == "plot_series":
            series.append(node)
        else:
            found.setdefault((node_run, role), node)
    if not runs:
        raise LookupError("the scene holds no HeadCTMoLRE result (no nodes with a HeadCTMoLRE.role attribute).")
    run = run or runs[0]
    known = {f.name for f in fields(PredictionNodes)}
    nodes = PredictionNodes(name=run, plot_series=[s for s in series if s.GetAttribute(RUN) == run])
    for (node_run, role), node in found.items():
        if node_run == run and role in known:
            setattr(nodes, role, node)
    if nodes.ct is None:
        ct = next((n for (r, role), n in found.items() if role == "ct"), None)
        nodes.ct = ct
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if nodes.attention is not None:
        nodes.folder_item = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(nodes.attention))
    return nodes
