"""Evaluation reports: PNG plots, TSV / Markdown tables, and the citation and license texts the model card
(``evaluation.model_card``) uses.

Plots are drawn on explicit ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
pyplot's global state, so that nothing leaks between plots and nothing opens a window (safe inside
Slicer and on headless servers). Per-finding arrays are (C,) in catalog order.

The tables read the evaluation dict that :func:`evaluate.evaluate` writes as
``evaluation.json`` (keys ``mean_auc``, ``std_auc``, ``n_findings_evaluated``, ``strata``,
``per_finding``, ``calibration``, ``thresholds``, ``failures``, ...); missing keys are tolerated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..findings import CATEGORIES
from ..metrics import STRATA, STRATUM_LABELS, ReliabilityBins

#: One colour per finding category (colour-blind-safe Okabe-Ito palette), in CATEGORIES order.
CATEGORY_COLOURS: dict[str, str] = dict(zip(CATEGORIES, ("#D55E00", "#0072B2", "#E69F00", "#CC79A7", "#009E73",
                                                        "#56B4E9")))
MODEL_COLOURS = ("#1F3A93", "#C0392B")  # first / second model in plots
PAPER_CITATION = (
    "Y. Yoo, H. Liu, B. Georgescu, Y. Zhang, S. Grbic, M. Baumgartner, T. J. Re, J. Das, P. Ullaskrishnan, "
    "E. Eibenberger, A. Chekkoury, U. K. Bodanapally, S. Nicolaou, P. C. Sanelli, T. J. Schroeppel, Y. W. Lui, "
    "E. Gibson. Specializing Foundation Models via Mixture of Low-Rank Experts for Comprehensive Head CT "
    "Analysis. arXiv:2603.00675, 2026."
)
PAPER_BIBTEX = """@misc{yoo2026molre,
  title         = {Specializing Foundation Models via Mixture of Low-Rank Experts for Comprehensive Head CT Analysis},
  author        = {Yoo, Youngjin and Liu, Han and Georgescu, Bogdan and others},
  year          = {2026},
  eprint        = {2603.00675},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV}
}"""
CODE_LICENSE = "Apache-2.0"


# --------------------------------------------------------------------------------------------- plotting
def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", facecolor="white")
    return path


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def radar_plot(path: str | Path, catalog, aucs_by_model: Mapping[str, Sequence[float]], *,
               title: str = "Per-finding AUC") -> Path:
    """A polar plot with one spoke per finding (catalog order, grouped by category) and one closed
    line per model; ``aucs_by_model`` maps a model label to (C,) AUCs (NaN = not evaluable: shown as a
    gap, its label greyed with "n/a"). Category sectors are tinted and labels coloured by category."""
    names = [f.name for f in catalog.findings]
    categories = [f.category for f in catalog.findings]
    n = len(names)
    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    all_values = np.concatenate([np.asarray(v, dtype=float) for v in aucs_by_model.values()]) if aucs_by_model else []
    finite = np.asarray(all_values)[np.isfinite(all_values)] if len(all_values) else np.array([])
    r_min = min(0.5, math.floor(finite.min() * 10) / 10) if finite.size else 0.5

    figure = _new_figure(13.0, 14.5)
    axes = figure.add_axes((0.17, 0.2, 0.66, 0.613), projection="polar")  # square on the 13 x 14.5 in page
    axes.set_theta_offset(np.pi / 2)
    axes.set_theta_direction(-1)
    axes.set_ylim(r_min, 1.0)
    width = 2.0 * np.pi / n
    for angle, category in zip(angles, categories):  # category sectors
        axes.bar(angle, 1.0 - r_min, width=width, bottom=r_min, color=CATEGORY_COLOURS.get(category, "#999999"),
                 alpha=0.10, linewidth=0)
    evaluable = np.zeros(n, dtype=bool)
    for index, (label, values) in enumerate(aucs_by_model.items()):
        values = np.asarray(values, dtype=float)
        evaluable |= np.isfinite(values)
        closed_angles, closed = np.append(angles, angles[0]), np.append(values, values[0])
        colour = MODEL_COLOURS[index % len(MODEL_COLOURS)]
        finite_count = int(np.isfinite(values).sum())
        mean = np.nanmean(values) if finite_count else float("nan")
        axes.plot(closed_angles, np.clip(closed, r_min, 1.0), color=colour, linewidth=1.6, marker="o", markersize=3,
                  label=f"{label}: mean AUC {mean:.3f} over {finite_count} findings")
    for reference in (0.8, 0.9):
        if reference > r_min:
            axes.plot(np.linspace(0, 2 * np.pi, 200), np.full(200, reference), color="#555555", linewidth=0.8,
                      linestyle="--")
    axes.set_xticks(angles)
    axes.set_xticklabels([])
    axes.set_rlabel_position(np.degrees(width) / 2)  # between the first two spokes, clear of their labels
    axes.tick_params(axis="y", labelsize=8, colors="#444444")
    axes.grid(color="#BBBBBB", linewidth=0.5)
    for angle, name, category, ok in zip(angles, names, categories, evaluable):
        degrees = np.degrees(angle)  # clockwise from the top
        text = _short(name) + ("" if ok else " (n/a)")
        rotation = 90.0 - degrees
        align = "left"
        if 180.0 < degrees < 360.0:
            rotation += 180.0
            align = "right"
        axes.text(angle, 1.0 + (1.0 - r_min) * 0.03, text, rotation=rotation, rotation_mode="anchor",
                  ha=align, va="center", fontsize=7.5,
                  color=CATEGORY_COLOURS.get(category, "#333333") if ok else "#9A9A9A")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    category_handles = [Patch(color=CATEGORY_COLOURS[c], label=c) for c in CATEGORIES if c in categories]
    model_handles, model_labels = axes.get_legend_handles_labels()
    figure.legend(model_handles, model_labels, loc="lower left", bbox_to_anchor=(0.03, 0.015), fontsize=10,
                  frameon=False)
    figure.legend(handles=category_handles + [Line2D([], [], color="#555555", linestyle="--", label="AUC 0.80 / 0.90")],
                  loc="lower right", bbox_to_anchor=(0.97, 0.015), fontsize=10, ncol=2, frameon=False,
                  title="Category", title_fontsize=10)
    figure.suptitle(title, fontsize=15, y=0.985)
    return _save(figure, path)


def strata_bar_chart(path: str | Path, strata_by_model: Mapping[str, Mapping[str, int]], *,
                     title: str = "Findings per AUC stratum") -> Path:
    """Grouped bars: for each AUC stratum of :data:`metrics.STRATA`, the number of findings of each model
    (one or two models; ``strata_by_model`` maps a label to ``metrics.stratify`` counts)."""
    keys = [key for key, _, _ in STRATA]
    models = list(strata_by_model)
    figure = _new_figure(7.5, 4.8)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(models))
    positions = np.arange(len(keys))
    top = 1
    for index, label in enumerate(models):
        counts = [int(strata_by_model[label].get(key, 0)) for key in keys]
        top = max(top, *counts)
        offset = (index - (len(models) - 1) / 2) * width
        bars = axes.bar(positions + offset, counts, width=width * 0.95, color=MODEL_COLOURS[index % 2], label=label)
        axes.bar_label(bars, padding=2, fontsize=10)
    axes.set_xticks(positions, [STRATUM_LABELS[key] for key in keys], fontsize=10)
    axes.set_ylabel("number of findings", fontsize=10)
    axes.set_ylim(0, top * 1.18 + 0.5)
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(fontsize=9, frameon=False)
    axes.set_title(title, fontsize=12)
    figure.tight_layout()
    return _save(figure, path)


def reliability_diagram(path: str | Path, bins_by_label: Mapping[str, ReliabilityBins],
                        ece_by_label: Mapping[str, float] | None = None, *,
                        title: str = "Reliability (all findings pooled)") -> Path:
    """Observed fraction positive against mean predicted probability per bin, one line per label (e.g.
    before / after temperature scaling), with the diagonal of perfect calibration, and below it the
    number of (case, finding) pairs per bin on a log scale."""
    figure = _new_figure(6.5, 7.0)
    grid = figure.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    curve = figure.add_subplot(grid[0])
    counts = figure.add_subplot(grid[1], sharex=curve)
    curve.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="perfect calibration")
    labels = list(bins_by_label)
    for index, label in enumerate(labels):
        bins = bins_by_label[label]
        filled = bins.count > 0
        ece = (ece_by_label or {}).get(label)
        text = label if ece is None or not np.isfinite(ece) else f"{label} (ECE {ece:.3f})"
        colour = MODEL_COLOURS[index % 2]
        curve.plot(bins.mean_predicted[filled], bins.fraction_positive[filled], marker="o", color=colour, label=text)
        centres = 0.5 * (bins.edges[:-1] + bins.edges[1:])
        bar_width = (bins.edges[1] - bins.edges[0]) / max(1, len(labels))
        offset = (index - (len(labels) - 1) / 2) * bar_width
        counts.bar(centres + offset, np.maximum(bins.count, 0), width=bar_width * 0.95, color=colour, alpha=0.8)
    curve.set_xlim(0, 1)
    curve.set_ylim(0, 1)
    curve.set_ylabel("observed fraction positive", fontsize=10)
    curve.legend(fontsize=9, loc="upper left", frameon=False)
    curve.set_title(title, fontsize=12)
    curve.tick_params(labelbottom=False)
    curve.grid(color="#DDDDDD", linewidth=0.5)
    if any(np.any(b.count > 0) for b in bins_by_label.values()):
        from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

        counts.set_yscale("log")  # most pairs are confident negatives: a linear axis hides the other bins
        counts.set_ylim(bottom=0.8)
        counts.yaxis.set_major_locator(LogLocator(base=10))
        counts.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        counts.yaxis.set_minor_formatter(NullFormatter())
    counts.set_xlabel("predicted probability", fontsize=10)
    counts.set_ylabel("pairs per bin", fontsize=9)
    figure.subplots_adjust(left=0.13, right=0.97, top=0.94, bottom=0.08)
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------- tables
PER_FINDING_COLUMNS = ("id", "name", "category", "n_pos", "n_neg", "auc", "ci_low", "ci_high", "ci_method",
                       "n_degenerate_resamples", "threshold", "n_called", "sensitivity", "sensitivity_ci_low",
                       "sensitivity_ci_high", "specificity", "specificity_ci_low", "specificity_ci_high", "ppv",
                       "ppv_ci_low", "ppv_ci_high")
#: The per-finding Markdown table: every figure with its positives, intervals in one cell.
PER_FINDING_MARKDOWN = (("name", "finding"), ("n_pos", "n pos"), ("n_neg", "n neg"), ("auc", "AUC (95% CI)"),
                        ("threshold", "threshold"), ("sensitivity", "sensitivity (95% CI)"),
                        ("specificity", "specificity (95% CI)"), ("ppv", "PPV (95% CI)"))
COMPARISON_COLUMNS = ("id", "name", "category", "auc_reference", "auc_candidate", "difference", "difference_ci_low",
                      "difference_ci_high", "n_pos", "n_neg")


def _sort_key(value) -> tuple:
    return (value is None or (isinstance(value, float) and math.isnan(value)), -(value or 0.0))


def sorted_rows(per_finding: Mapping[str, Mapping], key: str = "auc") -> list[dict]:
    """Rows ``{"id": ..., **values}`` sorted by ``key`` descending, findings without a value last."""
    rows = [{"id": fid, **values} for fid, values in per_finding.items()]
    return sorted(rows, key=lambda row: _sort_key(row.get(key)))


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_tsv(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """Tab-separated table with a header row; empty cells for missing or NaN values; 4 decimals."""
    lines = ["\t".join(columns)]
    lines += ["\t".join(_cell(row.get(c), 4).replace("\t", " ") for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def table_markdown(rows: Sequence[Mapping], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """GitHub Markdown table; "n/a" for missing values; 3 decimals."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join((_cell(row.get(c)) or "n/a").replace("|", "/") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _with_interval(row: Mapping, key: str, low_key: str, high_key: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    low, high = row.get(low_key), row.get(high_key)
    return f"{value:.3f}" + (f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else "")


