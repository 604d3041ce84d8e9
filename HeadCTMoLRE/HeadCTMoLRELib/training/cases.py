"""Labelled cases, the preprocessing cache, and batch prediction over many cases.

Cases CSV (one row per scan)::

    path,split,patient,series,epidural_hematoma,subdural_hematoma,...
    scans/case_0001.nii.gz,train,P001,,1,0,...
    dicom/patient_07,val,P007,1.2.840...,0,,...

Columns (``META_COLUMNS`` and one per finding id; nothing else is accepted):

- ``path``: an image file (NIfTI/NRRD/MHA) or a DICOM folder; relative paths are resolved against the
  CSV's folder.
- ``split`` (optional): train, val (also valid, validation) or test (also testing). Without the column,
  or where it is blank, training assigns a seeded share to validation (:func:`assign_splits`).
- ``patient`` (optional): a patient id. All scans of one patient stay in one split (a CSV that puts
  one patient into two splits is refused) and bootstrap intervals resample patients, not scans.
- ``series`` (optional): the DICOM SeriesInstanceUID to read from a folder holding several series.
- one column per finding id of the catalog: ``1`` (or ``1.0``, ``yes``, ``true``) positive, ``0`` (or
  ``0.0``, ``no``, ``false``) negative, blank (or NA, N/A, ?, unknown, -) unknown, case-insensitive.
  Unknown labels are NaN and are masked out of the loss and of AUCs. A finding of the catalog without a
  column is unknown for every case.

The whole CSV is checked before any work: a column that is neither a meta column nor a finding id
(with the closest finding id as "did you mean"), a split or label value that is not one of the above,
and a patient in two splits raise one CaseTableError that lists every such mistake. Rows whose scan
does not exist (or has an empty path) are reported in ``CaseTable.problems`` and skipped, so that a
batch survives a missing scan. Phantom datasets written by ``phantom.write_phantom_dataset``
(labels.csv) read as they are.

Preprocessing cache: a case's slice stack is stored under
``sha256(format version, sha256 of the input's bytes, PreprocessConfig)`` in a safetensors file
(``pixels`` uint8 (S, C, H, W) = round(255 * window value), C = the bundle's windows (3; Pillar0 headct 11), ``slice_valid`` uint8 (S,); warnings in the
metadata). The window values lose at most 1/510 of a window (0.16 HU in the brain window), well under
CT noise. Default folder ``~/.cache/headct-molre/stacks``; ``HEADCT_MOLRE_CACHE`` or an argument
overrides it. Only safetensors and JSON are read back, never pickle. Each entry carries its own key,
the sha256 and byte count of its tensors and their shapes (metadata), is written atomically (fsync +
rename), and is checked whenever it is read: a truncated, empty, corrupted or swapped entry is reported
(``CacheResult.rebuilt``) and rebuilt by the next ``build_cache``, never a crash that needs the cache
deleted by hand.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .. import calibration, metrics

CACHE_FORMAT_VERSION = 2
MAX_CACHE_ENTRY_BYTES = 4 * 1024 ** 3
CACHE_ENV = "HEADCT_MOLRE_CACHE"
SPLITS = ("train", "val", "test")
#: Columns of a cases CSV that are not findings (see the module docstring).
META_COLUMNS = ("path", "split", "patient", "series")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
_UNKNOWN_TEXT = {"", "na", "nan", "n/a", "?", "unknown", "-"}
_POSITIVE_TEXT = {"1", "1.0", "true", "yes"}
_NEGATIVE_TEXT = {"0", "0.0", "false", "no"}


class CaseTableError(ValueError):
    """A cases CSV that cannot be used at all; the message names the file and what to fix."""


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One labelled scan: ``path`` (file or DICOM folder, absolute), ``labels`` float32 (C,) in catalog
    order with 1/0/NaN (unknown), ``split`` ("train", "val", "test" or None when not given), ``row``
    (1-based line number in the CSV, header = line 1), ``patient`` and ``series`` (None when not given)."""

    path: Path
    labels: np.ndarray
    split: str | None = None
    row: int = 0
    patient: str | None = None
    series: str | None = None


