"""Write a Prediction to files: findings (TSV + JSON) and overlay maps (NRRD) in the input's geometry.

Files written into ``out_dir``:
    findings.tsv      one row per finding, sorted by probability (id, name, category, probability,
                      threshold, positive, top_slice, top_slice_position_mm)
    findings.json     Prediction.to_json(): findings, attention, router weights, slice positions,
                      timings, provenance, warnings
    attention.nrrd    float32 attention weight of each voxel's slice, on the input's own grid (LPS)
    experts.nrrd      uint8 dominant expert per slice (1..K, 0 = outside head/scan), same grid
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import SimpleITK as sitk

FINDINGS_TSV = "findings.tsv"
FINDINGS_JSON = "findings.json"
ATTENTION_NRRD = "attention.nrrd"
EXPERTS_NRRD = "experts.nrrd"
TSV_COLUMNS = ("id", "name", "category", "probability", "threshold", "positive", "top_slice", "top_slice_position_mm")


def json_default(value):
    """`json.dumps(default=...)` for result objects: numpy arrays/scalars and paths; anything else is a bug."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_findings_tsv(findings: list[dict], path: Path) -> Path:
    rows = sorted(findings, key=lambda f: f["probability"], reverse=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for f in rows:
            position = " ".join(f"{v:.1f}" for v in f["top_slice_position_mm"])
            writer.writerow(
                [f["id"], f["name"], f["category"], f"{f['probability']:.6f}", f"{f['threshold']:.6f}",
                 int(f["positive"]), f["top_slice"], position]
            )
    return path


def write_prediction(prediction, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every output of ``prediction`` into ``out_dir`` (created); returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "findings_tsv": write_findings_tsv(prediction.findings(), out / FINDINGS_TSV),
        "findings_json": out / FINDINGS_JSON,
        "attention": out / ATTENTION_NRRD,
        "experts": out / EXPERTS_NRRD,
    }
    paths["findings_json"].write_text(json.dumps(prediction.to_json(), indent=2) + "\n", encoding="utf-8")
    sitk.WriteImage(prediction.attention_image(), str(paths["attention"]), useCompression=True)
    sitk.WriteImage(prediction.expert_image(), str(paths["experts"]), useCompression=True)
    return paths