def per_finding_markdown(rows: Sequence[Mapping], evaluation: Mapping) -> str:
    """The per-finding table of an evaluation as Markdown, saying which figures are held-out."""
    thresholds = evaluation.get("thresholds") or {}
    bootstrap = evaluation.get("bootstrap") or {}
    header = [f"Held-out figures on {evaluation.get('n_cases_evaluated', '?')} evaluated case(s) of "
              f"`{evaluation.get('cases_csv', '?')}`" + (f" (split {evaluation['split']})" if evaluation.get("split") else "")
              + f"; thresholds: {thresholds.get('reported_at', '?')}. Intervals: {bootstrap.get('rule', '')}.", ""]
    table = [{"name": row.get("name") or row["id"], "n_pos": row.get("n_pos"), "n_neg": row.get("n_neg"),
              "auc": _with_interval(row, "auc", "ci_low", "ci_high") + (" *" if row.get("ci_method") == "exact_extreme" else ""),
              "threshold": row.get("threshold"),
              **{k: _with_interval(row, k, f"{k}_ci_low", f"{k}_ci_high") for k in ("sensitivity", "specificity", "ppv")}}
             for row in rows]
    keys = [k for k, _ in PER_FINDING_MARKDOWN]
    return "\n".join(header) + "\n" + table_markdown(table, keys, [h for _, h in PER_FINDING_MARKDOWN]) + \
        "\n\\* interval from the exact bound at an extreme AUC (0 or 1), not the bootstrap\n"


