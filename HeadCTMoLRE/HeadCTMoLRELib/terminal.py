"""Plain-text presenters for the command line: validation results, slice stacks, findings tables.

Pure formatting: every function takes JSON-able dicts / result objects and returns a string, so the
same text can be printed by the CLI, logged by the batch script, or shown in Slicer's Python console.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence


def _xyz(values: Sequence[float] | None, fmt: str = "{:.2f}", sep: str = " x ") -> str:
    if values is None:
        return "?"
    return sep.join(fmt.format(v) for v in values)


def _bullets(title: str, lines: Iterable[str]) -> list[str]:
    lines = list(lines)
    if not lines:
        return []
    return [f"{title}:"] + [f"  - {line}" for line in lines]


def format_validation(report: Mapping) -> str:
    """Text for one `ctio.validation_report` dict (accepted or refused)."""
    source = report.get("source") or (report.get("provenance") or {}).get("source", "")
    if not report.get("accepted"):
        out = [f"REFUSED  {source}".rstrip(), f"  {report.get('error')}"]
        out += _bullets("Warnings", report.get("warnings") or [])
        return "\n".join(out)
    out = [f"ACCEPTED {source}".rstrip()]
    out.append(
        f"  size {_xyz(report.get('size'), '{:d}')} voxels, spacing {_xyz(report.get('spacing_mm'))} mm"
        + (f", orientation {report['orientation']}" if report.get("orientation") else "")
    )
    coverage = report.get("coverage_mm")
    if isinstance(coverage, Mapping):
        out.append("  coverage " + ", ".join(f"{axis} {mm:.0f} mm" for axis, mm in coverage.items()))
    elif coverage is not None:
        out.append(f"  coverage {coverage:.0f} mm")
    percentiles = report.get("hu_percentiles")
    if isinstance(percentiles, Mapping) and percentiles:
        out.append("  HU percentiles " + ", ".join(f"{k} {v:.0f}" for k, v in percentiles.items()))
    prov = report.get("provenance") or {}
    if prov.get("format") == "dicom":
        desc = prov.get("series_description") or ""
        out.append(f"  DICOM series {prov.get('series_instance_uid', '?')} {desc}".rstrip())
        others = prov.get("other_series") or []
        if others:
            out.append(f"  {len(others)} other series in the folder (choose one with --series UID):")
            for other in others:
                out.append(
                    f"    {other.get('uid', other.get('series_instance_uid', '?'))}  "
                    f"{other.get('description', '')}  ({other.get('n_images', '?')} images)"
                )
    out += _bullets("Warnings", report.get("warnings") or [])
    out += _bullets("Notes", report.get("notes") or [])
    return "\n".join(out)


def format_stack_summary(summary: Mapping) -> str:
    """Text for the preprocessing summary the demo prints (see cli._stack_summary)."""
    lines = [
        f"Slice stack {summary['shape'][0]} slices x {summary['shape'][1]} windows x "
        f"{summary['shape'][2]} x {summary['shape'][3]} px "
        f"({summary['valid_slices']} slices inside the scan), "
        f"grid spacing {_xyz(summary['spacing_mm'])} mm",
        f"  alignment: {summary['alignment'].get('method')}"
        + (
            f" (quality {summary['alignment']['quality']:.3f})"
            if isinstance(summary["alignment"].get("quality"), (int, float))
            else ""
        ),
        "  time: " + ", ".join(f"{k} {v:.2f} s" for k, v in summary["timings_s"].items()),
    ]
    lines += _bullets("Warnings", summary.get("warnings") or [])
    return "\n".join(lines)


def format_status_banner(status: Mapping | None) -> str:
    """The model-status line framed so it cannot be missed ("" for a trained real model).

    ``status``: model.status.BundleStatus.to_json() (or Prediction.model_status)."""
    label = (status or {}).get("label") or ""
    if not label:
        return ""
    rule = "!" * min(len(label) + 4, 110)
    return "\n".join([rule, f"! {label}", rule])


def format_findings_table(findings: Sequence[Mapping], *, limit: int | None = None,
                          status: Mapping | None = None) -> str:
    """Findings sorted by probability, one row each: probability, flag, name, category, threshold.

    ``findings``: dicts with id, name, category, probability, threshold, positive. ``status``: the
    bundle's status (BundleStatus.to_json()); its label heads the table when the model is synthetic,
    untrained or on a random backbone.
    """
    banner = format_status_banner(status)
    rows = sorted(findings, key=lambda f: f["probability"], reverse=True)
    if limit is not None:
        rows = rows[:limit]
    name_w = max([len("finding")] + [len(f["name"]) for f in rows])
    cat_w = max([len("category")] + [len(f["category"]) for f in rows])
    header = f"{'prob':>6}  {'':1}  {'finding':<{name_w}}  {'category':<{cat_w}}  {'thresh':>6}"
    out = [header, "-" * len(header)]
    for f in rows:
        flag = "*" if f.get("positive") else " "
        out.append(
            f"{f['probability']:6.3f}  {flag}  {f['name']:<{name_w}}  {f['category']:<{cat_w}}  "
            f"{f['threshold']:6.3f}"
        )
    return "\n".join(([banner] if banner else []) + out)


def truth_comparison(findings: Sequence[Mapping], truth_ids: Sequence[str]) -> dict:
    """Prediction against known labels of one case. ``findings``: rows as in :func:`format_findings_table`
    (id, name, probability, threshold, positive); ``truth_ids``: the ids that are truly present.

    Returns {"rows": one dict per finding that is true or called positive (id, name, truth, probability,
    threshold, called, rank: 1 = highest probability of all findings), true first; "true_called",
    "n_true", "false_calls", "n_false": counts}."""
    truth = set(truth_ids)
    order = sorted(findings, key=lambda f: f["probability"], reverse=True)
    rank = {f["id"]: i + 1 for i, f in enumerate(order)}
    shown = [f for f in order if f["id"] in truth] + [f for f in order if f["id"] not in truth and f.get("positive")]
    rows = [{"id": f["id"], "name": f["name"], "truth": f["id"] in truth, "probability": float(f["probability"]),
             "threshold": float(f["threshold"]), "called": bool(f.get("positive")), "rank": rank[f["id"]]}
            for f in shown]
    return {"rows": rows, "true_called": sum(r["called"] for r in rows if r["truth"]),
            "n_true": sum(1 for f in findings if f["id"] in truth),
            "false_calls": sum(r["called"] for r in rows if not r["truth"]),
            "n_false": sum(1 for f in findings if f["id"] not in truth)}


def format_truth_table(comparison: Mapping) -> str:
    """The rows of :func:`truth_comparison` as a table (truth, called, probability, threshold, rank, name)
    and a line of counts."""
    rows = comparison["rows"]
    name_w = max([len("finding")] + [len(r["name"]) for r in rows])
    header = f"{'truth':<9}{'called':<8}{'prob':>6}  {'thresh':>6}  {'rank':>4}  {'finding':<{name_w}}"
    out = [header, "-" * len(header)]
    for r in rows:
        out.append(f"{'present' if r['truth'] else '-':<9}{'yes' if r['called'] else 'no':<8}{r['probability']:6.3f}  "
                   f"{r['threshold']:6.3f}  {r['rank']:>4}  {r['name']:<{name_w}}")
    out.append(f"{comparison['true_called']} of {comparison['n_true']} present findings called; "
               f"{comparison['false_calls']} false call(s) among the {comparison['n_false']} absent ones "
               "(called: probability >= the finding's threshold; rank: place among all findings by probability)")
    return "\n".join(out)


def format_duration(seconds: float) -> str:
    """"42 s", "3 min 05 s", "2 h 07 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def format_progress(done: int, total: int, elapsed_s: float, *, width: int = 24, note: str = "") -> str:
    """One progress-bar line with the estimated time left: ``[#####.....]  12/40  30%  ETA 3 min 10 s``.

    ``done``: cases finished in this run (skipped ones excluded from the rate), ``elapsed_s``: their time."""
    total = max(int(total), 1)
    filled = int(round(width * min(done, total) / total))
    eta = "ETA --" if done <= 0 else f"ETA {format_duration(elapsed_s / done * max(total - done, 0))}"
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total} {100 * done / total:3.0f}% {eta}"
    return f"{line}  {note}".rstrip()


def round_value(value, digits: int = 3):
    """Numbers for people: floats to ``digits`` significant decimals (ints and text unchanged)."""
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    if value != value or value in (float("inf"), float("-inf")):
        return value
    if abs(value) >= 100:
        return round(value, 1)
    return round(value, digits)
