"""`headct-molre evaluate`: how good is a model bundle on labelled cases, honestly.

    evaluate(cases_csv, bundle_path, out_dir) -> dict        (also written as out_dir/evaluation.json)

Steps: read the cases CSV (data.read_cases) -> predict every case (data.predict_cases, through the
preprocessing cache; unreadable cases are reported in ``failures``, never fatal) -> per-finding AUC with
bootstrap 95% intervals, mean +- SD over findings with both classes, the paper's strata -> calibration:
ECE of the bundle's current probabilities, one temperature fitted on the raw logits, ECE after it ->
per-finding thresholds reaching the target sensitivity on the calibrated probabilities -> files in
``out_dir`` -> optionally the temperature, thresholds, metrics and model card written back into the
bundle (bundle.update_bundle; the weights are never touched).

Files written: ``evaluation.json``, ``per_finding.tsv``, ``per_finding.md``, ``auc_radar.png``,
``auc_strata.png``, ``reliability.png``, ``model_card.md``; with ``compare``: ``comparison.tsv``,
``comparison.md`` (and both models on the radar and strata plots).

The temperature and thresholds are fitted on the very cases they are then measured on: the "after"
figures are in-sample. Evaluate on cases the model was not trained on (``split="test"`` picks them from
a CSV with a split column).
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

from .. import metrics
from . import report

EVALUATION_JSON = "evaluation.json"
PER_FINDING_TSV = "per_finding.tsv"
PER_FINDING_MD = "per_finding.md"
COMPARISON_TSV = "comparison.tsv"
COMPARISON_MD = "comparison.md"
RADAR_PNG = "auc_radar.png"
STRATA_PNG = "auc_strata.png"
RELIABILITY_PNG = "reliability.png"
MODEL_CARD = "model_card.md"
THRESHOLD_RULE = ("highest threshold whose sensitivity on the evaluation cases reaches the target; placed halfway "
                  "to the next lower probability; probability >= threshold is positive; 0.5 without positives")


class EvaluationError(ValueError):
    """Evaluation cannot produce any result (no usable case, incompatible models); says what to do."""


# ---------------------------------------------------------------------------------------- pure metrics
@dataclass
class ModelEvaluation:
    """Everything measured for one model on one set of cases (arrays (C,) in catalog order).

    ``summary``: the JSON-able result (see :func:`evaluate_predictions`); ``auc``: metrics.AUCResult;
    ``reliability_before`` / ``reliability_after``: metrics.ReliabilityBins (after is None without
    calibration); ``thresholds``: metrics.Thresholds; ``temperature``: the temperature the thresholds
    and the "after" calibration use.
    """

    summary: dict
    auc: metrics.AUCResult
    reliability_before: metrics.ReliabilityBins
    reliability_after: metrics.ReliabilityBins | None
    thresholds: metrics.Thresholds
    temperature: float


def _number(value) -> float | None:
    """float, or None for NaN / None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def evaluate_predictions(logits, labels, catalog, *, temperature: float = 1.0, calibrate: bool = True,
                         target_sensitivity: float = 0.9, n_boot: int = 1000, seed: int = 0,
                         n_bins: int = 10) -> ModelEvaluation:
    """Metrics of one model from its raw logits (N, C) (before any temperature) and labels (N, C) 1/0/NaN.

    ``temperature``: the one the bundle applies now (its probabilities = sigmoid(logits / temperature)
    give the "before" calibration). With ``calibrate`` a new temperature is fitted on the raw logits and
    thresholds are chosen on sigmoid(logits / new temperature); without it, on the current probabilities.
    AUCs do not depend on the temperature.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if logits.shape != labels.shape or logits.ndim != 2 or logits.shape[1] != len(catalog):
        raise EvaluationError(f"logits {logits.shape} and labels {labels.shape} must both be (cases, "
                              f"{len(catalog)} findings)")
    probabilities_now = metrics.sigmoid(logits / temperature)
    auc = metrics.auc_with_ci(logits, labels, n_boot=n_boot, seed=seed)
    bins_before = metrics.reliability_bins(probabilities_now, labels, n_bins)
    ece_before = metrics.expected_calibration_error(probabilities_now, labels, n_bins)
    calibration: dict[str, Any] = {
        "ece_before": _number(ece_before),
        "nll_before": _number(metrics.binary_nll(logits / temperature, labels)),
        "temperature_before": float(temperature),
        "n_bins": n_bins,
        "reliability_before": bins_before.to_dict(),
    }
    bins_after = None
    final_temperature = float(temperature)
    if calibrate:
        final_temperature = metrics.fit_temperature(logits, labels)
        calibrated = metrics.sigmoid(logits / final_temperature)
        bins_after = metrics.reliability_bins(calibrated, labels, n_bins)
        calibration.update({
            "ece_after": _number(metrics.expected_calibration_error(calibrated, labels, n_bins)),
            "nll_after": _number(metrics.binary_nll(logits / final_temperature, labels)),
            "reliability_after": bins_after.to_dict(),
        })
    else:
        calibration.update({"ece_after": None, "nll_after": None})
    calibration["temperature"] = final_temperature
    thresholds = metrics.thresholds_at_sensitivity(metrics.sigmoid(logits / final_temperature), labels,
                                                   target_sensitivity)
    per_finding = {}
    for index, finding in enumerate(catalog.findings):
        per_finding[finding.id] = {
            "name": finding.name,
            "category": finding.category,
            "auc": _number(auc.auc[index]),
            "ci_low": _number(auc.ci_low[index]),
            "ci_high": _number(auc.ci_high[index]),
            "n_pos": int(auc.n_pos[index]),
            "n_neg": int(auc.n_neg[index]),
            "threshold": float(thresholds.threshold[index]),
            "sensitivity": _number(thresholds.sensitivity[index]),
            "specificity": _number(thresholds.specificity[index]),
        }
    summary = {
        **metrics.summarize_aucs(auc.auc),
        "bootstrap": {"n_boot": n_boot, "level": auc.level, "seed": seed, "resampled": "cases"},
        "per_finding": per_finding,
        "calibration": calibration,
        "thresholds": {"target_sensitivity": float(target_sensitivity), "rule": THRESHOLD_RULE,
                       "fitted_on_calibrated_probabilities": bool(calibrate)},
        "not_evaluated": [fid for fid, row in per_finding.items() if row["auc"] is None],
    }
    return ModelEvaluation(summary, auc, bins_before, bins_after, thresholds, final_temperature)


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


def _select_split(table, split: str | None):
    if split is None:
        return table
    if not table.has_split:
        raise EvaluationError(f"{table.csv_path}: --split {split} was asked for but the CSV has no 'split' column")
    chosen = table.split(split)
    if not len(chosen):
        raise EvaluationError(f"{table.csv_path}: no usable case has split '{split}'")
    chosen.problems = list(table.problems)
    return chosen


def _predict(bundle, table, *, device, cache_dir, progress, label):
    from ..training.cases import predict_cases

    def forward(event):
        if progress:
            progress({**event, "model": label})

    return predict_cases(bundle, table, cache_dir=cache_dir, device=device, progress=forward if progress else None)


def _rows_by_path(predictions, keep_paths: list[str]):
    index = {path: i for i, path in enumerate(predictions.paths)}
    rows = [index[path] for path in keep_paths]
    return predictions.logits[rows], predictions.labels[rows]


def _bundle_metrics(evaluation: dict) -> dict:
    """What goes back into the bundle's manifest ``metrics``: headline numbers at the top (shown by
    `headct-molre info`), the whole summary without the per-bin arrays under ``evaluation``."""
    calibration = {k: v for k, v in evaluation["calibration"].items() if not k.startswith("reliability")}
    summary = {k: evaluation.get(k) for k in ("mean_auc", "std_auc", "n_findings_evaluated", "n_findings_total",
                                               "strata", "n_cases", "n_cases_evaluated", "cases_csv",
                                               "cases_csv_sha256", "split", "synthetic_cases", "evaluated",
                                               "thresholds", "bootstrap")}
    summary["calibration"] = calibration
    summary["per_finding_auc"] = {fid: row["auc"] for fid, row in evaluation["per_finding"].items()}
    return {"mean_auc": evaluation["mean_auc"], "std_auc": evaluation["std_auc"],
            "n_findings_evaluated": evaluation["n_findings_evaluated"],
            "ece": calibration.get("ece_after") if calibration.get("ece_after") is not None else calibration.get("ece_before"),
            "evaluation": summary}


def _manifest_after_write_back(manifest: dict, evaluation: dict, thresholds: dict, temperature: float) -> dict:
    updated = json.loads(json.dumps(manifest))
    updated["thresholds"] = {**(updated.get("thresholds") or {}), **thresholds}
    updated["temperature"] = temperature
    updated["metrics"] = {**(updated.get("metrics") or {}), **_bundle_metrics(evaluation)}
    return updated


def _write_tables_and_plots(out: Path, catalog, label: str, result: ModelEvaluation, evaluation: dict,
                            compared: tuple[str, ModelEvaluation, list[dict]] | None) -> list[str]:
    rows = report.sorted_rows(evaluation["per_finding"])
    (out / PER_FINDING_TSV).write_text(report.table_tsv(rows, report.PER_FINDING_COLUMNS), encoding="utf-8")
    (out / PER_FINDING_MD).write_text(report.table_markdown(rows, report.PER_FINDING_COLUMNS), encoding="utf-8")
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
    report.radar_plot(out / RADAR_PNG, catalog, aucs, title="Per-finding AUC on "
                      f"{evaluation['n_cases_evaluated']} cases (gaps: finding without both classes)")
    report.strata_bar_chart(out / STRATA_PNG, strata,
                            title=f"Findings per AUC stratum ({evaluation['n_findings_evaluated']} evaluated)")
    bins = {f"current (T = {evaluation['calibration']['temperature_before']:.2f})": result.reliability_before}
    eces = {next(iter(bins)): evaluation["calibration"]["ece_before"] or float("nan")}
    if result.reliability_after is not None:
        key = f"after temperature scaling (T = {result.temperature:.2f})"
        bins[key] = result.reliability_after
        eces[key] = evaluation["calibration"]["ece_after"] or float("nan")
    report.reliability_diagram(out / RELIABILITY_PNG, bins, eces)
    return written + [RADAR_PNG, STRATA_PNG, RELIABILITY_PNG]


def evaluate(cases_csv: str | os.PathLike, bundle_path: str | os.PathLike, out_dir: str | os.PathLike, *,
             compare: str | os.PathLike | None = None, device: str = "auto", cache_dir: str | os.PathLike | None = None,
             target_sensitivity: float = 0.9, calibrate: bool = True, write_back: bool = True,
             progress: Callable[[dict], None] | None = None, split: str | None = None, n_boot: int = 1000,
             seed: int = 0) -> dict:
    """Evaluate the bundle at ``bundle_path`` on the labelled cases of ``cases_csv``; returns the
    evaluation dict that is also written to ``out_dir/evaluation.json``.

    ``compare``: another bundle with the same finding catalog (e.g. the LoRA-only baseline); both are
    evaluated on the cases that both could read, with paired bootstrap intervals of the differences
    (this bundle minus ``compare``). ``device``: auto/cpu/cuda/cuda:N/mps. ``cache_dir``: preprocessing
    cache (default: data.default_cache_dir()). ``target_sensitivity``: for the per-finding thresholds.
    ``calibrate``: fit a temperature. ``write_back``: store temperature (when calibrated), thresholds,
    the metrics summary and the model card in the bundle. ``progress``: callable(dict) receiving
    ``{"stage", "done", "total", "model"}``. ``split``: evaluate only the cases of this split.
    Cases that could not be read are listed under ``failures`` (path, reason), rows or columns of the CSV
    that were skipped under ``csv_problems``; raises EvaluationError when no case at
    all can be evaluated, bundle.BundleError for an unusable bundle.
    """
    from ..model import bundle as bundle_lib
    from ..training.cases import read_cases

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model = bundle_lib.load_bundle(bundle_path)
    other = bundle_lib.load_bundle(compare) if compare is not None else None
    if other is not None and tuple(other.catalog.ids) != tuple(model.catalog.ids):
        raise EvaluationError(f"cannot compare {model.path} with {other.path}: their finding catalogs differ "
                              "(ids or order); compare models trained on the same catalog")
    table = _select_split(read_cases(cases_csv, model.catalog), split)
    label = _model_label(model)
    predictions = _predict(model, table, device=device, cache_dir=cache_dir, progress=progress, label=label)
    failures = [{"path": str(path), "reason": str(reason)} for path, reason in predictions.failures]
    if not predictions.paths:
        shown = "; ".join(f"{f['path']}: {f['reason']}" for f in failures[:2]) or "; ".join(table.problems[:3])
        raise EvaluationError(f"{cases_csv}: none of the {len(table)} cases could be evaluated ({shown}). Check the "
                              "paths in the CSV (relative paths are read from the CSV's folder) with "
                              "`headct-molre validate PATH`.")
    keep = list(predictions.paths)
    other_predictions = None
    if other is not None:
        other_label = _model_label(other)
        if other_label == label:
            other_label = f"{other_label} [reference]"
        other_predictions = _predict(other, table, device=device, cache_dir=cache_dir, progress=progress,
                                     label=other_label)
        common = set(other_predictions.paths)
        keep = [path for path in keep if path in common]
        if not keep:
            raise EvaluationError(f"no case could be evaluated by both {model.path} and {other.path}")

    logits, labels = _rows_by_path(predictions, keep)
    result = evaluate_predictions(logits, labels, model.catalog, temperature=model.temperature, calibrate=calibrate,
                                  target_sensitivity=target_sensitivity, n_boot=n_boot, seed=seed)
    train_cases = sum(1 for case in table.cases if case.split == "train")
    evaluation = {
        "model": {"name": model.name, "path": str(model.path), "fingerprint": model.fingerprint,
                  "use_molre": bool(model.manifest.get("model", {}).get("use_molre", True))},
        "cases_csv": str(Path(cases_csv).expanduser().resolve()),
        "cases_csv_sha256": table.csv_sha256,
        "split": split,
        "synthetic_cases": bool(table.synthetic),
        "evaluated": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "n_cases": len(table),
        "n_cases_evaluated": len(keep),
        **result.summary,
        "failures": failures,
        "csv_problems": list(table.problems),
        "warnings": [],
    }
    if train_cases:
        evaluation["warnings"].append(f"{train_cases} evaluated case(s) are marked split=train: metrics on training "
                                      "cases are optimistic; use --split test")
    if len(keep) < len(predictions.paths):
        evaluation["warnings"].append(f"{len(predictions.paths) - len(keep)} case(s) left out because the compared "
                                      "model could not read them (both models are measured on the same cases)")
    compared = None
    if other is not None:
        other_logits, other_labels = _rows_by_path(other_predictions, keep)
        other_result = evaluate_predictions(other_logits, other_labels, other.catalog, temperature=other.temperature,
                                            calibrate=calibrate, target_sensitivity=target_sensitivity,
                                            n_boot=n_boot, seed=seed)
        comparison, rows = comparison_summary(model.catalog, other_result, result, reference_name=other_label,
                                              candidate_name=label, n_cases=len(keep))
        comparison["reference_path"] = str(other.path)
        evaluation["comparison"] = comparison
        compared = (other_label, other_result, rows)

    thresholds = {fid: row["threshold"] for fid, row in evaluation["per_finding"].items()}
    temperature = result.temperature
    card_manifest = _manifest_after_write_back(model.manifest, evaluation, thresholds, temperature)
    card = report.model_card(card_manifest, evaluation)
    files = _write_tables_and_plots(out, model.catalog, label, result, evaluation, compared)
    (out / MODEL_CARD).write_text(card, encoding="utf-8")
    files.append(MODEL_CARD)
    evaluation["files"] = files + [EVALUATION_JSON]
    evaluation["written_back"] = False
    if write_back:
        bundle_lib.update_bundle(model.path, thresholds=thresholds, temperature=temperature if calibrate else None,
                                 metrics=_bundle_metrics(evaluation), extra_files={MODEL_CARD: card})
        evaluation["written_back"] = True
    (out / EVALUATION_JSON).write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    return evaluation


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """Arguments of `headct-molre evaluate`."""
    parser.add_argument("--cases", required=True, help="cases CSV: path, optional split, one 1/0/blank column per finding")
    parser.add_argument("--model", required=True, help="model bundle folder to evaluate")
    parser.add_argument("--out", required=True, help="folder for evaluation.json, tables, plots and the model card")
    parser.add_argument("--compare", help="another bundle (same catalog) to compare with, e.g. the LoRA-only baseline")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps, cpu")
    parser.add_argument("--cache", help="preprocessing cache folder (default ~/.cache/headct-molre/stacks)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="evaluate only the cases of this split")
    parser.add_argument("--target-sensitivity", type=float, default=0.9,
                        help="per-finding thresholds are the highest that reach this sensitivity (default 0.9)")
    parser.add_argument("--no-calibrate", action="store_true", help="do not fit a temperature")
    parser.add_argument("--no-write-back", action="store_true",
                        help="leave the bundle unchanged (default: store temperature, thresholds, metrics, model card)")
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
    """Run `headct-molre evaluate` from parsed arguments; returns the exit status (0)."""
    evaluation = evaluate(
        args.cases, args.model, args.out, compare=args.compare, device=args.device, cache_dir=args.cache,
        target_sensitivity=args.target_sensitivity, calibrate=not args.no_calibrate,
        write_back=not args.no_write_back, progress=None if args.json else _terminal_progress, split=args.split,
        n_boot=args.bootstrap, seed=args.seed,
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
    if evaluation["written_back"]:
        print(f"Temperature, thresholds, metrics and model_card.md written back into {args.model}")
    return 0