@dataclass
class CaseTable:
    """The usable cases of a CSV and what was wrong with the rest.

    ``catalog``: the FindingCatalog the labels follow; ``problems``: human-readable strings
    ("file, row N: what"); ``finding_columns``: catalog ids that had a column; ``missing_findings``:
    catalog ids without one (all unknown); ``ignored_columns``: columns that are no finding id;
    ``has_split``: the CSV had a split column; ``has_patient``: it had a patient column; ``synthetic``: the CSV is a phantom dataset (its
    ``metadata.json`` from ``phantom.write_phantom_dataset`` lies next to it); ``csv_sha256``.
    """

    cases: list[Case]
    catalog: Any
    problems: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    csv_sha256: str | None = None
    finding_columns: tuple[str, ...] = ()
    missing_findings: tuple[str, ...] = ()
    ignored_columns: tuple[str, ...] = ()
    has_split: bool = False
    synthetic: bool = False
    has_patient: bool = False

    def __len__(self) -> int:
        return len(self.cases)

    def labels(self) -> np.ndarray:
        """float32 (N, C) labels with NaN for unknown."""
        if not self.cases:
            return np.zeros((0, len(self.catalog)), np.float32)
        return np.stack([case.labels for case in self.cases])

    def subset(self, cases: Sequence[Case]) -> "CaseTable":
        return CaseTable(cases=list(cases), catalog=self.catalog, problems=[], csv_path=self.csv_path,
                         csv_sha256=self.csv_sha256, finding_columns=self.finding_columns,
                         missing_findings=self.missing_findings, ignored_columns=self.ignored_columns,
                         has_split=self.has_split, synthetic=self.synthetic, has_patient=self.has_patient)

    def patients(self) -> list[str]:
        """One group id per case for bootstrap and split grouping: the patient id, or the case's own path
        when the CSV names no patient (every scan its own patient)."""
        return [case.patient if case.patient else f"case:{case.path}" for case in self.cases]

    def split(self, name: str) -> "CaseTable":
        return self.subset([case for case in self.cases if case.split == name])

    def counts(self) -> dict:
        """JSON-able summary: cases per split, positives / negatives / unknown per finding."""
        labels = self.labels()
        splits: dict[str, int] = {}
        for case in self.cases:
            splits[case.split or "unassigned"] = splits.get(case.split or "unassigned", 0) + 1
        return {
            "cases": len(self.cases),
            "splits": splits,
            "positives": {fid: int(np.nansum(labels[:, i] == 1)) for i, fid in enumerate(self.catalog.ids)},
            "known_labels": int(np.isfinite(labels).sum()),
            "unknown_labels": int(np.isnan(labels).sum()),
        }


def _sha256_bytes_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_label(text: str) -> float | None:
    """'1' -> 1.0, '0' -> 0.0, blank/NA -> NaN, anything else -> None (a problem)."""
    value = (text or "").strip().lower()
    if value in _POSITIVE_TEXT:
        return 1.0
    if value in _NEGATIVE_TEXT:
        return 0.0
    if value in _UNKNOWN_TEXT:
        return math.nan
    return None


