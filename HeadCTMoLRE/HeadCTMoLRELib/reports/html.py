"""Self-contained HTML pages: one ``report.html`` per case and the batch's ``index.html``.

    write_case_report(prediction, out_dir, *, case_id, manifest, snapshots) -> out_dir/report.html
    write_batch_index(output, rows, *, status) -> output/index.html

A case report opens offline from a USB stick or a mail attachment: CSS inline, every image inlined as a
base64 data URI, no script or font from elsewhere. It shows the model's status first (synthetic,
untrained, random backbone: the label of model.status), the findings sorted by probability with their
thresholds and the slice (RAS S, mm) that contributed most, the input warnings, the model's intended use
and limits, provenance, and the annotated snapshots. A small inline script records whether every image
decoded into ``<div id="render-check">`` (``data-images-total``, ``data-images-loaded``), which the tests
read back from headless Chromium.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["REPORT_HTML", "INDEX_HTML", "write_case_report", "write_batch_index", "LIMITS"]

REPORT_HTML = "report.html"
INDEX_HTML = "index.html"
LIMITS = (
    "Research use only. Not a medical device; not for clinical decisions; every output must be reviewed by a "
    "qualified reader.",
    "Probabilities are per scan; the highlighted slices show where the model looked (attention) and which slice "
    "added most to a finding's score, not a segmentation of the finding.",
    "Thresholds come from the model bundle (calibrated on its own validation data when it was evaluated); "
    "on other scanners and populations they may be wrong.",
    "The model sees axial slices resampled to its own grid: findings smaller than a slice or outside the "
    "field of view can be missed.",
)

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#1b1b1b;
line-height:1.35}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.positive td{font-weight:600;
background:#fff4e5}.status{background:#b00020;color:#fff;padding:10px 14px;font-weight:700;border-radius:4px}
.ok{background:#e8f5e9;color:#1b5e20;padding:8px 12px;border-radius:4px}.warn{color:#8a4b00}
figure{display:inline-block;margin:6px;vertical-align:top}figure img{max-width:520px;border:1px solid #ccc}
figcaption{font-size:12px;color:#444;max-width:520px}.muted{color:#666;font-size:12px}
"""