def format_summary(evaluation: Mapping, *, top: int = 10) -> str:
    """A short plain-text summary for the terminal: mean AUC, strata, calibration, best/worst findings."""
    mean = evaluation.get("mean_auc")
    lines = [
        f"Cases evaluated: {evaluation.get('n_cases_evaluated', '?')} of {evaluation.get('n_cases', '?')}"
        + (f" ({len(evaluation['failures'])} could not be read)" if evaluation.get("failures") else ""),
        f"Mean AUC: {mean:.3f} +- {evaluation.get('std_auc') or 0.0:.3f} over "
        f"{evaluation.get('n_findings_evaluated')} findings with both classes present"
        if mean is not None else "Mean AUC: n/a (no finding has both positive and negative known labels)",
        "Strata: " + ", ".join(f"{STRATUM_LABELS[k]}: {v}" for k, v in (evaluation.get("strata") or {}).items()),
    ]
    calibration = evaluation.get("calibration") or {}
    if calibration.get("ece_before") is not None:
        after = calibration.get("ece_after")
        lines.append(f"Calibration (ECE over the {(calibration.get('bundle') or {}).get('n_findings', '?')} findings "
                     f"with positives): bundle as given {calibration['ece_before']:.3f}"
                     + (f" -> {after:.3f} with {calibration.get('method')} (T = {calibration.get('temperature'):.3f}; "
                        f"{calibration.get('after_is')})" if after is not None else ""))
    thresholds = evaluation.get("thresholds") or {}
    if thresholds.get("reported_at"):
        lines.append(f"Sensitivity / specificity / PPV below: held-out, at {thresholds['reported_at']}")
    overlap = evaluation.get("overlap") or {}
    if overlap.get("n_train") or overlap.get("n_val"):
        lines.append(f"OVERLAP: {overlap['n_train']} evaluated case(s) among the training cases, {overlap['n_val']} "
                     "among the validation cases of the bundle")
    rows = [r for r in sorted_rows(evaluation.get("per_finding") or {}) if r.get("auc") is not None]
    if rows:
        shown = rows if len(rows) <= 2 * top else rows[:top] + [None] + rows[-top:]
        lines.append("")
        lines.append(f"{'finding':<40} {'pos':>5} {'neg':>5} {'AUC':>6} {'95% CI':>13} {'sens':>5} {'spec':>5} "
                     f"{'PPV':>5}")
        for row in shown:
            if row is None:
                lines.append(f"{'...':<40}")
                continue
            ci = f"{row['ci_low']:.3f}-{row['ci_high']:.3f}" if row.get("ci_low") is not None else ""
            rates = " ".join(f"{row[k]:>5.2f}" if row.get(k) is not None else f"{'n/a':>5}"
                             for k in ("sensitivity", "specificity", "ppv"))
            lines.append(f"{_short(row.get('name') or row['id'], 40):<40} {row.get('n_pos', ''):>5} "
                         f"{row.get('n_neg', ''):>5} {row['auc']:>6.3f} {ci:>13} {rates}")
    comparison = evaluation.get("comparison")
    if comparison and comparison.get("mean_gain") is not None:
        lines.append("")
        lines.append(f"Compared with {comparison.get('reference_name')}: mean AUC gain {comparison['mean_gain']:+.3f} "
                     f"({comparison['n_improved']} findings better, {comparison['n_worse']} worse, "
                     f"{comparison['n_equal']} equal, of {comparison['n_compared']})")
    return "\n".join(lines)


