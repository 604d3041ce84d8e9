"""Parallel, resumable, indexed DICOM header scan of a large folder tree (RSNA: ~750,000 flat files).

``scan_folder(root, index_path)`` reads the header of every file under ``root`` (pixel data skipped)
in a process pool and stores one row per file in a SQLite index, keyed by the path relative to ``root``
with the file's size and modification time. A second scan re-reads only files that are new or whose
size or mtime changed, and drops rows of files that are gone, so re-importing a dataset costs a
directory walk and one ``stat`` per file. Rows are committed every few seconds: an interrupted scan
resumes where it stopped. Memory stays bounded: files are streamed from the directory walk in chunks,
at most ``4 x workers`` chunks are in flight, and only one row per file (never a pydicom dataset)
leaves a worker.

Table ``files`` (one row per file): ``path`` (relative, "/"-separated), ``size`` (bytes),
``mtime_ns``, ``status`` ("image": a DICOM image with pixel data; "other": DICOM without an image, e.g.
DICOMDIR or a report; "error": not DICOM, unreadable, or pixel data shorter than the header says),
``reason`` (for "other"/"error"), and for images: ``sop``, ``study``, ``series``, ``patient`` (UIDs and
PatientID), ``modality``, ``description`` (SeriesDescription), ``kernel``, ``ipp_x/y/z`` (LPS mm),
``iop`` (6 direction cosines, "\\"-joined), ``rows``, ``columns``, ``bits_stored``,
``pixel_representation``, ``slope``, ``intercept``, ``instance``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import multiprocessing
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

INDEX_FORMAT = 1
CHUNK_FILES = 256  # files per worker task
COMMIT_SECONDS = 5.0

_COLUMNS = ("path", "size", "mtime_ns", "status", "reason", "sop", "study", "series", "patient", "modality",
            "description", "kernel", "ipp_x", "ipp_y", "ipp_z", "iop", "rows", "columns", "bits_stored",
            "pixel_representation", "slope", "intercept", "instance")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, status TEXT, reason TEXT,
    sop TEXT, study TEXT, series TEXT, patient TEXT, modality TEXT, description TEXT, kernel TEXT,
    ipp_x REAL, ipp_y REAL, ipp_z REAL, iop TEXT, rows INTEGER, columns INTEGER, bits_stored INTEGER,
    pixel_representation INTEGER, slope REAL, intercept REAL, instance INTEGER, seen INTEGER);
CREATE INDEX IF NOT EXISTS files_series ON files(series);
CREATE INDEX IF NOT EXISTS files_sop ON files(sop);
"""


@dataclass
class ScanSummary:
    """What one scan did: ``total`` files found, ``scanned`` (headers read now), ``reused`` (unchanged,
    taken from the index), ``removed`` (rows of files no longer present), ``errors`` (status "error" among
    all files), ``seconds`` (wall time) and ``files_per_second`` over the whole walk."""

    total: int = 0
    scanned: int = 0
    reused: int = 0
    removed: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def files_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


