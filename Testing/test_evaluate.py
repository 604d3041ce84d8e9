"""evaluate: metrics from predictions, end to end on phantoms with tiny bundles, write-back, bad cases, CLI."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
from bundle_fixtures import make_bundle

from HeadCTMoLRELib.model import bundle
from HeadCTMoLRELib.evaluation import evaluate
from HeadCTMoLRELib import findings, metrics, phantoms as phantom


# ------------------------------------------------------------------------------------- from predictions
def test_evaluate_predictions_fits_temperature_on_raw_logits_and_thresholds_on_calibrated_probabilities():
    catalog = findings.default_catalog()
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=1.5, size=(400, len(catalog))) - 1.5
    labels = (rng.random(true_logits.shape) < metrics.sigmoid(true_logits)).astype(float)
    labels[:, 5] = np.nan  # one finding entirely unknown
    labels[:, 6] = 0.0  # one finding without positives
    raw = 3.0 * true_logits  # an overconfident model: calibrated at T = 3
    result = evaluate.evaluate_predictions(raw, labels, catalog, temperature=1.0, n_boot=50)
    summary = result.summary
    assert summary["n_findings_evaluated"] == len(catalog) - 2
    assert summary["not_evaluated"] == [catalog.ids[5], catalog.ids[6]]
    assert summary["calibration"]["temperature"] == pytest.approx(3.0, rel=0.15)
    assert summary["calibration"]["ece_after"] < summary["calibration"]["ece_before"]
    row = summary["per_finding"][catalog.ids[0]]
    assert row["ci_low"] <= row["auc"] <= row["ci_high"] and row["sensitivity"] >= 0.9
    calibrated = metrics.sigmoid(raw[:, 0] / result.temperature)
    positives = labels[:, 0] == 1
    assert np.mean(calibrated[positives] >= row["threshold"]) == pytest.approx(row["sensitivity"])
    assert summary["per_finding"][catalog.ids[6]]["threshold"] == 0.5
    assert summary["per_finding"][catalog.ids[5]]["auc"] is None
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN anywhere


def test_evaluate_predictions_without_calibration_keeps_the_bundle_temperature():
    catalog = findings.default_catalog()
    rng = np.random.default_rng(1)
    labels = (rng.random((60, len(catalog))) < 0.3).astype(float)
    logits = rng.normal(size=labels.shape) + labels
    result = evaluate.evaluate_predictions(logits, labels, catalog, temperature=2.0, calibrate=False, n_boot=0)
    assert result.temperature == 2.0 and result.reliability_after is None
    assert result.summary["calibration"]["ece_after"] is None
    expected = metrics.expected_calibration_error(metrics.sigmoid(logits / 2.0), labels)
    assert result.summary["calibration"]["ece_before"] == pytest.approx(expected)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    labels_csv = phantom.write_phantom_dataset(root / "cases", n=6, seed=5, prevalence=0.3)
    molre = make_bundle(root / "molre", seed=0)
    lora = make_bundle(root / "lora", use_molre=False, seed=1)
    return root, labels_csv, molre, lora


def test_evaluate_end_to_end_with_comparison_and_write_back(phantom_cases):
    root, labels_csv, molre, lora = phantom_cases
    out = root / "out_compare"
    events = []
    result = evaluate.evaluate(labels_csv, molre, out, compare=lora, device="cpu", cache_dir=root / "cache",
                               n_boot=200, progress=events.append)
    assert result["n_cases_evaluated"] == 6 and result["failures"] == []
    assert result["synthetic_cases"] is True
    assert 0 < result["n_findings_evaluated"] <= len(phantom.RENDERABLE_FINDINGS)
    assert set(result["strata"]) == {"auc_ge_0.90", "auc_0.80_0.90", "auc_lt_0.80"}
    assert sum(result["strata"].values()) == result["n_findings_evaluated"]
    for name in ("evaluation.json", "per_finding.tsv", "per_finding.md", "comparison.tsv", "comparison.md",
                 "auc_radar.png", "auc_strata.png", "reliability.png", "model_card.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    stored = json.loads((out / "evaluation.json").read_text())
    assert stored["mean_auc"] == pytest.approx(result["mean_auc"])
    row = next(iter(stored["per_finding"].values()))
    assert set(row) >= {"auc", "ci_low", "ci_high", "n_pos", "n_neg", "threshold"}
    assert set(stored["calibration"]) >= {"ece_before", "ece_after", "temperature"}
    comparison = stored["comparison"]
    assert comparison["n_improved"] + comparison["n_worse"] + comparison["n_equal"] == comparison["n_compared"]
    assert comparison["mean_gain"] == pytest.approx(comparison["mean_auc_candidate"] - comparison["mean_auc_reference"])
    with (out / "per_finding.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == 75
    assert {e["model"] for e in events} == {"molre (MoLRE)", "lora (LoRA-only)"}

    written = bundle.load_bundle(molre)  # verifies every hash, including the new model card
    assert written.temperature == pytest.approx(stored["calibration"]["temperature"])
    for fid, values in stored["per_finding"].items():
        assert written.thresholds[fid] == pytest.approx(values["threshold"])
    assert written.manifest["metrics"]["mean_auc"] == pytest.approx(stored["mean_auc"])
    assert "model_card.md" in written.manifest["files"]
    card = (written.path / "model_card.md").read_text()
    assert "## Evaluation" in card and f"{stored['mean_auc']:.3f}" in card
    assert bundle.load_bundle(lora).temperature == 1.0  # the compared bundle is never written


def test_evaluate_reports_bad_cases_without_failing(phantom_cases, tmp_path):
    root, labels_csv, molre, _ = phantom_cases
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file")
    rows = list(csv.reader(labels_csv.open()))
    header, good = rows[0], rows[1:4]
    good = [[str(labels_csv.parent / r[0])] + r[1:] for r in good]
    bad = [[str(corrupt)] + good[0][1:], [str(tmp_path / "missing.nii.gz")] + good[0][1:]]
    cases_csv = tmp_path / "cases.csv"
    with cases_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows([header] + good + bad)
    before = (molre / "manifest.json").read_text()
    result = evaluate.evaluate(cases_csv, molre, tmp_path / "out", device="cpu", cache_dir=root / "cache",
                               n_boot=20, write_back=False)
    assert result["n_cases_evaluated"] == 3
    assert [f["path"] for f in result["failures"]] == [str(corrupt)]
    assert any("missing.nii.gz" in problem for problem in result["csv_problems"])
    assert result["written_back"] is False and (molre / "manifest.json").read_text() == before


def test_evaluate_without_any_readable_case_raises_an_actionable_error(phantom_cases, tmp_path):
    root, labels_csv, molre, _ = phantom_cases
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"\x00" * 64)
    cases_csv = tmp_path / "cases.csv"
    cases_csv.write_text(f"path,epidural_hematoma\n{corrupt},1\n")
    with pytest.raises(evaluate.EvaluationError, match="none of the 1 cases could be evaluated"):
        evaluate.evaluate(cases_csv, molre, tmp_path / "out", device="cpu", cache_dir=root / "cache", n_boot=0)


def _run_evaluate_cli(phantom_cases, out_dir, *options: str) -> int:
    """`evaluate` through its argument parser on the phantom cases, no write-back, CPU, shared cache."""
    root, labels_csv, molre, _ = phantom_cases
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run_from_args(parser.parse_args(
        ["--cases", str(labels_csv), "--model", str(molre), "--out", str(out_dir), "--no-write-back",
         "--cache", str(root / "cache"), "--device", "cpu", *options]))


def test_cli_json_prints_mean_auc_and_per_finding(phantom_cases, tmp_path, capsys):
    assert _run_evaluate_cli(phantom_cases, tmp_path / "o", "--json", "--bootstrap", "20",
                             "--target-sensitivity", "0.8") == 0
    printed = json.loads(capsys.readouterr().out)
    assert "mean_auc" in printed and len(printed["per_finding"]) == 75
    assert printed["thresholds"]["target_sensitivity"] == 0.8
    assert not math.isnan(printed["mean_auc"])


def test_cli_text_mode_prints_a_summary_table(phantom_cases, tmp_path, capsys):
    assert _run_evaluate_cli(phantom_cases, tmp_path / "o", "--no-calibrate", "--bootstrap", "0") == 0
    text = capsys.readouterr().out
    assert "Mean AUC:" in text and "finding" in text and "Wrote" in text
