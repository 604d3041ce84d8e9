"""DICOM results (highdicom): the SR, Parametric Map and Segmentation read back with pydicom and highdicom,
reference the source series' SOP instances and frame of reference, and carry the model's status."""

from __future__ import annotations

import os
import shutil
import subprocess

import pydicom
import pytest

from HeadCTMoLRELib import inference
from HeadCTMoLRELib.reports import dicom

hd = pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from HeadCTMoLRELib.slicer.selftest import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("dicom") / "tiny")


def _evidence_uids(sr) -> set[str]:
    return {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}


def _walk(dataset) -> tuple[set[str], list[float]]:
    """Every code value and every "probability" measurement value in an SR content tree."""
    codes, numbers = set(), []
    for item in getattr(dataset, "ContentSequence", []):
        for concept in list(getattr(item, "ConceptCodeSequence", [])) + list(getattr(item, "ConceptNameCodeSequence", [])):
            codes.add(str(getattr(concept, "CodeValue", "") or getattr(concept, "LongCodeValue", "")))
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "probability":
            numbers.append(float(item.MeasuredValueSequence[0].NumericValue))
        inner_codes, inner_numbers = _walk(item)
        codes |= inner_codes
        numbers += inner_numbers
    return codes, numbers


def test_sr_pm_and_seg_reference_the_source_series_and_read_back(tmp_path, tiny, test_data):
    source = test_data / "bad" / "00_good_control_series"
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(source.glob("*.dcm"))]
    prediction = inference.predict(source, tiny, "cpu")
    written = dicom.write_dicom_outputs(prediction, tmp_path, case_id="c1")
    assert set(written) == {"dicom_sr", "dicom_attention", "dicom_experts"}

    sr = hd.sr.srread(written["dicom_sr"])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert _evidence_uids(sr) == {ds.SOPInstanceUID for ds in sources}
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID and sr.PatientID == sources[0].PatientID
    codes, numbers = _walk(sr)
    probabilities = {f["id"]: f["probability"] for f in prediction.findings()}
    assert set(probabilities) <= codes  # every finding is coded in the report
    assert len(numbers) == len(probabilities)
    assert sorted(numbers) == pytest.approx(sorted(probabilities.values()), abs=1e-6)
    assert "UNTRAINED" in sr.SeriesDescription

    pm = pydicom.dcmread(written["dicom_attention"])
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert pm.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert pm.StudyInstanceUID == sources[0].StudyInstanceUID
    assert int(pm.NumberOfFrames) == len(sources) and (pm.Rows, pm.Columns) == (sources[0].Rows, sources[0].Columns)
    assert "UNTRAINED" in pm.ContentDescription
    referenced = {item.ReferencedSOPInstanceUID for series in pm.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}

    seg = hd.seg.segread(written["dicom_experts"])
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    labels = {seg.get_segment_description(n).SegmentLabel for n in seg.segment_numbers}
    assert labels and all(label.startswith("Expert ") for label in labels)


def test_nifti_needs_a_generated_study_and_then_references_it(tmp_path, tiny, test_data):
    nifti = test_data / "real" / "derived" / "GE_head_axial_1x1x5mm.nii.gz"
    prediction = inference.predict(nifti, tiny, "cpu")
    with pytest.raises(dicom.DicomOutputError, match="generate"):
        dicom.write_dicom_outputs(prediction, tmp_path / "no", case_id="c2")
    written = dicom.write_dicom_outputs(prediction, tmp_path / "yes", generate_study=True, case_id="c2")
    generated = [pydicom.dcmread(p, stop_before_pixels=True)
                 for p in sorted((tmp_path / "yes" / dicom.GENERATED_SERIES).glob("*.dcm"))]
    sr = hd.sr.srread(written["dicom_sr"])
    assert _evidence_uids(sr) == {ds.SOPInstanceUID for ds in generated}
    assert all(ds.PatientName == "Anonymous^Generated" for ds in generated)
    pm = pydicom.dcmread(written["dicom_attention"])
    assert pm.FrameOfReferenceUID == generated[0].FrameOfReferenceUID


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None and not os.environ.get("CI"),
                    reason="dciodvfy (Debian dicom3tools) is not installed (.ci/run installs it; CI never skips this)")
@pytest.mark.parametrize("source", ["dicom", "nifti"])
def test_outputs_pass_an_independent_validator_dciodvfy(tmp_path, tiny, test_data, source):
    """David Clunie's dciodvfy checks each object against its IOD (modules, Type 1/2/2C attributes, value
    constraints): every error it reports fails the test (its warnings, e.g. on highdicom's defined terms, do not)."""
    assert DCIODVFY, "CI must have dciodvfy (.ci/run installs Debian's dicom3tools)"
    if source == "dicom":
        prediction = inference.predict(test_data / "bad" / "00_good_control_series", tiny, "cpu")
        written = dicom.write_dicom_outputs(prediction, tmp_path, case_id="c1")
    else:
        prediction = inference.predict(test_data / "real" / "derived" / "GE_head_axial_1x1x5mm.nii.gz", tiny, "cpu")
        written = dicom.write_dicom_outputs(prediction, tmp_path, generate_study=True, case_id="c2")
    assert set(written) == {"dicom_sr", "dicom_attention", "dicom_experts"}
    for kind, path in written.items():
        result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
        report = result.stdout + result.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{kind} ({path.name}):\n" + "\n".join(errors)
