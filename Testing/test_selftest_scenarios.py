"""The Slicer self-test scenarios, run by pytest against slicer-core (the module's test runs the same)."""

from __future__ import annotations

import pytest

slicer = pytest.importorskip("slicer")

from HeadCTMoLRELib.slicer import selftest, app as slicer_app  # noqa: E402


def test_full_path_scenario_passes_on_a_phantom(tmp_path):
    scene = slicer.vtkMRMLScene()
    facts = selftest.scenario_full_path(scene, tmp_path)
    slicer_app.release(scene)
    assert facts["model"] in ("demo", "tiny random (no demo model in Resources/Models/demo)")
    assert facts["mrb_bytes"] > 0 and (tmp_path / "snapshot.png").is_file()


def test_scenario_check_reports_a_broken_overlay(tmp_path):
    scene = slicer.vtkMRMLScene()
    slicer_app.scene_logics(scene)
    from HeadCTMoLRELib import inference, phantoms as phantom
    from HeadCTMoLRELib.slicer import mrml

    bundle = selftest.make_tiny_bundle(tmp_path / "tiny")
    prediction = inference.predict(_volume(phantom.generate_phantom([], seed=4)), bundle, "cpu")
    nodes = mrml.show_prediction(scene, prediction, name="case")
    nodes.attention.SetSpacing(2.0, 2.0, 2.0)  # geometry no longer that of the CT
    with pytest.raises(AssertionError, match="attention overlay geometry"):
        selftest.check_prediction_nodes(nodes, len(prediction.catalog))


def _volume(case):
    import SimpleITK as sitk

    from HeadCTMoLRELib.ct.loader import CTVolume

    return CTVolume(image=sitk.Cast(case.image, sitk.sitkFloat32))
