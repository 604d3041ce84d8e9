"""`headct-molre batch`: one model over many head CTs, every case's results in its own folder.

    headct-molre batch INPUT... --model BUNDLE --out DIR      (files, DICOM folders, folders of cases, CSVs)
    headct-molre batch --cases CSV --model BUNDLE --out DIR   (CSV: path, optional case_id, series, hu_offset)

Per case, in DIR/<case_id>/: findings.tsv/json, attention.nrrd and experts.nrrd (input grid), report.html
(self-contained), annotated snapshots (snapshot_NN_S+12.3mm.png), scene.mrb and expert_colors.csv (with
slicer-core), the DICOM SR / Parametric Map / Segmentation with --dicom, and done.json. In DIR:
summary.tsv (one row per case: status ok/failed, reason, model status, top finding, every probability),
appended and flushed as each case finishes, and index.html linking every report.

Guarantees (a hostile case list cannot break them): case ids are sanitised (letters, digits, ``-_.``; no
path separators, no leading dot, at most 80 characters) and unique ignoring case, with ``_2``, ``_3``...
chosen so a renamed id never collides with another; every output stays inside DIR (a case folder that
resolves elsewhere, e.g. through a symlink, is refused); no input path reaches any output (summary,
JSON, report, scene, DICOM series descriptions) unless ``--keep-paths``. The model is loaded and verified
once. ``--resume`` reads summary.tsv and skips cases already done. Exit status: 0 every case ok, 1 any
case failed, 2 bad arguments (nothing run).

Sharding: under ``torchrun`` (or any launcher setting RANK and WORLD_SIZE) rank r takes cases r, r+W,
r+2W, ... and writes DIR/summary.rank<r>.tsv; when every rank has finished (DIR/.rank<r>.done), the last
one, and rank 0 after waiting for the others, merge the parts into DIR/summary.tsv in case-list order.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_ARGUMENTS = 0, 1, 2
DONE_MARKER = "done.json"
SUMMARY = "summary.tsv"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_ID_LENGTH = 80
SUMMARY_FIELDS = ("case_id", "status", "reason", "model_status", "top_finding", "top_probability", "positives",
                  "seconds", "report")


class BatchError(ValueError):
    """The case list or the arguments cannot be used; nothing was run."""


@dataclass(frozen=True)
class BatchCase:
    """One case: its sanitised unique id, its input, and the validate options for it."""

    case_id: str
    source: Path
    series: str | None = None
    hu_offset: float | None = None


# ------------------------------------------------------------------------------------------- case ids
def _strip_volume_suffix(name: str) -> str:
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def safe_case_id(raw: str) -> str:
    """A folder name made from ``raw`` that can never leave the output folder: path separators and
    every character other than letters, digits and ``-_.`` become ``_``; leading dots/underscores are
    dropped (no ``..``, no hidden folders); empty gives ``case``."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw).strip())
    text = re.sub(r"\.{2,}", "_", text)
    text = re.sub(r"_{2,}", "_", text).lstrip("._").rstrip(".")[:MAX_ID_LENGTH]
    return text or "case"


def unique_case_ids(raw_ids: list[str]) -> list[str]:
    """Sanitised ids, unique ignoring case (for case-insensitive file systems): a repeated id gets the
    first free suffix ``_2``, ``_3``..., never one that another case's id already takes."""
    wanted = [safe_case_id(raw) for raw in raw_ids]
    taken = {name.lower() for name in wanted}
    seen: set[str] = set()
    out = []
    for name in wanted:
        candidate, index = name, 2
        while candidate.lower() in seen or (candidate != name and candidate.lower() in taken):
            candidate, index = f"{name[: MAX_ID_LENGTH - 6]}_{index}", index + 1
        seen.add(candidate.lower())
        out.append(candidate)
    return out


