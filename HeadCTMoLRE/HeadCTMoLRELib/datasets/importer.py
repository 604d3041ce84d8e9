"""Write what a dataset importer finds: the cases CSV, its dataset sidecar, the import log, reader files.

Outputs, for ``--out CASES.csv``:

* ``CASES.csv``: ``path, patient, series[, split], <every finding id of the catalog>``; one row per case
  (series or scan), labels 1/0, blank where the dataset does not label the finding. ``path`` is relative
  to the CSV's folder when it lies below it (series manifests), otherwise absolute.
* ``CASES.dataset.json``: dataset name, licence, source, what a model trained on it inherits, the label
  table used (path, sha256), counts (cases, patients, positives/negatives per finding), the findings it
  cannot evaluate. ``train`` copies it into the bundle's training provenance (model card).
* ``CASES.import.log``: every problem found, one per line (``kind: message``), and the summary.
* ``CASES.index.sqlite``: the header index of DICOM datasets (see ``dicom_index``), reused next time.
* CQ500 only: ``CASES.reader1.csv`` .. ``reader3.csv``: the same cases with each reader's own labels.

Patient-level splits (``splits=(0.8, 0.1, 0.1)``): each patient goes to train/val/test by a seeded hash of
its id, so every series of a patient lands in one split and re-importing gives the same split.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

SIDECAR_FORMAT = "headct-molre-dataset"
SIDECAR_VERSION = 1
DATASETS = ("rsna-ich", "cq500", "ct-ich")
EXAMPLES_PER_KIND = 5


@dataclass
class CaseRow:
    """One case an importer found: ``path`` (file, DICOM folder or series manifest), ``patient``,
    ``series`` (a human-readable name: SeriesDescription, else SeriesInstanceUID or scan name), ``labels``
    (dataset label -> 1/0/None, study level) and, for multi-reader datasets, ``readers`` (reader name ->
    that reader's dataset labels)."""

    path: Path
    patient: str
    series: str
    labels: dict
    readers: dict = field(default_factory=dict)


class ImportLog:
    """Problems found during an import: each is written to the log file at once (so a 750k-file import
    never holds them all) and counted by kind; the first few of each kind are kept for the summary."""

    def __init__(self, path: Path):
        self.path = path
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self._handle: TextIO = path.open("w", encoding="utf-8")

    def add(self, kind: str, message: str, count: int = 1) -> None:
        self.counts[kind] += count
        examples = self.examples.setdefault(kind, [])
        if len(examples) < EXAMPLES_PER_KIND:
            examples.append(message)
        self._handle.write(f"{kind}: {message}\n")

    def write(self, text: str) -> None:
        self._handle.write(text + "\n")

    def close(self) -> None:
        self._handle.close()


@dataclass
class ImportResult:
    """What ``import_dataset`` wrote and found: ``csv_path``, ``sidecar_path``, ``log_path``, ``index_path``
    (or None), ``reader_paths``; ``counts`` (the sidecar's counts); ``problems`` (kind -> number) and
    ``examples`` (kind -> first messages); ``scan`` (the header scan's summary as a dict, DICOM datasets)."""

    csv_path: Path
    sidecar_path: Path
    log_path: Path
    index_path: Path | None
    reader_paths: list[Path]
    counts: dict
    problems: dict
    examples: dict
    scan: dict | None = None

    def to_json(self) -> dict:
        return {"cases_csv": str(self.csv_path), "sidecar": str(self.sidecar_path), "log": str(self.log_path),
                "index": str(self.index_path) if self.index_path else None,
                "reader_csvs": [str(p) for p in self.reader_paths], "counts": self.counts,
                "problems": self.problems, "examples": self.examples, "scan": self.scan}


def output_paths(out_csv: Path) -> dict[str, Path]:
    """The files written next to ``out_csv`` (see the module docstring)."""
    stem = out_csv.name[:-4] if out_csv.name.lower().endswith(".csv") else out_csv.name
    folder = out_csv.parent
    return {"sidecar": folder / f"{stem}.dataset.json", "log": folder / f"{stem}.import.log",
            "index": folder / f"{stem}.index.sqlite", "series": folder / f"{stem}.series",
            "reader": folder / f"{stem}.reader{{}}.csv"}


def patient_split(patient: str, splits: tuple[float, float, float], seed: int) -> str:
    """train/val/test for a patient: a seeded sha256 of its id, uniform in [0, 1), against the fractions."""
    digest = hashlib.sha256(f"{seed}:{patient}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    train, val, _ = splits
    return "train" if u < train else "val" if u < train + val else "test"


def parse_splits(text: str | None) -> tuple[float, float, float] | None:
    """'80/10/10' (percent or fractions, summing to 100 or 1) -> (0.8, 0.1, 0.1); None or '' -> None."""
    if not text:
        return None
    try:
        parts = [float(p) for p in text.replace(",", "/").split("/")]
    except ValueError:
        parts = []
    total = sum(parts)
    if len(parts) != 3 or any(p < 0 for p in parts) or total <= 0:
        raise ValueError(f"--splits {text!r}: give three numbers train/val/test, e.g. 80/10/10.")
    return tuple(p / total for p in parts)


def _csv_path_text(path: Path, folder: Path) -> str:
    path = path.resolve()
    try:
        return path.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)


def _label_text(value) -> str:
    return "" if value is None else str(int(value))


class _CasesWriter:
    """Streams case rows to a cases CSV; counts positives/negatives per finding and patients."""

    def __init__(self, path: Path, catalog, with_split: bool):
        self.path, self.catalog, self.with_split = path, catalog, with_split
        self.handle = path.open("w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle)
        self.writer.writerow(["path", "patient", "series"] + (["split"] if with_split else []) + list(catalog.ids))
        self.positives: Counter = Counter()
        self.negatives: Counter = Counter()
        self.splits: Counter = Counter()
        self.patients: set[str] = set()
        self.rows = 0

    def write(self, case: CaseRow, findings: dict, split: str | None) -> None:
        cells = [_csv_path_text(case.path, self.path.parent), case.patient, case.series]
        if self.with_split:
            cells.append(split)
            self.splits[split] += 1
        self.writer.writerow(cells + [_label_text(findings.get(fid)) for fid in self.catalog.ids])
        for fid, value in findings.items():
            (self.positives if value == 1 else self.negatives)[fid] += 1
        self.patients.add(case.patient)
        self.rows += 1

    def close(self) -> None:
        self.handle.close()


def import_dataset(dataset: str, src: str | os.PathLike, out_csv: str | os.PathLike, *, labels=None,
                   workers: int | None = None, splits: tuple[float, float, float] | None = None, seed: int = 0,
                   progress: Callable[[dict], None] | None = None, catalog=None, **options) -> ImportResult:
    """Import a downloaded public dataset (``dataset``: rsna-ich, cq500 or ct-ich) from ``src`` into a
    cases CSV ``out_csv`` and the files next to it (module docstring). ``labels``: a replacement mapping
    table (default ``Resources/datasets/<dataset>_labels.csv``); ``workers``: header-scan processes;
    ``splits``: patient-level train/val/test fractions (None: no split column); ``progress`` receives
    the header scan's progress dicts; ``options`` go to the dataset's importer (e.g. ``labels_csv``).
    Problems (corrupt files, patients without images, duplicate label rows, ...) are logged and counted,
    never raised; a source that is not the dataset at all raises ValueError / FileNotFoundError."""
    from ..findings import default_catalog
    from . import cq500, ct_ich, rsna_ich
    from .labels import default_table_path, load_label_table

    module = {"rsna-ich": rsna_ich, "cq500": cq500, "ct-ich": ct_ich}.get(dataset)
    if module is None:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    catalog = catalog or default_catalog()
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder; --src must be the folder where {module.INFO['title']} "
                                "was downloaded and unpacked.")
    out_csv = Path(out_csv).expanduser().resolve()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table = load_label_table(labels or default_table_path(module.INFO["table"]), catalog, module.DATASET_LABELS)
    paths = output_paths(out_csv)
    log = ImportLog(paths["log"])
    writer = _CasesWriter(out_csv, catalog, splits is not None)
    readers: dict[str, _CasesWriter] = {}
    conflicts = 0
    context = {"log": log, "workers": workers, "progress": progress, "paths": paths, "scan": None}
    try:
        for case in module.iter_cases(src, context, **options):
            findings, case_conflicts = table.apply(case.labels)
            for conflict in case_conflicts:
                log.add("label conflict", f"{case.path.name} (patient {case.patient}): {conflict}")
            conflicts += len(case_conflicts)
            split = patient_split(case.patient, splits, seed) if splits else None
            writer.write(case, findings, split)
            for reader, reader_labels in case.readers.items():
                if reader not in readers:
                    readers[reader] = _CasesWriter(Path(str(paths["reader"]).format(reader)), catalog, splits is not None)
                readers[reader].write(case, table.apply(reader_labels)[0], split)
    finally:
        writer.close()
        for reader_writer in readers.values():
            reader_writer.close()
    counts = {
        "cases": writer.rows, "patients": len(writer.patients),
        "splits": dict(writer.splits) if splits else None,
        "positives": {fid: writer.positives[fid] for fid in catalog.ids if fid in writer.positives or fid in writer.negatives},
        "negatives": {fid: writer.negatives[fid] for fid in catalog.ids if fid in writer.positives or fid in writer.negatives},
    }
    labelled = [fid for fid in catalog.ids if fid in counts["positives"]]
    sidecar = {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "dataset": dataset, "name": module.INFO["title"],
        "license": module.INFO["license"], "license_url": module.INFO["license_url"],
        "source": module.INFO["source"], "terms": module.INFO["terms"],
        "imported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_folder": str(src), "label_table": {"path": str(table.path), "sha256": table.sha256},
        "cases": counts["cases"], "patients": counts["patients"],
        "findings_labelled": labelled,
        "findings_not_labelled": len(catalog.ids) - len(labelled),
        "counts": counts, "problems": dict(log.counts),
        "split_seed": seed if splits else None,
    }
    paths["sidecar"].write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    log.write(f"\nsummary: {json.dumps({'cases': writer.rows, 'patients': len(writer.patients), 'problems': dict(log.counts)})}")
    log.close()
    return ImportResult(csv_path=out_csv, sidecar_path=paths["sidecar"], log_path=paths["log"],
                        index_path=paths["index"] if paths["index"].is_file() else None,
                        reader_paths=[r.path for r in readers.values()], counts=counts, problems=dict(log.counts),
                        examples=dict(log.examples), scan=context["scan"])


def read_dataset_sidecar(csv_path: str | os.PathLike | None) -> dict | None:
    """The dataset sidecar (``CASES.dataset.json``) written next to a cases CSV, or None when there is none
    or it is not one of ours. Only the fields a model card needs: dataset, name, license, license_url,
    source, terms, cases, patients, imported, label table."""
    if not csv_path:
        return None
    path = output_paths(Path(csv_path))["sidecar"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        return None
    keep = ("dataset", "name", "license", "license_url", "source", "terms", "cases", "patients", "imported",
            "label_table")
    return {key: data.get(key) for key in keep}


# ------------------------------------------------------------------------------------------ terminal
def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_printer(stream: TextIO = sys.stderr) -> Callable[[dict], None]:
    """A progress callback that draws one updating line: bar, done/total, files/s and ETA."""

    def show(event: dict) -> None:
        done, total, seconds = event["done"], max(event["total"], 1), max(event["seconds"], 1e-9)
        rate = event.get("scanned", done) / seconds
        remaining = total - done
        eta = remaining / rate if rate > 0 else 0.0
        filled = int(30 * done / total)
        line = (f"\rheader scan [{'#' * filled}{'.' * (30 - filled)}] {done:,}/{total:,} files "
                f"({100 * done / total:.0f}%), {event.get('reused', 0):,} from the index, {rate:,.0f} files/s, "
                + (f"took {format_duration(seconds)}" if event.get("final") else f"ETA {format_duration(eta)}"))
        stream.write(line + ("\n" if event.get("final") else ""))
        stream.flush()

    return show


def format_summary(result: ImportResult, catalog_size: int) -> str:
    """The terminal summary of an import: counts, labelled findings, every kind of problem with examples."""
    counts = result.counts
    lines = [f"wrote {result.csv_path}: {counts['cases']:,} case(s) of {counts['patients']:,} patient(s)"]
    if counts.get("splits"):
        lines.append("splits (by patient): " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts["splits"].items())))
    if result.scan:
        scan = result.scan
        lines.append(f"header scan: {scan['total']:,} files, {scan['scanned']:,} read, {scan['reused']:,} from the "
                     f"index, {scan['seconds']:.1f} s ({scan['files_per_second']:,.0f} files/s)")
    labelled = list(counts["positives"])
    lines.append(f"findings labelled: {len(labelled)} of {catalog_size} (the others are blank: the dataset cannot "
                 "evaluate them)")
    for fid in labelled:
        lines.append(f"  {fid}: {counts['positives'][fid]:,} positive, {counts['negatives'][fid]:,} negative")
    if result.problems:
        lines.append(f"problems ({result.log_path}):")
        for kind, number in sorted(result.problems.items()):
            lines.append(f"  {kind}: {number:,}")
            lines += [f"    e.g. {example}" for example in result.examples.get(kind, [])[:3]]
    else:
        lines.append("no problems found")
    lines.append(f"dataset sidecar (licence, counts): {result.sidecar_path}")
    for path in result.reader_paths:
        lines.append(f"per-reader labels: {path}")
    return "\n".join(lines)