_RENDER_CHECK = """
<div id="render-check" data-images-total="" data-images-loaded="" data-images-failed=""></div>
<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images), ok = 0, bad = [];
  images.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { ok += 1; } else { bad.push(img.alt); } });
  var check = document.getElementById('render-check');
  check.setAttribute('data-images-total', String(images.length));
  check.setAttribute('data-images-loaded', String(ok));
  check.setAttribute('data-images-failed', bad.join('|'));
});
</script>
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width\"><style>{_CSS}</style></head>\n<body>\n{body}\n"
            f"{_RENDER_CHECK}</body></html>\n")


def _status_block(status: Mapping) -> str:
    label = status.get("label") or ""
    if not label:
        return "<p class=\"ok\">Model status: trained on real data with a pretrained backbone. Research use only.</p>"
    items = "".join(f"<li>{_e(w)}</li>" for w in status.get("warnings") or [])
    return f"<div class=\"status\" id=\"model-status\">{_e(label)}</div><ul class=\"warn\">{items}</ul>"


def _findings_table(findings: Sequence[Mapping]) -> str:
    rows = []
    for f in sorted(findings, key=lambda f: f["probability"], reverse=True):
        flag = "positive" if f.get("positive") else ""
        rows.append(
            f"<tr class=\"{flag}\"><td>{_e(f['name'])}</td><td>{_e(f['category'])}</td>"
            f"<td class=\"num\">{f['probability']:.3f}</td><td class=\"num\">{f['threshold']:.3f}</td>"
            f"<td>{'above threshold' if flag else ''}</td>"
            f"<td class=\"num\">{float(f['top_slice_position_mm'][2]):+.1f}</td></tr>")
    return ("<table id=\"findings\"><thead><tr><th>finding</th><th>category</th><th>probability</th><th>threshold</th>"
            "<th>call</th><th>top slice S (mm; LPS and RAS agree on S)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _definition_list(items: Mapping) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items.items() if v not in (None, "", []))
    return f"<table>{rows}</table>"


def write_case_report(prediction, out_dir: str | os.PathLike, *, case_id: str, manifest: Mapping,
                      snapshots: Sequence[tuple[str | os.PathLike, str]] = (), extra_files: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.html`` for one case.

    prediction: inference.Prediction (its provenance and warnings already redacted by the caller when
    paths must stay out); manifest: the bundle's manifest (intended use, description); snapshots:
    (PNG path, caption) pairs, inlined; extra_files: names of the case's other outputs, listed.
    """
    status = prediction.model_status or {}
    findings = prediction.findings()
    positives = sum(1 for f in findings if f["positive"])
    provenance = prediction.provenance or {}
    source = provenance.get("input") or {}
    bundle = provenance.get("bundle") or {}
    figures = "".join(
        f"<figure><img src=\"{_data_uri(Path(png))}\" alt=\"{_e(Path(png).name)}\"><figcaption>{_e(caption)}"
        f"</figcaption></figure>" for png, caption in snapshots)
    warnings = "".join(f"<li>{_e(w)}</li>" for w in prediction.warnings) or "<li>none</li>"
    limits = "".join(f"<li>{_e(line)}</li>" for line in LIMITS)
    body = [
        f"<h1>HeadCTMoLRE report: {_e(case_id)}</h1>",
        f"<p class=\"muted\">model {_e(bundle.get('name', ''))} ({_e(bundle.get('fingerprint', ''))}); "
        f"{positives} of {len(findings)} findings above threshold</p>",
        _status_block(status),
        "<h2>Findings (sorted by probability)</h2>", _findings_table(findings),
        "<h2>Snapshots</h2>" + (figures or "<p>none</p>"),
        f"<h2>Input warnings</h2><ul>{warnings}</ul>",
        "<h2>Model: intended use and limits</h2>",
        f"<p>{_e(manifest.get('intended_use', ''))}</p><p class=\"muted\">{_e(manifest.get('description', ''))}</p>",
        f"<ul>{limits}</ul>",
        "<h2>Provenance</h2>",
        _definition_list({
            "case": case_id, "input format": source.get("format"), "series": source.get("series_instance_uid"),
            "series description": source.get("series_description"), "manufacturer": source.get("manufacturer"),
            "model": bundle.get("name"), "model fingerprint": bundle.get("fingerprint"),
            "model created": manifest.get("created"), "device": provenance.get("device"),
            "precision": provenance.get("precision"),
            "alignment": (provenance.get("alignment") or {}).get("method"),
            "software": json.dumps(manifest.get("created_by") or {}),
            "time (s)": ", ".join(f"{k} {v:.2f}" for k, v in (prediction.timings_s or {}).items()),
            "other outputs": ", ".join(extra_files),
        }),
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_HTML
    path.write_text(_page(f"HeadCTMoLRE {case_id}", "\n".join(body)), encoding="utf-8")
    return path


def write_batch_index(output: str | os.PathLike, rows: Sequence[Mapping], *, status: Mapping | None = None) -> Path:
    """Write ``output/index.html`` linking every case's report.

    rows: summary rows (case_id, status "ok"/"failed", top_finding, top_probability, positives, reason,
    report: relative link or "")."""
    lines = []
    for row in rows:
        link = row.get("report") or ""
        name = f"<a href=\"{_e(link)}\">{_e(row['case_id'])}</a>" if link else _e(row["case_id"])
        probability = row.get("top_probability")
        lines.append(
            f"<tr class=\"{'' if row.get('status') == 'ok' else 'warn'}\"><td>{name}</td><td>{_e(row.get('status'))}</td>"
            f"<td>{_e(row.get('top_finding') or '')}</td>"
            f"<td class=\"num\">{'' if probability in (None, '') else f'{float(probability):.3f}'}</td>"
            f"<td class=\"num\">{_e(row.get('positives', ''))}</td><td>{_e(row.get('reason') or '')}</td></tr>")
    failed = sum(1 for row in rows if row.get("status") != "ok")
    body = "\n".join([
        "<h1>HeadCTMoLRE batch</h1>",
        f"<p class=\"muted\">{len(rows)} case(s), {failed} failed</p>",
        _status_block(status or {}),
        "<table id=\"cases\"><thead><tr><th>case</th><th>status</th><th>top finding</th><th>probability</th>"
        "<th>above threshold</th><th>reason</th></tr></thead><tbody>" + "".join(lines) + "</tbody></table>",
    ])
    path = Path(output) / INDEX_HTML
    path.write_text(_page("HeadCTMoLRE batch", body), encoding="utf-8")
    return path