# ------------------------------------------------------------------------------------------- case lists
def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _optional_float(value, where: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise BatchError(f"{where}: hu_offset {value!r} is not a number") from None


def _cases_from_csv(path: Path) -> list[tuple[str, Path, str | None, float | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BatchError(f"{path}: cannot read the case list ({error}).") from None
    if "path" not in columns:
        raise BatchError(f"{path}: a case list needs a 'path' column (optional: case_id, series, hu_offset); "
                         f"found {', '.join(columns) or 'no header'}.")
    if not rows:
        raise BatchError(f"{path}: the case list has no rows.")
    cases = []
    for line, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise BatchError(f"{path} line {line}: empty path.")
        source = Path(row["path"].strip()).expanduser()
        source = source if source.is_absolute() else path.parent / source
        raw_id = (row.get("case_id") or "").strip() or _strip_volume_suffix(source.name)
        cases.append((raw_id, source, (row.get("series") or "").strip() or None,
                      _optional_float(row.get("hu_offset"), f"{path} line {line}")))
    return cases


def _cases_from_path(source: Path) -> list[tuple[str, Path, None, None]]:
    if source.is_file() and source.suffix.lower() == ".csv":
        return _cases_from_csv(source)
    if source.is_file():
        return [(_strip_volume_suffix(source.name), source, None, None)]
    if source.is_dir():
        entries = sorted(source.iterdir())
        volumes = [p for p in entries if _is_volume_file(p)]
        folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        if volumes or folders:
            return [(_strip_volume_suffix(p.name), p, None, None) for p in volumes + folders]
        return [(source.name, source, None, None)]  # the folder itself is one DICOM series
    raise BatchError(f"{source}: no such file or folder.")


def list_cases(inputs, *, cases_csv=None, series: str | None = None, hu_offset: float | None = None,
               numbered_ids: bool = False) -> list[BatchCase]:
    """Every case of ``inputs`` (files, DICOM folders, folders of cases, CSVs) and ``cases_csv``, with
    sanitised unique ids (``numbered_ids``: case_00001... instead of names). A CSV's series/hu_offset
    columns override ``series``/``hu_offset``."""
    found = []
    for source in [*(Path(p) for p in inputs or []), *([Path(cases_csv)] if cases_csv else [])]:
        found.extend(_cases_from_path(source))
    if not found:
        raise BatchError("no cases: give INPUT paths or --cases CSV.")
    raw = [f"case_{i:05d}" for i in range(1, len(found) + 1)] if numbered_ids else [c[0] for c in found]
    return [BatchCase(case_id, source, row_series or series, hu_offset if row_offset is None else row_offset)
            for case_id, (_, source, row_series, row_offset) in zip(unique_case_ids(raw), found)]


def shard(cases: list[BatchCase], rank: int, world_size: int) -> list[BatchCase]:
    """Rank ``rank``'s cases: every ``world_size``-th, starting at ``rank``."""
    return cases[rank::world_size]


def rank_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE (0, 1 without them)."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise BatchError("RANK and WORLD_SIZE must be integers.") from None
    if world < 1 or not 0 <= rank < world:
        raise BatchError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world}).")
    return rank, world


# ------------------------------------------------------------------------------------------- summary
def _summary_columns(finding_ids, keep_paths: bool) -> list[str]:
    return [*SUMMARY_FIELDS, *(["input"] if keep_paths else []), *finding_ids]


def read_summary(path: Path) -> dict[str, dict]:
    """Rows of a summary.tsv by case id ({} when absent or unreadable)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle, delimiter="\t") if row.get("case_id")}


class SummaryWriter:
    """summary TSV appended one row per finished case, flushed and fsynced so that a crash loses at most
    the case in progress; ``keep`` rows (from a resumed run) are written first."""

    def __init__(self, path: Path, columns: list[str], keep: list[dict]):
        self.path, self.columns = path, columns
        staging = path.with_name(f".{path.name}.tmp")
        with open(staging, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(keep)
        os.replace(staging, path)

    def add(self, row: dict) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, self.columns, delimiter="\t", lineterminator="\n",
                           extrasaction="ignore").writerow(row)
            handle.flush()
            os.fsync(handle.fileno())


def _clean(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------- one case
def case_folder(output: Path, case_id: str) -> Path:
    """DIR/<case_id>, refused (BatchError) when it would resolve outside DIR (e.g. a planted symlink)."""
    root = output.resolve()
    folder = output / case_id
    if folder.is_symlink() or folder.resolve().parent != root or case_id != safe_case_id(case_id):
        raise BatchError(f"case {case_id!r}: its output folder would lie outside {output}; refused.")
    return folder


def _public_prediction(prediction, case: BatchCase, keep_paths: bool):
    """The prediction every output is made from: input and bundle paths replaced unless ``keep_paths``."""
    if keep_paths:
        return prediction
    from .outputs import path_secrets, redact

    secrets = path_secrets(case.source, *((prediction.provenance.get("input") or {}).get("source_paths") or []),
                           (prediction.provenance.get("bundle") or {}).get("path"))
    return dataclasses.replace(prediction, provenance=redact(prediction.provenance, secrets),
                               warnings=redact(list(prediction.warnings), secrets))


def _snapshot_slices(prediction, count: int) -> list[tuple[float, list[dict]]]:
    """(RAS S mm, findings whose top slice it is) for the slices of the ``count`` most probable findings."""
    chosen: dict[float, list[dict]] = {}
    for finding in sorted(prediction.findings(), key=lambda f: f["probability"], reverse=True):
        ras_s = round(float(finding["top_slice_position_mm"][2]), 1)  # S is the same in LPS and RAS
        if ras_s in chosen or len(chosen) < count:
            chosen.setdefault(ras_s, []).append(finding)
    return list(chosen.items())


def _finding_caption(findings: list[dict]) -> str:
    first = findings[0]
    call = "positive" if first["positive"] else "below threshold"
    text = f"{first['name']}  p = {first['probability']:.2f} (threshold {first['threshold']:.2f}, {call})"
    return text + (f"  +{len(findings) - 1} more" if len(findings) > 1 else "")


def _write_scene_outputs(public, case_id: str, out_dir: Path, snapshots: int, write_scene: bool) -> tuple[list, list]:
    """scene.mrb, expert_colors.csv and annotated snapshots (needs slicer-core); returns (files, snapshots)."""
    try:
        import slicer
    except ImportError:
        return [], []
    from .slicer import app as slicer_app, mrml
    from .slicer.mrml_render import render_annotated_snapshot

    scene = slicer.vtkMRMLScene()
    files, pictures = [], []
    try:
        nodes = mrml.show_prediction(scene, public, name=case_id)
        if nodes.expert_colors is not None:
            storage = nodes.expert_colors.CreateDefaultStorageNode()
            storage.SetFileName(str(out_dir / "expert_colors.csv"))
            if storage.WriteData(nodes.expert_colors):
                files.append("expert_colors.csv")
        for rank, (ras_s, findings) in enumerate(_snapshot_slices(public, snapshots), start=1):
            caption = _finding_caption(findings)
            png = out_dir / f"snapshot_{rank:02d}_S{ras_s:+.1f}mm.png"
            render_annotated_snapshot(scene, nodes, ras_s, png, title=caption, status_label=public.status_label)
            pictures.append((png, f"{caption}; slice S {ras_s:+.1f} mm"))
        if write_scene:
            mrml.save_scene_mrb(scene, out_dir / "scene.mrb")
            files.append("scene.mrb")
    finally:
        slicer_app.release(scene)
        scene.Clear(True)
    return files, pictures


def run_case(case: BatchCase, out_dir: Path, bundle, options) -> dict:
    """Every output of one case into ``out_dir``; returns its summary row (probabilities by finding id)."""
    from . import inference, outputs
    from .reports import html

    start = time.perf_counter()
    prediction = inference.predict(case.source, bundle, options.device, precision=options.precision,
                                   series=case.series, hu_offset=case.hu_offset,
                                   backbone_folder=options.backbone_path, threads=getattr(options, "threads", None))
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused input leaves no empty folder
    public = _public_prediction(prediction, case, options.keep_paths)
    written = outputs.write_prediction(public, out_dir, keep_paths=options.keep_paths)
    files = [Path(p).name for p in written.values()]
    scene_files, pictures = _write_scene_outputs(public, case.case_id, out_dir, options.snapshots,
                                                 not options.no_scene)
    files += scene_files + [Path(p).name for p, _ in pictures]
    notes = []
    if options.dicom or options.dicom_generate_study:
        from .reports import dicom

        try:
            dicom_files = dicom.write_dicom_outputs(prediction, out_dir / "dicom", source=case.source,
                                                    series_uid=case.series,
                                                    generate_study=options.dicom_generate_study,
                                                    case_id=case.case_id)
            files += [f"dicom/{Path(p).name}" for p in dicom_files.values()]
        except dicom.DicomOutputError as error:
            notes.append(str(error))
    if notes:
        public = dataclasses.replace(public, warnings=list(public.warnings) + notes)
    html.write_case_report(public, out_dir, case_id=case.case_id, manifest=bundle.manifest, snapshots=pictures,
                           extra_files=files)
    findings = prediction.findings()
    top = max(findings, key=lambda f: f["probability"])
    row = {"case_id": case.case_id, "status": "ok", "reason": "; ".join(_clean(n) for n in notes),
           "model_status": public.status_label, "top_finding": top["id"],
           "top_probability": f"{top['probability']:.6f}", "positives": sum(1 for f in findings if f["positive"]),
           "seconds": f"{time.perf_counter() - start:.2f}", "report": f"{case.case_id}/{html.REPORT_HTML}",
           **({"input": str(case.source)} if options.keep_paths else {}),
           **{f["id"]: f"{f['probability']:.6f}" for f in findings}}
    (out_dir / DONE_MARKER).write_text(json.dumps({**row, "files": files}, indent=2) + "\n", encoding="utf-8")
    return row


def _failure_row(case: BatchCase, error: BaseException, keep_paths: bool, status_label: str) -> dict:
    from .outputs import path_secrets, redact

    reason = f"{type(error).__name__}: {_clean(str(error)) or type(error).__name__}"
    if not keep_paths:
        reason = redact(reason, path_secrets(case.source))
    return {"case_id": case.case_id, "status": "failed", "reason": reason, "model_status": status_label,
            **({"input": str(case.source)} if keep_paths else {})}


# ------------------------------------------------------------------------------------------- merging
def _part_path(output: Path, rank: int) -> Path:
    return output / f"summary.rank{rank}.tsv"


def _done_path(output: Path, rank: int, world: int) -> Path:
    return output / f".rank{rank}-of-{world}.done"


def merge_summaries(output: Path, cases: list[BatchCase], world: int, columns: list[str]) -> Path:
    """Join the ranks' parts into DIR/summary.tsv in case-list order (atomic rename)."""
    rows: dict[str, dict] = {}
    for rank in range(world):
        rows.update(read_summary(_part_path(output, rank)))
    SummaryWriter(output / SUMMARY, columns, [rows[c.case_id] for c in cases if c.case_id in rows])
    return output / SUMMARY


def _write_index(output: Path, summary: Path, status: dict) -> None:
    from .reports import html

    rows = list(read_summary(summary).values())
    for row in rows:
        row["report"] = row.get("report") if row.get("status") == "ok" else ""
        row["top_finding"] = row.get("top_finding") or ""
    html.write_batch_index(output, rows, status=status)


# ------------------------------------------------------------------------------------------- run
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files, DICOM folders, folders of cases, or case-list CSVs")
    parser.add_argument("--input", dest="more_inputs", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--cases", help="case-list CSV: path, optional case_id, series, hu_offset columns")
    parser.add_argument("--model", required=True, help="model bundle folder (or a model id)")
    parser.add_argument("--out", "--output", dest="out", required=True, help="output folder (created)")
    parser.add_argument("--series", help="SeriesInstanceUID to use when a DICOM folder holds several series")
    parser.add_argument("--hu-offset", type=float, default=None,
                        help="add to every value (e.g. -1024 for raw CT numbers whose rescale is missing)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps, cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--backbone-path", help="where the bundle's external backbone folder is on this machine")
    parser.add_argument("--threads", default=None,
                        help="CPU threads for the model and preprocessing (default: $HEADCT_THREADS, else by work size)")
    parser.add_argument("--snapshots", type=int, default=3,
                        help="annotated PNG snapshots per case, at the top slices of the most probable findings")
    parser.add_argument("--no-scene", action="store_true", help="do not write scene.mrb (faster, smaller)")
    parser.add_argument("--dicom", action="store_true",
                        help="also write a DICOM SR, Parametric Map and Segmentation for DICOM inputs")
    parser.add_argument("--dicom-generate-study", action="store_true",
                        help="with --dicom, generate a DICOM study for NIfTI/NRRD inputs and reference it")
    parser.add_argument("--resume", action="store_true", help="skip the cases summary.tsv lists as done")
    parser.add_argument("--keep-paths", action="store_true",
                        help="write input paths into the outputs (default: kept out; folder names may hold names)")
    parser.add_argument("--numbered-ids", action="store_true",
                        help="name cases case_00001... instead of after their files (no names in outputs)")
    parser.add_argument("--merge-wait-minutes", type=float, default=60.0,
                        help="under torchrun: how long rank 0 waits for the other ranks before merging")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_from_args(args) -> int:
    """Run the batch; 0 all ok, 1 some case failed, 2 bad arguments."""
    from . import terminal
    from .model import bundle as bundle_lib
    from .model.status import bundle_status

    if args.snapshots < 0:
        raise BatchError("--snapshots must be 0 or more.")
    rank, world = rank_from_env()
    cases = list_cases([*args.inputs, *args.more_inputs], cases_csv=args.cases, series=args.series,
                       hu_offset=args.hu_offset, numbered_ids=args.numbered_ids)
    model_path = Path(args.model)
    if not (model_path / bundle_lib.MANIFEST).is_file():
        from .slicer.logic import resolve_model  # a model id from the model list

        model_path = resolve_model(args.model)
    bundle = bundle_lib.load_bundle(model_path)  # verified once; every case reuses it (and its built model)
    status = bundle_status(bundle.manifest).to_json()
    output = Path(args.out)
    output.mkdir(parents=True, exist_ok=True)
    columns = _summary_columns(bundle.catalog.ids, args.keep_paths)
    summary_path = output / SUMMARY if world == 1 else _part_path(output, rank)
    mine = shard(cases, rank, world)
    previous = {**read_summary(output / SUMMARY), **read_summary(summary_path)} if args.resume else {}
    ids = {c.case_id for c in mine}
    keep = [previous[c.case_id] for c in mine
            if c.case_id in previous and previous[c.case_id].get("status") == "ok"
            and (output / c.case_id / DONE_MARKER).is_file()]
    writer = SummaryWriter(summary_path, columns, [row for row in keep if row["case_id"] in ids])
    skipped = {row["case_id"] for row in keep}
    banner = terminal.format_status_banner(status)
    if banner:
        _log(banner)
    _log(f"{len(mine)} case(s)" + (f" on rank {rank} of {world}" if world > 1 else "")
         + (f", {len(skipped)} already done" if skipped else "") + f"; model {bundle.name}")
    failures, done, started = 0, 0, time.perf_counter()
    todo = [c for c in mine if c.case_id not in skipped]
    for case in todo:
        try:
            row = run_case(case, case_folder(output, case.case_id), bundle, args)
            note = f"{case.case_id} ok (top: {row['top_finding']} {float(row['top_probability']):.2f})"
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one bad case must not stop the batch
            row = _failure_row(case, error, args.keep_paths, status.get("label", ""))
            failures += 1
            note = f"{case.case_id} FAILED ({row['reason']})"
            if not isinstance(error, ValueError):
                traceback.print_exc(file=sys.stderr)
        writer.add(row)
        done += 1
        _log(terminal.format_progress(done, len(todo), time.perf_counter() - started, note=note))
    final = summary_path
    if world > 1:
        _done_path(output, rank, world).write_text(json.dumps({"failed": failures}), encoding="utf-8")
        final = _merge_when_complete(output, cases, world, rank, columns, args.merge_wait_minutes)
    if final is not None and final.name == SUMMARY:
        _write_index(output, final, status)
        rows = read_summary(final)
        failures = sum(1 for row in rows.values() if row.get("status") != "ok")
        _log(f"done: {len(rows) - failures} ok, {failures} failed; summary {final}, reports {output / 'index.html'}")
    else:
        _log(f"rank {rank} done: {len(mine) - failures} ok, {failures} failed; the last rank merges {SUMMARY}")
    if banner:
        _log(status["label"])
    return EXIT_FAILED if failures else EXIT_OK


def _merge_when_complete(output: Path, cases, world: int, rank: int, columns, wait_minutes: float) -> Path | None:
    """Merge when every rank has finished; rank 0 waits up to ``wait_minutes`` for the others."""
    deadline = time.monotonic() + (wait_minutes * 60 if rank == 0 else 0)
    while True:
        missing = [r for r in range(world) if not _done_path(output, r, world).is_file()]
        if not missing:
            return merge_summaries(output, cases, world, columns)
        if time.monotonic() >= deadline:
            if rank == 0:
                _log(f"ranks {missing} have not finished after {wait_minutes:g} min; the last of them merges "
                     f"{SUMMARY}.")
            return None
        time.sleep(2.0)


def build_parser(prog: str = "headct-molre batch") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def main(argv=None, prog: str = "headct-molre batch") -> int:
    """Entry point of scripts/headct_batch.py (argv without the program name)."""
    try:
        args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:
        return EXIT_ARGUMENTS if stop.code else EXIT_OK
    try:
        return run_from_args(args)
    except (ValueError, OSError) as error:  # BatchError, BundleError, unreadable case list
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ARGUMENTS