def run_from_args(args) -> int:
    """``headct-molre import-dataset``: import, print the summary (or JSON), exit 0."""
    from ..findings import default_catalog

    catalog = default_catalog()
    options = {"labels_csv": args.labels_csv} if getattr(args, "labels_csv", None) else {}
    result = import_dataset(args.dataset, args.src, args.out, labels=args.labels, workers=args.workers,
                            splits=parse_splits(args.splits), seed=args.seed, catalog=catalog,
                            progress=None if args.json else progress_printer(), **options)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_summary(result, len(catalog)))
    return 0


def add_arguments(parser) -> None:
    """The ``import-dataset`` subcommand's arguments."""
    parser.add_argument("dataset", choices=DATASETS, help="which public dataset the folder holds")
    parser.add_argument("--src", required=True, help="the dataset's downloaded, unpacked folder")
    parser.add_argument("--out", required=True, help="cases CSV to write (sidecar, log and index go next to it)")
    parser.add_argument("--labels", help="your own label mapping table (default Resources/datasets/<dataset>_labels.csv)")
    parser.add_argument("--labels-csv", help="RSNA only: the label file (default SRC/stage_2_train.csv or "
                                             "SRC/../stage_2_train.csv)")
    parser.add_argument("--workers", type=int, default=None, help="header-scan processes (default: all CPUs)")
    parser.add_argument("--splits", help="patient-level train/val/test split, e.g. 80/10/10 (default: no split column)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")

