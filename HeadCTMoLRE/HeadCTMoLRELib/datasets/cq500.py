"""CQ500 (qure.ai): per-patient folders of DICOM series and three radiologists' reads.

Layout: ``SRC/reads.csv`` (columns ``name, Category`` and, for each reader R1, R2, R3, ``R1:ICH, R1:IPH,
R1:IVH, R1:SDH, R1:EDH, R1:SAH, R1:BleedLocation-Left, R1:BleedLocation-Right, R1:ChronicBleed,
R1:Fracture, R1:CalvarialFracture, R1:OtherFracture, R1:MassEffect, R1:MidlineShift``; ``name`` is
``CQ500-CT-<N>``) and one folder per patient, ``CQ500CT<N> CQ500CT<N>/Unknown Study/CT <series
description>/CT0000xx.dcm``, anywhere below SRC (as the per-patient zips unpack). ``reads.csv`` may also
lie one level above SRC (``labels_csv`` overrides).

Import: every header is indexed (``dicom_index``); each series of each patient (thin, thick and
bone-kernel alike) is one row, its ``series`` column the SeriesDescription (else the folder name), so a
user can filter. ``path`` is the series' folder when it holds that series only, otherwise a series
manifest. Labels are the majority of the three readers (``labels.majority``); each reader's own labels go
to ``CASES.reader1.csv`` .. ``reader3.csv``. Patients of ``reads.csv`` without images are logged, not
fatal; series of patients missing from ``reads.csv`` are logged and left out.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

from . import dicom_index
from .importer import CaseRow
from .labels import majority

DATASET_LABELS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                  "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift")
INFO = {
    "title": "CQ500 (qure.ai head CT dataset)",
    "table": "cq500",
    "license": "CC BY-NC-SA 4.0 (Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International)",
    "license_url": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
    "source": "http://headctstudy.qure.ai/dataset",
    "terms": "A model trained or evaluated on this dataset inherits its terms: attribution to qure.ai, "
             "non-commercial use only, derivatives shared under the same licence.",
}
_PATIENT = re.compile(r"CQ500[-_ ]?CT[-_ ]?(\d+)", re.IGNORECASE)
_READER = re.compile(r"^(R\d+):(.+)$")


def patient_number(text: str) -> int | None:
    """N of ``CQ500-CT-N`` / ``CQ500CTN`` in a name or path, or None."""
    match = _PATIENT.search(text)
    return int(match.group(1)) if match else None


def _find_reads(src: Path, labels_csv: str | None) -> Path:
    candidates = [Path(labels_csv).expanduser()] if labels_csv else [src / "reads.csv", src.parent / "reads.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{src}: no CQ500 reads.csv (looked for {', '.join(str(c) for c in candidates)}). Pass "
                            "--labels-csv PATH/reads.csv.")


def read_reads(path: Path, log) -> dict[int, dict[str, dict[str, float | None]]]:
    """reads.csv -> {patient N: {reader: {label: 1/0/None}}}. Unreadable values are logged and unknown."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        columns = {f: _READER.match(f).groups() for f in fields if _READER.match(f)}
        if "name" not in fields or not columns:
            raise ValueError(f"{path}: columns {fields[:6]} are not CQ500's (name, Category, R1:ICH, ...).")
        unknown = sorted({label for _, label in columns.values()} - set(DATASET_LABELS))
        if unknown:
            log.add("unknown reads.csv column", f"{path.name}: {', '.join(unknown)} not mapped (ignored)")
        reads: dict[int, dict[str, dict[str, float | None]]] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            number = patient_number(row.get("name", ""))
            if number is None:
                log.add("unreadable reads.csv row", f"{path.name}, row {line}: name {row.get('name')!r}")
                continue
            if number in reads:
                log.add("duplicate reads.csv row", f"{path.name}, row {line}: {row['name']} again; the first row is used")
                continue
            per_reader: dict[str, dict[str, float | None]] = {}
            for column, (reader_name, label) in columns.items():
                if label not in DATASET_LABELS:
                    continue
                text = row.get(column, "")
                value = float(text) if text in ("0", "1") else None
                if value is None:
                    log.add("unreadable read", f"{path.name}, row {line}: {column} = {text!r}; unknown")
                per_reader.setdefault(reader_name, {})[label] = value
            reads[number] = per_reader
    return reads


def majority_labels(per_reader: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Majority over the readers of every label."""
    return {label: majority([reads.get(label) for reads in per_reader.values()]) for label in DATASET_LABELS}


def iter_cases(src: Path, context: dict, labels_csv: str | None = None) -> Iterator[CaseRow]:
    """Scan and label the CQ500 folders (module docstring); yields one CaseRow per series."""
    from ..ct.series_manifest import write_series_manifest

    log, paths = context["log"], context["paths"]
    reads = read_reads(_find_reads(src, labels_csv), log)
    scan = dicom_index.scan_folder(src, paths["index"], workers=context["workers"], progress=context["progress"])
    context["scan"] = {**scan.__dict__, "files_per_second": scan.files_per_second}
    connection = dicom_index.open_index(paths["index"])
    try:
        for row in dicom_index.problem_rows(connection):
            if row["path"].lower().endswith(".csv"):
                continue
            kind = "corrupt or unreadable file" if row["status"] == "error" else "DICOM file without an image"
            log.add(kind, f"{src / row['path']}: {row['reason']}")
        folder_series: dict[str, set[str]] = {}
        for row in dicom_index.iter_rows(connection, "status = 'image'"):
            folder_series.setdefault(str(PurePosixPath(row["path"]).parent), set()).add(row["series"])
        with_images: set[int] = set()
        for uid, rows in dicom_index.iter_series(connection):
            number = patient_number(rows[0]["path"])
            if number is None or number not in reads:
                log.add("series of a patient not in reads.csv",
                        f"{src / PurePosixPath(rows[0]['path']).parent} (series {uid}) left out")
                continue
            with_images.add(number)
            folders = {str(PurePosixPath(r["path"]).parent) for r in rows}
            folder = next(iter(folders))
            if len(folders) == 1 and folder_series.get(folder) == {uid}:
                path = src / folder
            else:
                files = [{"path": r["path"], "size": r["size"]} for r in dicom_index.slice_order(rows)]
                path = write_series_manifest(paths["series"] / f"{dicom_index.safe_name(uid)}.series.json", root=src,
                                             files=files, series_instance_uid=uid,
                                             study_instance_uid=rows[0]["study"] or "", patient=f"CQ500-CT-{number}")
            description = rows[0]["description"] or PurePosixPath(folder).name.removeprefix("CT ").strip() or uid
            per_reader = reads[number]
            yield CaseRow(path=path, patient=f"CQ500-CT-{number}", series=description,
                          labels=majority_labels(per_reader),
                          readers={name.lstrip("R"): labels for name, labels in sorted(per_reader.items())})
        for number in sorted(set(reads) - with_images):
            log.add("patient in reads.csv without images", f"CQ500-CT-{number}: no readable series under {src}")
    finally:
        connection.close()
