"""Write a Prediction to files: findings (TSV + JSON) and overlay maps (NRRD) in the input's geometry.

Files written into ``out_dir``:
    findings.tsv      one row per finding, sorted by probability (id, name, category, probability,
                      threshold, positive, top_slice, top_slice_position_mm, model_status: the bundle's
                      one-line status label, e.g. "SYNTHETIC MODEL: ...", empty for a real trained model)
    findings.json     Prediction.to_json(): findings, attention, router weights, slice positions,
                      timings, provenance, warnings, model_status

With ``keep_paths=False`` (the batch default) no input path reaches the files: ``redact`` replaces every
path of the input (and of the bundle) by a placeholder, so folder names that hold patient names stay out.
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
TSV_COLUMNS = ("id", "name", "category", "probability", "threshold", "positive", "top_slice", "top_slice_position_mm",
               "model_status")
PATH_PLACEHOLDER = "<input>"


def json_default(value):
    """`json.dumps(default=...)` for result objects: numpy arrays/scalars and paths; anything else is a bug."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def redact(value, secrets, placeholder: str = PATH_PLACEHOLDER):
    """A copy of a JSON-able ``value`` in which every string containing one of ``secrets`` (paths, longest
    first) has it replaced by ``placeholder``; dict keys are kept."""
    secrets = sorted({str(s) for s in secrets if s and len(str(s)) > 1}, key=len, reverse=True)
    if not secrets:
        return value

    def walk(item):
        if isinstance(item, str):
            for secret in secrets:
                item = item.replace(secret, placeholder)
            return item
        if isinstance(item, dict):
            return {key: walk(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(inner) for inner in item]
        return item

    return walk(value)


def path_secrets(*paths) -> list[str]:
    """Every spelling of ``paths`` that may appear in messages: as given, absolute and resolved."""
    out = []
    for path in paths:
        if path is None:
            continue
        for candidate in (Path(path), Path(path).expanduser().absolute(), Path(path).expanduser().resolve()):
            out.append(os.fspath(candidate))
    return out


def write_findings_tsv(findings: list[dict], path: Path, *, status_label: str = "") -> Path:
    rows = sorted(findings, key=lambda f: f["probability"], reverse=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for f in rows:
            position = " ".join(f"{v:.1f}" for v in f["top_slice_position_mm"])
            writer.writerow(
                [f["id"], f["name"], f["category"], f"{f['probability']:.6f}", f"{f['threshold']:.6f}",
                 int(f["positive"]), f["top_slice"], position, status_label]
            )
    return path


def prediction_json(prediction, *, keep_paths: bool = True) -> dict:
    """``prediction.to_json()``; without ``keep_paths``, input and bundle paths replaced (see ``redact``)."""
    result = prediction.to_json()
    if keep_paths:
        return result
    provenance = result.get("provenance") or {}
    secrets = path_secrets(*((provenance.get("input") or {}).get("source_paths") or []),
                           (provenance.get("bundle") or {}).get("path"))
    return redact(result, secrets)


def write_prediction(prediction, out_dir: str | os.PathLike, *, keep_paths: bool = True) -> dict[str, Path]:
    """Write every output of ``prediction`` into ``out_dir`` (created); returns {kind: path}.

    keep_paths: False keeps the input's paths out of every file (batch default; see ``redact``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "findings_tsv": write_findings_tsv(prediction.findings(), out / FINDINGS_TSV,
                                           status_label=prediction.status_label),
        "findings_json": out / FINDINGS_JSON,
        "attention": out / ATTENTION_NRRD,
        "experts": out / EXPERTS_NRRD,
    }
    paths["findings_json"].write_text(json.dumps(prediction_json(prediction, keep_paths=keep_paths), indent=2)
                                      + "\n", encoding="utf-8")
    sitk.WriteImage(prediction.attention_image(), str(paths["attention"]), useCompression=True)
    sitk.WriteImage(prediction.expert_image(), str(paths["experts"]), useCompression=True)
    return paths