def open_index(index_path: str | os.PathLike) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite index; refuses an index of another format version."""
    connection = sqlite3.connect(str(index_path))
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(_SCHEMA)
    row = connection.execute("SELECT value FROM meta WHERE key='format'").fetchone()
    if row is None:
        connection.execute("INSERT INTO meta VALUES ('format', ?)", (str(INDEX_FORMAT),))
        connection.commit()
    elif row[0] != str(INDEX_FORMAT):
        connection.close()
        raise ValueError(f"{index_path}: index format {row[0]} is not {INDEX_FORMAT}; delete the file and re-run "
                         "(the next import scans every file again).")
    return connection


# ------------------------------------------------------------------------------------------ one header
def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _number(ds, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def quiet_pydicom():
    """No pydicom value-validation warnings while reading (RSNA's "ID_..." UIDs would give one per file);
    the reader's setting is restored afterwards."""
    from pydicom import config

    saved = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = saved


def read_file_header(path: Path) -> dict:
    """One file's index row (without path/size/mtime): {"status": "image"|"other"|"error", "reason", ...}.
    Never raises: a bad file gives status "error" and the reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, defer_size=1024)
        except InvalidDicomError:
            return {"status": "error", "reason": "not a DICOM file (no DICM prefix)"}
        except Exception as error:  # noqa: BLE001 - truncated/garbled files raise assorted errors
            return {"status": "error", "reason": f"unreadable DICOM ({type(error).__name__}: {str(error)[:120]})"}
        try:
            return _image_row(path, ds)
        except Exception as error:  # noqa: BLE001 - a garbled element value
            return {"status": "error", "reason": f"corrupt header ({type(error).__name__}: {str(error)[:120]})"}


def _truncation(path: Path, ds) -> str | None:
    """Why the pixel data is shorter than the header promises, or None. A deferred (large) element is
    checked against the file size; a read one against Rows x Columns x samples x frames x bytes per sample
    (uncompressed transfer syntaxes only)."""
    pixel = ds.get_item("PixelData")
    offset, length = getattr(pixel, "value_tell", None), getattr(pixel, "length", None)
    if offset is not None and length not in (None, 0xFFFFFFFF):
        if offset + length > path.stat().st_size:
            return f"truncated: pixel data ends at byte {offset + length}, the file has {path.stat().st_size} bytes"
        return None
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    value = getattr(pixel, "value", None)
    if syntax is None or getattr(syntax, "is_compressed", True) or not isinstance(value, (bytes, bytearray)):
        return None
    expected = (int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("SamplesPerPixel") or 1)
                * int(_number(ds, "NumberOfFrames") or 1) * ((int(ds.get("BitsAllocated") or 16) + 7) // 8))
    if len(value) < expected:
        return f"truncated: {len(value)} of {expected} bytes of pixel data"
    return None


def _image_row(path: Path, ds) -> dict:
    if "DirectoryRecordSequence" in ds:
        return {"status": "other", "reason": "DICOMDIR index"}
    if "PixelData" not in ds or "Rows" not in ds:
        return {"status": "other", "reason": "DICOM object without an image"}
    if not _text(ds, "SOPInstanceUID"):
        return {"status": "error", "reason": "no SOPInstanceUID (truncated or not an image)"}
    truncated = _truncation(path, ds)
    if truncated:
        return {"status": "error", "reason": truncated}
    ipp = ds.get("ImagePositionPatient")
    try:
        ipp = [float(v) for v in ipp] if ipp is not None and len(ipp) == 3 else [None, None, None]
    except (TypeError, ValueError):
        ipp = [None, None, None]
    instance = _number(ds, "InstanceNumber")
    return {"status": "image", "reason": None, "sop": _text(ds, "SOPInstanceUID"),
            "study": _text(ds, "StudyInstanceUID"), "series": _text(ds, "SeriesInstanceUID"),
            "patient": _text(ds, "PatientID"), "modality": _text(ds, "Modality").upper(),
            "description": _text(ds, "SeriesDescription"), "kernel": _text(ds, "ConvolutionKernel"),
            "ipp_x": ipp[0], "ipp_y": ipp[1], "ipp_z": ipp[2], "iop": _text(ds, "ImageOrientationPatient"),
            "rows": int(ds.get("Rows") or 0), "columns": int(ds.get("Columns") or 0),
            "bits_stored": int(ds.get("BitsStored") or 0), "pixel_representation": int(ds.get("PixelRepresentation") or 0),
            "slope": _number(ds, "RescaleSlope"), "intercept": _number(ds, "RescaleIntercept"),
            "instance": None if instance is None else int(instance)}


def _read_chunk(root: str, items: list[tuple[str, int, int]]) -> list[tuple]:
    """Worker: headers of ``items`` (relative path, size, mtime_ns) -> index rows in _COLUMNS order."""
    rows = []
    for relative, size, mtime in items:
        header = read_file_header(Path(root) / relative)
        header.update(path=relative, size=size, mtime_ns=mtime)
        rows.append(tuple(header.get(column) for column in _COLUMNS))
    return rows


# ------------------------------------------------------------------------------------------ the walk
def _walk(root: Path) -> Iterator[tuple[str, int, int]]:
    """(relative "/" path, size, mtime_ns) of every regular file under ``root`` (hidden names skipped), in
    a stable order, streamed (a 750k-file folder is never held as a list)."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                subfolders.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=True):
                stat = entry.stat()
                yield Path(entry.path).relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns
        stack.extend(reversed(subfolders))


def count_files(root: Path) -> int:
    """Number of files ``_walk`` yields (a fast first pass, for the progress bar's total)."""
    total = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=True):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=True):
                        total += 1
        except OSError:
            continue
    return total


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in iterator:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def scan_folder(root: str | os.PathLike, index_path: str | os.PathLike, *, workers: int | None = None,
                progress: Callable[[dict], None] | None = None) -> ScanSummary:
    """Index the DICOM headers of every file under ``root`` into ``index_path`` (see module docstring).

    ``workers``: header-reading processes (default: CPU count); 0 or 1 reads in this process.
    ``progress`` receives {"stage": "scan", "done", "total", "scanned", "reused", "seconds"} about twice
    a second and at the end. Returns a ScanSummary.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder to scan.")
    started = time.perf_counter()
    summary = ScanSummary(total=count_files(root))
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    connection = open_index(index_path)
    generation = int(time.time_ns())
    try:
        connection.execute("INSERT OR REPLACE INTO meta VALUES ('root', ?)", (str(root),))
        state = {"last_report": 0.0, "last_commit": time.perf_counter()}

        def report(final: bool = False) -> None:
            now = time.perf_counter()
            if progress and (final or now - state["last_report"] >= 0.5):
                state["last_report"] = now
                progress({"stage": "scan", "done": summary.scanned + summary.reused, "total": summary.total,
                          "scanned": summary.scanned, "reused": summary.reused, "seconds": now - started})

        def store(rows: list[tuple]) -> None:
            connection.executemany(
                f"INSERT OR REPLACE INTO files ({', '.join(_COLUMNS)}, seen) VALUES "
                f"({', '.join('?' * len(_COLUMNS))}, {generation})", rows)
            summary.scanned += len(rows)
            if time.perf_counter() - state["last_commit"] >= COMMIT_SECONDS:
                connection.commit()
                state["last_commit"] = time.perf_counter()
            report()

        def pending_chunks() -> Iterator[list]:
            """Chunks of files that need reading; unchanged files are marked seen and counted as reused."""
            for chunk in _chunks(_walk(root), 2048):
                placeholders = ", ".join("?" * len(chunk))
                known = {path: (size, mtime) for path, size, mtime in connection.execute(
                    f"SELECT path, size, mtime_ns FROM files WHERE path IN ({placeholders})", [c[0] for c in chunk])}
                fresh = [c for c in chunk if known.get(c[0]) != (c[1], c[2])]
                unchanged = [c[0] for c in chunk if known.get(c[0]) == (c[1], c[2])]
                if unchanged:
                    connection.executemany(f"UPDATE files SET seen = {generation} WHERE path = ?",
                                           [(p,) for p in unchanged])
                    summary.reused += len(unchanged)
                    report()
                yield from _chunks(iter(fresh), CHUNK_FILES)

        if workers <= 1:
            for chunk in pending_chunks():
                store(_read_chunk(str(root), chunk))
        else:
            _scan_in_pool(str(root), pending_chunks(), workers, store)
        removed = connection.execute(f"DELETE FROM files WHERE seen != {generation}")
        summary.removed = max(removed.rowcount, 0)
        connection.commit()
        summary.errors = connection.execute("SELECT COUNT(*) FROM files WHERE status = 'error'").fetchone()[0]
    finally:
        connection.close()
    summary.seconds = time.perf_counter() - started
    report_final = progress
    if report_final:
        report_final({"stage": "scan", "done": summary.total, "total": summary.total, "scanned": summary.scanned,
                      "reused": summary.reused, "seconds": summary.seconds, "final": True})
    return summary


def _scan_in_pool(root: str, chunks: Iterator[list], workers: int, store: Callable[[list], None]) -> None:
    """Feed ``chunks`` to a spawn process pool with at most 4 x workers in flight; ``store`` each result."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        in_flight: set = set()
        for chunk in chunks:
            in_flight.add(pool.submit(_read_chunk, root, chunk))
            if len(in_flight) >= 4 * workers:
                done, in_flight = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    store(future.result())
        for future in concurrent.futures.as_completed(in_flight):
            store(future.result())