def is_phantom_dataset(csv_path: str | os.PathLike) -> bool:
    """True when ``csv_path`` sits next to the ``metadata.json`` that ``phantom.write_phantom_dataset``
    writes (a list of per-case dicts with the drawn findings and seeds)."""
    metadata = Path(csv_path).with_name("metadata.json")
    if not metadata.is_file():
        return False
    try:
        entries = json.loads(metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(entries, list) and bool(entries) and all(
        isinstance(e, dict) and "findings_drawn" in e and "seed" in e for e in entries)


def read_cases(csv_path: str | os.PathLike, catalog) -> CaseTable:
    """Read a cases CSV (see the module docstring) against ``catalog`` (a findings.FindingCatalog).

    Returns a CaseTable whose ``cases`` are the usable rows and whose ``problems`` list the rows skipped
    (scan not found) and the catalog findings without a column. Raises CaseTableError, listing every
    mistake at once, when the CSV is wrong: no such file, no ``path`` column, duplicate columns, no
    finding column, a column that is neither a meta column nor a finding id, a split or label value
    that cannot be read, a patient in two splits.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    if not csv_path.is_file():
        raise CaseTableError(f"{csv_path}: no such cases CSV. Give a CSV with a 'path' column and one column "
                             "per finding id (1, 0 or blank).")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        rows = list(reader)
    _check_header(csv_path, header, catalog)
    columns = {name: index for index, name in enumerate(header)}
    finding_columns = tuple(fid for fid in catalog.ids if fid in columns)
    mistakes = [_unknown_column_message(name, catalog) for name in header
                if name not in META_COLUMNS and name not in catalog]
    problems = []
    missing = tuple(fid for fid in catalog.ids if fid not in columns)
    if missing:
        problems.append(f"{csv_path.name}: {len(missing)} finding(s) of the catalog have no column and are "
                        f"unknown for every case (e.g. {', '.join(missing[:5])})")
    cases = []
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        case, problem, mistake = _parse_row(csv_path, line, row, columns, catalog)
        problems += [problem] if problem else []
        mistakes += [mistake] if mistake else []
        if case is not None:
            cases.append(case)
    mistakes += _patients_in_two_splits(cases)
    if mistakes:
        shown = "\n  ".join(mistakes[:25]) + (f"\n  ... and {len(mistakes) - 25} more" if len(mistakes) > 25 else "")
        raise CaseTableError(f"{csv_path}: {len(mistakes)} mistake(s) in the cases CSV; nothing was done. Fix them "
                             f"and rerun:\n  {shown}\n(accepted columns: {', '.join(META_COLUMNS)} and the finding "
                             "ids of Resources/findings.csv; labels 1/0/blank, also yes/no, true/false)")
    return CaseTable(cases=cases, catalog=catalog, problems=problems, csv_path=csv_path,
                     csv_sha256=_sha256_bytes_of(csv_path), finding_columns=finding_columns,
                     missing_findings=missing, ignored_columns=(), has_split="split" in columns,
                     synthetic=is_phantom_dataset(csv_path), has_patient="patient" in columns)


def _unknown_column_message(name: str, catalog) -> str:
    import difflib

    close = difflib.get_close_matches(name.lower(), list(catalog.ids) + list(META_COLUMNS), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"not a finding id nor one of {', '.join(META_COLUMNS)}"
    return f"column '{name}': {hint}"


def _patients_in_two_splits(cases: list[Case]) -> list[str]:
    splits: dict[str, dict[str, int]] = {}
    for case in cases:
        if case.patient and case.split:
            splits.setdefault(case.patient, {}).setdefault(case.split, case.row)
    return [f"patient '{patient}' is in splits " + " and ".join(f"{split} (row {row})" for split, row in rows.items())
            + "; all scans of a patient belong in one split"
            for patient, rows in splits.items() if len(rows) > 1]


def _check_header(csv_path: Path, header: list[str], catalog) -> None:
    if "path" not in header:
        raise CaseTableError(f"{csv_path}: no 'path' column (header: {', '.join(header[:8]) or 'empty'}). The "
                             "first row must name the columns: path, optional split, then finding ids.")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise CaseTableError(f"{csv_path}: duplicate column(s) {', '.join(duplicated)}; each column once.")
    if not any(fid in header for fid in catalog.ids):
        raise CaseTableError(f"{csv_path}: no column names a finding of the model's catalog (e.g. "
                             f"{', '.join(catalog.ids[:3])}); nothing to learn from. Check the finding ids.")


def _parse_row(csv_path: Path, line: int, row: list[str], columns: dict,
               catalog) -> tuple[Case | None, str | None, str | None]:
    """-> (case or None, problem (row skipped) or None, mistake (CSV refused) or None)."""
    where = f"row {line}"
    cell = lambda name: row[columns[name]].strip() if name in columns and columns[name] < len(row) else ""  # noqa: E731
    split = None
    if cell("split"):
        split = _SPLIT_ALIASES.get(cell("split").lower())
        if split is None:
            return None, None, f"{where}: split '{cell('split')}' is not train, val or test (or blank)"
    labels = np.full(len(catalog), np.nan, np.float32)
    bad = []
    for index, fid in enumerate(catalog.ids):
        if fid not in columns:
            continue
        value = _parse_label(cell(fid))
        if value is None:
            bad.append(f"'{cell(fid)}' for {fid}")
        else:
            labels[index] = value
    if bad:
        return None, None, f"{where}: label {', '.join(bad[:3])} is not 1, 0 or blank"
    raw_path = cell("path")
    if not raw_path:
        return None, f"{csv_path.name}, {where}: empty path; row skipped", None
    path = Path(raw_path).expanduser()
    path = path if path.is_absolute() else (csv_path.parent / path)
    if not path.exists():
        return None, f"{csv_path.name}, {where}: {path} does not exist; row skipped", None
    return Case(path=path.resolve(), labels=labels, split=split, row=line, patient=cell("patient") or None,
                series=cell("series") or None), None, None


def assign_splits(table: CaseTable, val_fraction: float, seed: int) -> CaseTable:
    """Cases without a split get "train" or "val", seeded and roughly stratified, by patient.

    The unit is the patient (the ``patient`` column; a case without one is its own patient): a patient
    with a split on some of its scans gives it to the others, and a patient without any goes to train or
    val as a whole. Patients are grouped by the rarest positive finding among their scans (or "no
    positive"), and each group gives round(val_fraction * n) of its patients (at least one from groups
    of 2 or more when val_fraction > 0) to validation. Returns a new CaseTable."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    labels = table.labels()
    with np.errstate(invalid="ignore"):
        known = np.isfinite(labels).sum(axis=0)
        prevalence = np.where(known > 0, np.nansum(labels, axis=0) / np.maximum(known, 1), 0.0)
    units: dict[str, list[int]] = {}
    for index, patient in enumerate(table.patients()):
        units.setdefault(patient, []).append(index)
    chosen: dict[int, str] = {}
    groups: dict[int, list[str]] = {}
    for unit, members in units.items():
        given = [table.cases[i].split for i in members if table.cases[i].split is not None]
        if given:
            chosen.update({i: given[0] for i in members})
            continue
        positives = np.flatnonzero(np.any(labels[members] == 1, axis=0))
        key = int(positives[np.argmin(prevalence[positives])]) if len(positives) else -1
        groups.setdefault(key, []).append(unit)
    rng = np.random.default_rng([int(seed), 7])
    for key in sorted(groups):
        members = sorted(groups[key])
        rng.shuffle(members)
        count = int(round(val_fraction * len(members)))
        if val_fraction > 0 and count == 0 and len(members) >= 2:
            count = 1
        for position, unit in enumerate(members):
            chosen.update({i: "val" if position < count else "train" for i in units[unit]})
    cases = [dataclasses.replace(case, split=chosen[i]) for i, case in enumerate(table.cases)]
    result = table.subset(cases)
    result.problems = list(table.problems)
    return result


# ------------------------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    """``$HEADCT_MOLRE_CACHE`` if set, else ``~/.cache/headct-molre/stacks``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headct-molre" / "stacks"


_HASH_MEMO: dict[tuple, str] = {}  # (path, sizes and mtimes) -> sha256, so repeated builds in a process skip reading


def input_sha256(path: str | os.PathLike) -> str:
    """sha256 of an input's bytes: a file's content, or for a folder every file below it in sorted
    relative-path order (name and content), so a DICOM series hashes the same wherever it is copied.
    Within one process the result is remembered while the files' sizes and modification times stay."""
    path = Path(path)
    files = [path] if path.is_file() else sorted((p for p in path.rglob("*") if p.is_file()),
                                                 key=lambda p: p.relative_to(path).as_posix())
    signature = (str(path.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if signature in _HASH_MEMO:
        return _HASH_MEMO[signature]
    if path.is_file():
        result = _sha256_bytes_of(path)
    else:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            digest.update(bytes.fromhex(_sha256_bytes_of(file)))
        result = digest.hexdigest()
    _HASH_MEMO[signature] = result
    return result


def cache_key(input_hash: str, preprocessing) -> str:
    """The cache file name (hex sha256) for an input hash and a PreprocessConfig."""
    text = json.dumps({"format": CACHE_FORMAT_VERSION, "input": input_hash,
                       "preprocessing": preprocessing.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class CachedStack:
    """A slice stack read back from the cache: ``pixels`` uint8 (S, C, H, W) (window value * 255; slice
    inferior -> superior, row anterior -> posterior, column right -> left), ``slice_valid`` bool (S,)."""

    pixels: np.ndarray
    slice_valid: np.ndarray
    warnings: list[str] = field(default_factory=list)


class CacheEntryError(ValueError):
    """A cache entry that cannot be used (truncated, empty, corrupted, swapped); it is rebuilt."""


def _content_digest(tensors: dict[str, np.ndarray]) -> tuple[str, int]:
    """sha256 and byte count over the tensors' names, dtypes, shapes and bytes (sorted by name)."""
    digest, size = hashlib.sha256(), 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
        size += array.nbytes
    return digest.hexdigest(), size


def write_cached_stack(path: Path, stack, source: str) -> None:
    """Store a preprocess.SliceStack at ``path`` (safetensors) with its key, digest and size in the
    metadata, atomically (temporary file, fsync, rename)."""
    from safetensors.numpy import save_file

    from ..atomic_files import atomic_write

    tensors = {
        "pixels": np.ascontiguousarray(np.round(np.clip(stack.pixels, 0.0, 1.0) * 255.0).astype(np.uint8)),
        "slice_valid": np.ascontiguousarray(np.asarray(stack.slice_valid, dtype=np.uint8)),
    }
    digest, size = _content_digest(tensors)
    metadata = {"format": f"headct-molre-stack-{CACHE_FORMAT_VERSION}", "source": source,
                "key": Path(path).stem, "content_sha256": digest, "content_bytes": str(size),
                "warnings": json.dumps(list(stack.warnings))}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def read_cached_stack(path: str | os.PathLike) -> CachedStack:
    """Read and check a stack written by ``write_cached_stack`` (safetensors only). Raises
    CacheEntryError naming the file and the problem for an entry that is empty, truncated, corrupted,
    of another format, or swapped with another entry (its stored key is not its file name)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise CacheEntryError(f"cache entry {path} cannot be read ({error.strerror or error})") from None
    if size == 0 or size > MAX_CACHE_ENTRY_BYTES:
        raise CacheEntryError(f"cache entry {path} is {'empty' if size == 0 else f'{size:,} bytes, too large'}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in ("pixels", "slice_valid")}
    except Exception as error:  # SafetensorError (truncated header/data), missing tensor, OSError
        raise CacheEntryError(f"cache entry {path} is damaged ({type(error).__name__}: {str(error)[:200]})") from None
    if metadata.get("format") != f"headct-molre-stack-{CACHE_FORMAT_VERSION}":
        raise CacheEntryError(f"cache entry {path} has format {metadata.get('format')!r:.60}, not this version's")
    if metadata.get("key") != path.stem:
        raise CacheEntryError(f"cache entry {path} holds the entry {str(metadata.get('key'))[:16]}... (swapped or "
                              "copied over another entry)")
    digest, content_bytes = _content_digest(tensors)
    if digest != metadata.get("content_sha256") or str(content_bytes) != metadata.get("content_bytes"):
        raise CacheEntryError(f"cache entry {path} does not match its own digest (corrupted)")
    pixels, valid = tensors["pixels"], tensors["slice_valid"]
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or valid.ndim != 1 or valid.shape[0] != pixels.shape[0]:
        raise CacheEntryError(f"cache entry {path} has tensors of unexpected shapes {pixels.shape}, {valid.shape}")
    try:
        warnings = json.loads(metadata.get("warnings", "[]"))
    except ValueError:
        raise CacheEntryError(f"cache entry {path} has unreadable warnings metadata") from None
    return CachedStack(pixels=pixels, slice_valid=valid.astype(bool), warnings=[str(w) for w in warnings])


def _cache_one(source: str, preprocessing_dict: dict, cache_dir: str,
               cached_only: bool = False) -> tuple[str, str | None, bool, str | None, str | None] | None:
    """Worker: (source) -> (source, cache file or None, was_cached, error or None, rebuilt note or None).
    Never raises for a bad input; the error text names the file and the problem. A damaged cache entry
    is removed and rebuilt, and the note says so. ``cached_only``: return None instead of preprocessing
    when there is no usable entry (the main process's first pass, which needs no worker)."""
    from ..ct.preprocess import PreprocessConfig, preprocess

    note = None
    try:
        config = PreprocessConfig.from_dict(preprocessing_dict)
        target = Path(cache_dir) / f"{cache_key(input_sha256(source), config)}.safetensors"
        if target.exists() or target.is_symlink():
            try:
                if target.is_symlink() or not target.is_file():
                    raise CacheEntryError(f"cache entry {target} is not a plain file")
                read_cached_stack(target)
                return source, str(target), True, None, None
            except CacheEntryError as problem:
                if cached_only:  # the full path removes, rebuilds and reports it
                    return None
                note = f"{source}: {problem}; rebuilt"
                if target.is_dir() and not target.is_symlink():
                    import shutil

                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
        if cached_only:
            return None
        from ..ct.loader import load_ct

        stack = preprocess(load_ct(source), config)
        if not stack.slice_valid.any():
            return source, None, False, f"{source}: no slice of the head frame lies inside the scan; skipped", note
        write_cached_stack(target, stack, source)
        return source, str(target), False, None, note
    except (ValueError, OSError, RuntimeError, MemoryError) as error:  # CTInputError is a ValueError
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return source, None, False, text if source in text else f"{source}: {text}", note


def _worker_init() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the pool provides the parallelism
    try:
        import torch  # preprocess may resample with torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@dataclass
class CacheResult:
    """``files``: source path -> cache file (for the cases that worked); ``failures``: (path, reason);
    ``reused``: how many were already cached; ``rebuilt``: (path, what was wrong with its damaged cache
    entry, which was rebuilt); ``seconds``: wall time."""

    files: dict[str, Path]
    failures: list[tuple[str, str]]
    reused: int = 0
    seconds: float = 0.0
    rebuilt: list[tuple[str, str]] = field(default_factory=list)


def build_cache(sources: Iterable[str | os.PathLike | Case], preprocessing, *, cache_dir=None,
                workers: int | None = None, progress: Callable[[dict], None] | None = None) -> CacheResult:
    """Preprocess every source (file or DICOM folder) into the cache, in parallel, skipping bad inputs.

    ``workers``: processes (default min(4, CPU count)); 0 or 1 runs in this process. ``progress``
    receives {"stage": "cache", "done", "total", "path"} after each case. Cases already cached cost a
    hash of their bytes. Returns a CacheResult; a bad case is in ``failures``, never raised.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(str(getattr(s, "path", s)) for s in sources))
    workers = min(4, os.cpu_count() or 1) if workers is None else int(workers)
    args = (preprocessing.to_dict(), str(cache_dir))
    result = CacheResult(files={}, failures=[])

    def record(outcome):
        source, file, cached, error, note = outcome
        if note:
            result.rebuilt.append((source, note))
        if file:
            result.files[source] = Path(file)
            result.reused += int(cached)
        else:
            result.failures.append((source, error or "unknown error"))
        if progress:
            progress({"stage": "cache", "done": len(result.files) + len(result.failures), "total": len(unique),
                      "path": source, **({"rebuilt": note} if note else {})})

    to_build = []
    for source in unique:  # cases already cached cost a hash here: no worker process (and its torch import)
        outcome = _cached_outcome(source, args)
        if outcome is None:
            to_build.append(source)
        else:
            record(outcome)
    if workers <= 1 or len(to_build) <= 1:
        for source in to_build:
            record(_cache_one(source, *args))
    else:
        broken = _build_in_pool(to_build, args, workers, record)
        if broken:  # the pool never worked (e.g. a script without `if __name__ == "__main__":`): go serial
            for source in broken:
                record(_cache_one(source, *args))
    result.seconds = time.perf_counter() - start
    return result


def _cached_outcome(source: str, args: tuple):
    """`_cache_one`'s outcome when ``source`` has a usable cache entry or cannot even be read for hashing
    (its failure, with the message a worker would give), else None: it needs preprocessing."""
    try:
        return _cache_one(source, *args, cached_only=True)
    except Exception:  # noqa: BLE001 - the full path reports every problem with its message
        return None


def _build_in_pool(sources: list[str], args: tuple, workers: int, record) -> list[str]:
    """Run `_cache_one` over ``sources`` in a spawn process pool, passing outcomes to ``record``.
    Returns the sources to redo in this process when the pool broke before finishing any case."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    finished, broken = 0, []
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(sources)), mp_context=context,
                                                initializer=_worker_init) as pool:
        futures = {pool.submit(_cache_one, source, *args): source for source in sources}
        for future in concurrent.futures.as_completed(futures):
            try:
                outcome = future.result()
            except concurrent.futures.process.BrokenProcessPool as error:
                if finished == 0:
                    broken.append(futures[future])
                    continue
                outcome = (futures[future], None, False, f"{futures[future]}: preprocessing crashed ({error})", None)
            finished += 1
            record(outcome)
    return broken


def stack_batch(files: Sequence[Path]):
    """Read cached stacks -> (pixels uint8 torch (B, S, C, H, W), slice_valid bool torch (B, S))."""
    import torch

    stacks = [read_cached_stack(f) for f in files]
    pixels = torch.from_numpy(np.stack([s.pixels for s in stacks]))
    valid = torch.from_numpy(np.stack([s.slice_valid for s in stacks]))
    return pixels, valid


# ------------------------------------------------------------------------------------------ predictions
@dataclass
class CasePredictions:
    """Model outputs over many cases (N = cases that worked, C = findings in catalog order).

    ``logits``: float64 (N, C) raw model logits, BEFORE the bundle's calibration;
    ``probabilities``: float64 (N, C) = sigmoid((logits - logit_offsets) / temperature) (what `infer`
    reports; see calibration.py); ``logit_offsets`` (C,) the bundle's prior correction (zeros without);
    ``labels``: float32 (N, C) 1/0/NaN; ``paths``: N input paths; ``splits``: N splits (or None);
    ``failures``: (path, reason) for cases skipped; ``temperature``; ``catalog``.
    """

    probabilities: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    paths: list[str]
    failures: list[tuple[str, str]]
    catalog: Any = None
    temperature: float = 1.0
    splits: list[str | None] = field(default_factory=list)
    logit_offsets: Any = 0.0
    patients: list[str | None] = field(default_factory=list)


def _as_cases(cases, catalog) -> list[Case]:
    """CaseTable / list of Case / list of paths -> list of Case with labels in ``catalog`` order."""
    if isinstance(cases, (str, os.PathLike)):
        cases = read_cases(cases, catalog)
    table_catalog = getattr(cases, "catalog", None)
    items = list(getattr(cases, "cases", cases))
    result = []
    for item in items:
        if not isinstance(item, Case):
            result.append(Case(Path(item), np.full(len(catalog), np.nan, np.float32)))
        elif table_catalog is not None and tuple(table_catalog.ids) != tuple(catalog.ids):
            old = {fid: i for i, fid in enumerate(table_catalog.ids)}
            labels = np.array([item.labels[old[fid]] if fid in old else np.nan for fid in catalog.ids], np.float32)
            result.append(dataclasses.replace(item, labels=labels))
        else:
            result.append(item)
    return result


def _resolve_model(bundle_or_model, preprocessing):
    """-> (bundle or None, classifier or None, catalog, preprocessing, temperature, logit offsets (C,) or 0.0).

    A bundle's classifier is left to `inference.cached_model` (None here): the inference-only model,
    built once per process, device and precision."""
    from ..model.bundle import Bundle, load_bundle

    if isinstance(bundle_or_model, (str, os.PathLike, Bundle)):
        bundle = bundle_or_model if isinstance(bundle_or_model, Bundle) else load_bundle(bundle_or_model)
        offsets = calibration.logit_offsets(bundle.manifest, bundle.catalog.ids)
        return (bundle, None, bundle.catalog, preprocessing or bundle.preprocessing, bundle.temperature, offsets)
    model = getattr(bundle_or_model, "module", bundle_or_model)  # DistributedDataParallel
    if preprocessing is None:
        raise ValueError("predict_cases with a model (not a bundle) needs preprocessing=PreprocessConfig(...).")
    return None, model, getattr(model, "catalog", None), preprocessing, 1.0, 0.0


def predict_cases(bundle_or_model, cases, *, preprocessing=None, cache_dir=None, device="auto",
                  precision="auto", batch_size: int = 4, progress=None, catalog=None,
                  workers: int | None = None, chunk_size: int | None = None,
                  threads: int | str | None = None) -> CasePredictions:
    """Run a bundle (folder or bundle.Bundle) or a HeadCTClassifier over many cases.

    ``cases``: a CaseTable, a cases CSV path, a list of Case, or a list of image paths (labels unknown).
    ``preprocessing``: needed with a bare model (a bundle brings its own). ``catalog``: the labels'
    catalog for a bare model (default: the CaseTable's). Stacks come from (and go to) the preprocessing
    cache. ``device``: "auto" (a bare model stays on its own device), "cpu", "cuda"...; ``precision``:
    auto/fp32/bf16/fp16. ``progress`` receives {"stage": "cache"|"predict", "done", "total"}. Cases that
    cannot be read are listed in ``failures``. The model's train/eval mode is restored afterwards.
    A bundle runs as `infer` runs it: the cached inference model (LoRA merged, fused attention), slices
    ``chunk_size`` at a time (None: 8 on the CPU, all on a GPU), torch threads by work size (``threads``:
    an explicit count, see threads.py).
    """
    import torch

    from ..inference import (_CPU_DEFAULT_CHUNK, _autocast, _cpu_threads, cached_model, forward_flops_per_slice,
                             select_device, select_precision)

    bundle, model, model_catalog, preprocessing, temperature, offsets = _resolve_model(bundle_or_model,
                                                                                      preprocessing)
    catalog = model_catalog or catalog or getattr(cases, "catalog", None)
    if catalog is None:
        raise ValueError("predict_cases needs a catalog: pass a bundle, a CaseTable or catalog=...")
    case_list = _as_cases(cases, catalog)
    cached = build_cache(case_list, preprocessing, cache_dir=cache_dir, workers=workers, progress=progress)
    usable = [case for case in case_list if str(case.path) in cached.files]
    if device == "auto" and model is not None and hasattr(model, "parameters"):
        torch_device = next(model.parameters()).device
    else:
        torch_device = select_device(device)
    chosen_precision = select_precision(torch_device, precision)  # "auto": as `headct-molre infer` chooses
    if model is None:
        model = cached_model(bundle, torch_device, chosen_precision) if usable else None
    if chunk_size is None and torch_device.type == "cpu":
        chunk_size = _CPU_DEFAULT_CHUNK
    was_training = bool(model is not None and model.training)
    if model is not None:
        model.to(torch_device).eval()
    logits = []
    try:
        for start in range(0, len(usable), batch_size):
            batch = usable[start:start + batch_size]
            pixels, valid = stack_batch([cached.files[str(c.path)] for c in batch])
            pixels = pixels.to(torch_device).float().div_(255.0)
            slices_per_call = chunk_size or int(valid.sum())
            with _cpu_threads(torch_device, forward_flops_per_slice(model) * slices_per_call, threads), \
                    torch.inference_mode(), _autocast(torch_device, chosen_precision):
                output = model(pixels, valid.to(torch_device), chunk_size=chunk_size)
            logits.append(output.logits.float().cpu().numpy().astype(np.float64))
            if progress:
                progress({"stage": "predict", "done": start + len(batch), "total": len(usable)})
    finally:
        if model is not None and bundle is None:
            model.train(was_training)
    logits_array = np.concatenate(logits) if logits else np.zeros((0, len(catalog)))
    probabilities = metrics.sigmoid(calibration.calibrated_logits(logits_array, offsets, temperature))
    labels = np.stack([c.labels for c in usable]) if usable else np.zeros((0, len(catalog)), np.float32)
    return CasePredictions(probabilities=probabilities, logits=logits_array, labels=labels,
                           paths=[str(c.path) for c in usable], failures=list(cached.failures),
                           catalog=catalog, temperature=float(temperature), splits=[c.split for c in usable],
                           logit_offsets=offsets, patients=[c.patient for c in usable])
