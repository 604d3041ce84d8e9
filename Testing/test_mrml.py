"""MRML presenters against the real Slicer core (slicer-core): geometry, node classes, tables, plot, .mrb, PNG."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from HeadCTMoLRELib import inference, phantoms as phantom
from HeadCTMoLRELib.slicer import mrml, app as slicer_app  # noqa: E402
from HeadCTMoLRELib.ct.loader import CTInputError, CTVolume  # noqa: E402
from HeadCTMoLRELib.slicer.selftest import _png_has_content, check_prediction_nodes, make_tiny_bundle  # noqa: E402


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    slicer_app.scene_logics(scene)
    yield scene
    slicer_app.release(scene)


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")
    case = phantom.generate_phantom([], seed=5)
    volume = CTVolume(image=sitk.Cast(case.image, sitk.sitkFloat32))
    return inference.predict(volume, bundle, "cpu")


def _oblique_image(direction) -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((12.0, -30.0, 45.0))
    image.SetDirection(direction)
    return image


def _rotation(angle_deg: float) -> tuple:
    a = np.deg2rad(angle_deg)
    return tuple(np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]).ravel())


SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


@pytest.mark.parametrize("direction", [tuple(np.eye(3).ravel()), SAGITTAL, _rotation(18.5)])
def test_voxel_ras_position_is_lps_with_x_y_negated(scene, direction):
    image = _oblique_image(direction)
    node = mrml.volume_node_from_image(scene, image, "grid")
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        ras = ijk_to_ras.MultiplyPoint((*index, 1.0))[:3]
        lps = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-6)
    assert np.array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("direction", [SAGITTAL, _rotation(-12.0)])
def test_image_round_trip_through_node_keeps_geometry_and_voxels(scene, direction):
    image = _oblique_image(direction)
    back = mrml.image_from_volume_node(mrml.volume_node_from_image(scene, image, "grid"))
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    assert np.allclose(back.GetOrigin(), image.GetOrigin()) and np.allclose(back.GetSpacing(), image.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_linear_parent_transform_is_applied_to_the_geometry(scene):
    import vtk

    image = _oblique_image(tuple(np.eye(3).ravel()))
    node = mrml.volume_node_from_image(scene, image, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # +10 mm towards R = -10 mm in LPS x
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    back = mrml.image_from_volume_node(node)
    assert np.allclose(back.GetOrigin(), np.add(image.GetOrigin(), (-10.0, 0.0, 0.0)))


def test_ct_volume_from_node_refuses_non_hu_values_like_files(scene):
    image = sitk.GetImageFromArray(np.full((40, 64, 64), 1060, np.int16))
    image.SetSpacing((1.0, 1.0, 4.0))
    node = mrml.volume_node_from_image(scene, image, "raw numbers")
    with pytest.raises(CTInputError, match="raw numbers"):
        mrml.ct_volume_from_node(node)


def test_show_prediction_creates_named_nodes_on_the_ct_grid(scene, prediction):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    check_prediction_nodes(nodes, len(prediction.catalog))
    assert nodes.attention.GetName() == "case attention" and nodes.experts.GetName() == "case experts"
    assert nodes.attention.GetDisplayNode().GetColorNodeID() in mrml.HEAT_COLOR_IDS
    assert nodes.attention.GetDisplayNode().GetApplyThreshold()
    k = prediction.router_weights.shape[1]
    assert [nodes.expert_colors.GetColorName(i) for i in range(1, k + 1)] == [f"Expert {i}" for i in range(1, k + 1)]
    colours = {tuple(np.round(nodes.expert_colors.GetLookupTable().GetTableValue(i)[:3], 3)) for i in range(1, k + 1)}
    assert len(colours) == k


def test_findings_table_matches_prediction_sorted_with_flags(scene, prediction):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    table = nodes.findings_table
    expected = sorted(prediction.findings(), key=lambda f: f["probability"], reverse=True)
    for row, finding in enumerate(expected):
        assert table.GetCellText(row, 1) == finding["id"] and table.GetCellText(row, 0) == finding["name"]
        assert table.GetTable().GetValue(row, 3).ToDouble() == pytest.approx(finding["probability"])
        assert table.GetCellText(row, 5) == ("positive" if finding["positive"] else "")


def test_plot_series_follow_attention_and_router_weights(scene, prediction):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    valid = prediction.slice_valid
    table = nodes.plot_table.GetTable()
    positions = [table.GetValueByName(r, "slice_position_mm").ToDouble() for r in range(table.GetNumberOfRows())]
    assert table.GetNumberOfRows() == int(valid.sum()) and positions == sorted(positions)
    assert sum(table.GetValueByName(r, "attention").ToDouble() for r in range(table.GetNumberOfRows())) == \
        pytest.approx(float(prediction.attention[valid].sum()), rel=1e-5)
    series = [nodes.plot_chart.GetNthPlotSeriesNode(i) for i in range(nodes.plot_chart.GetNumberOfPlotSeriesNodes())]
    assert [s.GetYColumnName() for s in series] == ["attention"] + [f"expert_{i + 1}" for i in
                                                                    range(prediction.router_weights.shape[1])]
    assert all(s.GetXColumnName() == "slice_position_mm" for s in series)


def test_select_finding_returns_top_contributing_slice_and_updates_map(scene, prediction):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    finding = prediction.catalog.ids[10]
    index = prediction.catalog.index_of(finding)
    top = prediction.top_slice(index)  # the most contributing slice inside the scan
    assert mrml.select_finding(scene, nodes, finding) == pytest.approx(prediction.slice_positions_mm[top, 2])
    assert nodes.contribution.GetAttribute(mrml.SELECTED_FINDING) == finding
    expected = sitk.GetArrayFromImage(prediction.contribution_image(finding))
    assert np.allclose(slicer.util.arrayFromVolume(nodes.contribution), expected)
    with pytest.raises(KeyError):
        mrml.select_finding(scene, nodes, "not_a_finding")


def test_outputs_sit_in_a_subject_hierarchy_folder(scene, prediction):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemName(nodes.folder_item) == "HeadCTMoLRE case"
    for node in nodes.nodes():
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == nodes.folder_item, node.GetName()


def test_mrb_round_trip_keeps_nodes_geometry_and_hierarchy(scene, prediction, tmp_path):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    path = mrml.save_scene_mrb(scene, tmp_path / "case.mrb")
    reloaded = mrml.load_scene_mrb(path)
    again = mrml.find_prediction_nodes(reloaded, "case")
    check_prediction_nodes(again, len(prediction.catalog))
    assert np.allclose(slicer.util.arrayFromVolume(again.attention), slicer.util.arrayFromVolume(nodes.attention))
    assert again.folder_item and again.expert_colors.GetColorName(1) == "Expert 1"


def test_axial_snapshot_shows_the_head_with_overlays(scene, prediction, tmp_path):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    s = float(prediction.slice_positions_mm[np.argmax(np.where(prediction.slice_valid, prediction.attention, 0)), 2])
    slice_nodes_before = scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")
    plain = mrml.render_axial_snapshot(scene, nodes, s, tmp_path / "plain.png", opacity=0.0, show_experts=False)
    overlay = mrml.render_axial_snapshot(scene, nodes, s, tmp_path / "overlay.png")
    assert _png_has_content(plain) and _png_has_content(overlay)
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    def pixels(path):
        reader = vtk.vtkPNGReader()
        reader.SetFileName(str(path))
        reader.Update()
        return vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars())[:, :3].astype(float)

    a, b = pixels(plain), pixels(overlay)
    assert np.abs(a - b).mean() > 1.0  # the overlays change the picture
    assert scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == slice_nodes_before  # render leaves no view nodes


def test_expert_display_and_opacity_controls(scene, prediction):
    nodes = mrml.show_prediction(scene, prediction, name="case")
    mrml.set_expert_display(scene, nodes, "fill")
    assert all(not scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetUseLabelOutline()
               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")))
    mrml.set_overlay_opacity(scene, nodes, 0.8)
    assert nodes.attention.GetAttribute("HeadCTMoLRE.opacity") == "0.8"
    with pytest.raises(ValueError):
        mrml.set_expert_display(scene, nodes, "dotted")
