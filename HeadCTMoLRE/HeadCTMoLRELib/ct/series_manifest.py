"""Series manifests: a small JSON file that names the DICOM files of exactly one series.

Public datasets such as RSNA 2019 keep every slice of every series in one flat folder; a cases CSV row
must still point at one series. ``headct-molre import-dataset`` writes one manifest per series
(``<SeriesInstanceUID>.series.json``) and ``load_ct`` reads it like a DICOM folder holding only those
files. Format (version 1)::

    {"format": "headct-molre-series", "version": 1,
     "series_instance_uid": "...", "study_instance_uid": "...", "patient": "...",
     "root": "/abs/path/stage_2_train", "root_relative": "../../stage_2_train",
     "files": [{"path": "ID_0a1b2c3d4.dcm", "size": 525436}, ...,
               {"path": "fixed/ID_9f.dcm", "size": 524912, "relative_to": "manifest",
                "original": "ID_9f.dcm", "fix": "..."}],
     "notes": ["..."]}

``files`` are in slice order (inferior -> superior along the slice normal; the loader sorts by
ImagePositionPatient anyway). A file's ``path`` is relative to the dataset root unless ``relative_to`` is
``"manifest"`` (a corrected copy written by the importer next to the manifest). The root is looked up as
``root_relative`` (relative to the manifest's folder, so dataset and manifests can move together), then as
``root``. Each file's size is checked on reading: a changed or missing file is refused with the remedy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .checks import CTInputError

MANIFEST_FORMAT = "headct-molre-series"
MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".series.json"


@dataclass
class SeriesManifest:
    """A series manifest as read: ``files`` absolute paths in slice order, and the recorded identifiers."""

    path: Path
    files: list[Path]
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    patient: str = ""
    notes: list[str] = field(default_factory=list)


def is_series_manifest(path: str | os.PathLike) -> bool:
    """True for a file named ``*.series.json`` (the loader then reads it as a series manifest)."""
    return str(path).lower().endswith(MANIFEST_SUFFIX) and Path(path).is_file()


def write_series_manifest(path: str | os.PathLike, *, root: str | os.PathLike, files: list[dict],
                          series_instance_uid: str, study_instance_uid: str = "", patient: str = "",
                          notes: list[str] | None = None) -> Path:
    """Write a manifest at ``path`` (must end in ``.series.json``). ``files``: dicts with ``path`` (relative
    to ``root``, or to the manifest's folder with ``relative_to="manifest"``), ``size`` (bytes) and
    optionally ``original`` / ``fix``, in slice order. Written atomically (temp file + rename)."""
    path = Path(path)
    if not path.name.endswith(MANIFEST_SUFFIX):
        raise ValueError(f"{path}: a series manifest's name must end in {MANIFEST_SUFFIX}")
    root = Path(root).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        root_relative = os.path.relpath(root, path.parent.resolve())
    except ValueError:  # another drive (Windows)
        root_relative = None
    document = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                "series_instance_uid": series_instance_uid, "study_instance_uid": study_instance_uid,
                "patient": patient, "root": str(root), "root_relative": root_relative,
                "files": files, "notes": list(notes or [])}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=0), encoding="utf-8")
    os.replace(temporary, path)
    return path


def read_series_manifest(path: str | os.PathLike) -> SeriesManifest:
    """Read and check a manifest: every file must exist with its recorded size. Raises CTInputError naming
    the manifest, the problem and what to do."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CTInputError(f"{path}: not a readable series manifest ({error}); re-run `headct-molre "
                           "import-dataset` to write it again.") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise CTInputError(f"{path}: not a series manifest (format key is not {MANIFEST_FORMAT!r}).")
    if document.get("version") != MANIFEST_VERSION:
        raise CTInputError(f"{path}: series manifest version {document.get('version')!r} is not supported "
                           f"(this HeadCTMoLRE reads version {MANIFEST_VERSION}); re-run import-dataset.")
    entries = document.get("files")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and e.get("path") for e in entries):
        raise CTInputError(f"{path}: the series manifest lists no files.")
    root = _find_root(path, document, entries)
    files, missing, changed = [], [], []
    for entry in entries:
        base = path.parent if entry.get("relative_to") == "manifest" else root
        file = (base / entry["path"]).resolve()
        if not file.is_file():
            missing.append(file)
        elif entry.get("size") is not None and file.stat().st_size != int(entry["size"]):
            changed.append(file)
        files.append(file)
    if missing or changed:
        bad = missing or changed
        what = "missing" if missing else "changed size since the import"
        raise CTInputError(f"{path}: {len(bad)} of {len(files)} file(s) of series "
                           f"{document.get('series_instance_uid', '?')} are {what} (e.g. {bad[0]}). Restore the "
                           "dataset as it was imported, or re-run `headct-molre import-dataset` (fast: its index "
                           "is reused).")
    return SeriesManifest(path=path, files=files, series_instance_uid=str(document.get("series_instance_uid", "")),
                          study_instance_uid=str(document.get("study_instance_uid", "")),
                          patient=str(document.get("patient", "")), notes=list(document.get("notes") or []))


def read_series_files(path: str | os.PathLike) -> list[Path]:
    """The manifest's DICOM files (absolute, checked); what ``load_ct`` reads for a ``*.series.json``."""
    return read_series_manifest(path).files


def _find_root(path: Path, document: dict, entries: list[dict]) -> Path:
    probe = next((e["path"] for e in entries if e.get("relative_to") != "manifest"), None)
    candidates = []
    if document.get("root_relative"):
        candidates.append((path.parent / document["root_relative"]).resolve())
    if document.get("root"):
        candidates.append(Path(document["root"]))
    if probe is None:
        return candidates[0] if candidates else path.parent
    for candidate in candidates:
        if (candidate / probe).is_file():
            return candidate
    tried = " or ".join(str(c) for c in candidates) or "(no root recorded)"
    raise CTInputError(f"{path}: the series' files are not found under {tried} (looked for {probe}). If the "
                       "dataset moved, re-run `headct-molre import-dataset --src NEW_FOLDER` (its index is reused).")
