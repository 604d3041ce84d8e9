"""`headct-molre evaluate`: how good is a model bundle on labelled cases, honestly. It reads and reports.

    evaluate(cases_csv, bundle_path, out_dir, fit_split="val") -> dict   (also out_dir/evaluation.json)

Nothing is ever written into the bundle evaluated (or the compared one), nor into Resources/: the only
files written are in ``out_dir`` and, when asked, a NEW bundle folder ``calibrated_out`` (a copy of the
evaluated bundle with the new calibration, thresholds, held-out metrics and model card, written through
bundle.update_bundle, with where the calibration was fitted).

Two sets of cases, never overlapping:
- the *fit* cases (``fit_split`` of the same CSV, or a second CSV ``fit_cases``): the temperature (or
  the focal prior correction) and the per-finding thresholds at the target sensitivity are fitted here;
  figures measured on them are labelled **in-sample**;
- the *evaluated* cases (``split``, default "test" when a fit split is named): AUCs with bootstrap
  intervals, ECE over findings with positives and per category, and sensitivity / specificity / PPV at
  the chosen thresholds with bootstrap intervals; all **held-out**. Without fit cases, the bundle's own
  calibration and thresholds are measured (held-out for this bundle), and a calibration fitted on the
  evaluated cases themselves is shown as in-sample only.

Overlap: evaluated cases whose content (sha256 of the input's bytes) or patient id is among the training
or validation cases recorded in the bundle's training provenance are reported; ``strict`` refuses them.
Fit and evaluated cases that share a scan or a patient are always refused. Bootstrap intervals resample
patients when the CSV has a ``patient`` column (metrics.CI_RULE). Paths in the outputs are file names or
relative to the cases CSV, never this machine's folders.

Files written: ``evaluation.json``, ``per_finding.tsv``, ``per_finding.md``, ``auc_radar.png``,
``auc_strata.png``, ``reliability.png``, ``model_card.md``; with ``compare``: ``comparison.tsv``,
``comparison.md`` (and both models on the radar and strata plots).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .. import calibration as calibration_lib, metrics
from . import report
from .model_card import model_card

EVALUATION_JSON = "evaluation.json"
PER_FINDING_TSV = "per_finding.tsv"
PER_FINDING_MD = "per_finding.md"
COMPARISON_TSV = "comparison.tsv"
COMPARISON_MD = "comparison.md"
RADAR_PNG = "auc_radar.png"
STRATA_PNG = "auc_strata.png"
RELIABILITY_PNG = "reliability.png"
MODEL_CARD = "model_card.md"
THRESHOLD_RULE = ("highest threshold whose sensitivity on the fit cases reaches the target; placed halfway "
                  "to the next lower probability; probability >= threshold is positive; 0.5 without positives")
CALIBRATION_CHOICES = ("temperature", "prior_correction", "prior_correction+temperature", "none")


class EvaluationError(ValueError):
    """Evaluation cannot produce any result (no usable case, incompatible models); says what to do."""


# ---------------------------------------------------------------------------------------- pure metrics
@dataclass
class ModelEvaluation:
    """Everything measured for one model on one set of cases (arrays (C,) in catalog order).

    ``summary``: the JSON-able result (see :func:`evaluate_predictions`); ``auc``: metrics.AUCResult;
    ``reliability_before`` / ``reliability_after``: metrics.ReliabilityBins over findings with positives
    (the bundle's calibration / the new one; after is None without a new calibration); ``thresholds``:
    the fitted metrics.Thresholds (on the fit cases, or in-sample); ``temperature`` and ``offsets``: the
    calibration they go with; ``operating``: metrics.OperatingPoints on the evaluated cases at the
    thresholds the summary reports as held-out; ``fitted_temperature``: a temperature was fitted.
    """

    summary: dict
    auc: metrics.AUCResult
    reliability_before: metrics.ReliabilityBins
    reliability_after: metrics.ReliabilityBins | None
    thresholds: metrics.Thresholds
    temperature: float
    offsets: np.ndarray | None = None
    operating: metrics.OperatingPoints | None = None
    fitted_temperature: bool = False


def _number(value) -> float | None:
    """float, or None for NaN / None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def fit_calibration(logits, labels, *, offsets, temperature: float, method: str = "temperature",
                    alpha=None) -> tuple[np.ndarray, float, bool]:
    """Fit a calibration on raw logits (N, C) and labels of the FIT cases.

    ``offsets`` (C,) and ``temperature``: the bundle's current calibration. ``method``: "temperature"
    (keep the offsets, fit one temperature on logits - offsets), "prior_correction" (offsets from the
    focal alphas (C,) ``alpha``, temperature 1, nothing fitted), "prior_correction+temperature" (both),
    "none" (keep the bundle's). Returns (offsets, temperature, whether a temperature was fitted).
    """
    if method not in CALIBRATION_CHOICES:
        raise EvaluationError(f"calibration method must be one of {', '.join(CALIBRATION_CHOICES)}, not {method!r}")
    offsets = np.asarray(offsets, dtype=np.float64)
    if method == "none":
        return offsets, float(temperature), False
    if method.startswith("prior_correction"):
        if alpha is None:
            raise EvaluationError("the prior correction needs the focal alpha the bundle was trained with, and this "
                                  "bundle records none; use --calibration temperature")
        offsets = calibration_lib.prior_offsets(alpha)
    if method.endswith("temperature"):
        return offsets, metrics.fit_temperature(np.asarray(logits, np.float64) - offsets, labels), True
    return offsets, 1.0, False


def _operating_rows(points: metrics.OperatingPoints, index: int) -> dict:
    row = {"threshold": float(points.threshold[index]), "n_called": int(points.n_called[index])}
    for name in ("sensitivity", "specificity", "ppv"):
        low, high = points.intervals[name]
        row[name] = _number(getattr(points, name)[index])
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = _number(low[index]), _number(high[index])
    return row


def evaluate_predictions(logits, labels, catalog, *, temperature: float = 1.0, offsets=None, calibrate: bool = True,
                         fit_logits=None, fit_labels=None, method: str = "temperature", alpha=None,
                         thresholds=None, target_sensitivity: float = 0.9, n_boot: int = 1000, seed: int = 0,
                         n_bins: int = 10, groups=None) -> ModelEvaluation:
    """Metrics of one model from its raw logits (N, C) and labels (N, C) 1/0/NaN of the evaluated cases.

    ``temperature`` / ``offsets`` (C,): the bundle's current calibration (probabilities =
    sigmoid((logits - offsets) / temperature)) give the "before" figures. With ``fit_logits`` /
    ``fit_labels`` (the fit cases) a new calibration (:func:`fit_calibration` with ``method``) and the
    thresholds at ``target_sensitivity`` are fitted there and every figure on the evaluated cases is
    held-out. Without fit cases: the held-out operating points use ``thresholds`` (C,) (the bundle's;
    0.5 where None) with the bundle's calibration, and with ``calibrate`` a calibration and thresholds
    fitted on the evaluated cases themselves are reported under ``in_sample`` only (and as "after",
    labelled in-sample). ``groups`` (N,): patient ids for bootstrap resampling. AUCs do not depend on
    the calibration.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if logits.shape != labels.shape or logits.ndim != 2 or logits.shape[1] != len(catalog):
        raise EvaluationError(f"logits {logits.shape} and labels {labels.shape} must both be (cases, "
                              f"{len(catalog)} findings)")
    offsets_now = np.zeros(len(catalog)) if offsets is None else np.asarray(offsets, dtype=np.float64)
    categories = [finding.category for finding in catalog.findings]
    probabilities_now = metrics.sigmoid(calibration_lib.calibrated_logits(logits, offsets_now, temperature))
    auc = metrics.auc_with_ci(logits, labels, n_boot=n_boot, seed=seed, groups=groups)
    with_positives = metrics.findings_with_positives(labels)
    bins_before = metrics.reliability_bins(probabilities_now[:, with_positives], labels[:, with_positives], n_bins)
    summary_now = metrics.calibration_summary(probabilities_now, labels, categories, n_bins)
    held_out_fit = fit_logits is not None
    fit_on = (np.asarray(fit_logits, np.float64), np.asarray(fit_labels, np.float64)) if held_out_fit else (logits, labels)
    calibration: dict[str, Any] = {
        "ece_before": summary_now["ece"],
        "nll_before": _number(metrics.binary_nll(calibration_lib.calibrated_logits(logits, offsets_now, temperature),
                                                 labels)),
        "temperature_before": float(temperature),
        "bundle": summary_now,
        "n_bins": n_bins,
        "ece_over": "findings with at least one positive among the evaluated cases (metrics.calibration_summary)",
        "reliability_before": bins_before.to_dict(),
    }
    bins_after, new_offsets, new_temperature, fitted_t = None, offsets_now, float(temperature), False
    if held_out_fit or calibrate:
        new_offsets, new_temperature, fitted_t = fit_calibration(*fit_on, offsets=offsets_now, temperature=temperature,
                                                                 method=method if calibrate else "none", alpha=alpha)
        calibrated_z = calibration_lib.calibrated_logits(logits, new_offsets, new_temperature)
        calibrated = metrics.sigmoid(calibrated_z)
        bins_after = metrics.reliability_bins(calibrated[:, with_positives], labels[:, with_positives], n_bins)
        summary_after = metrics.calibration_summary(calibrated, labels, categories, n_bins)
        calibration.update({"ece_after": summary_after["ece"], "calibrated": summary_after,
                            "nll_after": _number(metrics.binary_nll(calibrated_z, labels)),
                            "reliability_after": bins_after.to_dict()})
    else:
        calibration.update({"ece_after": None, "nll_after": None, "calibrated": None})
    calibration.update({"temperature": new_temperature, "method": method if (held_out_fit or calibrate) else "none",
                        "fitted_temperature": fitted_t,
                        "fitted_on": "fit cases" if held_out_fit else ("evaluated cases (in-sample)" if calibrate
                                                                        else None),
                        "after_is": "held-out" if held_out_fit else ("in-sample" if calibrate else None)})
    fit_probabilities = metrics.sigmoid(calibration_lib.calibrated_logits(fit_on[0], new_offsets, new_temperature))
    fitted = metrics.thresholds_at_sensitivity(fit_probabilities, fit_on[1], target_sensitivity)
    if held_out_fit:
        reported_thresholds, reported_probabilities = fitted.threshold, metrics.sigmoid(
            calibration_lib.calibrated_logits(logits, new_offsets, new_temperature))
        thresholds_source = "the thresholds fitted on the fit cases"
    else:
        reported_thresholds = np.full(len(catalog), 0.5) if thresholds is None else np.asarray(thresholds, np.float64)
        reported_probabilities = probabilities_now
        thresholds_source = "the bundle's own thresholds and calibration"
    operating = metrics.operating_points(reported_probabilities, labels, reported_thresholds, n_boot=n_boot,
                                         seed=seed, groups=groups)
    in_sample_ece = metrics.calibration_summary(fit_probabilities, fit_on[1], categories, n_bins)
    per_finding, in_sample_rows = {}, {}
    for index, finding in enumerate(catalog.findings):
        per_finding[finding.id] = {
            "name": finding.name,
            "category": finding.category,
            "auc": _number(auc.auc[index]),
            "ci_low": _number(auc.ci_low[index]),
            "ci_high": _number(auc.ci_high[index]),
            "ci_method": auc.ci_method[index],
            "n_degenerate_resamples": int(auc.n_degenerate[index]),
            "n_pos": int(auc.n_pos[index]),
            "n_neg": int(auc.n_neg[index]),
            **_operating_rows(operating, index),
        }
        in_sample_rows[finding.id] = {
            "threshold": float(fitted.threshold[index]), "sensitivity": _number(fitted.sensitivity[index]),
            "specificity": _number(fitted.specificity[index]),
            "n_pos": int(np.nansum(fit_on[1][:, index] == 1)), "n_neg": int(np.nansum(fit_on[1][:, index] == 0))}
    summary = {
        **metrics.summarize_aucs(auc.auc),
        "bootstrap": {"n_boot": n_boot, "level": auc.level, "seed": seed, "resampled": auc.resampled,
                      "rule": metrics.CI_RULE},
        "per_finding": per_finding,
        "calibration": calibration,
        "thresholds": {"target_sensitivity": float(target_sensitivity), "rule": THRESHOLD_RULE,
                       "reported_at": thresholds_source,
                       "fitted_on": "fit cases" if held_out_fit else "evaluated cases (in-sample)"},
        "figures": {
            "held_out": "AUCs and intervals; sensitivity, specificity and PPV per finding (at "
                        f"{thresholds_source}); calibration 'before'"
                        + ("; calibration 'after' (fitted on the fit cases)" if held_out_fit else ""),
            "in_sample": "the 'in_sample' block (thresholds and calibration measured on the cases they were "
                         "fitted on)" + ("" if held_out_fit else "; calibration 'after'"),
        },
        "in_sample": {"cases": "fit cases" if held_out_fit else "evaluated cases", "n_cases": int(fit_on[1].shape[0]),
                      "calibration": in_sample_ece, "per_finding": in_sample_rows},
        "not_evaluated": [fid for fid, row in per_finding.items() if row["auc"] is None],
    }
    return ModelEvaluation(summary, auc, bins_before, bins_after, fitted, new_temperature, new_offsets, operating,
                           fitted_t)


def comparison_summary(catalog, reference: ModelEvaluation, candidate: ModelEvaluation, *,
                       reference_name: str, candidate_name: str, n_cases: int) -> tuple[dict, list[dict]]:
    """Candidate minus reference AUC (paired bootstrap over the same cases): JSON-able summary and rows."""
    comparison = metrics.compare_aucs(reference.auc, candidate.auc)
    rows = []
    for index, finding in enumerate(catalog.findings):
        rows.append({
            "id": finding.id, "name": finding.name, "category": finding.category,
            "auc_reference": _number(reference.auc.auc[index]), "auc_candidate": _number(candidate.auc.auc[index]),
            "difference": _number(comparison["difference"][index]),
            "difference_ci_low": _number(comparison["difference_ci_low"][index]),
            "difference_ci_high": _number(comparison["difference_ci_high"][index]),
            "n_pos": int(candidate.auc.n_pos[index]), "n_neg": int(candidate.auc.n_neg[index]),
        })
    summary = {
        "reference_name": reference_name,
        "candidate_name": candidate_name,
        "n_cases": n_cases,
        "mean_auc_reference": reference.summary["mean_auc"],
        "mean_auc_candidate": candidate.summary["mean_auc"],
        "strata_reference": reference.summary["strata"],
        "strata_candidate": candidate.summary["strata"],
        "mean_gain": comparison["mean_gain"],
        "mean_gain_ci": comparison["mean_gain_ci"],
        "n_compared": comparison["n_compared"],
        "n_improved": comparison["n_improved"],
        "n_worse": comparison["n_worse"],
        "n_equal": comparison["n_equal"],
        "per_finding_difference": {row["id"]: row["difference"] for row in rows},
    }
    return summary, rows


# ------------------------------------------------------------------------------------------- the run
def _model_label(bundle) -> str:
    use_molre = bundle.manifest.get("model", {}).get("use_molre", True)
    return f"{bundle.name} ({'MoLRE' if use_molre else 'LoRA-only'})"


def _select_split(table, split: str | None, what: str = "--split"):
    if split is None:
        return table
    if not table.has_split:
        raise EvaluationError(f"{table.csv_path}: {what} {split} was asked for but the CSV has no 'split' column")
    chosen = table.split(split)
    if not len(chosen):
        raise EvaluationError(f"{table.csv_path}: no usable case has split '{split}' ({what})")
    chosen.problems = list(table.problems)
    return chosen


def _predict(bundle, table, *, device, cache_dir, progress, label, threads=None):
    from ..training.cases import predict_cases

    def forward(event):
        if progress:
            progress({**event, "model": label})

    return predict_cases(bundle, table, cache_dir=cache_dir, device=device, progress=forward if progress else None,
                         threads=threads)


def _rows_by_path(predictions, keep_paths: list[str]):
    index = {path: i for i, path in enumerate(predictions.paths)}
    rows = [index[path] for path in keep_paths]
    return predictions.logits[rows], predictions.labels[rows]


def _portable(path, csv_path) -> str:
    """A case path as written in reports: relative to the cases CSV's folder where it lies below it,
    else its name (never this machine's folders)."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path(csv_path).resolve().parent).as_posix()
    except ValueError:
        return path.name


def _refuse_writing_into(target: Path, model, other) -> None:
    """Outputs never go into an input bundle or into Resources/."""
    from ..resources import resources_dir

    protected = [model.path] + ([other.path] if other is not None else [])
    try:
        protected.append(resources_dir())
    except FileNotFoundError:
        pass
    resolved = target.expanduser().resolve()
    for folder in protected:
        folder = Path(folder).resolve()
        if resolved == folder or folder in resolved.parents:
            raise EvaluationError(f"{target}: would write into {folder}, which evaluate only reads (an input bundle "
                                  "or Resources/); choose a folder elsewhere")


def _overlap_with_training(model, table, keep: list[str]) -> dict:
    """Evaluated cases that the bundle's training provenance names (by content hash or patient id)."""
    from ..training.cases import input_sha256

    training = model.manifest.get("training") or {}
    hashes = training.get("case_sha256") or {}
    patients = training.get("patients") or {}
    by_path = {str(case.path): case for case in table.cases}
    found = {"train": [], "val": []}
    for path in keep:
        digest = input_sha256(path)
        case = by_path.get(path)
        for role in ("train", "val"):
            same_scan = digest in set(hashes.get(role) or [])
            same_patient = bool(case is not None and case.patient and case.patient in set(patients.get(role) or []))
            if same_scan or same_patient:
                found[role].append({"path": _portable(path, table.csv_path),
                                    "by": "content" if same_scan else "patient"})
    return {"checked": bool(hashes or patients), "train": found["train"], "val": found["val"],
            "n_train": len(found["train"]), "n_val": len(found["val"]),
            "note": None if (hashes or patients) else "the bundle's training provenance records no case hashes "
                                                      "or patients (trained before this check existed)"}


def _check_fit_and_evaluated_apart(fit_table, eval_table, fit_paths, eval_paths) -> None:
    from ..training.cases import input_sha256

    fit_hashes = {input_sha256(p): p for p in fit_paths}
    shared = [p for p in eval_paths if input_sha256(p) in fit_hashes]
    fit_patients = {c.patient for c in fit_table.cases if c.patient}
    shared_patients = sorted({c.patient for c in eval_table.cases if c.patient in fit_patients})
    if shared or shared_patients:
        what = (f"{len(shared)} scan(s) (e.g. {Path(shared[0]).name})" if shared else "") + \
               (" and " if shared and shared_patients else "") + \
               (f"{len(shared_patients)} patient(s) (e.g. {shared_patients[0]})" if shared_patients else "")
        raise EvaluationError(f"the fit cases and the evaluated cases share {what}: a calibration measured on the "
                              "cases it was fitted on is in-sample. Fit on another split or CSV.")


def _fitted_on_record(fit_table, fit_split, n_cases: int, model) -> dict:
    labels = fit_table.labels()
    return {"cases_csv": fit_table.csv_path.name if fit_table.csv_path else None,
            "cases_csv_sha256": fit_table.csv_sha256, "split": fit_split, "n_cases": n_cases,
            "n_pos": {fid: int(np.nansum(labels[:, i] == 1)) for i, fid in enumerate(model.catalog.ids)},
            "source_bundle": {"name": model.name, "fingerprint": model.fingerprint},
            "fitted": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}


def _bundle_metrics(evaluation: dict) -> dict:
    """What goes into a calibrated bundle's manifest ``metrics``: held-out headline numbers at the top
    (shown by `headct-molre info`), the summary without the per-bin arrays under ``evaluation``."""
    calibration = {k: v for k, v in evaluation["calibration"].items() if not k.startswith("reliability")}
    summary = {k: evaluation.get(k) for k in ("mean_auc", "std_auc", "n_findings_evaluated", "n_findings_total",
                                               "strata", "n_cases", "n_cases_evaluated", "cases_csv",
                                               "cases_csv_sha256", "split", "synthetic_cases", "evaluated",
                                               "thresholds", "bootstrap", "figures", "overlap")}
    summary["calibration"] = calibration
    summary["per_finding"] = {fid: {k: row.get(k) for k in ("auc", "ci_low", "ci_high", "n_pos", "n_neg", "threshold",
                                                              "sensitivity", "specificity", "ppv")}
                              for fid, row in evaluation["per_finding"].items()}
    return {"mean_auc": evaluation["mean_auc"], "std_auc": evaluation["std_auc"],
            "n_findings_evaluated": evaluation["n_findings_evaluated"],
            "ece": calibration.get("ece_after") if calibration.get("ece_after") is not None else calibration.get("ece_before"),
            "figures": "held-out", "evaluation": summary}


def _manifest_for_card(manifest: dict, evaluation: dict, thresholds: dict | None, record: dict | None) -> dict:
    updated = json.loads(json.dumps(manifest))
    if thresholds:
        updated["thresholds"] = {**(updated.get("thresholds") or {}), **thresholds}
    if record:
        updated["calibration"], updated["temperature"] = record, record["temperature"]
    updated["metrics"] = {**(updated.get("metrics") or {}), **_bundle_metrics(evaluation)}
    return updated


def _write_tables_and_plots(out: Path, catalog, label: str, result: ModelEvaluation, evaluation: dict,
                            compared: tuple[str, ModelEvaluation, list[dict]] | None) -> list[str]:
    rows = report.sorted_rows(evaluation["per_finding"])
    (out / PER_FINDING_TSV).write_text(report.table_tsv(rows, report.PER_FINDING_COLUMNS), encoding="utf-8")
    (out / PER_FINDING_MD).write_text(report.per_finding_markdown(rows, evaluation), encoding="utf-8")
    written = [PER_FINDING_TSV, PER_FINDING_MD]
    aucs = {label: result.auc.auc}
    strata = {label: evaluation["strata"]}
    if compared is not None:
        other_label, other, comparison_rows = compared
        aucs = {other_label: other.auc.auc, label: result.auc.auc}
        strata = {other_label: other.summary["strata"], label: evaluation["strata"]}
        ordered = report.sorted_rows({r["id"]: {k: v for k, v in r.items() if k != "id"} for r in comparison_rows},
                                     key="difference")
        (out / COMPARISON_TSV).write_text(report.table_tsv(ordered, report.COMPARISON_COLUMNS), encoding="utf-8")
        headers = ["id", "name", "category", f"AUC {other_label}", f"AUC {label}", "difference", "diff CI low",
                   "diff CI high", "n pos", "n neg"]
        (out / COMPARISON_MD).write_text(report.table_markdown(ordered, report.COMPARISON_COLUMNS, headers),
                                         encoding="utf-8")
        written += [COMPARISON_TSV, COMPARISON_MD]
    report.radar_plot(out / RADAR_PNG, catalog, aucs, title="Per-finding AUC (held-out) on "
                      f"{evaluation['n_cases_evaluated']} cases (gaps: finding without both classes)")
    report.strata_bar_chart(out / STRATA_PNG, strata,
                            title=f"Findings per AUC stratum ({evaluation['n_findings_evaluated']} evaluated, held-out)")
    calibration = evaluation["calibration"]
    bins = {f"bundle as given (T = {calibration['temperature_before']:.2f})": result.reliability_before}
    eces = {next(iter(bins)): calibration["ece_before"] if calibration["ece_before"] is not None else float("nan")}
    if result.reliability_after is not None:
        key = f"{calibration['method']} (T = {result.temperature:.2f}; {calibration['after_is']})"
        bins[key] = result.reliability_after
        eces[key] = calibration["ece_after"] if calibration["ece_after"] is not None else float("nan")
    report.reliability_diagram(out / RELIABILITY_PNG, bins, eces,
                               title=f"Reliability over the {calibration['bundle']['n_findings']} findings with positives")
    return written + [RADAR_PNG, STRATA_PNG, RELIABILITY_PNG]


def evaluate(cases_csv: str | os.PathLike, bundle_path: str | os.PathLike, out_dir: str | os.PathLike, *,
             split: str | None = None, fit_split: str | None = None, fit_cases: str | os.PathLike | None = None,
             calibration: str = "temperature", calibrated_out: str | os.PathLike | None = None,
             strict: bool = False, compare: str | os.PathLike | None = None, device: str = "auto",
             cache_dir: str | os.PathLike | None = None, target_sensitivity: float = 0.9, calibrate: bool = True,
             progress: Callable[[dict], None] | None = None, n_boot: int = 1000, seed: int = 0,
             threads: int | str | None = None) -> dict:
    """Evaluate the bundle at ``bundle_path`` on the labelled cases of ``cases_csv`` (read only); returns
    the evaluation dict that is also written to ``out_dir/evaluation.json``.

    ``split``: evaluate only the cases of this split (default "test" when ``fit_split`` is given).
    ``fit_split`` (of the same CSV) or ``fit_cases`` (another CSV; with ``fit_split``, that CSV's split):
    where the calibration (``calibration``: temperature, prior_correction, prior_correction+temperature,
    none) and the thresholds at ``target_sensitivity`` are fitted. ``calibrated_out``: a NEW folder that
    receives a copy of the bundle with that calibration, thresholds, the held-out metrics and the model
    card (needs fit cases). ``strict``: refuse when evaluated cases are among the bundle's training or
    validation cases. ``compare``: another bundle with the same finding catalog, evaluated on the same
    cases with paired bootstrap intervals of the differences (this bundle minus ``compare``).
    ``calibrate=False``: no calibration fitted (the bundle's own is measured). ``progress``:
    callable(dict) receiving ``{"stage", "done", "total", "model"}``. Unreadable cases are listed under
    ``failures``; raises EvaluationError when nothing can be evaluated or a rule above is broken,
    bundle.BundleError for an unusable bundle. ``threads``: CPU threads for torch (threads.py; None: by work size).
    """
    import shutil

    from ..model import bundle as bundle_lib
    from ..training.cases import read_cases

    out = Path(out_dir).expanduser()
    model = bundle_lib.load_bundle(bundle_path)
    other = bundle_lib.load_bundle(compare) if compare is not None else None
    _refuse_writing_into(out, model, other)
    if calibrated_out is not None:
        _refuse_writing_into(Path(calibrated_out), model, other)
        if Path(calibrated_out).expanduser().exists():
            raise EvaluationError(f"{calibrated_out} already exists; --calibrated-out names a NEW folder")
        if fit_split is None and fit_cases is None:
            raise EvaluationError("--calibrated-out needs fit cases (--fit-split SPLIT or --fit-cases CSV): a "
                                  "calibration fitted on the evaluated cases would be reported in-sample")
    if other is not None and tuple(other.catalog.ids) != tuple(model.catalog.ids):
        raise EvaluationError(f"cannot compare {model.name} with {other.name}: their finding catalogs differ "
                              "(ids or order); compare models trained on the same catalog")
    full_table = read_cases(cases_csv, model.catalog)
    fit_table = None
    if fit_cases is not None:
        fit_table = _select_split(read_cases(fit_cases, model.catalog), fit_split, "--fit-split")
    elif fit_split is not None:
        fit_table = _select_split(full_table, fit_split, "--fit-split")
        split = split or ("test" if fit_split != "test" else None)
        if split is None or split == fit_split:
            raise EvaluationError(f"--fit-split {fit_split}: name another --split to evaluate on")
    table = _select_split(full_table, split)
    out.mkdir(parents=True, exist_ok=True)
    label = _model_label(model)
    predictions = _predict(model, table, device=device, threads=threads, cache_dir=cache_dir, progress=progress, label=label)
    failures = [{"path": _portable(path, table.csv_path), "reason": str(reason)} for path, reason in predictions.failures]
    if not predictions.paths:
        shown = "; ".join(f"{f['path']}: {f['reason']}" for f in failures[:2]) or "; ".join(table.problems[:3])
        raise EvaluationError(f"{cases_csv}: none of the {len(table)} cases could be evaluated ({shown}). Check the "
                              "paths in the CSV (relative paths are read from the CSV's folder) with "
                              "`headct-molre validate PATH`.")
    keep = list(predictions.paths)
    other_predictions = other_label = None
    if other is not None:
        other_label = _model_label(other)
        if other_label == label:
            other_label = f"{other_label} [reference]"
        other_predictions = _predict(other, table, device=device, threads=threads, cache_dir=cache_dir, progress=progress,
                                     label=other_label)
        common = set(other_predictions.paths)
        keep = [path for path in keep if path in common]
        if not keep:
            raise EvaluationError(f"no case could be evaluated by both {model.name} and {other.name}")

    fit_logits = fit_labels = None
    fit_failures: list = []
    if fit_table is not None:
        fit_predictions = _predict(model, fit_table, device=device, threads=threads, cache_dir=cache_dir, progress=progress,
                                   label=f"{label} [fit]")
        if not fit_predictions.paths:
            raise EvaluationError(f"none of the {len(fit_table)} fit cases could be read; check them with "
                                  "`headct-molre validate PATH`")
        _check_fit_and_evaluated_apart(fit_table, table, fit_predictions.paths, keep)
        fit_logits, fit_labels = fit_predictions.logits, fit_predictions.labels
        fit_failures = [{"path": _portable(p, fit_table.csv_path), "reason": str(r)} for p, r in fit_predictions.failures]

    overlap = _overlap_with_training(model, table, keep)
    if strict and (overlap["n_train"] or overlap["n_val"]):
        shown = ", ".join(item["path"] for item in (overlap["train"] + overlap["val"])[:3])
        raise EvaluationError(f"--strict: {overlap['n_train']} evaluated case(s) are among the bundle's training cases "
                              f"and {overlap['n_val']} among its validation cases (by content or patient; e.g. "
                              f"{shown}); evaluate on cases the model has not seen")
    alpha, alpha_source = calibration_lib.alpha_from_training(model.manifest.get("training"), model.catalog.ids)
    logits, labels = _rows_by_path(predictions, keep)
    by_path = {str(c.path): c for c in table.cases}
    groups = [by_path[p].patient or f"case:{p}" for p in keep] if table.has_patient else None
    offsets_now = calibration_lib.logit_offsets(model.manifest, model.catalog.ids)
    result = evaluate_predictions(logits, labels, model.catalog, temperature=model.temperature, offsets=offsets_now,
                                  calibrate=calibrate, fit_logits=fit_logits, fit_labels=fit_labels, method=calibration,
                                  alpha=alpha, thresholds=model.threshold_vector(),
                                  target_sensitivity=target_sensitivity, n_boot=n_boot, seed=seed, groups=groups)
    train_cases = sum(1 for path in keep if by_path[path].split == "train")
    evaluation = {
        "model": {"name": model.name, "fingerprint": model.fingerprint,
                  "use_molre": bool(model.manifest.get("model", {}).get("use_molre", True))},
        "cases_csv": Path(cases_csv).name,
        "cases_csv_sha256": table.csv_sha256,
        "split": split,
        "fit_cases": None if fit_table is None else {"cases_csv": fit_table.csv_path.name, "split": fit_split,
                                                     "n_cases": int(fit_labels.shape[0]), "failures": fit_failures},
        "synthetic_cases": bool(table.synthetic),
        "evaluated": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "n_cases": len(table),
        "n_cases_evaluated": len(keep),
        **result.summary,
        "overlap": overlap,
        "failures": failures,
        "csv_problems": list(table.problems),
        "warnings": [],
    }
    evaluation["calibration"]["alpha_source"] = alpha_source if calibration.startswith("prior") else None
    if overlap["n_train"] or overlap["n_val"]:
        evaluation["warnings"].append(f"{overlap['n_train']} evaluated case(s) are among the bundle's training cases and "
                                      f"{overlap['n_val']} among its validation cases (by content hash or patient): "
                                      "their figures are optimistic; --strict refuses")
    if train_cases:
        evaluation["warnings"].append(f"{train_cases} evaluated case(s) are marked split=train: metrics on training "
                                      "cases are optimistic; use --split test")
    if fit_table is None and calibrate:
        evaluation["warnings"].append("no fit cases (--fit-split / --fit-cases): the calibration 'after' and the "
                                      "in_sample thresholds were fitted on the evaluated cases and are in-sample")
    if len(keep) < len(predictions.paths):
        evaluation["warnings"].append(f"{len(predictions.paths) - len(keep)} case(s) left out because the compared "
                                      "model could not read them (both models are measured on the same cases)")
    compared = None
    if other is not None:
        other_logits, other_labels = _rows_by_path(other_predictions, keep)
        other_fit = _predict(other, fit_table, device=device, threads=threads, cache_dir=cache_dir, progress=None,
                             label=other_label) if fit_table is not None else None
        other_alpha, _ = calibration_lib.alpha_from_training(other.manifest.get("training"), other.catalog.ids)
        other_result = evaluate_predictions(
            other_logits, other_labels, other.catalog, temperature=other.temperature,
            offsets=calibration_lib.logit_offsets(other.manifest, other.catalog.ids), calibrate=calibrate,
            fit_logits=None if other_fit is None else other_fit.logits,
            fit_labels=None if other_fit is None else other_fit.labels, method=calibration, alpha=other_alpha,
            thresholds=other.threshold_vector(), target_sensitivity=target_sensitivity, n_boot=n_boot, seed=seed,
            groups=groups)
        comparison, rows = comparison_summary(model.catalog, other_result, result, reference_name=other_label,
                                              candidate_name=label, n_cases=len(keep))
        evaluation["comparison"] = comparison
        compared = (other_label, other_result, rows)

    thresholds = record = None
    if fit_table is not None and calibrate:
        thresholds = {fid: float(t) for fid, t in zip(model.catalog.ids, result.thresholds.threshold)}
        prior = None
        if np.any(result.offsets != 0):
            prior = (calibration_lib.prior_correction_record(model.catalog.ids, alpha, alpha_source)
                     if calibration.startswith("prior") else (model.manifest.get("calibration") or {}).get("prior_correction"))
        record = calibration_lib.calibration_record(
            temperature=result.temperature, prior_correction=prior, fitted_temperature=result.fitted_temperature,
            fitted_on=_fitted_on_record(fit_table, fit_split, int(fit_labels.shape[0]), model))
    card = model_card(_manifest_for_card(model.manifest, evaluation, thresholds, record), evaluation)
    files = _write_tables_and_plots(out, model.catalog, label, result, evaluation, compared)
    (out / MODEL_CARD).write_text(card, encoding="utf-8")
    files.append(MODEL_CARD)
    evaluation["files"] = files + [EVALUATION_JSON]
    evaluation["calibrated_bundle"] = None
    if calibrated_out is not None:
        target = Path(calibrated_out).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(model.path, target)
        try:
            bundle_lib.update_bundle(target, thresholds=thresholds, calibration=record,
                                     metrics=_bundle_metrics(evaluation), extra_files={MODEL_CARD: card})
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        evaluation["calibrated_bundle"] = target.name
    (out / EVALUATION_JSON).write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    return evaluation


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """Arguments of `headct-molre evaluate`."""
    parser.add_argument("--cases", required=True, help="cases CSV: path, optional split/patient/series, one 1/0/blank "
                                                       "column per finding")
    parser.add_argument("--model", required=True, help="model bundle folder to evaluate (only read, never changed)")
    parser.add_argument("--out", required=True, help="folder for evaluation.json, tables, plots and the model card")
    parser.add_argument("--split", choices=("train", "val", "test"),
                        help="evaluate only the cases of this split (default: test when --fit-split is given)")
    parser.add_argument("--fit-split", choices=("train", "val", "test"),
                        help="fit calibration and thresholds on this split (of --cases, or of --fit-cases)")
    parser.add_argument("--fit-cases", help="a second cases CSV to fit calibration and thresholds on")
    parser.add_argument("--calibration", choices=CALIBRATION_CHOICES, default="temperature",
                        help="what to fit on the fit cases: a temperature (default), the focal prior correction "
                             "(no fitting), both, or none (thresholds only)")
    parser.add_argument("--calibrated-out", help="a NEW bundle folder: a copy of --model with the fitted calibration, "
                                                 "thresholds, held-out metrics and model card (needs fit cases)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse when evaluated cases are among the bundle's training/validation cases")
    parser.add_argument("--compare", help="another bundle (same catalog) to compare with, e.g. the LoRA-only baseline")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps, cpu")
    parser.add_argument("--cache", help="preprocessing cache folder (default ~/.cache/headct-molre/stacks)")
    parser.add_argument("--threads", default=None,
                        help="CPU threads for the model (default: $HEADCT_THREADS, else chosen by work size)")
    parser.add_argument("--target-sensitivity", type=float, default=0.9,
                        help="per-finding thresholds are the highest that reach this sensitivity (default 0.9)")
    parser.add_argument("--no-calibrate", action="store_true", help="fit nothing; measure the bundle's own calibration")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", action="store_true", help="print the evaluation as JSON instead of a summary")


def _terminal_progress(event: dict) -> None:
    import sys

    if event.get("total"):
        sys.stderr.write(f"\r{event.get('model', '')}: {event.get('stage')} {event.get('done')}/{event.get('total')}   ")
        if event.get("done") == event.get("total"):
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_from_args(args) -> int:
    """Run `headct-molre evaluate` from parsed arguments; returns the exit status (0; errors give 2)."""
    evaluation = evaluate(
        args.cases, args.model, args.out, split=args.split, fit_split=args.fit_split, fit_cases=args.fit_cases,
        calibration=args.calibration, calibrated_out=args.calibrated_out, strict=args.strict, compare=args.compare,
        device=args.device, cache_dir=args.cache, target_sensitivity=args.target_sensitivity,
        calibrate=not args.no_calibrate, progress=None if args.json else _terminal_progress,
        n_boot=args.bootstrap, seed=args.seed, threads=args.threads,
    )
    if args.json:
        print(json.dumps(evaluation, indent=2))
        return 0
    print(report.format_summary(evaluation))
    for warning in evaluation["warnings"]:
        print(f"warning: {warning}")
    skipped = [f["reason"] if f["reason"].startswith(f["path"]) else f"{f['path']}: {f['reason']}"
               for f in evaluation["failures"]] + evaluation["csv_problems"]
    for line in skipped[:10]:
        print(f"skipped: {line}")
    if len(skipped) > 10:
        print(f"skipped: ... and {len(skipped) - 10} more (see evaluation.json)")
    print(f"Wrote {', '.join(evaluation['files'])} to {Path(args.out)}")
    if evaluation["calibrated_bundle"]:
        print(f"Calibrated bundle (calibration fitted on the fit cases, metrics held-out): {args.calibrated_out}")
    print(f"{args.model} was only read; it is unchanged.")
    return 0
