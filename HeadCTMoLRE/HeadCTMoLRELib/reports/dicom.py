"""DICOM outputs a PACS can store, made with highdicom (never hand-built result objects).

    write_dicom_outputs(prediction, out_dir, *, source, manifest, generate_study=False) -> {kind: path}

Files written into ``out_dir`` (all in the source's study, frame of reference and patient):

* ``findings_sr.dcm``: a **Comprehensive 3D SR** holding a **TID 1500 Measurement Report**. TID 1500 is the
  DICOM template for "measurements and qualitative evaluations made by a person or an algorithm about
  images", which is exactly a per-scan classifier's output; its image-level groups (TID 1501) need no ROI,
  so each finding is one group: tracking id = finding id, finding type = the finding (private coding
  scheme ``99HCTMOLRE``), one measurement "probability" (UCUM ``1``, 0..1), one qualitative evaluation
  "present"/"absent" at the bundle's threshold, the algorithm (model name, fingerprint, status as a
  parameter). The source series' SOP instances are the evidence (CurrentRequestedProcedureEvidence) and the
  report's image library. TID 1500 was preferred over a Key Object Selection (no values) or a Basic Text SR
  (not machine readable).
* ``attention_pm.dcm``: a **Parametric Map** of the attention weight per slice (float, unitless, each slice's
  share of the model's attention) on the loaded CT grid, placed by its affine in the source frame of
  reference (for gantry-tilted series that is the tilt-corrected grid, still in the source's patient space).
* ``experts_seg.dcm``: a **Segmentation** (binary, one segment per expert present) of the router's dominant
  expert per slice, same grid; segment labels are the colour table's names ("Expert 1".."Expert K").

The model's status label (synthetic, untrained, random backbone) is in every series description, in the
SR's algorithm parameters and in the map's content description. NIfTI/NRRD inputs have no DICOM study:
with ``generate_study=True`` one is generated first (``source_series/``, a CT series of the loaded volume
with fresh UIDs and an anonymous patient) and the outputs reference it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping

import numpy as np

__all__ = ["DicomOutputError", "write_dicom_outputs", "source_datasets", "SR_FILE", "PM_FILE", "SEG_FILE",
           "CODING_SCHEME"]

SR_FILE, PM_FILE, SEG_FILE = "findings_sr.dcm", "attention_pm.dcm", "experts_seg.dcm"
GENERATED_SERIES = "source_series"
CODING_SCHEME = "99HCTMOLRE"  # private coding scheme of the finding catalog ids
MANUFACTURER = "HeadCTMoLRE"


class DicomOutputError(ValueError):
    """The DICOM outputs cannot be made for this input; the message says why and what to do."""


def source_datasets(source, series_uid: str | None = None) -> list:
    """The pydicom datasets (headers, no pixel data) of the DICOM series the prediction was made from."""
    import pydicom

    from ..ct.dicom_series import choose_series, scan_dicom

    scan = scan_dicom(source)
    chosen, _ = choose_series(scan, series_uid)
    return [_with_type2(pydicom.dcmread(str(s.path), stop_before_pixels=True)) for s in chosen.slices]


# Patient and study attributes that the results copy and that are Type 2 (present, possibly empty) in them;
# anonymised or generated series often lack them, which is legal in the source but not in our outputs.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def _with_type2(dataset):
    """``dataset`` (in memory only) with every missing Type 2 patient/study attribute present and empty."""
    for keyword in _TYPE2:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    return dataset


def _generate_study(image, folder: Path, case_id: str) -> list:
    """A CT series of ``image`` (SimpleITK, LPS, HU) written into ``folder``; returns its datasets."""
    import pydicom
    import SimpleITK as sitk

    from ..phantoms.io import write_dicom_series

    if not np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6):
        identity = sitk.Image(image)  # the generated study is axial: put the voxels on an axis-aligned grid
        identity.SetDirection(tuple(np.eye(3).ravel()))
        image = sitk.Resample(image, identity, sitk.Transform(), sitk.sitkLinear, -1024.0)
    write_dicom_series(SimpleNamespace(image=image), folder, series_seed=abs(hash(case_id)) % 10**9,
                       patient_id=case_id[:64] or "ANONYMOUS", patient_name="Anonymous^Generated",
                       study_description="Generated from a non-DICOM head CT",
                       series_description="Head CT (generated from NIfTI/NRRD)")
    return [_with_type2(pydicom.dcmread(str(p), stop_before_pixels=True)) for p in sorted(folder.glob("*.dcm"))]


def _status_words(status: Mapping) -> str:
    label = str(status.get("label") or "")
    return label.split(" MODEL", 1)[0] + " MODEL" if label else ""


def _description(what: str, status: Mapping) -> str:
    words = _status_words(status)
    return (f"HeadCTMoLRE {what}" + (f" [{words}]" if words else ""))[:64]


def _volume(image, frame_of_reference_uid: str):
    """A highdicom Volume of a SimpleITK image (index (k, j, i) -> LPS mm, the DICOM patient frame)."""
    import highdicom as hd
    import SimpleITK as sitk

    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    columns = direction @ np.diag(spacing)  # column c: LPS step per index i (c=0), j (c=1), k (c=2)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = columns[:, 2], columns[:, 1], columns[:, 0]
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return hd.Volume(sitk.GetArrayFromImage(image), affine, coordinate_system="PATIENT",
                     frame_of_reference_uid=frame_of_reference_uid)


def _algorithm(prediction, status: Mapping):
    import highdicom as hd

    from pydicom.sr.codedict import codes

    bundle = (prediction.provenance or {}).get("bundle") or {}
    return hd.AlgorithmIdentificationSequence(name=str(bundle.get("name") or "HeadCTMoLRE")[:64],
                                              version=str(bundle.get("fingerprint") or "unknown")[:64],
                                              family=codes.cid7162.ArtificialIntelligence,
                                              parameters={"status": str(status.get("label") or "trained")[:64]})


def _finding_code(finding: Mapping):
    import highdicom as hd

    return hd.sr.CodedConcept(value=str(finding["id"]), scheme_designator=CODING_SCHEME,
                              meaning=str(finding["name"])[:64])


def _structured_report(prediction, sources: list, status: Mapping, series_number: int):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    bundle = (prediction.provenance or {}).get("bundle") or {}
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=str(bundle.get("name") or "HeadCTMoLRE")[:64], manufacturer_name=MANUFACTURER,
            model_name=str(bundle.get("fingerprint") or "")[:64]))
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(bundle.get("name") or "HeadCTMoLRE")[:64], version=str(bundle.get("fingerprint") or "unknown")[:64],
        parameters=[f"model status: {status.get('label') or 'trained'}"[:64]])
    probability = hd.sr.CodedConcept("probability", CODING_SCHEME, "Probability of the finding")
    presence = hd.sr.CodedConcept("presence", CODING_SCHEME, "Finding at the model's threshold")
    present = hd.sr.CodedConcept("present", CODING_SCHEME, "Present (probability >= threshold)")
    absent = hd.sr.CodedConcept("absent", CODING_SCHEME, "Absent (probability < threshold)")
    reference = hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[len(sources) // 2])
    groups = []
    for finding in sorted(prediction.findings(), key=lambda f: f["probability"], reverse=True):
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=str(finding["id"])[:64]),
            finding_type=_finding_code(finding),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=probability, value=float(finding["probability"]),
                                            unit=codes.UCUM.NoUnits, algorithm_id=algorithm)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=presence,
                                                                 value=present if finding["positive"] else absent)],
            source_images=[reference]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("24725-4", "LN", "CT Head"),
        imaging_measurements=groups, referenced_images=sources)
    return hd.sr.Comprehensive3DSR(
        evidence=sources, content=report, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        series_description=_description("findings", status), is_complete=True)


def _software_version() -> str:
    from .. import __version__

    return str(__version__)


def _parametric_map(prediction, sources: list, status: Mapping, series_number: int):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    volume = _volume(prediction.attention_image(), sources[0].FrameOfReferenceUID)
    volume = volume.with_array(np.asarray(volume.array, dtype=np.float32))
    peak = float(max(volume.array.max(), 1e-6))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="attention", lut_explanation="attention weight per slice (share of the model's attention)",
        unit=codes.UCUM.NoUnits, value_range=(0.0, float(max(peak, 1.0))), slope=1, intercept=0)
    return hd.pm.ParametricMap(
        source_images=sources, pixel_array=volume, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="HeadCTMoLRE", software_versions=_software_version(), device_serial_number="0",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(  # LINEAR_EXACT: the window may be narrower than 1
            window_center=peak / 2, window_width=peak, voi_lut_function="LINEAR_EXACT")],
        content_label="ATTENTION",
        content_description=_description("attention", status), series_description=_description("attention", status))


def _segmentation(prediction, sources: list, status: Mapping, series_number: int):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    volume = _volume(prediction.expert_image(), sources[0].FrameOfReferenceUID)
    labels = np.asarray(volume.array, dtype=np.uint8)
    present = [int(v) for v in np.unique(labels) if v > 0]
    if not present:
        return None
    # renumber to 1..n (Segment numbers must be consecutive); keep the colour table's names
    renumbered = np.zeros_like(labels)
    descriptions = []
    for number, expert in enumerate(present, start=1):
        renumbered[labels == expert] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=f"Expert {expert}",
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Brain,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(prediction, status), tracking_id=f"expert_{expert}",
            tracking_uid=generate_uid()))
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=volume.with_array(renumbered), segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="HeadCTMoLRE", software_versions=_software_version(), device_serial_number="0",
        content_label="EXPERTS", content_description=_description("experts", status),
        series_description=_description("experts", status))


def _set_body_part(dataset, sources: list) -> None:
    """General Series' Body Part Examined of the source (HEAD when it has none): without it, Laterality
    (Type 2C, for paired body parts) cannot be judged absent, and validators (dciodvfy) report an error."""
    dataset.BodyPartExamined = str(getattr(sources[0], "BodyPartExamined", "") or "HEAD")


def write_dicom_outputs(prediction, out_dir: str | os.PathLike, *, source=None, series_uid: str | None = None,
                        generate_study: bool = False, case_id: str = "case", dicom_source=None) -> dict[str, Path]:
    """Write the SR, Parametric Map and Segmentation of ``prediction`` into ``out_dir``; returns {kind: path}.

    source: the DICOM folder/files the prediction was made from (default: the prediction's provenance);
    series_uid: the series used (default: the provenance's). A non-DICOM input needs ``generate_study``;
    without it DicomOutputError says so.
    dicom_source: the DICOM files of the series the predicted volume was loaded from when the prediction's own
    input was a plain volume file (the Slicer panel: a volume from the DICOM module, handed to the worker as
    NRRD); the outputs reference that series.
    """
    out = Path(out_dir)
    provenance = (prediction.provenance or {}).get("input") or {}
    status = prediction.model_status or {}
    if dicom_source is not None:
        sources = source_datasets(dicom_source, series_uid)
    elif provenance.get("format") == "dicom":
        sources = source_datasets(source if source is not None else provenance["source_paths"][0],
                                  series_uid or provenance.get("series_instance_uid"))
    elif generate_study:
        out.mkdir(parents=True, exist_ok=True)
        sources = _generate_study(prediction.volume.image, out / GENERATED_SERIES, case_id)
    else:
        raise DicomOutputError(f"{case_id}: the input is {provenance.get('format', 'not DICOM')}, so there is no "
                               "DICOM study to attach results to; pass --dicom-generate-study to make one.")
    if not sources or "FrameOfReferenceUID" not in sources[0]:
        raise DicomOutputError(f"{case_id}: the source series has no FrameOfReferenceUID; maps cannot be placed.")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    base = 9000  # series numbers 9001-9003: after the scanner's own series
    sr = _structured_report(prediction, sources, status, base + 1)
    written["dicom_sr"] = out / SR_FILE
    sr.save_as(written["dicom_sr"], enforce_file_format=True)
    pm = _parametric_map(prediction, sources, status, base + 2)
    _set_body_part(pm, sources)
    written["dicom_attention"] = out / PM_FILE
    pm.save_as(written["dicom_attention"], enforce_file_format=True)
    seg = _segmentation(prediction, sources, status, base + 3)
    if seg is not None:
        _set_body_part(seg, sources)
        written["dicom_experts"] = out / SEG_FILE
        seg.save_as(written["dicom_experts"], enforce_file_format=True)
    return written
