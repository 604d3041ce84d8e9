"""Synthetic head CT phantoms on disk: labelled datasets (NIfTI or DICOM) and DICOM CT series.

:func:`write_phantom_dataset` writes ``n`` cases under one folder with ``labels.csv`` (a ``path`` column
and one 0/1 column per catalog id) and ``metadata.json`` (each case's seed, geometry, pose and finding
parameters); case ``i`` depends only on ``(seed, i)``. :func:`write_dicom_series` writes one phantom as an
axial CT series whose ImagePositionPatient / ImageOrientationPatient are in LPS mm, as real scanners do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..findings import FindingCatalog, default_catalog
from .findings import RENDERABLE_FINDINGS, check_renderable, sample_findings
from .generator import Phantom, generate_phantom


def _case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset, independent of the other cases."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_phantom_dataset(out_dir: str | Path, n: int, seed: int, *, fmt: str = "nifti",
                          findings: Iterable[str] | None = None,
                          prevalence: float | Mapping[str, float] = 0.1,
                          spacing_mm: tuple[float, float, float] | None = None,
                          catalog: FindingCatalog | None = None) -> Path:
    """Write ``n`` phantoms and their labels; returns the path of ``labels.csv``.

    ``fmt="nifti"`` writes ``case_0000.nii.gz`` ...; ``fmt="dicom"`` writes one CT series folder per case
    (``case_0000/slice_000.dcm`` ..., uint16 with RescaleIntercept -1024). ``labels.csv`` has a ``path``
    column (relative to ``out_dir``) and one 0/1 column per catalog id, in catalog order;
    ``metadata.json`` holds each case's seed, geometry, pose and finding parameters. ``findings``
    restricts which findings may be drawn (default: all renderable); each case draws its set with
    :func:`sample_findings` at ``prevalence``. Case ``i`` depends only on ``(seed, i)``.
    """
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', not {fmt!r}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    catalog = catalog or default_catalog()
    allowed = tuple(RENDERABLE_FINDINGS) if findings is None else tuple(findings)
    check_renderable(allowed)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows, metadata = [], []
    for index in range(n):
        case_seed = _case_seed(seed, index)
        rng = np.random.default_rng([case_seed, 1])
        drawn = sample_findings(rng, prevalence, allowed)
        phantom = generate_phantom(drawn, case_seed, spacing_mm=spacing_mm, catalog=catalog)
        name = f"case_{index:04d}"
        if fmt == "nifti":
            relative = f"{name}.nii.gz"
            sitk.WriteImage(phantom.image, str(out / relative), True)
        else:
            relative = name
            write_dicom_series(phantom, out / relative, series_seed=case_seed, patient_id=name)
        rows.append([relative] + [phantom.labels[fid] for fid in catalog.ids])
        metadata.append({"path": relative, **phantom.metadata})
    labels_path = out / "labels.csv"
    with labels_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *catalog.ids])
        writer.writerows(rows)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1), encoding="utf-8")
    return labels_path


def write_dicom_series(phantom: Phantom, folder: str | Path, *, series_seed: int = 0,
                       patient_id: str = "PHANTOM", patient_name: str | None = None,
                       study_description: str = "Synthetic head CT phantom",
                       series_description: str = "HEAD NON-CONTRAST (synthetic)") -> Path:
    """Write ``phantom.image`` (anything with an axis-aligned ``image``) as an axial CT series (one file per
    slice, uint16 + RescaleIntercept -1024, ImagePositionPatient / ImageOrientationPatient in LPS mm). UIDs
    derive from ``series_seed``; the descriptions and patient name default to a phantom's."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = phantom.image
    hu = sitk.GetArrayFromImage(image).astype(np.int32)
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    sx, sy, sz = image.GetSpacing()
    ox, oy, oz = image.GetOrigin()
    entropy = [str(series_seed), patient_id]
    study_uid = generate_uid(entropy_srcs=entropy + ["study"])
    series_uid = generate_uid(entropy_srcs=entropy + ["series"])
    frame_uid = generate_uid(entropy_srcs=entropy + ["frame"])
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=entropy + [f"slice{k}"])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID = "CT", patient_id
        ds.PatientName = patient_name or f"Phantom^{patient_id}"
        ds.StudyDescription, ds.SeriesDescription = study_description, series_description
        ds.BodyPartExamined, ds.ImageType = "HEAD", ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{oz + k * sz:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{oz + k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{sz:.4f}"
        ds.KVP, ds.ConvolutionKernel = 120, "SYNTH"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
    return folder