# ------------------------------------------------------------------------------------------ queries
def iter_rows(connection: sqlite3.Connection, where: str = "1", parameters: tuple = (),
              order: str = "series, path") -> Iterator[dict]:
    """Stream index rows as dicts (column -> value) matching ``where``, in ``order``."""
    cursor = connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM files WHERE {where} ORDER BY {order}", parameters)
    for row in cursor:
        yield dict(zip(_COLUMNS, row))


def iter_series(connection: sqlite3.Connection) -> Iterator[tuple[str, list[dict]]]:
    """(SeriesInstanceUID, its image rows) for every series in the index, one series in memory at a time."""
    current, members = None, []
    for row in iter_rows(connection, "status = 'image'"):
        if row["series"] != current and members:
            yield current, members
            members = []
        current = row["series"]
        members.append(row)
    if members:
        yield current, members


def problem_rows(connection: sqlite3.Connection) -> Iterator[dict]:
    """Rows of files that are no usable image (status "error" or "other"), by path."""
    return iter_rows(connection, "status != 'image'", order="path")


def slice_order(rows: list[dict]) -> list[dict]:
    """Rows sorted inferior -> superior along the normal of the first slice's plane (IPP . n); rows without
    position keep their order at the end."""
    try:
        iop = np.array([float(v) for v in rows[0]["iop"].split("\\")])
        normal = np.cross(iop[:3], iop[3:])
    except (ValueError, AttributeError):
        return rows
    placed = [r for r in rows if r["ipp_z"] is not None]
    placed.sort(key=lambda r: float(np.dot([r["ipp_x"], r["ipp_y"], r["ipp_z"]], normal)))
    return placed + [r for r in rows if r["ipp_z"] is None]


def safe_name(uid: str) -> str:
    """A UID as a file name (anything but letters, digits, dot, dash, underscore becomes "_")."""
    return re.sub(r"[^0-9A-Za-z._-]", "_", uid) or "series"
