"""report.html and index.html: self-contained (no external resource), findings sorted with thresholds, the model
status first, and, in a real browser (headless Chromium), the page renders and every inlined image decodes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from HeadCTMoLRELib import inference
from HeadCTMoLRELib.reports import html
from HeadCTMoLRELib.slicer.snapshot_legend import ColorScale, SnapshotLegend, annotate_axial_snapshot

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory, test_data):
    from HeadCTMoLRELib.model import bundle
    from HeadCTMoLRELib.slicer.selftest import make_tiny_bundle

    root = tmp_path_factory.mktemp("html")
    tiny = make_tiny_bundle(root / "tiny")
    prediction = inference.predict(test_data / "bad" / "00_good_control_series", tiny, "cpu")
    head = np.zeros((128, 128, 4), np.uint8)
    head[..., 3] = 255
    head[32:96, 40:88, :3] = 180
    legend = SnapshotLegend(title="Finding  p = 0.91", slice_s_mm=12.5, status_label=prediction.status_label,
                            scale=ColorScale("attention", "weight per slice, sum 1", 0.0, 0.1,
                                             np.linspace(0, 1, 256)[:, None].repeat(3, 1), value=0.05),
                            experts=[("Expert 1", (0.9, 0.6, 0.0)), ("Expert 2", (0.3, 0.7, 0.9))], slice_expert=2)
    png = annotate_axial_snapshot(head, root / "case" / "snapshot_01.png", legend)
    page = html.write_case_report(prediction, root / "case", case_id="case", manifest=bundle.read_manifest(tiny),
                                  snapshots=[(png, "Finding p = 0.91")])
    index = html.write_batch_index(root, [{"case_id": "case", "status": "ok", "report": "case/report.html",
                                           "top_finding": "x", "top_probability": "0.9", "positives": 3},
                                          {"case_id": "bad", "status": "failed", "reason": "CTInputError: truncated"}],
                                   status=prediction.model_status)
    return prediction, page, index


def test_report_is_self_contained_sorted_and_labelled(report):
    prediction, page, index = report
    text = page.read_text()
    assert not re.search(r"""(src|href)=["'](https?:|//|file:)""", text)  # nothing loaded from elsewhere
    assert text.count("data:image/png;base64,") == 1
    probabilities = [float(v) for v in re.findall(r'<td class="num">(0\.\d{3})</td><td class="num">0\.\d{3}</td>', text)]
    assert len(probabilities) == 75 and probabilities == sorted(probabilities, reverse=True)
    assert text.index("UNTRAINED + RANDOM BACKBONE") < text.index('id="findings"')
    assert "Research use only" in text and "Provenance" in text and "Input warnings" in text
    assert 'href="case/report.html"' in index.read_text() and "UNTRAINED" in index.read_text()


def _dump_dom(path, tmp_path) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
               path.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Chromium is not installed (.ci/run installs it; CI never skips this)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(report, tmp_path):
    assert CHROMIUM, "CI must have Chromium (.ci/run installs Debian's chromium)"
    _, page, index = report
    dom = _dump_dom(page, tmp_path)
    check = re.search(r'<div id="render-check"[^>]*>', dom)
    assert check, dom[-2000:]
    total = int(re.search(r'data-images-total="(\d+)"', check.group(0)).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', check.group(0)).group(1))
    assert total == loaded == 1
    assert dom.count("<tr class=") >= 75 and "UNTRAINED" in dom
    assert 'id="cases"' in _dump_dom(index, tmp_path)
