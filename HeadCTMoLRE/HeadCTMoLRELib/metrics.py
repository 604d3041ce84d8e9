"""Evaluation metrics for multi-label head CT classification (numpy only, no torch, no scikit-learn).

Conventions shared by every function here:

- ``probabilities`` and ``labels`` are float arrays of shape (N cases, C findings), findings in catalog
  order. A label is 1 (present), 0 (absent) or NaN (unknown); unknown labels are left out of every
  metric of that finding, never counted as negatives.
- ``logits`` are the classifier's pre-sigmoid outputs, shape (N, C).
- A finding is *evaluable* when its known labels hold at least one positive and one negative; every
  per-finding metric of a non-evaluable finding is NaN, and summaries (mean AUC, strata) skip it and
  say how many findings they cover.

AUC is the Mann-Whitney statistic P(score of a positive > score of a negative), ties counting one half,
so that all-equal scores give exactly 0.5. Bootstrap intervals resample *cases* (the same resampled cases
for every finding, and for two models when comparing), so per-finding intervals and paired model
differences keep the correlation that real case resampling has.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

#: The paper's AUC strata: findings with AUC >= 0.90, 0.80 <= AUC < 0.90, AUC < 0.80.
STRATA: tuple[tuple[str, float, float], ...] = (
    ("auc_ge_0.90", 0.90, math.inf),
    ("auc_0.80_0.90", 0.80, 0.90),
    ("auc_lt_0.80", -math.inf, 0.80),
)
STRATUM_LABELS = {"auc_ge_0.90": "AUC >= 0.90", "auc_0.80_0.90": "0.80 <= AUC < 0.90", "auc_lt_0.80": "AUC < 0.80"}


def _as_2d(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (cases, findings), got {array.shape}")
    return array


def _check_pair(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = _as_2d("scores", scores), _as_2d("labels", labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same (cases, findings) shape")
    known = ~np.isnan(labels)
    if np.any((labels[known] != 0) & (labels[known] != 1)):
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    if np.any(np.isnan(scores[known])):
        raise ValueError("scores are NaN where the label is known; the model produced invalid outputs")
    return scores, labels


# ------------------------------------------------------------------------------------------------- AUC
def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of one finding under case weights (bootstrap counts).

    ``scores`` (n,) and ``positive`` (n,) bool over the cases with a known label; ``weights`` (B, n)
    non-negative case multiplicities. Returns (B,) AUCs, NaN where a weighting leaves no positive or no
    negative. Cost O(B * n) after one sort: cases with equal scores form tie groups, and each positive
    scores the negative weight strictly below its group plus half the negative weight inside it.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, is_pos, w = scores[order], positive[order], weights[:, order]
    new_group = np.empty(len(sorted_scores), dtype=bool)
    new_group[:1] = True
    new_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
    if not len(sorted_scores):
        return np.full(w.shape[0], np.nan)
    group = np.cumsum(new_group) - 1  # (n,) tie-group index, ascending score
    neg_w = np.where(is_pos, 0.0, w)
    pos_w = np.where(is_pos, w, 0.0)
    neg_in_group = np.add.reduceat(neg_w, np.flatnonzero(new_group), axis=1)  # (B, groups): ties are contiguous
    neg_below = np.cumsum(neg_in_group, axis=1) - neg_in_group
    credit = neg_below[:, group] + 0.5 * neg_in_group[:, group]  # (B, n) per case
    total_pos, total_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_w * credit).sum(axis=1) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def roc_auc(scores, labels) -> np.ndarray:
    """Per-finding ROC AUC, shape (C,); NaN where a finding lacks positives or negatives among known labels.

    ``scores``: (N, C) probabilities or logits (any monotone score gives the same AUC); ``labels``: (N, C)
    with 1 / 0 / NaN = unknown (masked). 1-D inputs are treated as one finding and give shape (1,).
    """
    scores, labels = _check_pair(scores, labels)
    aucs = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        known = ~np.isnan(labels[:, c])
        if known.any():
            aucs[c] = _weighted_auc(scores[known, c], labels[known, c] == 1, np.ones((1, int(known.sum()))))[0]
    return aucs


def bootstrap_counts(n_cases: int, n_boot: int = 1000, seed: int = 0, groups=None) -> np.ndarray:
    """How often each case is drawn in each bootstrap resample: int array (n_boot, n_cases).

    Without ``groups`` each resample draws ``n_cases`` cases with replacement. With ``groups`` ((N,)
    labels, e.g. patient ids) the resample draws as many *groups* as there are, with replacement, and
    every case counts as often as its group was drawn: two scans of one patient stay together, as they
    are not independent. The same ``(n_cases, n_boot, seed, groups)`` always gives the same counts,
    which pairs the resamples of two models evaluated on the same cases.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(0, n_cases, size=(n_boot, n_cases))
        flat = draws + (np.arange(n_boot) * n_cases)[:, None]
        return np.bincount(flat.ravel(), minlength=n_boot * n_cases).reshape(n_boot, n_cases)
    groups = np.asarray(groups, dtype=object)
    if groups.shape != (n_cases,):
        raise ValueError(f"groups must have one label per case ({n_cases}), got shape {groups.shape}")
    _, group_of_case = np.unique(groups.astype(str), return_inverse=True)
    n_groups = int(group_of_case.max()) + 1 if n_cases else 0
    draws = rng.integers(0, max(n_groups, 1), size=(n_boot, n_groups))
    flat = draws + (np.arange(n_boot) * n_groups)[:, None]
    group_counts = np.bincount(flat.ravel(), minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    return group_counts[:, group_of_case]


def bootstrap_auc_samples(scores, labels, counts: np.ndarray) -> np.ndarray:
    """Per-finding AUC of every bootstrap resample: (n_boot, C); NaN where a resample is single-class.

    ``counts`` from :func:`bootstrap_counts` (n_boot, N). Unknown labels are masked per finding.
    """
    scores, labels = _check_pair(scores, labels)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != scores.shape[0]:
        raise ValueError(f"counts must have shape (n_boot, {scores.shape[0]}), got {counts.shape}")
    samples = np.full((counts.shape[0], scores.shape[1]), np.nan)
    for c in range(scores.shape[1]):
        known = ~np.isnan(labels[:, c])
        positive = labels[known, c] == 1
        if positive.any() and not positive.all():
            samples[:, c] = _weighted_auc(scores[known, c], positive, counts[:, known])
    return samples


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval per column of (n_boot, C) samples, ignoring NaN resamples; NaN if all are NaN."""
    samples = np.asarray(samples, dtype=np.float64)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.full(samples.shape[1], np.nan), np.full(samples.shape[1], np.nan)
    valid = ~np.all(np.isnan(samples), axis=0)
    if valid.any():
        low[valid] = np.nanpercentile(samples[:, valid], tail, axis=0)
        high[valid] = np.nanpercentile(samples[:, valid], 100.0 - tail, axis=0)
    return low, high


def exact_extreme_interval(value: float, n_effective: int, level: float = 0.95) -> tuple[float, float]:
    """Interval of a proportion-like score observed at an extreme (0 or 1) on ``n_effective`` units.

    A percentile bootstrap of an AUC of exactly 1 gives [1, 1] whatever the sample size: every resample
    of perfectly separated cases is perfectly separated. The Clopper-Pearson bound for n successes out
    of n, ((1 - level) / 2) ** (1 / n), with n = min(positives, negatives) (the number of independent
    positive-negative comparisons), is used instead; mirrored for 0.
    """
    n_effective = max(int(n_effective), 1)
    bound = ((1.0 - level) / 2.0) ** (1.0 / n_effective)
    return (bound, 1.0) if value >= 0.5 else (0.0, 1.0 - bound)


@dataclass
class AUCResult:
    """Per-finding AUC with a bootstrap interval; arrays of shape (C,) in catalog order.

    ``n_degenerate``: resamples in which the finding had a single class (no AUC; left out of its
    interval); ``ci_method``: "percentile" or "exact_extreme" (see :func:`auc_with_ci`) per finding;
    ``resampled``: "cases" or "patients".
    """

    auc: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    n_pos: np.ndarray
    n_neg: np.ndarray
    n_boot: int
    level: float
    samples: np.ndarray  # (n_boot, C) resampled AUCs, kept for paired comparisons
    n_degenerate: np.ndarray | None = None
    ci_method: list | None = None
    resampled: str = "cases"

    @property
    def evaluable(self) -> np.ndarray:
        """(C,) bool: findings with at least one known positive and one known negative."""
        return ~np.isnan(self.auc)


#: How intervals are made, stated in every report that shows them.
CI_RULE = ("percentile bootstrap (resampling patients when a patient column is given, else cases); resamples "
           "in which a finding has one class only are left out and counted (n_degenerate); when the AUC is 0 "
           "or 1, or the percentile interval has zero width at an extreme, the Clopper-Pearson bound with "
           "n = min(positives, negatives) replaces it (ci_method exact_extreme)")


def auc_with_ci(scores, labels, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                groups=None) -> AUCResult:
    """Per-finding AUC, counts of known positives/negatives, and a bootstrap interval.

    Cases (or, with ``groups``, the groups: patients) are resampled with replacement ``n_boot`` times
    (seeded); resamples in which a finding has a single class are dropped for that finding and
    counted in ``n_degenerate``. An AUC at exactly 0 or 1 (whose percentile interval would collapse
    to a point) gets :func:`exact_extreme_interval` instead. ``n_boot=0`` skips the interval (NaN).
    """
    scores, labels = _check_pair(scores, labels)
    auc = roc_auc(scores, labels)
    n_pos = np.nansum(labels == 1, axis=0).astype(int)
    n_neg = np.nansum(labels == 0, axis=0).astype(int)
    methods = ["none" if np.isnan(a) else "percentile" for a in auc]
    degenerate = np.zeros(scores.shape[1], dtype=int)
    if n_boot > 0 and scores.shape[0] > 0:
        counts = bootstrap_counts(scores.shape[0], n_boot, seed, groups)
        samples = bootstrap_auc_samples(scores, labels, counts)
        low, high = percentile_interval(samples, level)
        degenerate = np.where(np.isnan(auc), 0, np.isnan(samples).sum(axis=0))
        for c in np.flatnonzero(~np.isnan(auc)):
            at_extreme = auc[c] in (0.0, 1.0) or (np.isfinite(low[c]) and low[c] == high[c] and low[c] in (0.0, 1.0))
            if at_extreme:
                low[c], high[c] = exact_extreme_interval(auc[c], min(n_pos[c], n_neg[c]), level)
                methods[c] = "exact_extreme"
    else:
        samples = np.full((0, scores.shape[1]), np.nan)
        low = high = np.full(scores.shape[1], np.nan)
    return AUCResult(auc=auc, ci_low=low, ci_high=high, n_pos=n_pos, n_neg=n_neg, n_boot=n_boot, level=level,
                     samples=samples, n_degenerate=degenerate, ci_method=methods,
                     resampled="cases" if groups is None else "patients")


# --------------------------------------------------------------------------------------------- summaries
def stratify(aucs) -> dict[str, int]:
    """The paper's stratified counts over evaluable findings: keys of :data:`STRATA` -> counts."""
    aucs = np.asarray(aucs, dtype=np.float64)
    aucs = aucs[~np.isnan(aucs)]
    return {key: int(np.sum((aucs >= low) & (aucs < high))) for key, low, high in STRATA}


def summarize_aucs(aucs) -> dict:
    """Mean and standard deviation (population, ddof=0) of the AUC over evaluable findings, their count,
    and the strata. ``mean_auc``/``std_auc`` are None when no finding is evaluable."""
    aucs = np.asarray(aucs, dtype=np.float64)
    valid = aucs[~np.isnan(aucs)]
    return {
        "mean_auc": float(valid.mean()) if valid.size else None,
        "std_auc": float(valid.std()) if valid.size else None,
        "n_findings_evaluated": int(valid.size),
        "n_findings_total": int(aucs.size),
        "strata": stratify(valid),
    }


# ------------------------------------------------------------------------------------------- calibration
def sigmoid(logits) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    z = np.asarray(logits, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


@dataclass
class ReliabilityBins:
    """Equal-width bins of predicted probability over [0, 1], shape (n_bins,) each.

    ``edges`` (n_bins + 1,); ``count`` known (case, finding) pairs per bin; ``mean_predicted`` and
    ``fraction_positive`` per bin (NaN for empty bins).
    """

    edges: np.ndarray
    count: np.ndarray
    mean_predicted: np.ndarray
    fraction_positive: np.ndarray

    def to_dict(self) -> dict:
        def clean(a):
            return [None if np.isnan(v) else float(v) for v in np.asarray(a, dtype=np.float64)]

        return {"edges": clean(self.edges), "count": [int(v) for v in self.count],
                "mean_predicted": clean(self.mean_predicted), "fraction_positive": clean(self.fraction_positive)}


def reliability_bins(probabilities, labels, n_bins: int = 10) -> ReliabilityBins:
    """Pool every known (case, finding) pair and bin it by predicted probability.

    Bin b holds probabilities in [b/n, (b+1)/n); the last bin also holds 1.0. Unknown labels are skipped.
    """
    probabilities, labels = _check_pair(probabilities, labels)
    known = ~np.isnan(labels)
    p, y = probabilities[known], labels[known]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=n_bins) / count
        fraction_positive = np.bincount(index, weights=y, minlength=n_bins) / count
    return ReliabilityBins(edges, count, mean_predicted, fraction_positive)


def expected_calibration_error(probabilities, labels, n_bins: int = 10, *, findings=None) -> float:
    """ECE over all known (case, finding) pairs, pooled across findings (or the ``findings`` mask (C,)).

    ECE = sum_b (n_b / n) * |mean predicted probability in b - fraction positive in b|, with ``n_bins``
    equal-width bins on [0, 1] (see :func:`reliability_bins`). 0 is perfect calibration; NaN without
    known labels. Findings never positive in the data dilute the pooled ECE (their probabilities sit
    near 0 against 0 positives): :func:`calibration_summary` reports it over findings with positives.
    """
    if findings is not None:
        probabilities, labels = _check_pair(probabilities, labels)
        mask = np.asarray(findings, dtype=bool)
        probabilities, labels = probabilities[:, mask], labels[:, mask]
    bins = reliability_bins(probabilities, labels, n_bins)
    total = bins.count.sum()
    if total == 0:
        return float("nan")
    filled = bins.count > 0
    gaps = np.abs(bins.mean_predicted[filled] - bins.fraction_positive[filled])
    return float(np.sum(bins.count[filled] / total * gaps))


def findings_with_positives(labels) -> np.ndarray:
    """(C,) bool: findings with at least one known positive label."""
    labels = _as_2d("labels", labels)
    return np.nansum(labels == 1, axis=0) > 0


def calibration_summary(probabilities, labels, categories, n_bins: int = 10) -> dict:
    """ECE over findings with positives (the honest headline), over all findings (pooled, for
    comparison), and per category over its findings with positives, each with how many findings and
    positive labels it covers. ``categories``: (C,) category name per finding. JSON-able (None for NaN).
    """
    probabilities, labels = _check_pair(probabilities, labels)
    with_positives = findings_with_positives(labels)
    n_pos = np.nansum(labels == 1, axis=0).astype(int)

    def ece(mask):
        value = expected_calibration_error(probabilities, labels, n_bins, findings=mask) if mask.any() else math.nan
        return None if math.isnan(value) else float(value)

    per_category = {}
    categories = list(categories)
    for category in dict.fromkeys(categories):
        mask = np.array([c == category for c in categories]) & with_positives
        per_category[category] = {"ece": ece(mask), "n_findings": int(mask.sum()), "n_pos": int(n_pos[mask].sum())}
    return {"ece": ece(with_positives), "n_findings": int(with_positives.sum()), "n_pos": int(n_pos.sum()),
            "ece_all_findings": ece(np.ones(labels.shape[1], bool)), "n_findings_all": int(labels.shape[1]),
            "per_category": per_category, "n_bins": n_bins}


def binary_nll(logits, labels) -> float:
    """Mean negative log-likelihood of sigmoid(logits) over known labels (nats)."""
    logits, labels = _check_pair(logits, labels)
    known = ~np.isnan(labels)
    z, y = logits[known], labels[known]
    if z.size == 0:
        return float("nan")
    # -[y log s(z) + (1-y) log(1-s(z))] = softplus(z) - y z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits, labels, *, t_min: float = 0.05, t_max: float = 20.0, iterations: int = 100) -> float:
    """One temperature T > 0 minimising the NLL of sigmoid(logits / T) over known labels.

    The NLL is convex in the inverse temperature a = 1/T (a logistic loss of a * logit), so a
    golden-section search over a in [1/t_max, 1/t_min] finds the global minimum within that range
    without derivatives or scipy. Returns 1.0 when there are no known labels or when every known
    label is of one class (then no finite T is best). Logits that anti-rank the labels push T to
    ``t_max`` (probabilities flattened towards 0.5), never to a negative value.
    """
    logits, labels = _check_pair(logits, labels)
    known = ~np.isnan(labels)
    z, y = logits[known], labels[known]
    if z.size == 0 or y.min() == y.max() or not np.any(z != 0):
        return 1.0

    def nll(inverse_t: float) -> float:
        scaled = inverse_t * z
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

    low, high = 1.0 / t_max, 1.0 / t_min
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    f_a, f_b = nll(a), nll(b)
    for _ in range(iterations):
        if f_a <= f_b:
            high, b, f_b = b, a, f_a
            a = high - ratio * (high - low)
            f_a = nll(a)
        else:
            low, a, f_a = a, b, f_b
            b = low + ratio * (high - low)
            f_b = nll(b)
    return float(1.0 / (0.5 * (low + high)))


# -------------------------------------------------------------------------------------------- thresholds
@dataclass
class Thresholds:
    """Per-finding decision thresholds (C,) and what they achieve on the evaluation cases.

    A case is called positive when probability >= threshold. ``sensitivity`` / ``specificity`` are
    NaN where a finding has no known positives / negatives; such thresholds are ``default``.
    """

    threshold: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray
    target_sensitivity: float


def thresholds_at_sensitivity(probabilities, labels, target_sensitivity: float = 0.90, *,
                              default: float = 0.5) -> Thresholds:
    """For each finding, the highest threshold whose sensitivity on known labels reaches the target.

    Rule: with the known positives' probabilities sorted from high to low, the k-th highest (k =
    ceil(target * n_pos)) is the lowest probability that must still be called positive. The threshold
    is placed halfway between it and the next lower distinct probability of any known case of that
    finding (or exactly at it when none is lower), so every case tied with it is positive, the same
    cases are positive on these data whatever the float rounding at inference, and specificity is as
    high as the target allows. Findings without known positives get ``default`` (0.5).
    """
    probabilities, labels = _check_pair(probabilities, labels)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    n_findings = probabilities.shape[1]
    threshold = np.full(n_findings, float(default))
    sensitivity, specificity = np.full(n_findings, np.nan), np.full(n_findings, np.nan)
    for c in range(n_findings):
        known = ~np.isnan(labels[:, c])
        p, y = probabilities[known, c], labels[known, c]
        positives = np.sort(p[y == 1])[::-1]
        if positives.size:
            k = max(1, math.ceil(target_sensitivity * positives.size - 1e-9))
            cut = positives[k - 1]
            lower = p[p < cut]
            threshold[c] = 0.5 * (cut + lower.max()) if lower.size else cut
        called = p >= threshold[c]
        if np.any(y == 1):
            sensitivity[c] = float(np.mean(called[y == 1]))
        if np.any(y == 0):
            specificity[c] = float(np.mean(~called[y == 0]))
    return Thresholds(threshold, sensitivity, specificity, float(target_sensitivity))


@dataclass
class OperatingPoints:
    """Sensitivity, specificity and PPV at given thresholds, with bootstrap intervals; arrays (C,).

    ``n_pos`` / ``n_neg`` known positives / negatives, ``n_called`` cases at or above the threshold.
    NaN where undefined (no positives for sensitivity, no negatives for specificity, nothing called for
    PPV). Intervals: percentile bootstrap over the same resamples as the AUCs (NaN with n_boot=0).
    """

    threshold: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray
    ppv: np.ndarray
    intervals: dict  # name -> (low (C,), high (C,)) for "sensitivity", "specificity", "ppv"
    n_pos: np.ndarray
    n_neg: np.ndarray
    n_called: np.ndarray


def _rates(called: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """(B,) sensitivity, specificity, PPV under case weights (B, n); NaN where undefined."""
    tp = (weights * (called & positive)).sum(axis=1)
    fn = (weights * (~called & positive)).sum(axis=1)
    tn = (weights * (~called & ~positive)).sum(axis=1)
    fp = (weights * (called & ~positive)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fn), tn / (tn + fp), tp / (tp + fp)


def operating_points(probabilities, labels, thresholds, *, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0, groups=None) -> OperatingPoints:
    """Per-finding sensitivity, specificity and PPV of calling ``probabilities >= thresholds`` (C,).

    Resamples as :func:`auc_with_ci` (same ``seed`` and ``groups`` give the same resampled cases).
    """
    probabilities, labels = _check_pair(probabilities, labels)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    n, n_findings = probabilities.shape
    if thresholds.shape != (n_findings,):
        raise ValueError(f"thresholds must have one value per finding ({n_findings}), got {thresholds.shape}")
    counts = bootstrap_counts(n, n_boot, seed, groups).astype(np.float64) if n_boot > 0 and n else None
    point = {name: np.full(n_findings, np.nan) for name in ("sensitivity", "specificity", "ppv")}
    boot = {name: np.full((max(n_boot, 0), n_findings), np.nan) for name in point}
    n_called = np.zeros(n_findings, dtype=int)
    for c in range(n_findings):
        known = ~np.isnan(labels[:, c])
        called = probabilities[known, c] >= thresholds[c]
        positive = labels[known, c] == 1
        n_called[c] = int(called.sum())
        values = _rates(called, positive, np.ones((1, int(known.sum()))))
        for name, value in zip(point, values):
            point[name][c] = value[0]
        if counts is not None and known.any():
            for name, value in zip(point, _rates(called, positive, counts[:, known])):
                boot[name][:, c] = value
    intervals = {name: (percentile_interval(boot[name], level) if counts is not None
                        else (np.full(n_findings, np.nan), np.full(n_findings, np.nan))) for name in point}
    return OperatingPoints(thresholds, point["sensitivity"], point["specificity"], point["ppv"], intervals,
                           np.nansum(labels == 1, axis=0).astype(int), np.nansum(labels == 0, axis=0).astype(int),
                           n_called)


# -------------------------------------------------------------------------------------------- comparison
def compare_aucs(reference: AUCResult, candidate: AUCResult, *, level: float = 0.95) -> dict:
    """Candidate minus reference, per finding and on average (e.g. reference = LoRA-only, candidate = MoLRE).

    Returns ``difference`` (C,) (NaN where either AUC is NaN), ``mean_gain`` over findings evaluable in
    both (None if none), counts ``n_improved`` / ``n_worse`` / ``n_equal`` (|difference| <= 1e-12 is
    equal), ``n_compared``, and when both results carry paired bootstrap samples (same cases, same
    seed and n_boot) a percentile interval of the per-finding difference and of the mean gain.
    """
    difference = candidate.auc - reference.auc
    both = ~np.isnan(difference)
    compared = difference[both]
    result = {
        "difference": difference,
        "mean_gain": float(compared.mean()) if compared.size else None,
        "n_compared": int(compared.size),
        "n_improved": int(np.sum(compared > 1e-12)),
        "n_worse": int(np.sum(compared < -1e-12)),
        "n_equal": int(np.sum(np.abs(compared) <= 1e-12)),
        "difference_ci_low": np.full(difference.shape, np.nan),
        "difference_ci_high": np.full(difference.shape, np.nan),
        "mean_gain_ci": None,
    }
    if reference.samples.shape == candidate.samples.shape and reference.samples.shape[0] > 0 and compared.size:
        paired = candidate.samples - reference.samples  # same resampled cases in both
        result["difference_ci_low"], result["difference_ci_high"] = percentile_interval(paired, level)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # resamples where no finding is evaluable
            mean_gain_samples = np.nanmean(paired[:, both], axis=1, keepdims=True)
        low, high = percentile_interval(mean_gain_samples, level)
        result["mean_gain_ci"] = None if np.isnan(low[0]) else [float(low[0]), float(high[0])]
    return result
