"""evaluate: metrics from predictions; end to end on phantoms with tiny bundles: the evaluated bundle is
never written, calibration is fitted on one split and reported on another, overlap with the training
cases is detected, bad cases, CLI."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
from bundle_fixtures import make_bundle

from HeadCTMoLRELib.model import bundle
from HeadCTMoLRELib.evaluation import evaluate
from HeadCTMoLRELib.training.cases import input_sha256
from HeadCTMoLRELib import calibration, cli, findings, metrics, phantoms as phantom


def _overconfident(n, catalog, seed, scale=3.0, shift=-1.5):
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(scale=1.5, size=(n, len(catalog))) + shift
    labels = (rng.random(true_logits.shape) < metrics.sigmoid(true_logits)).astype(float)
    return scale * true_logits, labels


# ------------------------------------------------------------------------------------- from predictions
def test_without_fit_cases_the_fitted_calibration_and_thresholds_are_labelled_in_sample():
    catalog = findings.default_catalog()
    raw, labels = _overconfident(400, catalog, 0)
    labels[:, 5] = np.nan  # one finding entirely unknown
    labels[:, 6] = 0.0  # one finding without positives
    result = evaluate.evaluate_predictions(raw, labels, catalog, temperature=1.0, n_boot=50,
                                           thresholds=np.full(len(catalog), 0.7))
    summary = result.summary
    assert summary["n_findings_evaluated"] == len(catalog) - 2
    assert summary["not_evaluated"] == [catalog.ids[5], catalog.ids[6]]
    calibration_block = summary["calibration"]
    assert calibration_block["temperature"] == pytest.approx(3.0, rel=0.15)
    assert calibration_block["after_is"] == "in-sample" and calibration_block["fitted_on"].endswith("(in-sample)")
    assert calibration_block["ece_after"] < calibration_block["ece_before"]
    # ECE over findings with positives leaves out the never-positive finding
    assert calibration_block["bundle"]["n_findings"] == len(catalog) - 2
    in_sample = summary["in_sample"]["per_finding"][catalog.ids[0]]
    assert in_sample["sensitivity"] >= 0.9 and in_sample["n_pos"] == int(np.nansum(labels[:, 0] == 1))
    calibrated = metrics.sigmoid(raw[:, 0] / result.temperature)
    positives = labels[:, 0] == 1
    assert np.mean(calibrated[positives] >= in_sample["threshold"]) == pytest.approx(in_sample["sensitivity"])
    # the held-out per-finding operating points are the bundle's own (0.7 under its temperature 1)
    row = summary["per_finding"][catalog.ids[0]]
    assert row["threshold"] == 0.7 and summary["thresholds"]["reported_at"].startswith("the bundle's own")
    assert row["sensitivity"] == pytest.approx(np.mean(metrics.sigmoid(raw[positives, 0]) >= 0.7))
    assert row["sensitivity_ci_low"] <= row["sensitivity"] <= row["sensitivity_ci_high"]
    assert row["ci_low"] <= row["auc"] <= row["ci_high"] and row["n_pos"] == in_sample["n_pos"]
    assert summary["per_finding"][catalog.ids[5]]["auc"] is None
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN anywhere


def test_calibration_fitted_on_val_improves_held_out_ece_and_reports_held_out_operating_points():
    catalog = findings.default_catalog()
    fit_logits, fit_labels = _overconfident(300, catalog, 1)
    test_logits, test_labels = _overconfident(300, catalog, 2)
    result = evaluate.evaluate_predictions(test_logits, test_labels, catalog, fit_logits=fit_logits,
                                           fit_labels=fit_labels, n_boot=50, target_sensitivity=0.9)
    summary = result.summary
    assert summary["calibration"]["after_is"] == "held-out"
    assert summary["calibration"]["ece_after"] < 0.5 * summary["calibration"]["ece_before"]
    # thresholds come from the fit cases; the reported sensitivity is measured on the test cases
    expected = metrics.thresholds_at_sensitivity(metrics.sigmoid(fit_logits / result.temperature), fit_labels, 0.9)
    row = summary["per_finding"][catalog.ids[3]]
    assert row["threshold"] == pytest.approx(expected.threshold[3])
    test_positive = test_labels[:, 3] == 1
    held_out = np.mean(metrics.sigmoid(test_logits[test_positive, 3] / result.temperature) >= row["threshold"])
    assert row["sensitivity"] == pytest.approx(held_out)
    assert summary["in_sample"]["per_finding"][catalog.ids[3]]["sensitivity"] >= 0.9
    assert row["ppv"] is not None and row["n_called"] > 0


def test_the_prior_correction_undoes_the_focal_alpha_shift_without_fitting():
    catalog = findings.default_catalog()
    rng = np.random.default_rng(3)
    prevalence = rng.uniform(0.05, 0.3, len(catalog))
    true_logits = np.log(prevalence / (1 - prevalence)) + rng.normal(scale=1.0, size=(2000, len(catalog)))
    labels = (rng.random(true_logits.shape) < metrics.sigmoid(true_logits)).astype(float)
    alpha = np.clip(1 - prevalence, *calibration.ALPHA_CLIP)
    raw = true_logits + calibration.prior_offsets(alpha)  # what a focal-alpha-weighted loss learns
    fit = evaluate.evaluate_predictions(raw[:1000], labels[:1000], catalog, fit_logits=raw[1000:],
                                        fit_labels=labels[1000:], method="prior_correction", alpha=alpha, n_boot=0)
    assert fit.temperature == 1.0 and not fit.fitted_temperature
    assert fit.summary["calibration"]["ece_before"] > 0.2
    assert fit.summary["calibration"]["ece_after"] < 0.03


# ------------------------------------------------------------------------------------------- end to end
def _bundle_state(folder):
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    labels_csv = phantom.write_phantom_dataset(root / "cases", n=8, seed=5, prevalence=0.3)
    rows = list(csv.reader(labels_csv.open()))
    split_csv = labels_csv.with_name("split.csv")  # next to the phantoms' metadata.json: synthetic
    with split_csv.open("w", newline="") as handle:  # patient P_k holds cases 2k and 2k+1
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "patient"] + rows[0][1:])
        for index, row in enumerate(rows[1:]):
            writer.writerow([row[0], "val" if index < 4 else "test", f"P{index // 2}"] + row[1:])
    molre = make_bundle(root / "molre", seed=0)
    lora = make_bundle(root / "lora", use_molre=False, seed=1)
    return root, split_csv, molre, lora


def test_evaluate_never_writes_into_the_bundles_and_writes_a_calibrated_copy(phantom_cases):
    root, cases_csv, molre, lora = phantom_cases
    before, before_lora = _bundle_state(molre), _bundle_state(lora)
    out, calibrated = root / "out_compare", root / "calibrated"
    events = []
    result = evaluate.evaluate(cases_csv, molre, out, fit_split="val", calibrated_out=calibrated, compare=lora,
                               device="cpu", cache_dir=root / "cache", n_boot=200, progress=events.append)
    assert _bundle_state(molre) == before and _bundle_state(lora) == before_lora  # byte-identical, untouched
    assert result["split"] == "test" and result["n_cases_evaluated"] == 4 and result["fit_cases"]["n_cases"] == 4
    assert result["bootstrap"]["resampled"] == "patients" and result["calibration"]["after_is"] == "held-out"
    assert result["synthetic_cases"] is True
    assert set(result["strata"]) == {"auc_ge_0.90", "auc_0.80_0.90", "auc_lt_0.80"}
    for name in ("evaluation.json", "per_finding.tsv", "per_finding.md", "comparison.tsv", "comparison.md",
                 "auc_radar.png", "auc_strata.png", "reliability.png", "model_card.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    stored = json.loads((out / "evaluation.json").read_text())
    text = (out / "evaluation.json").read_text() + (out / "model_card.md").read_text()
    assert str(root) not in text and "/tmp" not in text  # portable: no machine paths
    row = next(iter(stored["per_finding"].values()))
    assert set(row) >= {"auc", "ci_low", "ci_high", "n_pos", "n_neg", "threshold", "sensitivity", "specificity", "ppv",
                        "sensitivity_ci_low", "ppv_ci_high", "ci_method"}
    with (out / "per_finding.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == 75 and "n_pos" in rows[0] and "ppv" in rows[0]
    assert "Held-out" in (out / "per_finding.md").read_text()
    assert {e["model"] for e in events} >= {"molre (MoLRE)", "lora (LoRA-only)", "molre (MoLRE) [fit]"}

    written = bundle.load_bundle(calibrated)  # a new bundle; verifies every hash, including the new model card
    record = written.manifest["calibration"]
    assert record["fitted_on"]["split"] == "val" and record["fitted_on"]["n_cases"] == 4
    assert record["fitted_on"]["source_bundle"]["fingerprint"] == bundle.load_bundle(molre).fingerprint
    assert written.temperature == pytest.approx(stored["calibration"]["temperature"]) == record["temperature"]
    for fid, values in stored["per_finding"].items():
        assert written.thresholds[fid] == pytest.approx(values["threshold"])
    assert written.manifest["metrics"]["figures"] == "held-out"
    assert written.manifest["metrics"]["mean_auc"] == pytest.approx(stored["mean_auc"])
    card = (written.path / "model_card.md").read_text()
    assert "## Evaluation" in card and f"{stored['mean_auc']:.3f}" in card and "held-out" in card


def test_overlap_with_the_training_cases_is_reported_and_strict_refuses(phantom_cases, tmp_path):
    root, cases_csv, molre, _ = phantom_cases
    trained = tmp_path / "trained"
    shutil.copytree(molre, trained)
    first_test_case = cases_csv.parent / "case_0004.nii.gz"
    bundle.update_bundle(trained, training={"case_sha256": {"train": [input_sha256(first_test_case)], "val": []},
                                            "patients": {"train": [], "val": ["P3"]}})
    result = evaluate.evaluate(cases_csv, trained, tmp_path / "out", split="test", device="cpu",
                               cache_dir=root / "cache", n_boot=0)
    overlap = result["overlap"]
    assert overlap["n_train"] == 1 and overlap["train"][0] == {"path": "case_0004.nii.gz", "by": "content"}
    assert overlap["n_val"] == 2 and {item["by"] for item in overlap["val"]} == {"patient"}  # P3 = cases 6, 7
    assert any("training cases" in warning for warning in result["warnings"])
    with pytest.raises(evaluate.EvaluationError, match="--strict: 1 evaluated case"):
        evaluate.evaluate(cases_csv, trained, tmp_path / "out2", split="test", strict=True, device="cpu",
                          cache_dir=root / "cache", n_boot=0)
    code = cli.main(["evaluate", "--cases", str(cases_csv), "--model", str(trained), "--out", str(tmp_path / "o3"),
                     "--split", "test", "--strict", "--device", "cpu", "--cache", str(root / "cache")])
    assert code == 2


def test_evaluate_refuses_what_would_leak_or_write_into_an_input(phantom_cases, tmp_path):
    root, cases_csv, molre, _ = phantom_cases
    common = dict(device="cpu", cache_dir=root / "cache", n_boot=0)
    with pytest.raises(evaluate.EvaluationError, match="only reads"):
        evaluate.evaluate(cases_csv, molre, molre / "eval", **common)
    with pytest.raises(evaluate.EvaluationError, match="needs fit cases"):
        evaluate.evaluate(cases_csv, molre, tmp_path / "o", calibrated_out=tmp_path / "new", **common)
    with pytest.raises(evaluate.EvaluationError, match="share 4 scan"):  # fitting on the evaluated cases
        evaluate.evaluate(cases_csv, molre, tmp_path / "o", split="test", fit_cases=cases_csv, fit_split="test",
                          **common)
    rows = list(csv.reader(cases_csv.open()))
    same_patient = tmp_path / "fit.csv"  # another scan of patient P2 (a test patient) in the fit CSV
    with same_patient.open("w", newline="") as handle:
        csv.writer(handle).writerows([rows[0], [str(cases_csv.parent / rows[1][0]), "val", "P2"] + rows[1][3:]])
    with pytest.raises(evaluate.EvaluationError, match="1 patient"):
        evaluate.evaluate(cases_csv, molre, tmp_path / "o", split="test", fit_cases=same_patient, **common)


def test_evaluate_reports_bad_cases_without_failing(phantom_cases, tmp_path):
    root, cases_csv, molre, _ = phantom_cases
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file")
    rows = list(csv.reader(cases_csv.open()))
    header, good = rows[0], rows[1:4]
    good = [[str(cases_csv.parent / r[0])] + r[1:] for r in good]
    bad = [[str(corrupt)] + good[0][1:], [str(tmp_path / "missing.nii.gz")] + good[0][1:]]
    bad_csv = tmp_path / "cases.csv"
    with bad_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows([header] + good + bad)
    before = _bundle_state(molre)
    result = evaluate.evaluate(bad_csv, molre, tmp_path / "out", device="cpu", cache_dir=root / "cache", n_boot=20)
    assert result["n_cases_evaluated"] == 3
    assert [f["path"] for f in result["failures"]] == ["corrupt.nii.gz"]
    assert any("missing.nii.gz" in problem for problem in result["csv_problems"])
    assert _bundle_state(molre) == before


def test_evaluate_without_any_readable_case_raises_an_actionable_error(phantom_cases, tmp_path):
    root, _, molre, _ = phantom_cases
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"\x00" * 64)
    cases_csv = tmp_path / "cases.csv"
    cases_csv.write_text(f"path,epidural_hematoma\n{corrupt},1\n")
    with pytest.raises(evaluate.EvaluationError, match="none of the 1 cases could be evaluated"):
        evaluate.evaluate(cases_csv, molre, tmp_path / "out", device="cpu", cache_dir=root / "cache", n_boot=0)


def _run_evaluate_cli(phantom_cases, out_dir, *options: str) -> int:
    """`evaluate` through its argument parser on the phantom cases, CPU, shared cache."""
    root, cases_csv, molre, _ = phantom_cases
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run_from_args(parser.parse_args(
        ["--cases", str(cases_csv), "--model", str(molre), "--out", str(out_dir),
         "--cache", str(root / "cache"), "--device", "cpu", *options]))


def test_cli_json_prints_mean_auc_and_per_finding(phantom_cases, tmp_path, capsys):
    assert _run_evaluate_cli(phantom_cases, tmp_path / "o", "--json", "--bootstrap", "20", "--fit-split", "val",
                             "--target-sensitivity", "0.8") == 0
    printed = json.loads(capsys.readouterr().out)
    assert "mean_auc" in printed and len(printed["per_finding"]) == 75
    assert printed["thresholds"]["target_sensitivity"] == 0.8 and printed["split"] == "test"
    assert not math.isnan(printed["mean_auc"])


def test_cli_text_mode_prints_a_summary_table(phantom_cases, tmp_path, capsys):
    assert _run_evaluate_cli(phantom_cases, tmp_path / "o", "--no-calibrate", "--bootstrap", "0") == 0
    text = capsys.readouterr().out
    assert "Mean AUC:" in text and "finding" in text and "Wrote" in text and "unchanged" in text
    assert "held-out" in text
