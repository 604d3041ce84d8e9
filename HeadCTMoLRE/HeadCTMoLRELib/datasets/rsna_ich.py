"""RSNA Intracranial Hemorrhage Detection 2019 (Kaggle): one flat folder of single-slice DICOM files.

Layout: ``SRC/stage_2_train/ID_<hex>.dcm`` (about 750,000 files with random names) and
``SRC/stage_2_train.csv`` with rows ``ID,Label`` where ID is ``ID_<hex>_<subtype>`` for the subtypes
epidural, intraparenchymal, intraventricular, subarachnoid, subdural and any (``SRC`` may also be the
image folder itself, with the CSV beside it or one level up; ``labels_csv`` overrides).

Import: every header is indexed (``dicom_index``), slices are grouped by SeriesInstanceUID and sorted by
position along the slice normal, and each series gets a manifest (``CASES.series/<uid>.series.json``)
that ``load_ct`` reads. Study-level labels: a subtype is 1 when any slice is 1, 0 when every slice is
labelled 0, otherwise blank. Quirks of the real set, each counted in the import log:

* duplicate label rows (the same ``ID_<hex>_<subtype>`` twice): identical ones are dropped; contradicting
  ones make that slice's subtype unknown;
* mixed RescaleIntercept values within one series: fine (the loader rescales slice by slice), reported;
* bad PixelRepresentation: files with BitsStored 12, PixelRepresentation 0 (unsigned) and a
  RescaleIntercept above -100 hold signed 12-bit values written as unsigned ones, so air (about -1000)
  appears as 3096. Public solutions add 1000, subtract 4096 from values >= 4096 and set the intercept to
  -1000. Here the stored values are read as CT numbers modulo 4096 (values >= 3072 become value - 4096,
  which recovers the whole CT range -1024..3071 exactly) and a corrected copy (PixelRepresentation 1,
  16 bits stored, the file's own slope and intercept) is written to ``CASES.series/fixed/``; the manifest
  points to it. A file whose pixels show no wrapped air (fewer than 5% of values >= 3072) is left as it is;
* corrupt or truncated files and files that are not DICOM: left out of their series, listed.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from . import dicom_index
from .importer import CaseRow

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
DATASET_LABELS = SUBTYPES
INFO = {
    "title": "RSNA Intracranial Hemorrhage Detection 2019",
    "table": "rsna_ich",
    "license": "RSNA Intracranial Hemorrhage Detection competition data terms (Kaggle competition rules): "
               "non-commercial research and education only",
    "license_url": "https://www.kaggle.com/competitions/rsna-intracranial-hemorrhage-detection/rules",
    "source": "https://www.kaggle.com/competitions/rsna-intracranial-hemorrhage-detection",
    "terms": "A model trained on this dataset inherits its terms: non-commercial use only; do not redistribute "
             "the images.",
}
QUIRK_WRAP = 3072  # stored values >= this are negative CT numbers (value - 4096)
QUIRK_MIN_WRAPPED_FRACTION = 0.05
FIX_NAME = "signed 12-bit values stored as unsigned (BitsStored 12, PixelRepresentation 0, intercept > -100)"
_ID = re.compile(r"^(ID_[0-9A-Za-z]+)_([a-z]+)$")


def _find_inputs(src: Path, labels_csv: str | None) -> tuple[Path, Path]:
    images = src / "stage_2_train" if (src / "stage_2_train").is_dir() else src
    candidates = [Path(labels_csv).expanduser()] if labels_csv else [
        src / "stage_2_train.csv", images / "stage_2_train.csv", src.parent / "stage_2_train.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return images, candidate.resolve()
    raise FileNotFoundError(f"{src}: no RSNA label file (looked for {', '.join(str(c) for c in candidates)}). Pass "
                            "--labels-csv PATH/stage_2_train.csv.")


# ------------------------------------------------------------------------------------------ labels
def _load_labels(connection, labels_csv: Path, log) -> None:
    """Label rows -> table rsna_labels(sop, pos, neg) with one bit per subtype; reused while the CSV's size
    and mtime stay. Duplicate and contradicting rows are logged."""
    stat = labels_csv.stat()
    signature = f"{labels_csv}:{stat.st_size}:{stat.st_mtime_ns}"
    connection.execute("CREATE TABLE IF NOT EXISTS rsna_labels (sop TEXT PRIMARY KEY, pos INTEGER, neg INTEGER, "
                       "repeats INTEGER DEFAULT 0)")
    row = connection.execute("SELECT value FROM meta WHERE key='rsna_labels'").fetchone()
    if row and row[0] == signature:
        for kind, count in connection.execute("SELECT key, value FROM meta WHERE key LIKE 'rsna_labels_problem:%'"):
            log.add(kind.split(":", 1)[1], f"{count} (from the label file, counted when it was first read)",
                    count=int(count))
        return
    connection.execute("DELETE FROM rsna_labels")
    connection.execute("DELETE FROM meta WHERE key LIKE 'rsna_labels_problem:%'")
    bit = {name: 1 << i for i, name in enumerate(SUBTYPES)}
    problems: dict[str, int] = {}

    def problem(kind: str, message: str) -> None:
        problems[kind] = problems.get(kind, 0) + 1
        log.add(kind, message)

    images: dict[str, list[int]] = {}  # sop -> [pos, neg]; flushed when the file moves to another image
    order: list[str] = []

    def flush() -> None:
        connection.executemany(
            "INSERT INTO rsna_labels (sop, pos, neg) VALUES (?, ?, ?) ON CONFLICT(sop) DO UPDATE SET "
            "pos = pos | excluded.pos, neg = neg | excluded.neg, repeats = repeats + 1", [(s, *images[s]) for s in order])
        images.clear()
        order.clear()

    seen_pairs: set[tuple[str, str]] = set()
    with labels_csv.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if [h.strip() for h in header[:2]] != ["ID", "Label"]:
            raise ValueError(f"{labels_csv}: header {header[:2]} is not 'ID,Label'; this is not the RSNA label file.")
        for line, row in enumerate(reader, start=2):
            if len(row) < 2:
                continue
            match = _ID.match(row[0].strip())
            value = row[1].strip()
            if not match or match.group(2) not in bit or value not in ("0", "1"):
                problem("unreadable label row", f"{labels_csv.name}, row {line}: {','.join(row)!r}")
                continue
            sop, subtype = match.groups()
            if sop not in images:
                if len(order) >= 4096:
                    flush()
                    seen_pairs.clear()
                images[sop] = [0, 0]
                order.append(sop)
            if (sop, subtype) in seen_pairs:
                problem("duplicate label row", f"{labels_csv.name}, row {line}: {row[0]} listed again")
            seen_pairs.add((sop, subtype))
            images[sop][0 if value == "1" else 1] |= bit[subtype]
    flush()
    # an image whose rows come back far apart in the file was merged by the upsert: count it too
    repeated = connection.execute("SELECT COUNT(*) FROM rsna_labels WHERE repeats > 0").fetchone()[0]
    if repeated:
        problems["duplicate label row"] = problems.get("duplicate label row", 0) + repeated
        log.add("duplicate label row", f"{repeated} image(s) listed again further down in {labels_csv.name}; merged",
                count=repeated)
    contradicting = connection.execute("SELECT COUNT(*) FROM rsna_labels WHERE pos & neg != 0").fetchone()[0]
    if contradicting:
        problems["contradicting label rows"] = contradicting
        examples = [sop for (sop,) in connection.execute("SELECT sop FROM rsna_labels WHERE pos & neg != 0 LIMIT 5")]
        log.add("contradicting label rows", f"{contradicting} slice(s) have a subtype labelled both 0 and 1 (e.g. "
                f"{', '.join(examples)}); that subtype is unknown for the slice", count=contradicting)
        connection.execute("UPDATE rsna_labels SET pos = pos & ~(pos & neg), neg = neg & ~(pos & neg) "
                           "WHERE pos & neg != 0")
    connection.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [(f"rsna_labels_problem:{k}", str(v)) for k, v in problems.items()])
    connection.execute("INSERT OR REPLACE INTO meta VALUES ('rsna_labels', ?)", (signature,))
    connection.commit()


# ------------------------------------------------------------------------------------------ pixel quirk
def has_pixel_representation_quirk(row: dict) -> bool:
    """The header rule public RSNA solutions use for the wrapped signed 12-bit files."""
    return (row.get("bits_stored") == 12 and row.get("pixel_representation") == 0
            and row.get("intercept") is not None and row["intercept"] > -100)


def fix_pixel_representation(source: Path, target: Path) -> bool:
    """Write a corrected copy of a wrapped file (module docstring) to ``target``; False (nothing written)
    when its pixels show no wrapped air. Stored values become int16 CT numbers, PixelRepresentation 1."""
    import pydicom

    with dicom_index.quiet_pydicom():
        ds = pydicom.dcmread(source)
        stored = ds.pixel_array.astype(np.int32) & 0x0FFF
    if np.mean(stored >= QUIRK_WRAP) < QUIRK_MIN_WRAPPED_FRACTION:
        return False
    corrected = np.where(stored >= QUIRK_WRAP, stored - 4096, stored).astype(np.int16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    ds.PixelData = corrected.tobytes()
    ds.DerivationDescription = "headct-molre import-dataset: " + FIX_NAME + " re-read as signed CT numbers"
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue"):
        if keyword in ds:
            del ds[keyword]
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    ds.save_as(temporary, enforce_file_format=False)
    temporary.replace(target)
    return True


# ------------------------------------------------------------------------------------------ series
def _series_labels(rows: list[dict], labels: dict[str, tuple[int, int]]) -> tuple[dict, int]:
    """Study-level labels of one series and the number of its slices without a label row."""
    unlabelled = 0
    pos_any, neg_all = 0, (1 << len(SUBTYPES)) - 1
    for row in rows:
        pos, neg = labels.get(row["sop"]) or labels.get(Path(row["path"]).stem) or (None, None)
        if pos is None:
            unlabelled += 1
            neg_all = 0
            continue
        pos_any |= pos
        neg_all &= neg
    result = {}
    for i, name in enumerate(SUBTYPES):
        result[name] = 1.0 if pos_any >> i & 1 else 0.0 if neg_all >> i & 1 else None
    return result, unlabelled


def iter_cases(src: Path, context: dict, labels_csv: str | None = None) -> Iterator[CaseRow]:
    """Scan, group and label the RSNA folder (module docstring); yields one CaseRow per series."""
    from ..ct.series_manifest import write_series_manifest

    log, paths = context["log"], context["paths"]
    images, labels_path = _find_inputs(src, labels_csv)
    scan = dicom_index.scan_folder(images, paths["index"], workers=context["workers"], progress=context["progress"])
    context["scan"] = {**scan.__dict__, "files_per_second": scan.files_per_second}
    connection = dicom_index.open_index(paths["index"])
    try:
        _load_labels(connection, labels_path, log)
        for row in dicom_index.problem_rows(connection):
            kind = "corrupt or unreadable file" if row["status"] == "error" else "DICOM file without an image"
            log.add(kind, f"{images / row['path']}: {row['reason']}")
        series_dir = paths["series"]
        for uid, rows in dicom_index.iter_series(connection):
            sops = [r["sop"] for r in rows] + [Path(r["path"]).stem for r in rows]
            placeholders = ", ".join("?" * len(sops))
            labels = {sop: (pos, neg) for sop, pos, neg in connection.execute(
                f"SELECT sop, pos, neg FROM rsna_labels WHERE sop IN ({placeholders})", sops)}
            case = _series_case(images, series_dir, uid, rows, labels, log, write_series_manifest)
            if case is not None:
                yield case
        orphans = connection.execute(
            "SELECT COUNT(*) FROM rsna_labels WHERE sop NOT IN (SELECT sop FROM files WHERE status = 'image')").fetchone()[0]
        if orphans:
            examples = [s for (s,) in connection.execute(
                "SELECT sop FROM rsna_labels WHERE sop NOT IN (SELECT sop FROM files WHERE status = 'image') LIMIT 5")]
            log.add("labelled image without a readable file", f"{orphans} label IDs have no readable image in {images} "
                    f"(e.g. {', '.join(examples)})", count=orphans)
    finally:
        connection.close()


def _series_case(images: Path, series_dir: Path, uid: str, rows: list[dict], labels: dict, log,
                 write_manifest) -> CaseRow | None:
    first = rows[0]
    if first["modality"] != "CT":
        log.add("series that is not CT", f"series {uid} ({len(rows)} files, modality {first['modality'] or 'missing'}) "
                "left out")
        return None
    ordered = dicom_index.slice_order(rows)
    notes = []
    intercepts = sorted({r["intercept"] for r in rows if r["intercept"] is not None})
    if len(intercepts) > 1:
        log.add("mixed rescale intercepts", f"series {uid}: intercepts {', '.join(f'{i:g}' for i in intercepts)} "
                "(handled: each slice is rescaled with its own)")
        notes.append(f"mixed RescaleIntercept values {intercepts}")
    if len({r["sop"] for r in rows}) < len(rows):
        log.add("duplicate image files", f"series {uid}: {len(rows) - len({r['sop'] for r in rows})} file(s) repeat "
                "an image (same SOPInstanceUID); the loader keeps one")
    files = []
    for row in ordered:
        source = images / row["path"]
        entry = {"path": row["path"], "size": row["size"]}
        if has_pixel_representation_quirk(row):
            target = series_dir / "fixed" / f"{dicom_index.safe_name(row['sop'])}.dcm"
            fixed = target.is_file() and target.stat().st_mtime_ns >= row["mtime_ns"]
            try:
                fixed = fixed or fix_pixel_representation(source, target)
            except Exception as error:  # noqa: BLE001 - a pixel decoder error: leave the slice as it is
                log.add("corrupt or unreadable file", f"{source}: pixel data unreadable ({error})")
                continue
            if fixed:
                entry = {"path": f"fixed/{target.name}", "size": target.stat().st_size, "relative_to": "manifest",
                         "original": row["path"], "fix": FIX_NAME}
                log.add("bad PixelRepresentation (fixed)", f"{source} -> {target}")
            else:
                log.add("bad PixelRepresentation header, pixels fine", f"{source}: no wrapped air; left as it is")
        files.append(entry)
    case_labels, unlabelled = _series_labels(rows, labels)
    if unlabelled:
        log.add("image without a label row", f"series {uid}: {unlabelled} of {len(rows)} slice(s) have no row in the "
                "label file (labels of that series use the labelled slices; a subtype is 0 only if every slice says 0)")
    if unlabelled == len(rows):
        log.add("series without labels", f"series {uid} left out: none of its slices is in the label file")
        return None
    manifest = write_manifest(series_dir / f"{dicom_index.safe_name(uid)}.series.json", root=images, files=files,
                              series_instance_uid=uid, study_instance_uid=first["study"] or "",
                              patient=first["patient"] or "", notes=notes)
    return CaseRow(path=manifest, patient=first["patient"] or first["study"] or uid,
                   series=first["description"] or uid, labels=case_labels)