def calibration_sentence(calibration: Mapping) -> str:
    """One line on calibration for cards and summaries: ECE over findings with positives, which figure
    is held-out and which in-sample, and how the probabilities are made."""
    bundle = calibration.get("bundle") or {}
    text = (f"- Calibration (ECE over the {bundle.get('n_findings', '?')} findings with positives, "
            f"{calibration.get('n_bins', 10)} equal-width bins): {format_value(calibration.get('ece_before'))} as the bundle "
            "was given (held-out)")
    if calibration.get("ece_after") is not None:
        text += (f", {format_value(calibration.get('ece_after'))} with {calibration.get('method') or 'temperature scaling'} "
                 f"(T = {format_value(calibration.get('temperature'))})"
                 + (f" fitted on the {calibration['fitted_on']}" if calibration.get("fitted_on") else "")
                 + (f" ({calibration['after_is']})" if calibration.get("after_is") else " (where fitted is not recorded)"))
    if bundle.get("ece_all_findings") is not None:
        text += f"; pooled over all {bundle.get('n_findings_all')} findings {format_value(bundle['ece_all_findings'])}"
    return text


def format_value(value, digits: int = 3) -> str:
    """A value for a report line: floats to ``digits`` places (NaN as n/a), None as n/a, booleans as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return "n/a" if value is None else str(value)
