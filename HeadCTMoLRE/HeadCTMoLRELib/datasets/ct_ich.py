"""PhysioNet CT-ICH (Hssayeni et al., "Computed Tomography Images for Intracranial Hemorrhage Detection
and Segmentation"): one NIfTI volume per patient with per-slice labels.

Layout: ``SRC/ct_scans/<nnn>.nii`` (or ``.nii.gz``; nnn = PatientNumber, zero-padded to 3 digits),
``SRC/masks/<nnn>.nii`` (hemorrhage masks) and ``SRC/hemorrhage_diagnosis_raw_ct.csv`` with the columns
``PatientNumber, SliceNumber, Intraventricular, Intraparenchymal, Subarachnoid, Epidural, Subdural,
No_Hemorrhage, Fracture_Yes_No`` (``SRC`` may also be the folder that holds the versioned dataset folder).

Import: one row per scan. Study-level labels: a subtype or ``Fracture_Yes_No`` is 1 when any slice is 1
and 0 when every slice is 0; ``No_Hemorrhage`` is 1 only when every slice says so. Patients of the CSV
without a scan (the release lacks some), scans without CSV rows, missing masks and a slice count that
differs from the scan's are logged.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterator

from .importer import CaseRow

DATASET_LABELS = ("Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural", "Subdural", "No_Hemorrhage",
                  "Fracture_Yes_No")
CSV_NAME = "hemorrhage_diagnosis_raw_ct.csv"
INFO = {
    "title": "PhysioNet CT-ICH: Computed Tomography Images for Intracranial Hemorrhage Detection and Segmentation",
    "table": "ct_ich",
    "license": "PhysioNet restricted access (version 1.3.1): PhysioNet Restricted Health Data License 1.5.0, files "
               "only after signing the data use agreement; earlier versions 1.0.0-1.3.0 were CC BY 4.0",
    "license_url": "https://physionet.org/content/ct-ich/1.3.1/",
    "source": "https://physionet.org/content/ct-ich/ (doi:10.13026/4nae-zg36)",
    "terms": "A model trained or evaluated on this dataset inherits its terms: cite the dataset and PhysioNet, "
             "no re-identification, no sharing of the data with people who did not sign the agreement.",
}


def _find_root(src: Path) -> Path:
    for candidate in [src] + sorted(p for p in src.iterdir() if p.is_dir()):
        if (candidate / CSV_NAME).is_file() and (candidate / "ct_scans").is_dir():
            return candidate
    raise FileNotFoundError(f"{src}: no {CSV_NAME} next to a ct_scans/ folder (looked in {src} and its subfolders); "
                            "point --src at the unpacked CT-ICH folder.")


def read_diagnosis(path: Path, log) -> dict[int, dict]:
    """The per-slice CSV -> {patient: {"slices": n, "labels": {label: 1/0/None}}} (study level)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in ("PatientNumber", "SliceNumber") + DATASET_LABELS if c not in fields]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; the CT-ICH diagnosis CSV has "
                             f"PatientNumber, SliceNumber, {', '.join(DATASET_LABELS)}.")
        slices: dict[int, dict[str, list[float]]] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            try:
                patient = int(float(row["PatientNumber"]))
            except ValueError:
                log.add("unreadable diagnosis row", f"{path.name}, row {line}: PatientNumber {row['PatientNumber']!r}")
                continue
            values = slices.setdefault(patient, {label: [] for label in DATASET_LABELS})
            for label in DATASET_LABELS:
                text = row.get(label, "")
                if text in ("0", "1", "0.0", "1.0"):
                    values[label].append(float(text))
                else:
                    log.add("unreadable diagnosis value", f"{path.name}, row {line}: {label} = {text!r}; unknown")
    result = {}
    for patient, values in slices.items():
        labels = {}
        for label, given in values.items():
            if not given:
                labels[label] = None
            elif label == "No_Hemorrhage":
                labels[label] = 1.0 if min(given) == 1 else 0.0
            else:
                labels[label] = 1.0 if max(given) == 1 else 0.0 if len(given) == len(values["No_Hemorrhage"]) else None
        result[patient] = {"slices": max(len(v) for v in values.values()), "labels": labels}
    return result


def _scan_file(folder: Path, patient: int) -> Path | None:
    for name in (f"{patient:03d}.nii", f"{patient:03d}.nii.gz", f"{patient}.nii", f"{patient}.nii.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _depth(path: Path) -> int | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    return int(size[2]) if len(size) >= 3 else None


def iter_cases(src: Path, context: dict, labels_csv: str | None = None) -> Iterator[CaseRow]:
    """One CaseRow per CT-ICH scan (module docstring)."""
    log = context["log"]
    root = _find_root(src)
    diagnosis = read_diagnosis(Path(labels_csv) if labels_csv else root / CSV_NAME, log)
    scans = root / "ct_scans"
    listed = set()
    for patient in sorted(diagnosis):
        scan = _scan_file(scans, patient)
        if scan is None:
            log.add("patient without a scan", f"patient {patient:03d}: no ct_scans/{patient:03d}.nii; left out")
            continue
        listed.add(scan.name)
        if _scan_file(root / "masks", patient) is None:
            log.add("scan without a mask", f"{scan.name}: no masks/{scan.name} (labels still used)")
        depth = _depth(scan)
        if depth is None:
            log.add("corrupt or unreadable file", f"{scan}: the NIfTI header cannot be read; left out")
            continue
        if depth != diagnosis[patient]["slices"]:
            log.add("slice count differs", f"{scan.name}: {depth} slices in the scan, "
                    f"{diagnosis[patient]['slices']} rows in {CSV_NAME}")
        yield CaseRow(path=scan, patient=f"{patient:03d}", series=scan.name, labels=diagnosis[patient]["labels"])
    for extra in sorted(p for p in scans.iterdir() if re.fullmatch(r"\d+\.nii(\.gz)?", p.name) and p.name not in listed):
        log.add("scan without diagnosis rows", f"{extra}: no rows in {CSV_NAME}; left out")
