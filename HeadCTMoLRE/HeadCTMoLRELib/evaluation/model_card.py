"""The model card of a bundle: a page a reviewer reads in two minutes, the long tables at the end.

    model_card(manifest, evaluation=None) -> Markdown text (written as BUNDLE/model_card.md)

Order: the model's status (synthetic / untrained / random backbone, from ``model.status``), a summary
table (what it is, what it reads and says, what it was trained and evaluated on, how sure its
probabilities are), intended use, limits, results per finding category, evaluation details, the training
protocol in brief, citation and license; then the per-finding table (positives counted next to every
figure) and the manifest's training record, flattened, with long values summarised so no line runs on.
Every figure is labelled with where it comes from (held-out or in-sample, the evaluated cases' file).
Without ``evaluation`` the metrics stored in the manifest are used, and their absence is stated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..model.manifest_schema import stored_patch_stem
from ..model.status import bundle_status
from .report import (CODE_LICENSE, PAPER_BIBTEX, PAPER_CITATION, STRATUM_LABELS, calibration_sentence,
                     format_value as _fmt, sorted_rows, table_markdown)

__all__ = ["model_card", "MAX_VALUE_CHARS"]

#: A value of the training record longer than this is cut (the manifest keeps it whole).
MAX_VALUE_CHARS = 160
#: Training-record keys shown elsewhere in the card (per-finding positives) or too long to be read
#: (per-epoch history: the training log and ``history.json`` of the run hold it).
_RECORD_SUMMARISED = ("train_positives", "history")


def _cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _record_items(mapping: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    """The training record flattened to ``a.b.c: value`` pairs; lists of more than 8 items or of records
    are counted, positives per finding and the epoch history summarised, every value cut to one line."""
    items = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if key in _RECORD_SUMMARISED and isinstance(value, (Mapping, list)):
            where = "per-finding table below" if key == "train_positives" else "the run's history.json / training log"
            items.append((name, f"{len(value)} entries ({where})"))
        elif isinstance(value, Mapping):
            items += _record_items(value, f"{name}.")
        elif isinstance(value, (list, tuple)) and (len(value) > 8 or any(isinstance(v, (Mapping, list)) for v in value)):
            items.append((name, f"{len(value)} items"))
        else:
            items.append((name, _cut(_fmt(value))))
    return items


def _windows(pre: Mapping) -> str:
    windows = pre.get("windows_hu") or []
    try:
        return ", ".join("the scan's min..max" if w == "minmax" else f"{float(w[0]):g}..{float(w[1]):g}"
                         for w in windows) + " HU"
    except (TypeError, ValueError):
        return f"{windows} HU"


def _evaluation_source(manifest: Mapping, evaluation: Mapping | None) -> Mapping:
    stored = manifest.get("metrics") or {}
    source = evaluation or stored.get("evaluation") or stored
    if not source or (source.get("mean_auc") is None and not source.get("per_finding") and not source.get("per_finding_auc")):
        return {}
    return source


def _per_finding_rows(manifest: Mapping, source: Mapping) -> list[dict]:
    """Evaluated findings, best AUC first, with name and category from the catalog."""
    catalog = {row["id"]: row for row in (manifest.get("findings") or {}).get("findings") or []}
    per_finding = source.get("per_finding") or {fid: {"auc": auc} for fid, auc in (source.get("per_finding_auc") or {}).items()}
    rows = []
    for row in sorted_rows(per_finding):
        if row.get("auc") is None:
            continue
        entry = catalog.get(row["id"], {})
        rows.append(dict(row, name=row.get("name") or entry.get("name", row["id"]),
                         category=row.get("category") or entry.get("category", "")))
    return rows


def _training_counts(training: Mapping) -> tuple[str, Mapping]:
    counts = training.get("counts") if isinstance(training.get("counts"), Mapping) else {}
    train = counts.get("train", training.get("train_cases"))
    val = counts.get("val", training.get("val_cases"))
    text = ", ".join(part for part in (f"{train} training" if train is not None else "",
                                       f"{val} validation" if val is not None else "") if part)
    return text, counts.get("train_positives") or {}


def _summary(manifest: Mapping, source: Mapping) -> list[str]:
    model = manifest.get("model") or {}
    backbone = model.get("backbone") or {}
    lora = backbone.get("lora") or {}
    molre = model.get("molre") or {}
    weights = (manifest.get("backbone") or {}).get("weights") or {}
    pre = manifest.get("preprocessing") or {}
    params = manifest.get("parameters") or {}
    findings = (manifest.get("findings") or {}).get("findings") or []
    training = manifest.get("training") if isinstance(manifest.get("training"), Mapping) else {}
    status = bundle_status(manifest)
    frozen = "trained end to end" if (training.get("config") or {}).get("train_backbone") else "frozen"
    adaptation = (f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')} on {lora.get('targets')} layers; "
                  + (f"MoLRE K={molre.get('num_experts')} experts of rank {molre.get('rank')} (soft routing per slice)"
                     if model.get("use_molre", True) else "no MoLRE (the paper's LoRA-only baseline)")
                  + ("; linear head on every slice, pooled per finding (smooth maximum over slices)"
                     if model.get("pooling") == "per_finding" else "; attention pooling over slices; linear head"))
    total, trainable = params.get("total"), params.get("trainable")
    parameters = "not recorded"
    if isinstance(total, int) and total:
        parameters = f"total {total:,}" + (f"; trainable {trainable:,} ({100 * trainable / total:.1f}%)"
                                           if isinstance(trainable, int) else "")
    data = ("synthetic phantoms (no patient data)" if manifest.get("synthetic_training_data")
            else "real head CT" if manifest.get("synthetic_training_data") is False else "not recorded")
    counts, _ = _training_counts(training)
    if training:
        data += f": {counts} cases" if counts else ""
        if training.get("seed") is not None:
            data += f", seed {training['seed']}"
        dataset = training.get("dataset") if isinstance(training.get("dataset"), Mapping) else {}
        if dataset.get("dataset"):
            data += f"; dataset {dataset['dataset']}" + (f" ({dataset['license']})" if dataset.get("license") else "")
    else:
        data = "never trained (adapters at initialisation)"
    rows = [
        ("Status", status.label or "trained; research use only"),
        ("Backbone", f"{backbone.get('family')} ({backbone.get('size')}), {backbone.get('image_size')} px, "
                     + (f"{stem} patch stem, " if (stem := stored_patch_stem(manifest)) != "linear" else "") + f"{frozen}; "
                     f"weights {weights.get('kind', '?')} ({weights.get('origin') or weights.get('folder') or 'origin unknown'})"),
        ("Adaptation", adaptation),
        ("Parameters", parameters),
        ("Input", f"non-contrast head CT as {pre.get('num_slices')} axial slices of {pre.get('slice_spacing_mm')} mm, "
                  f"{pre.get('image_size')} px over {pre.get('in_plane_fov_mm')} mm; windows {_windows(pre)}; "
                  f"alignment {pre.get('alignment')}"),
        ("Output", f"{len(findings)} finding probabilities (multi-label; catalog version "
                   f"{str((manifest.get('findings') or {}).get('version', ''))[:12]})"),
        ("Training data", data),
    ]
    if source.get("mean_auc") is not None:
        where = source.get("cases_csv") or source.get("evaluated_on")
        figures = source.get("figures")
        kind = "held-out" if figures == "held-out" or isinstance(figures, Mapping) else "as recorded"
        rows.append(("Evaluation", f"mean AUC {_fmt(source['mean_auc'])} ± {_fmt(source.get('std_auc'))} over "
                                   f"{source.get('n_findings_evaluated')} of {len(findings)} findings, "
                                   f"{source.get('n_cases_evaluated', '?')} cases"
                                   + (f" (`{Path(str(where)).name}`)" if where else "") + f", {kind}"
                                   + ("; synthetic phantoms" if source.get("synthetic_cases") else "")))
    else:
        rows.append(("Evaluation", "none recorded"))
    calibration = source.get("calibration") or {}
    ece = calibration.get("ece_after") if calibration.get("ece_after") is not None else calibration.get("ece_before")
    rule = "probability >= per-finding threshold"
    thresholds = source.get("thresholds") or {}
    if thresholds.get("target_sensitivity") is not None:
        rule += f" (set for sensitivity >= {thresholds['target_sensitivity']:.2f} on the {thresholds.get('fitted_on', 'evaluated cases')})"
    rows.append(("Decision rule", rule))
    prior = (manifest.get("calibration") or {}).get("prior_correction") if isinstance(manifest.get("calibration"), Mapping) else None
    cal_text = f"temperature {_fmt(float(manifest.get('temperature', 1.0)))}" + ("; focal-loss prior correction of the logits"
                                                                              if prior else "")
    if ece is not None:
        cal_text += f"; ECE {_fmt(ece)} over findings with positives"
    rows.append(("Calibration", cal_text))
    lines = ["## Summary", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value.replace('|', '/')} |" for key, value in rows]
    if manifest.get("description"):
        lines += ["", manifest["description"]]
    return lines + [""]


def _by_category(rows: list[dict], manifest: Mapping) -> list[str]:
    catalog = (manifest.get("findings") or {}).get("findings") or []
    order = list(dict.fromkeys(row.get("category", "") for row in catalog))
    lines = ["## Results by category", ""]
    if not rows:
        return lines + ["No finding could be evaluated (no evaluation with positive and negative cases is recorded).", ""]
    table = []
    for category in order:
        chosen = [r for r in rows if r.get("category") == category]
        in_catalog = sum(1 for r in catalog if r.get("category") == category)
        aucs = [float(r["auc"]) for r in chosen]
        counted = [int(r["n_pos"]) for r in chosen if isinstance(r.get("n_pos"), (int, float))]
        positives = sum(counted) if chosen and len(counted) == len(chosen) else None  # unknown when not recorded
        table.append({"category": category, "evaluated": f"{len(chosen)} of {in_catalog}",
                      "mean_auc": sum(aucs) / len(aucs) if aucs else None, "min_auc": min(aucs) if aucs else None,
                      "ge_090": sum(a >= 0.90 for a in aucs), "positives": positives})
    lines.append(table_markdown(table, ("category", "evaluated", "mean_auc", "min_auc", "ge_090", "positives"),
                                ("category", "findings evaluated", "mean AUC", "lowest AUC", "AUC >= 0.90",
                                 "positive cases")).rstrip())
    return lines + ["", "Findings evaluated = with both positive and negative cases; positive cases summed over them.", ""]


def _evaluation_details(source: Mapping) -> list[str]:
    lines = ["## Evaluation", ""]
    if not source:
        return lines + ["No evaluation is recorded for this bundle. Run `headct-molre evaluate --cases CSV --model "
                        "BUNDLE --out DIR --fit-split val` on held-out labelled cases.", ""]
    where = source.get("cases_csv") or source.get("evaluated_on")
    lines.append(f"- Evaluation cases: {source.get('n_cases_evaluated', '?')} of {source.get('n_cases', '?')}"
                 + (f" from `{Path(str(where)).name}`" if where else "")
                 + (f" (split {source['split']})" if source.get("split") else "")
                 + (f", evaluated {source['evaluated']}" if source.get("evaluated") else ""))
    if source.get("mean_auc") is not None:
        lines.append(f"- Mean AUC: {_fmt(source['mean_auc'])} ± {_fmt(source.get('std_auc'))} (population SD) over "
                     f"{source.get('n_findings_evaluated')} findings with both classes present")
    strata = source.get("strata") or {}
    if strata:
        lines.append("- Findings per AUC stratum (the paper's): "
                     + "; ".join(f"{STRATUM_LABELS.get(k, k)}: {v}" for k, v in strata.items()))
    if source.get("calibration"):
        lines.append(calibration_sentence(source["calibration"]))
    thresholds = source.get("thresholds") or {}
    if thresholds.get("target_sensitivity") is not None:
        lines.append(f"- Thresholds: chosen per finding for sensitivity >= {thresholds['target_sensitivity']:.2f} on the "
                     f"{thresholds.get('fitted_on', 'evaluated cases')}; 0.5 where a finding had no positive case; "
                     f"sensitivity, specificity and PPV are held-out (operating points: "
                     f"{thresholds.get('reported_at', 'these thresholds')})")
    overlap = source.get("overlap") or {}
    if overlap.get("n_train") or overlap.get("n_val"):
        lines.append(f"- **Overlap**: {overlap.get('n_train', 0)} evaluated case(s) are among the training cases and "
                     f"{overlap.get('n_val', 0)} among the validation cases: those figures are optimistic.")
    if source.get("synthetic_cases"):
        lines.append("- The evaluation cases are **synthetic phantoms**, not patient scans.")
    comparison = source.get("comparison") or {}
    if comparison.get("mean_gain") is not None:
        ci = comparison.get("mean_gain_ci")
        lines.append(f"- Compared with {comparison.get('reference_name')} on the same {comparison.get('n_cases')} cases: "
                     f"mean AUC {_fmt(comparison.get('mean_auc_reference'))} -> {_fmt(comparison.get('mean_auc_candidate'))}, "
                     f"gain {comparison['mean_gain']:+.3f}"
                     + (f" (95% paired bootstrap interval {ci[0]:+.3f} to {ci[1]:+.3f})" if ci else "")
                     + f"; {comparison.get('n_improved')} findings better, {comparison.get('n_worse')} worse")
    return lines + [""]


def _limitations(manifest: Mapping, source: Mapping, not_evaluated: list[str]) -> list[str]:
    lines = ["## Limitations", ""]
    status = bundle_status(manifest)
    lines += [f"- {warning}" for warning in status.warnings]
    if source.get("synthetic_cases"):
        lines.append("- Evaluated on synthetic phantoms: these figures say nothing about real scans.")
    if manifest.get("synthetic_training_data"):
        lines.append("- The phantoms render only a subset of the findings; the others cannot be learned from them.")
    if not_evaluated:
        shown = ", ".join(not_evaluated[:8]) + (f", … ({len(not_evaluated) - 8} more)" if len(not_evaluated) > 8 else "")
        lines.append(f"- {len(not_evaluated)} of the catalog's findings were not evaluated (no positive or no negative "
                     f"case): {shown}. Nothing is known about the model on these.")
    lines.append("- AUC intervals are bootstrap intervals over cases (patients when recorded); with few positive "
                 "cases they are wide and the AUC itself is unstable.")
    fitted_on = (source.get("thresholds") or {}).get("fitted_on")
    if fitted_on and "in-sample" in str(fitted_on):
        lines.append("- Thresholds and calibration were fitted on the evaluated cases themselves: the operating points "
                     "and the calibration after scaling are optimistic. Re-evaluate on independent cases.")
    elif fitted_on:
        lines.append(f"- Thresholds and calibration were fitted on the {fitted_on}, separate from the cases reported; "
                     "on other scanners and populations they may still be wrong.")
    else:
        lines.append("- No calibration or thresholds fitted on labelled cases are recorded: the thresholds are defaults.")
    lines += ["- Performance depends on the scanner, protocol, population and label definitions of the training data; "
              "expect a drop on data from other sites. Scans that fail the input checks (non-head, contrast, "
              "incomplete coverage, wrong units) are refused rather than scored.",
              "- A multi-label classifier: it does not localise findings; per-slice attention and contributions show "
              "which slices drove a score, not where a lesion is.", ""]
    return lines


def _training_protocol(manifest: Mapping) -> list[str]:
    training = manifest.get("training") if isinstance(manifest.get("training"), Mapping) else {}
    lines = ["## Training data", ""]
    synthetic = manifest.get("synthetic_training_data")
    lines.append("- **Trained on synthetic head CT phantoms only** (procedurally generated; no patient data)."
                 if synthetic else "- Trained on real head CT studies (see the training record)." if synthetic is False
                 else "- Whether the training data were synthetic is not recorded.")
    if not training:
        return lines + ["- No training provenance is recorded: this bundle was not trained by `headct-molre train` "
                        "(for example it was created by `new-model` with random adapters). Its outputs carry no "
                        "diagnostic information until it is trained.", ""]
    counts, _ = _training_counts(training)
    if counts:
        lines.append(f"- Cases: {counts}")
    dataset = training.get("dataset") if isinstance(training.get("dataset"), Mapping) else {}
    if dataset:
        lines.append(f"- Dataset: {dataset.get('dataset')}; license: {dataset.get('license', 'not recorded')}"
                     + (f"; {dataset['terms']}" if dataset.get("terms") else ""))
    config = training.get("config") if isinstance(training.get("config"), Mapping) else {}
    lines += ["", "## Training protocol", ""]
    facts = [("status", training.get("status")), ("epochs run", training.get("epochs_run")),
             ("best epoch", training.get("best_epoch")), ("best validation mean AUC", training.get("best_val_mean_auc")),
             ("duration", f"{training['duration_s'] / 60:.1f} min" if isinstance(training.get("duration_s"), (int, float)) else None),
             ("device", training.get("device")), ("precision", training.get("precision")),
             ("learning rates", f"heads {config['lr_heads']:g}, adapters {config['lr_adapters']:g}"
              if isinstance(config.get("lr_heads"), (int, float)) and isinstance(config.get("lr_adapters"), (int, float)) else None),
             ("batch", config.get("batch_size")), ("focal gamma", config.get("focal_gamma")), ("seed", config.get("seed"))]
    shown = [f"- {name}: {_fmt(value)}" for name, value in facts if value is not None]
    lines += shown or ["- See the training record at the end of this card."]
    return lines + ["- The whole record (manifest `training`) is at the end of this card.", ""]


def _per_finding_table(rows: list[dict], train_positives: Mapping) -> list[str]:
    lines = ["## Per-finding results", ""]
    if not rows:
        return lines + ["No per-finding evaluation is recorded.", ""]
    table = []
    for row in rows:
        ci = (f"{row['ci_low']:.3f}-{row['ci_high']:.3f}"
              if isinstance(row.get("ci_low"), (int, float)) and isinstance(row.get("ci_high"), (int, float)) else None)
        table.append(dict(row, ci=ci, train_pos=train_positives.get(row["id"])))
    columns = [c for c in ("name", "category", "n_pos", "n_neg", "auc", "ci", "threshold", "sensitivity", "specificity",
                           "ppv", "train_pos") if any(r.get(c) is not None for r in table)]
    headers = {"n_pos": "pos", "n_neg": "neg", "auc": "AUC", "ci": "95% CI", "sensitivity": "sens", "specificity": "spec",
               "ppv": "PPV", "train_pos": "train pos"}
    lines.append(f"{len(rows)} findings evaluated, best AUC first; pos/neg = evaluated cases with / without the finding.")
    lines += ["", table_markdown(table, columns, [headers.get(c, c) for c in columns]).rstrip(), ""]
    return lines


def model_card(manifest: Mapping, evaluation: Mapping | None = None) -> str:
    """The Markdown model card of a bundle, from its manifest and (optionally) an evaluation dict."""
    name = manifest.get("name", "model")
    status = bundle_status(manifest)
    lines = [f"# Model card: {name}", ""]
    if manifest.get("synthetic_training_data"):
        lines += ["> **Synthetic demonstration model. Trained on computer-generated phantoms, not on patients. "
                  "Not for clinical use.**", ""]
    if status.label:
        lines += [f"**{status.label}**", ""]
    source = _evaluation_source(manifest, evaluation)
    rows = _per_finding_rows(manifest, source) if source else []
    evaluated = {row["id"] for row in rows}
    not_evaluated = [row["id"] for row in (manifest.get("findings") or {}).get("findings") or [] if row["id"] not in evaluated]
    training = manifest.get("training") if isinstance(manifest.get("training"), Mapping) else {}
    _, train_positives = _training_counts(training)
    lines += _summary(manifest, source)
    lines += ["## Intended use", "", "**Research use only, not for clinical use.**", ""]
    if manifest.get("intended_use"):
        lines += [manifest["intended_use"], ""]
    lines += ["Not a medical device; not cleared or approved by any regulator; must not inform the diagnosis or "
              "treatment of a patient. For imaging-AI researchers and research radiologists studying adapted "
              "foundation models on non-contrast head CT of adults.", ""]
    lines += _limitations(manifest, source, not_evaluated)
    lines += _by_category(rows, manifest)
    lines += _evaluation_details(source)
    lines += _training_protocol(manifest)
    lines += ["## How to cite", "", "If you use this model or the HeadCTMoLRE software, cite the MoLRE paper:", "",
              PAPER_CITATION, "", "```bibtex", PAPER_BIBTEX, "```", ""]
    lines += ["## License", "",
              f"HeadCTMoLRE code: {CODE_LICENSE}. The backbone weights keep the license of their origin "
              "(see Backbone above); adapters trained on a dataset inherit that dataset's terms.", ""]
    lines += _per_finding_table(rows, train_positives)
    if training:
        lines += ["## Training record", "", "The manifest's `training` entry, flattened (long values shortened):", ""]
        lines += [f"- {key}: {value}" for key, value in _record_items(training)]
        lines.append("")
    return "\n".join(lines)
