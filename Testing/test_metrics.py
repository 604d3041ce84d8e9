"""Metrics: AUC with ties and masking, bootstrap intervals, strata, calibration, thresholds, comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from HeadCTMoLRELib import metrics

nan = np.nan


# ------------------------------------------------------------------------------------------------- AUC
def test_auc_matches_hand_count_of_positive_negative_pairs():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])[0] == pytest.approx(0.75)


def test_auc_counts_ties_as_half():
    # positives 0.5, 0.9; negatives 0.1, 0.5: 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert metrics.roc_auc([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1])[0] == pytest.approx(0.875)


def test_auc_of_all_equal_scores_is_one_half():
    assert metrics.roc_auc(np.full(7, 0.3), [0, 1, 0, 1, 1, 0, 0])[0] == pytest.approx(0.5)


def test_auc_perfect_and_inverted_ranking():
    labels = [0, 0, 1, 1]
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], labels)[0] == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], labels)[0] == 0.0


def test_auc_masks_unknown_labels_instead_of_counting_them_negative():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.99, 0.0])
    labels = np.array([0, 0, 1, 1, nan, nan])  # the unknown cases would change the AUC if counted
    assert metrics.roc_auc(scores, labels)[0] == pytest.approx(0.75)


def test_auc_is_nan_for_single_class_findings_and_per_column():
    scores = np.array([[0.1, 0.2, 0.3], [0.9, 0.4, 0.5], [0.5, 0.6, 0.7]])
    labels = np.array([[0, 1, nan], [1, 1, 0], [0, 1, nan]])
    auc = metrics.roc_auc(scores, labels)
    assert auc[0] == 1.0
    assert math.isnan(auc[1])  # no negatives
    assert math.isnan(auc[2])  # one known label


def test_auc_agrees_with_brute_force_pair_count_on_random_data_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = (rng.random(60) < 0.4).astype(float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert metrics.roc_auc(scores, labels)[0] == pytest.approx(brute)


def test_auc_rejects_labels_other_than_zero_one_nan():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        metrics.roc_auc([0.1, 0.2], [0, 2])


# ------------------------------------------------------------------------------------------- bootstrap
def _noisy_finding(n, seed, separation=1.0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(float)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + separation * labels
    return scores, labels


def test_bootstrap_interval_contains_point_estimate():
    scores, labels = _noisy_finding(120, 0)
    result = metrics.auc_with_ci(scores, labels, n_boot=500, seed=1)
    assert result.ci_low[0] <= result.auc[0] <= result.ci_high[0]
    assert result.ci_low[0] < result.ci_high[0]


def test_bootstrap_interval_narrows_with_more_cases():
    small = metrics.auc_with_ci(*_noisy_finding(40, 2), n_boot=500, seed=0)
    large = metrics.auc_with_ci(*_noisy_finding(1000, 2), n_boot=500, seed=0)
    assert (large.ci_high[0] - large.ci_low[0]) < 0.6 * (small.ci_high[0] - small.ci_low[0])


def test_bootstrap_is_seeded_and_identity_weights_reproduce_the_auc():
    scores, labels = _noisy_finding(50, 4)
    a = metrics.auc_with_ci(scores, labels, n_boot=100, seed=7)
    b = metrics.auc_with_ci(scores, labels, n_boot=100, seed=7)
    np.testing.assert_array_equal(a.samples, b.samples)
    ones = np.ones((1, 50))
    assert metrics.bootstrap_auc_samples(scores, labels, ones)[0, 0] == pytest.approx(a.auc[0])


def test_bootstrap_weights_equal_explicit_resampling():
    scores, labels = _noisy_finding(30, 5)
    counts = metrics.bootstrap_counts(30, n_boot=5, seed=2)
    assert counts.sum(axis=1).tolist() == [30] * 5
    for row in range(5):
        resampled = np.repeat(np.arange(30), counts[row])
        expected = metrics.roc_auc(scores[resampled], labels[resampled])[0]
        assert metrics.bootstrap_auc_samples(scores, labels, counts[row:row + 1])[0, 0] == pytest.approx(expected)


def test_bootstrap_leaves_single_class_finding_nan():
    scores = np.random.default_rng(0).random((20, 2))
    labels = np.zeros((20, 2))
    labels[:5, 0] = 1
    result = metrics.auc_with_ci(scores, labels, n_boot=50)
    assert not math.isnan(result.ci_low[0])
    assert math.isnan(result.auc[1]) and math.isnan(result.ci_low[1]) and math.isnan(result.ci_high[1])
    assert result.n_pos.tolist() == [5, 0] and result.n_neg.tolist() == [15, 20]


# -------------------------------------------------------------------------------------------- summaries
def test_strata_count_findings_with_boundaries_in_the_upper_stratum():
    aucs = [0.95, 0.90, 0.899, 0.80, 0.79, 0.5, nan]
    assert metrics.stratify(aucs) == {"auc_ge_0.90": 2, "auc_0.80_0.90": 2, "auc_lt_0.80": 2}


def test_summary_skips_nan_findings_and_reports_count():
    summary = metrics.summarize_aucs([0.9, 0.7, nan, 0.8])
    assert summary["mean_auc"] == pytest.approx(0.8)
    assert summary["std_auc"] == pytest.approx(np.std([0.9, 0.7, 0.8]))
    assert summary["n_findings_evaluated"] == 3 and summary["n_findings_total"] == 4
    assert metrics.summarize_aucs([nan, nan])["mean_auc"] is None


# ------------------------------------------------------------------------------------------ calibration
def test_ece_of_perfectly_calibrated_synthetic_set_is_near_zero():
    rng = np.random.default_rng(0)
    p = rng.random((20000, 3))
    y = (rng.random(p.shape) < p).astype(float)
    assert metrics.expected_calibration_error(p, y) < 0.02


def test_ece_of_overconfident_predictions_is_large():
    rng = np.random.default_rng(1)
    true_p = rng.random(20000)
    y = (rng.random(20000) < true_p).astype(float)
    logit = np.log(true_p / (1 - true_p))
    overconfident = metrics.sigmoid(4.0 * logit)
    assert metrics.expected_calibration_error(overconfident, y) > 0.1


def test_ece_by_hand_on_two_bins():
    # bin [0,0.5): p=0.2,0.2 with 1 positive -> gap 0.3; bin [0.5,1]: p=1.0 (last bin includes 1), y=1 -> 0
    assert metrics.expected_calibration_error([0.2, 0.2, 1.0], [0, 1, 1], n_bins=2) == pytest.approx(2 / 3 * 0.3)


def test_reliability_bins_skip_unknown_labels():
    bins = metrics.reliability_bins([[0.05], [0.95], [0.5]], [[0], [1], [nan]], n_bins=10)
    assert bins.count.sum() == 2
    assert bins.count[0] == 1 and bins.count[9] == 1
    assert bins.fraction_positive[9] == 1.0 and math.isnan(bins.mean_predicted[5])


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_known_temperature(true_temperature):
    rng = np.random.default_rng(11)
    calibrated_logits = rng.normal(scale=2.0, size=(4000, 5))
    labels = (rng.random(calibrated_logits.shape) < metrics.sigmoid(calibrated_logits)).astype(float)
    labels[rng.random(labels.shape) < 0.2] = nan  # unknown labels must be ignored
    fitted = metrics.fit_temperature(calibrated_logits * true_temperature, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    before = metrics.binary_nll(calibrated_logits * true_temperature, labels)
    after = metrics.binary_nll(calibrated_logits * true_temperature / fitted, labels)
    assert after < before


def test_temperature_is_one_without_two_classes_and_positive_for_anti_ranking_logits():
    assert metrics.fit_temperature([[1.0], [2.0]], [[1], [1]]) == 1.0
    assert metrics.fit_temperature([[1.0], [2.0]], [[nan], [nan]]) == 1.0
    inverted = metrics.fit_temperature([[3.0], [-3.0]], [[0], [1]], t_max=20.0)
    assert inverted == pytest.approx(20.0, rel=0.01)


# ------------------------------------------------------------------------------------------- thresholds
def test_thresholds_reach_target_sensitivity_with_highest_possible_threshold():
    rng = np.random.default_rng(5)
    labels = (rng.random((300, 4)) < 0.3).astype(float)
    probabilities = metrics.sigmoid(rng.normal(size=labels.shape) + 1.5 * labels)
    result = metrics.thresholds_at_sensitivity(probabilities, labels, 0.9)
    for c in range(4):
        pos = probabilities[labels[:, c] == 1, c]
        called = pos >= result.threshold[c]
        assert called.mean() >= 0.9
        assert result.sensitivity[c] == pytest.approx(called.mean())
        # one positive fewer called would drop below the target: the threshold is the highest that works
        assert (called.sum() - 1) / len(pos) < 0.9


def test_threshold_tie_rule_keeps_tied_cases_positive_and_sits_between_scores():
    probabilities = np.array([[0.9], [0.6], [0.6], [0.2], [0.6], [0.1]])
    labels = np.array([[1], [1], [0], [1], [1], [0]])
    # positives sorted 0.9, 0.6, 0.6, 0.2: k = ceil(0.5 * 4) = 2 -> cut at 0.6; next lower score 0.2 -> 0.4
    result = metrics.thresholds_at_sensitivity(probabilities, labels, 0.5)
    assert result.threshold[0] == pytest.approx(0.4)
    assert result.sensitivity[0] == pytest.approx(0.75)  # both tied positives are called
    assert result.specificity[0] == pytest.approx(0.5)  # the tied negative is called too


def test_threshold_defaults_to_one_half_without_positives():
    result = metrics.thresholds_at_sensitivity([[0.2], [0.7]], [[0], [0]])
    assert result.threshold[0] == 0.5 and math.isnan(result.sensitivity[0])
    assert result.specificity[0] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- comparison
def test_comparison_arithmetic_and_counts():
    def result(aucs):
        aucs = np.asarray(aucs, dtype=float)
        empty = np.full((0, aucs.size), nan)
        return metrics.AUCResult(aucs, aucs, aucs, np.ones(aucs.size, int), np.ones(aucs.size, int), 0, 0.95, empty)

    comparison = metrics.compare_aucs(result([0.7, 0.8, 0.9, nan, 0.6]), result([0.8, 0.8, 0.85, 0.9, nan]))
    np.testing.assert_allclose(comparison["difference"][:3], [0.1, 0.0, -0.05])
    assert math.isnan(comparison["difference"][3]) and math.isnan(comparison["difference"][4])
    assert comparison["mean_gain"] == pytest.approx((0.1 + 0.0 - 0.05) / 3)
    assert (comparison["n_improved"], comparison["n_worse"], comparison["n_equal"]) == (1, 1, 1)
    assert comparison["n_compared"] == 3 and comparison["mean_gain_ci"] is None


def test_paired_bootstrap_difference_interval_excludes_zero_for_a_clearly_better_model():
    rng = np.random.default_rng(8)
    labels = (rng.random((400, 2)) < 0.3).astype(float)
    noise = rng.normal(size=labels.shape)
    weak = noise + 0.3 * labels
    strong = noise + 2.0 * labels
    comparison = metrics.compare_aucs(metrics.auc_with_ci(weak, labels, n_boot=300, seed=1),
                                      metrics.auc_with_ci(strong, labels, n_boot=300, seed=1))
    assert comparison["n_improved"] == 2
    assert comparison["mean_gain_ci"][0] > 0
    assert np.all(comparison["difference_ci_low"] > 0)


# ------------------------------------------------------------- patients, extremes, operating points, ECE
def test_bootstrap_by_patient_draws_all_scans_of_a_patient_together():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    counts = metrics.bootstrap_counts(6, 200, seed=1, groups=groups)
    assert counts.shape == (200, 6)
    assert np.all(counts[:, 0] == counts[:, 1]) and np.all(counts[:, 3] == counts[:, 5])
    assert np.all(counts[:, [0, 2, 3]].sum(axis=1) == 3)  # as many patients drawn as there are
    assert np.array_equal(counts, metrics.bootstrap_counts(6, 200, seed=1, groups=groups))


def test_auc_at_an_extreme_gets_an_exact_interval_instead_of_a_point():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1], float)
    result = metrics.auc_with_ci(scores, labels, n_boot=200, seed=0)
    assert result.auc[0] == 1.0 and result.ci_method == ["exact_extreme"]
    assert result.ci_low[0] == pytest.approx(0.025 ** (1 / 2)) and result.ci_high[0] == 1.0
    assert 0 < result.n_degenerate[0] < 200  # resamples without a positive are counted, not hidden
    inverted = metrics.auc_with_ci(-scores, labels, n_boot=50, seed=0)
    assert inverted.ci_low[0] == 0.0 and inverted.ci_high[0] == pytest.approx(1 - 0.025 ** (1 / 2))


def test_operating_points_count_sensitivity_specificity_and_ppv():
    probabilities = np.array([[0.9], [0.6], [0.4], [0.7], [0.1], [0.2]])
    labels = np.array([[1], [1], [1], [0], [0], [np.nan]])
    points = metrics.operating_points(probabilities, labels, [0.5], n_boot=100, seed=0)
    assert points.sensitivity[0] == pytest.approx(2 / 3) and points.specificity[0] == pytest.approx(1 / 2)
    assert points.ppv[0] == pytest.approx(2 / 3) and points.n_called[0] == 3
    assert points.n_pos[0] == 3 and points.n_neg[0] == 2
    low, high = points.intervals["sensitivity"]
    assert low[0] <= points.sensitivity[0] <= high[0]


def test_ece_over_findings_with_positives_leaves_out_never_positive_findings():
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(0.3, 0.7, size=(200, 3))
    labels = (rng.random((200, 3)) < probabilities).astype(float)
    labels[:, 2] = 0.0
    probabilities[:, 2] = 0.001  # a never-positive finding, predicted near 0: it dilutes the pooled ECE
    summary = metrics.calibration_summary(probabilities, labels, ["a", "a", "b"])
    assert summary["n_findings"] == 2 and summary["n_findings_all"] == 3
    assert summary["ece"] == pytest.approx(metrics.expected_calibration_error(probabilities[:, :2], labels[:, :2]))
    assert summary["ece_all_findings"] < summary["ece"]
    assert summary["per_category"]["b"] == {"ece": None, "n_findings": 0, "n_pos": 0}
