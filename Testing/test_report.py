"""Report: PNG plots are written and show something, tables sort and format, the model card is complete."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from HeadCTMoLRELib import findings, metrics
from HeadCTMoLRELib.evaluation import report
from HeadCTMoLRELib.evaluation.model_card import model_card

nan = math.nan


def _assert_png_has_content(path, min_ink_fraction=0.01):
    from matplotlib.image import imread

    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(str(path))[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    ink = np.mean(np.any(pixels < 0.9, axis=-1))  # not near-white
    assert ink > min_ink_fraction, f"{path.name} is (nearly) blank: {ink:.4f} of pixels drawn"
    packed = (np.round(pixels * 255).astype(np.int64) * np.array([65536, 256, 1])).sum(axis=-1)
    assert np.unique(packed).size > 10  # colours, not one flat fill


@pytest.fixture(scope="module")
def catalog():
    return findings.default_catalog()


def _random_aucs(n, seed, missing=0.3):
    rng = np.random.default_rng(seed)
    aucs = rng.uniform(0.55, 1.0, n)
    aucs[rng.random(n) < missing] = nan
    return aucs


def test_radar_plot_of_two_models_is_written_and_not_blank(tmp_path, catalog):
    path = report.radar_plot(tmp_path / "radar.png", catalog,
                             {"LoRA-only": _random_aucs(len(catalog), 0), "MoLRE": _random_aucs(len(catalog), 1)})
    _assert_png_has_content(path)


def test_radar_plot_survives_all_nan_and_auc_below_one_half(tmp_path, catalog):
    aucs = np.full(len(catalog), nan)
    _assert_png_has_content(report.radar_plot(tmp_path / "empty.png", catalog, {"untrained": aucs}))
    aucs[:5] = [0.0, 0.2, 0.5, 0.9, 1.0]
    _assert_png_has_content(report.radar_plot(tmp_path / "low.png", catalog, {"m": aucs}))


def test_strata_bar_chart_for_one_and_two_models(tmp_path):
    one = report.strata_bar_chart(tmp_path / "one.png", {"MoLRE": {"auc_ge_0.90": 40, "auc_0.80_0.90": 20,
                                                                   "auc_lt_0.80": 15}})
    two = report.strata_bar_chart(tmp_path / "two.png", {"LoRA": metrics.stratify(_random_aucs(75, 2)),
                                                         "MoLRE": metrics.stratify(_random_aucs(75, 3))})
    _assert_png_has_content(one)
    _assert_png_has_content(two)


def test_reliability_diagram_before_and_after(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random((500, 4))
    y = (rng.random(p.shape) < p ** 2).astype(float)
    bins = {"before": metrics.reliability_bins(p, y), "after": metrics.reliability_bins(p ** 2, y)}
    eces = {k: metrics.expected_calibration_error(p if k == "before" else p ** 2, y) for k in bins}
    _assert_png_has_content(report.reliability_diagram(tmp_path / "rel.png", bins, eces))


def test_plots_never_import_pyplot(tmp_path):
    # pyplot's global figure state leaks between plots and can open windows inside Slicer
    code = (
        "import sys, numpy as np\n"
        "from HeadCTMoLRELib import findings, metrics\n"
        "from HeadCTMoLRELib.evaluation import report\n"
        f"out = {str(tmp_path)!r}\n"
        "c = findings.default_catalog()\n"
        "report.radar_plot(out + '/r.png', c, {'m': np.linspace(0.5, 1, len(c))})\n"
        "report.strata_bar_chart(out + '/s.png', {'m': {'auc_ge_0.90': 1}})\n"
        "report.reliability_diagram(out + '/d.png', {'m': metrics.reliability_bins([[0.2]], [[1]])})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    import HeadCTMoLRELib

    library = str(__import__("pathlib").Path(HeadCTMoLRELib.__file__).parent.parent)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": library, "MPLBACKEND": "", "PATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------- tables
def test_tables_sort_by_auc_with_missing_last_and_empty_cells():
    per_finding = {"a": {"auc": 0.7, "n_pos": 3}, "b": {"auc": None, "n_pos": 0}, "c": {"auc": 0.95, "n_pos": 5}}
    rows = report.sorted_rows(per_finding)
    assert [r["id"] for r in rows] == ["c", "a", "b"]
    tsv = report.table_tsv(rows, ("id", "auc", "n_pos")).splitlines()
    assert tsv[0] == "id\tauc\tn_pos"
    assert tsv[1] == "c\t0.9500\t5" and tsv[3] == "b\t\t0"
    markdown = report.table_markdown(rows, ("id", "auc"))
    assert "| b | n/a |" in markdown and markdown.splitlines()[1] == "|---|---|"


def test_terminal_summary_states_mean_auc_strata_and_comparison():
    evaluation = {"mean_auc": 0.85, "std_auc": 0.05, "n_findings_evaluated": 2, "n_cases": 10, "n_cases_evaluated": 9,
                  "failures": [{"path": "x", "reason": "y"}],
                  "strata": {"auc_ge_0.90": 1, "auc_0.80_0.90": 0, "auc_lt_0.80": 1},
                  "calibration": {"ece_before": 0.2, "ece_after": 0.05, "temperature": 1.5},
                  "per_finding": {"a": {"name": "A", "auc": 0.9, "ci_low": 0.8, "ci_high": 1.0, "n_pos": 2, "n_neg": 7}},
                  "comparison": {"reference_name": "base", "mean_gain": 0.02, "n_improved": 1, "n_worse": 0,
                                 "n_equal": 1, "n_compared": 2}}
    text = report.format_summary(evaluation)
    assert "Mean AUC: 0.850 +- 0.050 over 2 findings" in text
    assert "1 could not be read" in text and "AUC >= 0.90: 1" in text
    assert "bundle as given 0.200 -> 0.050" in text and "mean AUC gain +0.020" in text


# ------------------------------------------------------------------------------------------ model card
def _manifest(catalog, **overrides):
    manifest = {
        "name": "demo", "description": "tiny test model", "created": "2026-01-01T00:00:00+00:00",
        "intended_use": "Research use only.", "synthetic_training_data": True,
        "findings": catalog.to_dict(),
        "preprocessing": {"num_slices": 40, "slice_spacing_mm": 4.0, "image_size": 224, "in_plane_fov_mm": 224.0,
                          "windows_hu": [[0, 80]], "alignment": "template"},
        "model": {"backbone": {"family": "dinov3", "size": "small", "image_size": 224,
                               "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "attention"}},
                  "num_findings": len(catalog), "use_molre": True,
                  "molre": {"num_experts": 6, "rank": 8, "router_hidden": 256}},
        "backbone": {"weights": {"kind": "bundled", "origin": "random initialisation"}},
        "parameters": {"total": 1000, "trainable": 100},
        "training": {"train_cases": 120, "val_cases": 30, "epochs": 20, "loss": "focal", "focal_gamma": 2.0,
                     "optimizer": {"name": "AdamW", "lr_heads": 1e-3}},
        "temperature": 1.3,
    }
    manifest.update(overrides)
    return manifest


REQUIRED_SECTIONS = ("## Summary", "## Intended use", "## Limitations", "## Results by category", "## Evaluation",
                     "## Training data", "## How to cite", "## License", "## Per-finding results")


def _evaluation():
    return {"mean_auc": 0.912, "std_auc": 0.04, "n_findings_evaluated": 2, "n_cases": 50,
            "n_cases_evaluated": 49, "strata": {"auc_ge_0.90": 1, "auc_0.80_0.90": 1, "auc_lt_0.80": 0},
            "calibration": {"ece_before": 0.11, "ece_after": 0.03, "temperature": 1.3, "n_bins": 10},
            "thresholds": {"target_sensitivity": 0.9, "fitted_on": "fit cases"}, "synthetic_cases": True,
            "figures": "held-out",
            "per_finding": {"epidural_hematoma": {"name": "Epidural hematoma", "category": "Hemorrhage", "auc": 0.95,
                                                  "ci_low": 0.9, "ci_high": 0.99, "n_pos": 5, "n_neg": 44},
                            "subdural_hematoma": {"name": "Acute subdural hematoma", "category": "Hemorrhage",
                                                  "auc": 0.87, "n_pos": 4, "n_neg": 45}}}


def test_model_card_has_every_required_section_and_the_facts(catalog):
    card = model_card(_manifest(catalog), _evaluation())
    positions = [card.index(section) for section in REQUIRED_SECTIONS]
    assert positions == sorted(positions), "sections out of the reading order"
    assert "## Training protocol" in card and "## Training record" in card
    assert "Research use only, not for clinical use" in card
    assert "synthetic" in card.lower() and "Not for clinical use" in card and "SYNTHETIC MODEL" in card
    assert "dinov3 (small)" in card and "MoLRE K=6 experts" in card and "total 1,000; trainable 100 (10.0%)" in card
    assert "train_cases: 120" in card and "optimizer.name: AdamW" in card
    assert "| Evaluation | mean AUC 0.912 ± 0.040 over 2 of 75 findings, 49 cases, held-out; synthetic phantoms |" in card
    assert "Mean AUC: 0.912" in card and "AUC >= 0.90: 1" in card and "0.110 as the bundle was given (held-out), 0.030" in card
    assert "| Hemorrhage | 2 of " in card  # per category: findings evaluated of the catalog's
    assert "| Epidural hematoma | Hemorrhage | 5 | 44 | 0.950 | 0.900-0.990 |" in card
    assert "73 of the catalog's findings were not evaluated" in card
    assert "fitted on the fit cases, separate from the cases reported" in card
    assert "arXiv:2603.00675" in card and "Apache-2.0" in card


def test_model_card_reads_in_two_minutes_however_long_the_training_record(catalog):
    history = [{"epoch": e, "train_loss": 0.1, "val_auc": {fid: 0.7 for fid in catalog.ids}} for e in range(40)]
    training = {"train_cases": 120, "val_cases": 30, "epochs_run": 40, "history": history,
                "counts": {"train": 120, "val": 30, "train_positives": {fid: 3 for fid in catalog.ids}},
                "note": "x" * 5000, "config": {"lr_heads": 1e-3, "lr_adapters": 1e-4, "seed": 7}}
    evaluation = _evaluation()
    evaluation["per_finding"] = {fid: {"auc": 0.8, "n_pos": 4, "n_neg": 40} for fid in catalog.ids}
    card = model_card(_manifest(catalog, training=training), evaluation)
    lines = card.splitlines()
    assert max(len(line) for line in lines) <= 400, max(lines, key=len)[:200]
    assert "- history: 40 entries" in card and "- counts.train_positives: 75 entries" in card
    summary = card[:card.index("## Per-finding results")]
    assert len(summary.splitlines()) < 120, "the part before the long tables must stay short"
    assert "| train pos |" in card and "learning rates: heads 0.001, adapters 0.0001" in card


def test_model_card_says_when_thresholds_are_in_sample(catalog):
    evaluation = _evaluation()
    evaluation["thresholds"]["fitted_on"] = "evaluated cases (in-sample)"
    assert "are optimistic" in model_card(_manifest(catalog), evaluation)


def test_model_card_of_untrained_unevaluated_bundle_says_so(catalog):
    card = model_card(_manifest(catalog, training=None, synthetic_training_data=None, metrics=None))
    for section in REQUIRED_SECTIONS:
        assert section in card
    assert "No training provenance is recorded" in card
    assert "No evaluation is recorded" in card
    assert "LoRA-only" not in card


def test_model_card_reads_metrics_written_back_into_the_manifest(catalog):
    stored = {"mean_auc": 0.8, "evaluation": {"mean_auc": 0.8, "std_auc": 0.1, "n_findings_evaluated": 1,
                                              "strata": {"auc_0.80_0.90": 1},
                                              "per_finding_auc": {"epidural_hematoma": 0.8}}}
    manifest = _manifest(catalog, metrics=stored)
    manifest["model"]["use_molre"] = False
    card = model_card(manifest)
    assert "Mean AUC: 0.800" in card and "| Epidural hematoma | Hemorrhage | 0.800 |" in card
    assert "LoRA-only baseline" in card
