"""Self-test scenarios shared by the Slicer module's test and pytest: one scenario, two runners.

Each ``scenario_*`` function takes a scene and a work folder, does the whole thing through the public
logic, checks what a user would see and raises AssertionError with a clear message on the first
problem. It returns a dict of facts (which model was used, timings) for the runner to log.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import mrml

DEMO_MODEL_PARTS = ("Models", "demo")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def demo_or_tiny_model(workdir: Path, model_path=None) -> tuple[Path, str]:
    """(bundle folder, which): the given model, the shipped demo model, or a tiny random bundle made here."""
    from ..model import bundle as bundle_lib
    from ..resources import resource_path

    if model_path is not None:
        return Path(model_path), "given"
    demo = Path(resource_path(*DEMO_MODEL_PARTS))
    if (demo / bundle_lib.MANIFEST).is_file():
        return demo, "demo"
    return make_tiny_bundle(workdir / "tiny-random-model"), "tiny random (no demo model in Resources/Models/demo)"


def make_tiny_bundle(out: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny DINOv3-style bundle (32 px slices), made in seconds on a CPU."""
    import torch

    from ..model import backbones, bundle, classifier as model
    from .. import findings
    from ..ct import preprocess

    if (out / bundle.MANIFEST).is_file():
        return out
    torch.manual_seed(seed)
    catalog = findings.default_catalog()
    spec = backbones.BackboneSpec(family="dinov3", size="tiny", image_size=32)
    config = model.ModelConfig(backbone=spec, num_findings=len(catalog), use_molre=True)
    classifier = model.build_classifier(config).eval()
    with torch.no_grad():  # LoRA B and MoLRE experts start at zero: give them values so the maps vary
        for tensor in model.trainable_state_dict(classifier).values():
            if tensor.dtype.is_floating_point:
                tensor.copy_(torch.randn_like(tensor) * 0.05)
    pre = preprocess.PreprocessConfig(image_size=32, alignment="center")
    return bundle.save_bundle(classifier, out, catalog=catalog, preprocessing=pre, name="tiny-random")


def _same_grid(node, reference, what: str) -> None:
    import vtk

    from .mrml_geometry import _numpy_matrix

    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(a)
    reference.GetIJKToRASMatrix(b)
    _check(np.allclose(_numpy_matrix(a), _numpy_matrix(b), atol=1e-4),
           f"{what} geometry (IJKToRAS) differs from the CT's: {_numpy_matrix(a).round(3)} vs {_numpy_matrix(b).round(3)}")
    _check(tuple(node.GetImageData().GetDimensions()) == tuple(reference.GetImageData().GetDimensions()),
           f"{what} has {node.GetImageData().GetDimensions()} voxels, the CT {reference.GetImageData().GetDimensions()}")


def check_prediction_nodes(nodes, num_findings: int) -> None:
    """What the panel and the slice views need: classes, names, geometry, table, colours, plot."""
    _check(nodes.attention is not None and nodes.attention.IsA("vtkMRMLScalarVolumeNode"),
           "no attention volume (vtkMRMLScalarVolumeNode) was created")
    _check(nodes.experts is not None and nodes.experts.IsA("vtkMRMLLabelMapVolumeNode"),
           "no expert label map (vtkMRMLLabelMapVolumeNode) was created")
    _same_grid(nodes.attention, nodes.ct, "attention overlay")
    _same_grid(nodes.experts, nodes.ct, "expert label map")
    colors = nodes.expert_colors
    _check(colors is not None and nodes.experts.GetDisplayNode().GetColorNodeID() == colors.GetID(),
           "the expert label map does not use the expert colour table")
    names = [colors.GetColorName(i) for i in range(1, colors.GetNumberOfColors())]
    _check(names == [f"Expert {i}" for i in range(1, len(names) + 1)] and names,
           f"expert colour names are {names}, expected 'Expert 1' .. 'Expert K'")
    table = nodes.findings_table
    _check(table.GetNumberOfRows() == num_findings, f"findings table has {table.GetNumberOfRows()} rows, "
                                                    f"expected {num_findings}")
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    _check(columns == list(mrml.TABLE_COLUMNS), f"findings table columns are {columns}")
    probabilities = [float(table.GetCellText(r, 3)) for r in range(table.GetNumberOfRows())]
    _check(all(0 <= p <= 1 for p in probabilities), "a probability in the findings table is outside 0..1")
    _check(probabilities == sorted(probabilities, reverse=True), "findings table is not sorted by probability")
    chart = nodes.plot_chart
    num_experts = colors.GetNumberOfColors() - 1
    _check(chart is not None and chart.GetNumberOfPlotSeriesNodes() == 1 + num_experts,
           f"the slice plot should hold one attention series and {num_experts} expert series")
    import slicer

    attention_values = slicer.util.arrayFromVolume(nodes.attention)
    _check(float(attention_values.max()) > 0, "the attention overlay is empty (all zero)")
    _check(float(attention_values.min()) == 0.0, "the attention overlay is not zero outside the head")


def scenario_full_path(scene, workdir, model_path=None) -> dict:
    """Phantom -> volume node -> blocking logic -> nodes checked -> finding selected -> .mrb saved and
    reloaded with everything still there."""
    from .. import phantoms as phantom
    from .logic import HeadCTMoLRECore

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    facts: dict = {}
    model, facts["model"] = demo_or_tiny_model(workdir, model_path)
    case = phantom.generate_phantom(["intraparenchymal_hemorrhage"], seed=3)
    from . import app as slicer_app

    slicer_app.scene_logics(scene)
    ct = mrml.volume_node_from_image(scene, case.image, "HeadCTMoLRE phantom")
    start = time.perf_counter()
    stages = []
    nodes = HeadCTMoLRECore(scene).run(ct, str(model), "cpu", progress=lambda stage, fraction: stages.append(stage))
    facts["run_s"] = round(time.perf_counter() - start, 2)
    _check(stages[0] == "loading model" and stages[-1] == "done", f"progress stages were {stages}")
    catalog_size = nodes.prediction.catalog.__len__()
    check_prediction_nodes(nodes, catalog_size)

    top_id = nodes.findings_table.GetCellText(0, 1)
    ras_s = mrml.select_finding(scene, nodes, top_id)
    bounds = [0.0] * 6
    ct.GetRASBounds(bounds)
    _check(bounds[4] - 1e-3 <= ras_s <= bounds[5] + 1e-3,
           f"select_finding returned S = {ras_s:.1f} mm, outside the CT ({bounds[4]:.1f}..{bounds[5]:.1f} mm)")
    _check(nodes.contribution.GetAttribute(mrml.SELECTED_FINDING) == top_id, "contribution map not updated")

    snapshot = mrml.render_axial_snapshot(scene, nodes, ras_s, workdir / "snapshot.png", size=(256, 256))
    _check(_png_has_content(snapshot), f"snapshot {snapshot} is blank")

    path = mrml.save_scene_mrb(scene, workdir / "scene.mrb")
    reloaded = mrml.load_scene_mrb(path)
    again = mrml.find_prediction_nodes(reloaded)
    _check(again.ct is not None, "the reloaded scene lost the CT")
    check_prediction_nodes(again, catalog_size)
    _check(abs(mrml.select_finding(reloaded, again, top_id) - ras_s) < 1e-3,
           "the reloaded scene does not remember the top slice of the selected finding")
    facts["mrb_bytes"] = path.stat().st_size
    return facts


def _png_has_content(path) -> bool:
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    pixels = vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars())
    return pixels.size > 0 and float(pixels[:, :3].std()) > 5.0


SCENARIOS = {"full_path": scenario_full_path}
