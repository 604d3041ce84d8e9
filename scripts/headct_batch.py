"""Headless batch inference with Slicer's own scene, slice views and .mrb writer.

Desktop Slicer:
    Slicer --no-splash --no-main-window --python-script scripts/headct_batch.py \
        --input CASES --model MODEL --output OUT
Plain Python with slicer-core installed:
    python scripts/headct_batch.py --input CASES --model MODEL --output OUT

CASES: one image file (NIfTI/NRRD/MHA) or DICOM series folder, a folder of cases (image files and/or
DICOM series sub-folders), or a CSV with a ``path`` column (optional ``case_id``). MODEL: a model id
(see ``headct-molre info``) or a bundle folder.

Per case, in OUT/<case_id>/: findings.tsv, findings.json, attention.nrrd and experts.nrrd (on the input's
grid), expert_colors.csv, scene.mrb (CT, overlays, colour table, findings table, plot), and axial PNG
snapshots through the most-attended slices. In OUT: summary.csv (cases x finding probabilities),
failures.csv (case, input, reason). --resume skips cases whose folder is complete. Exit status 0 when every
case succeeded, 1 when any failed, 2 for bad arguments.
"""

import sys

if sys.version_info < (3, 10):  # Slicer 5.8 ships Python 3.9; the library needs 3.10+
    sys.stderr.write("headct_batch.py needs Python 3.10 or newer (Slicer 5.10+); this is Python "
                     f"{sys.version.split()[0]}. Update Slicer or run it with a newer Python.\n")
    sys.exit(2)


from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import traceback
from pathlib import Path

_LIBRARY_PARENT = Path(__file__).resolve().parent.parent / "HeadCTMoLRE"
if str(_LIBRARY_PARENT) not in sys.path:
    sys.path.insert(0, str(_LIBRARY_PARENT))

EXIT_OK, EXIT_FAILED, EXIT_ARGUMENTS = 0, 1, 2
DONE_MARKER = "done.json"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "case"


def list_cases(source: Path) -> list[tuple[str, Path]]:
    """(case_id, input path) for every case of ``source`` (file, DICOM folder, folder of cases, CSV)."""
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "path" not in rows[0]:
            raise ValueError(f"{source}: a case list needs a 'path' column (and optionally 'case_id').")
        cases = []
        for row in rows:
            path = Path(row["path"]).expanduser()
            path = path if path.is_absolute() else source.parent / path
            cases.append((row.get("case_id") or _case_id(path), path))
    elif _is_volume_file(source) or source.is_file():
        cases = [(_case_id(source), source)]
    elif source.is_dir():
        entries = sorted(source.iterdir())
        volumes = [p for p in entries if _is_volume_file(p)]
        folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        if volumes or folders:
            cases = [(_case_id(p), p) for p in volumes + folders]
        else:  # the folder itself is one DICOM series
            cases = [(_case_id(source), source)]
    else:
        raise ValueError(f"{source}: no such file or folder.")
    seen: dict[str, int] = {}
    unique = []
    for case_id, path in cases:
        seen[case_id] = seen.get(case_id, 0) + 1
        unique.append((case_id if seen[case_id] == 1 else f"{case_id}_{seen[case_id]}", path))
    return unique


def most_attended_positions(prediction, count: int) -> list[float]:
    """RAS S (mm) of the ``count`` valid slices with the highest attention (highest first)."""
    import numpy as np

    from HeadCTMoLRELib.slicer import mrml

    curves = mrml.slice_curves(prediction)
    weights = curves.get(mrml.ATTENTION_COLUMN)
    if weights is None or not len(weights):
        positions = curves[mrml.SLICE_POSITION_COLUMN]
        return [float(np.median(positions))] if len(positions) else [0.0]
    order = np.argsort(-weights)[:count]
    return [float(curves[mrml.SLICE_POSITION_COLUMN][i]) for i in order]


def write_color_table(node, path: Path) -> Path:
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise OSError(f"could not write the colour table {path}")
    return path


