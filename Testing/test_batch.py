"""scripts/headct_batch.py (a thin wrapper of `headct-molre batch`) under plain Python with slicer-core: per-case
outputs, summary.tsv with per-case status, resume, sharding by rank, DICOM outputs of a real series."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk

pytest.importorskip("slicer")

from HeadCTMoLRELib import phantoms as phantom  # noqa: E402
from HeadCTMoLRELib.slicer.selftest import make_tiny_bundle  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "headct_batch.py"


def summary_rows(out: Path) -> list[dict]:
    with open(out / "summary.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    bundle = make_tiny_bundle(root / "tiny")
    cases = root / "cases"
    cases.mkdir()
    sitk.WriteImage(phantom.generate_phantom([], seed=11).image, str(cases / "good.nii.gz"))
    (cases / "broken.nrrd").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 40\nencoding: raw\n\n")
    out = root / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(cases), "--model", str(bundle),
                             "--output", str(out), "--device", "cpu", "--snapshots", "2"],
                            capture_output=True, text=True, timeout=300)
    return root, bundle, cases, out, result


def test_failed_case_gives_nonzero_exit_and_a_reason(batch_run):
    _, _, _, out, result = batch_run
    assert result.returncode == 1, result.stderr[-2000:]
    rows = [r for r in summary_rows(out) if r["status"] == "failed"]
    assert [r["case_id"] for r in rows] == ["broken"] and "CTInputError" in rows[0]["reason"]
    assert " 2/2 100%" in result.stderr and "ETA" in result.stderr


def test_good_case_has_every_output(batch_run):
    _, _, _, out, _ = batch_run
    case = out / "good"
    for name in ("findings.tsv", "findings.json", "attention.nrrd", "experts.nrrd", "expert_colors.csv",
                 "scene.mrb", "done.json", "report.html"):
        assert (case / name).is_file(), name
    assert not (out / "broken").exists()  # a refused input leaves no empty folder
    index = (out / "index.html").read_text()
    assert 'href="good/report.html"' in index and "broken" in index
    assert len(list(case.glob("snapshot_*.png"))) == 2
    attention, source = sitk.ReadImage(str(case / "attention.nrrd")), phantom.generate_phantom([], seed=11).image
    assert attention.GetSize() == source.GetSize() and attention.GetOrigin() == pytest.approx(source.GetOrigin())
    with zipfile.ZipFile(case / "scene.mrb") as archive:
        names = archive.namelist()
    assert any(n.endswith(".mrml") for n in names) and any("attention" in n for n in names)
    assert "Expert 1" in (case / "expert_colors.csv").read_text()


def test_summary_has_one_row_per_case_with_status_label_and_every_finding(batch_run):
    from HeadCTMoLRELib import batch, findings

    _, _, _, out, _ = batch_run
    rows = summary_rows(out)
    assert sorted(r["case_id"] for r in rows) == ["broken", "good"]
    good = next(r for r in rows if r["case_id"] == "good")
    assert good["status"] == "ok" and "UNTRAINED" in good["model_status"]
    assert all("UNTRAINED" in r["model_status"] for r in rows)
    ids = findings.default_catalog().ids
    assert list(good)[: len(batch.SUMMARY_FIELDS)] == list(batch.SUMMARY_FIELDS) and "input" not in good
    assert all(0 <= float(good[fid]) <= 1 for fid in ids)


def test_resume_skips_finished_cases_and_scene_reloads(batch_run):
    root, bundle, cases, out, _ = batch_run
    stamp = (out / "good" / "scene.mrb").stat().st_mtime_ns
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(cases / "good.nii.gz"), "--model",
                             str(bundle), "--output", str(out), "--resume"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "1 already done" in result.stderr, result.stderr[-2000:]
    assert (out / "good" / "scene.mrb").stat().st_mtime_ns == stamp
    assert [r["case_id"] for r in summary_rows(out)] == ["good"]
    from HeadCTMoLRELib.slicer import mrml

    nodes = mrml.find_prediction_nodes(mrml.load_scene_mrb(out / "good" / "scene.mrb"))
    assert nodes.ct is not None and nodes.findings_table.GetNumberOfRows() == 75


def test_bad_arguments_exit_with_status_two(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "missing"), "--model", "x",
                             "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no such file" in result.stderr


def test_cli_batch_shards_by_rank_and_the_last_rank_merges_one_summary(tmp_path):
    """Two torchrun ranks simulated by RANK/WORLD_SIZE: each writes its part, one summary in case order."""
    bundle = make_tiny_bundle(tmp_path / "tiny")
    cases = tmp_path / "cases"
    cases.mkdir()
    for seed in (1, 2, 3):
        sitk.WriteImage(phantom.generate_phantom([], seed=seed).image, str(cases / f"p{seed}.nii.gz"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "HeadCTMoLRELib.cli", "batch", str(cases), "--model", str(bundle), "--out",
               str(out), "--device", "cpu", "--snapshots", "0", "--no-scene"]
    for rank in (1, 0):  # rank 1 finishes first: rank 0, the last one, merges
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert [r["case_id"] for r in summary_rows(out)] == ["p1", "p2", "p3"]
    part0 = list(csv.DictReader(open(out / "summary.rank0.tsv"), delimiter="\t"))
    part1 = list(csv.DictReader(open(out / "summary.rank1.tsv"), delimiter="\t"))
    assert [r["case_id"] for r in part0] == ["p1", "p3"] and [r["case_id"] for r in part1] == ["p2"]
    assert all((out / c / "report.html").is_file() for c in ("p1", "p2", "p3"))


def test_real_tilted_dicom_series_and_a_phantom_from_a_csv(tmp_path, test_data):
    """The batch mode on the real gantry-tilted GE head CT (DICOM) and a synthetic phantom, listed in a CSV:
    every output, overlays on the loaded CT's own grid, snapshots that show an image."""
    from HeadCTMoLRELib.ct import loader as ctio

    bundle = make_tiny_bundle(tmp_path / "tiny")
    dicom = test_data / "real" / "dcm_qa_ct_GE_tilt"
    sitk.WriteImage(phantom.generate_phantom(["subdural_hematoma"], seed=3).image, str(tmp_path / "sdh.nii.gz"))
    (tmp_path / "cases.csv").write_text(f"path,case_id\n{dicom},ge_tilt\nsdh.nii.gz,phantom_sdh\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "cases.csv"), "--model", str(bundle),
                             "--output", str(out), "--device", "cpu", "--snapshots", "2", "--dicom"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    reference = ctio.load_ct(dicom).image  # tilt-corrected, orthogonal grid
    for case in ("ge_tilt", "phantom_sdh"):
        for name in ("findings.tsv", "findings.json", "attention.nrrd", "experts.nrrd", "expert_colors.csv",
                     "scene.mrb"):
            assert (out / case / name).is_file(), f"{case}/{name}"
        snapshots = sorted((out / case).glob("snapshot_*.png"))
        assert len(snapshots) == 2
        for png in snapshots:
            pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
            assert pixels.std() > 10, f"{png.name} looks blank"
    attention = sitk.ReadImage(str(out / "ge_tilt" / "attention.nrrd"))
    assert attention.GetSize() == reference.GetSize()
    assert attention.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-6)
    assert attention.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-3)
    rows = summary_rows(out)
    assert [r["case_id"] for r in rows] == ["ge_tilt", "phantom_sdh"]
    # DICOM outputs of the real (gantry-tilted) series reference its instances; the NIfTI case has none
    import highdicom as hd
    import pydicom

    sr = hd.sr.srread(out / "ge_tilt" / "dicom" / "findings_sr.dcm")
    uids = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in dicom.rglob("*")
                   if p.is_file() and p.suffix.lower() in (".dcm", "")}
    assert uids and uids <= source_uids
    pm = pydicom.dcmread(out / "ge_tilt" / "dicom" / "attention_pm.dcm")
    assert int(pm.NumberOfFrames) == reference.GetSize()[2]
    assert not (out / "phantom_sdh" / "dicom").exists() and "generate" in rows[1]["reason"]
