"""A hostile case list against `headct-molre batch` (issue 16, batch class): ids that try to leave the output
folder, duplicate ids that collide after renaming, a summary that must survive a crash (and feed --resume),
and input paths (folder names with patient names) that must not reach any output unless --keep-paths."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk

from HeadCTMoLRELib import batch, phantoms as phantom
from HeadCTMoLRELib.slicer.selftest import make_tiny_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("hostile") / "tiny")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    sitk.WriteImage(phantom.generate_phantom([], seed=5).image, str(path))
    return path


def _summary(out: Path) -> list[dict]:
    with open(out / batch.SUMMARY, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _fake_run_case(calls: list, *, fail_on: str | None = None):
    """A run_case that writes done.json without running the model (the batch's bookkeeping is under test)."""

    def run_case(case, out_dir, bundle, options):
        calls.append(case.case_id)
        if case.case_id == fail_on:
            raise KeyboardInterrupt  # the machine dies in the middle of this case
        out_dir.mkdir(parents=True, exist_ok=True)
        row = {"case_id": case.case_id, "status": "ok", "model_status": "", "report": "", "top_finding": "x",
               "top_probability": "0.5"}
        (out_dir / batch.DONE_MARKER).write_text(json.dumps(row))
        return row

    return run_case


def test_case_ids_that_escape_the_output_folder_stay_inside_it(tmp_path, tiny, monkeypatch):
    outside = tmp_path / "outside"
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    (tmp_path / "cases.csv").write_text(
        "path,case_id\n"
        f"scan.nii.gz,../outside/x\nscan.nii.gz,{outside}/abs\nscan.nii.gz,..\nscan.nii.gz,.hidden\nscan.nii.gz,a/../../b\n")
    calls: list = []
    monkeypatch.setattr(batch, "run_case", _fake_run_case(calls))
    out = tmp_path / "out"
    code = batch.main(["--cases", str(tmp_path / "cases.csv"), "--model", str(tiny), "--out", str(out)])
    assert code == 0
    assert not outside.exists() and not (tmp_path / "b").exists()
    made = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(made) == 5 and all(not name.startswith(".") and ".." not in name and "/" not in name for name in made)
    assert {p.resolve().parent for p in out.iterdir()} == {out.resolve()}
    with pytest.raises(batch.BatchError):  # a planted symlink in the output folder is refused, not followed
        (out / "planted").symlink_to(outside, target_is_directory=True)
        batch.case_folder(out, "planted")


def test_renamed_duplicate_ids_never_collide(tmp_path, tiny, monkeypatch):
    (tmp_path / "cases.csv").write_text("path,case_id\ns.nii.gz,a\ns.nii.gz,a\ns.nii.gz,a_2\ns.nii.gz,A\ns.nii.gz,a b\n"
                                        "s.nii.gz,a_b\n")
    ids = [c.case_id for c in batch.list_cases([], cases_csv=tmp_path / "cases.csv")]
    assert len({i.lower() for i in ids}) == len(ids) == 6  # unique even on case-insensitive file systems
    assert ids[0] == "a" and ids[2] == "a_2"  # an explicit id keeps its name; the renamed duplicate moves on
    calls: list = []
    monkeypatch.setattr(batch, "run_case", _fake_run_case(calls))
    out = tmp_path / "out"
    assert batch.main(["--cases", str(tmp_path / "cases.csv"), "--model", str(tiny), "--out", str(out)]) == 0
    assert len(_summary(out)) == 6 and len({r["case_id"] for r in _summary(out)}) == 6


def test_summary_is_written_as_cases_finish_and_resume_reads_it(tmp_path, tiny, monkeypatch):
    (tmp_path / "cases.csv").write_text("path,case_id\ns.nii.gz,one\ns.nii.gz,two\ns.nii.gz,three\n")
    out = tmp_path / "out"
    argv = ["--cases", str(tmp_path / "cases.csv"), "--model", str(tiny), "--out", str(out)]
    calls: list = []
    monkeypatch.setattr(batch, "run_case", _fake_run_case(calls, fail_on="two"))
    with pytest.raises(KeyboardInterrupt):
        batch.main(argv)
    assert [r["case_id"] for r in _summary(out)] == ["one"]  # on disk before the crash
    calls.clear()
    monkeypatch.setattr(batch, "run_case", _fake_run_case(calls))
    assert batch.main([*argv, "--resume"]) == 0
    assert calls == ["two", "three"]
    assert [r["case_id"] for r in _summary(out)] == ["one", "two", "three"]


def _all_text(folder: Path) -> str:
    """Every byte of every output, .mrb archives unpacked, as text."""
    chunks = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        chunks.append(path.name)
        if path.suffix == ".mrb":
            with zipfile.ZipFile(path) as archive:
                chunks += archive.namelist() + [archive.read(n).decode("latin-1") for n in archive.namelist()]
        else:
            chunks.append(path.read_bytes().decode("latin-1"))
    return "\n".join(chunks)


def test_no_input_path_reaches_any_output_unless_keep_paths(tmp_path, tiny, scan):
    patient = tmp_path / "DOE_JOHN_1957"
    patient.mkdir()
    (patient / "head.nii.gz").write_bytes(scan.read_bytes())
    (patient / "broken.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    (tmp_path / "cases.csv").write_text(f"path,case_id\n{patient / 'head.nii.gz'},c1\n{patient / 'broken.nii.gz'},c2\n")
    out = tmp_path / "out"
    code = batch.main(["--cases", str(tmp_path / "cases.csv"), "--model", str(tiny), "--out", str(out),
                       "--device", "cpu", "--snapshots", "1", "--dicom", "--dicom-generate-study"])
    assert code == 1  # c2 fails
    assert (out / "c1" / "scene.mrb").is_file() and (out / "c1" / "dicom" / "findings_sr.dcm").is_file()
    assert "DOE_JOHN" not in _all_text(out)
    kept = tmp_path / "kept"
    batch.main([str(patient / "head.nii.gz"), "--model", str(tiny), "--out", str(kept), "--device", "cpu",
                "--snapshots", "0", "--no-scene", "--keep-paths"])
    assert _summary(kept)[0]["input"] == str(patient / "head.nii.gz")