def run_case(case_id: str, source: Path, out_dir: Path, model_path: Path, device: str, snapshots: int) -> dict:
    """Everything for one case into ``out_dir``; returns a summary dict (probabilities by finding id)."""
    import slicer

    from HeadCTMoLRELib import inference, outputs
    from HeadCTMoLRELib.slicer import mrml, app as slicer_app

    out_dir.mkdir(parents=True, exist_ok=True)
    prediction = inference.predict(str(source), str(model_path), device)
    outputs.write_prediction(prediction, out_dir)
    scene = slicer.vtkMRMLScene()
    try:
        nodes = mrml.show_prediction(scene, prediction, name=case_id)
        if nodes.expert_colors is not None:
            write_color_table(nodes.expert_colors, out_dir / "expert_colors.csv")
        images = []
        for rank, ras_s in enumerate(most_attended_positions(prediction, snapshots), start=1):
            png = out_dir / f"snapshot_{rank:02d}_S{ras_s:+.1f}mm.png"
            images.append(mrml.render_axial_snapshot(scene, nodes, ras_s, png).name)
        mrml.save_scene_mrb(scene, out_dir / "scene.mrb")
    finally:
        slicer_app.release(scene)
        scene.Clear(True)
    summary = {"case_id": case_id, "input": str(source), "snapshots": images,
               "probabilities": {f["id"]: f["probability"] for f in prediction.findings()},
               "warnings": prediction.warnings, "device": prediction.provenance.get("device"),
               "seconds": round(sum(v for k, v in prediction.timings_s.items() if k == "total"), 2)}
    (out_dir / DONE_MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def write_tables(output: Path, summaries: list[dict], failures: list[dict], finding_ids: list[str]) -> None:
    with open(output / "summary.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "input", *finding_ids])
        for summary in summaries:
            writer.writerow([summary["case_id"], summary["input"],
                             *(f"{summary['probabilities'].get(fid, float('nan')):.6f}" for fid in finding_ids)])
    with open(output / "failures.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "input", "reason"])
        for failure in failures:
            writer.writerow([failure["case_id"], failure["input"], failure["reason"]])


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="headct_batch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="image file, DICOM folder, folder of cases or CSV")
    parser.add_argument("--model", required=True, help="model id or bundle folder")
    parser.add_argument("--output", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--snapshots", type=int, default=3, help="PNG snapshots per case (most-attended slices)")
    parser.add_argument("--resume", action="store_true", help="skip cases whose output folder is complete")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:
        return EXIT_ARGUMENTS if stop.code else EXIT_OK
    from HeadCTMoLRELib.model import bundle as bundle_lib
    from HeadCTMoLRELib.slicer.logic import resolve_model

    try:
        cases = list_cases(args.input)
        model_path = resolve_model(args.model)
        catalog = bundle_lib.load_bundle(model_path).catalog
    except (ValueError, OSError) as error:
        print(f"headct_batch: {error}", file=sys.stderr)
        return EXIT_ARGUMENTS
    args.output.mkdir(parents=True, exist_ok=True)
    summaries, failures = [], []
    for index, (case_id, source) in enumerate(cases, start=1):
        out_dir = args.output / case_id
        start = time.perf_counter()
        prefix = f"[{index}/{len(cases)}] {case_id}"
        if args.resume and (out_dir / DONE_MARKER).is_file():
            summaries.append(json.loads((out_dir / DONE_MARKER).read_text(encoding="utf-8")))
            print(f"{prefix}: already done, skipped", flush=True)
            continue
        try:
            summary = run_case(case_id, source, out_dir, model_path, args.device, args.snapshots)
        except Exception as error:  # noqa: BLE001 - one bad case must not stop the batch
            reason = " ".join(str(error).split()) or type(error).__name__
            failures.append({"case_id": case_id, "input": str(source), "reason": f"{type(error).__name__}: {reason}"})
            print(f"{prefix}: FAILED ({reason})", flush=True)
            if not isinstance(error, ValueError):
                traceback.print_exc(file=sys.stderr)
            continue
        summaries.append(summary)
        top = max(summary["probabilities"].items(), key=lambda kv: kv[1])
        print(f"{prefix}: ok in {time.perf_counter() - start:.1f} s (top: {top[0]} {top[1]:.2f})", flush=True)
    write_tables(args.output, summaries, failures, list(catalog.ids))
    print(f"done: {len(summaries)} ok, {len(failures)} failed; summary in {args.output / 'summary.csv'}", flush=True)
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
