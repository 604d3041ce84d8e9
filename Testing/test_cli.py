"""The `headct-molre` command line: exit codes, text and JSON contracts of validate, demo, new-model,
info and infer, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from HeadCTMoLRELib import cli

REAL_NIFTI = "real/derived/GE_head_axial_1x1x5mm.nii.gz"


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_accepts_a_good_series_with_exit_0(capsys, test_data):
    code, out, _ = run(capsys, "validate", str(test_data / "bad" / "00_good_control_series"))
    assert code == 0
    assert out.startswith("ACCEPTED") and "64 x 64 x 20 voxels" in out


def test_validate_refuses_with_exit_2_and_says_why(capsys, test_data):
    code, out, _ = run(capsys, "validate", str(test_data / "bad" / "13_dicom_mr_series"))
    assert code == 2
    assert out.startswith("REFUSED") and "MR" in out


def test_validate_json_has_the_documented_keys(capsys, test_data):
    code, out, _ = run(capsys, "validate", "--json", str(test_data / "bad" / "10_dicom_missing_slice"))
    report = json.loads(out)
    assert {"accepted", "error", "warnings", "size", "spacing_mm"} <= set(report)
    assert (code == 0) == report["accepted"]
    if report["accepted"]:
        assert any("gap" in w.lower() or "missing" in w.lower() for w in report["warnings"])
    else:
        assert report["error"]


def test_validate_hu_offset_corrects_raw_ct_numbers(capsys, test_data):
    raw = str(test_data / "real" / "slicer_CTHeadAxialDicom")
    code, out, _ = run(capsys, "validate", "--json", raw)
    refused = json.loads(out)
    assert code == 2 and "1024" in refused["error"]
    code, out, _ = run(capsys, "validate", "--json", "--hu-offset", "-1024", raw)
    corrected = json.loads(out)
    assert code == 0 and corrected["accepted"]
    assert any("-1024" in w for w in corrected["warnings"])


def test_demo_runs_on_the_bundled_sample(capsys):
    code, out, _ = run(capsys, "demo", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["validation"]["accepted"]
    shape = result["preprocessing"]["shape"]
    assert len(shape) == 4 and shape[1] == 3
    assert result["preprocessing"]["valid_slices"] > shape[0] // 2
    if (cli.default_demo_model() / "manifest.json").is_file():
        from HeadCTMoLRELib.model import bundle

        demo = bundle.read_manifest(cli.default_demo_model())
        assert shape == [demo["preprocessing"]["num_slices"], 3, demo["preprocessing"]["image_size"],
                         demo["preprocessing"]["image_size"]]
        assert len(result["prediction"]["findings"]) == 75
        # the second part: the bundled phantom, truth next to prediction
        truth = json.loads((cli.default_demo_model().parent.parent / "Samples" / "phantom_demo_truth.json").read_text())
        phantom = result["phantom"]
        assert phantom["truth"] == truth["positive_labels"] and phantom["seed"] == truth["seed"]
        comparison = phantom["comparison"]
        assert [r["id"] for r in comparison["rows"] if r["truth"]] and comparison["n_true"] == len(truth["positive_labels"])
        assert {r["id"] for r in comparison["rows"] if r["truth"]} == set(truth["positive_labels"])
        assert comparison["n_true"] + comparison["n_false"] == 75
    else:
        assert "train_demo_model.py" in result["note"]


def test_truth_comparison_counts_hits_misses_and_false_calls():
    from HeadCTMoLRELib import terminal

    rows = [{"id": i, "name": i.upper(), "probability": p, "threshold": 0.5, "positive": p >= 0.5}
            for i, p in (("a", 0.9), ("b", 0.2), ("c", 0.7), ("d", 0.1))]
    comparison = terminal.truth_comparison(rows, ["a", "b"])
    assert [(r["id"], r["truth"], r["called"], r["rank"]) for r in comparison["rows"]] == [
        ("a", True, True, 1), ("b", True, False, 3), ("c", False, True, 2)]
    assert (comparison["true_called"], comparison["n_true"], comparison["false_calls"], comparison["n_false"]) == (1, 2, 1, 2)
    text = terminal.format_truth_table(comparison)
    assert "1 of 2 present findings called; 1 false call(s) among the 2 absent ones" in text
    assert text.splitlines()[2].startswith("present")


def test_demo_with_another_model_prints_the_findings_table(capsys, tmp_path):
    from bundle_fixtures import make_bundle

    model = make_bundle(tmp_path / "m")
    code, out, _ = run(capsys, "demo", "--model", str(model), "--device", "cpu", "--out", str(tmp_path / "out"))
    assert code == 0
    assert "ACCEPTED" in out and "finding" in out and "Research use only" in out
    assert (tmp_path / "out" / "findings.tsv").is_file()


def test_new_model_info_and_infer_end_to_end(capsys, tmp_path, test_data):
    bundle_dir = tmp_path / "model"
    code, out, _ = run(capsys, "new-model", "--backbone", "dinov3", "--size", "tiny", "--image-size", "32",
                       "--alignment", "center", "--out", str(bundle_dir))
    assert code == 0 and "wrote" in out and (bundle_dir / "manifest.json").is_file()

    code, out, _ = run(capsys, "info", str(bundle_dir), "--verify")
    assert code == 0 and "dinov3 tiny" in out and "All file hashes verified" in out

    code, out, _ = run(capsys, "infer", str(test_data / REAL_NIFTI), "--model", str(bundle_dir), "--device", "cpu",
                       "--json", "--out", str(tmp_path / "out"))
    assert code == 0
    result = json.loads(out)
    assert {"findings", "attention", "router_weights", "slice_positions_mm"} <= set(result)
    assert len(result["findings"]) == 75
    assert {"id", "name", "category", "probability", "threshold", "positive"} <= set(result["findings"][0])
    assert len(result["attention"]) == 40 and len(result["router_weights"][0]) == 6
    for name in ("findings.tsv", "findings.json", "attention.nrrd", "experts.nrrd"):
        assert (tmp_path / "out" / name).is_file()

    code, out, _ = run(capsys, "infer", str(test_data / REAL_NIFTI), "--model", str(bundle_dir), "--device", "cpu",
                       "--top", "5")
    assert code == 0
    lines = [line for line in out.splitlines() if not line.startswith("!")]  # the UNTRAINED banner comes first
    assert out.startswith("!") and "UNTRAINED" in out.splitlines()[1]
    assert lines[0].split()[:3] == ["prob", "finding", "category"]
    assert "Research use only" in out


def test_new_model_with_per_finding_pooling_runs_through_info_and_infer(capsys, tmp_path, test_data):
    bundle_dir = tmp_path / "model"
    code, _, _ = run(capsys, "new-model", "--backbone", "dinov3", "--size", "tiny", "--image-size", "32",
                     "--pooling", "per_finding", "--out", str(bundle_dir))
    assert code == 0
    assert json.loads((bundle_dir / "manifest.json").read_text())["model"]["pooling"] == "per_finding"
    code, out, _ = run(capsys, "info", str(bundle_dir), "--verify")
    assert code == 0 and "Slice pooling: per finding" in out
    code, out, _ = run(capsys, "infer", str(test_data / REAL_NIFTI), "--model", str(bundle_dir), "--device", "cpu",
                       "--json", "--out", str(tmp_path / "out"))
    assert code == 0
    result = json.loads(out)
    assert len(result["attention"]) == 40 and abs(sum(result["attention"]) - 1.0) < 1e-4
    # a 3-D backbone has no slices to pool: refused with the reason, nothing written
    code, _, err = run(capsys, "new-model", "--backbone", "videomae3d", "--size", "tiny", "--image-size", "32",
                       "--pooling", "per_finding", "--out", str(tmp_path / "video"))
    assert code == 2 and "whole volumes" in err and not (tmp_path / "video").exists()


def test_new_model_refuses_an_existing_folder_and_unknown_family(capsys, tmp_path):
    code, _, err = run(capsys, "new-model", "--backbone", "resnet", "--size", "tiny", "--out", str(tmp_path / "x"))
    assert code == 2 and "resnet" in err
    (tmp_path / "exists").mkdir()
    code, _, err = run(capsys, "new-model", "--backbone", "dinov3", "--size", "tiny", "--out", str(tmp_path / "exists"))
    assert code == 2 and "already exists" in err


def test_infer_refused_input_exits_2_with_the_reason(capsys, tmp_path, test_data):
    code, _, _ = run(capsys, "new-model", "--backbone", "dinov3", "--size", "tiny", "--image-size", "32",
                     "--out", str(tmp_path / "m"))
    assert code == 0
    code, _, err = run(capsys, "infer", str(test_data / "bad" / "01_nifti_truncated.nii.gz"), "--model",
                       str(tmp_path / "m"))
    assert code == 2 and "01_nifti_truncated.nii.gz" in err and "truncated" in err.lower()


def test_infer_with_a_missing_bundle_says_how_to_make_one(capsys, tmp_path, test_data):
    code, _, err = run(capsys, "infer", str(test_data / REAL_NIFTI), "--model", str(tmp_path))
    assert code == 2 and "new-model" in err


def test_installed_entry_point_runs(test_data):
    completed = subprocess.run(
        [sys.executable, "-m", "HeadCTMoLRELib.cli", "validate", str(test_data / "bad" / "05_nifti_2d.nii.gz")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "2D" in completed.stdout or "2-D" in completed.stdout


def test_validate_does_not_import_torch():
    """The light commands stay fast: torch and transformers load only for commands that need them."""
    code = ("import sys; from HeadCTMoLRELib import cli; "
            "cli.main(['validate', sys.argv[1]]); print('torch' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code, "/nonexistent.nii.gz"],
                               capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip().splitlines()[-1] == "False", completed.stdout + completed.stderr


def test_every_command_is_listed_with_its_arguments():
    parser = cli.build_parser()
    text = parser.format_help()
    for name in ("validate", "demo", "phantoms", "info", "new-model", "infer", "train", "fine-tune", "evaluate",
                 "benchmark"):
        assert name in text
