"""The demo model (Resources/Models/demo): a self-contained, clearly synthetic bundle made by
scripts/train_demo_model.py and registered in Resources/Models.json.

(The phantom learning test, AUC >= 0.85 on held-out phantoms, is in test_pretrain.py, with the dense
pre-training that the demo's stage A uses.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from HeadCTMoLRELib.model import bundle

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "Models" / "demo"


@pytest.fixture(scope="module")
def demo_bundle():
    return bundle.load_bundle(DEMO)  # verifies every file's sha256


def test_demo_bundle_is_small_self_contained_and_labelled_synthetic(demo_bundle):
    manifest = demo_bundle.manifest
    assert manifest["synthetic_training_data"] is True
    assert "NOT FOR CLINICAL USE" in manifest["description"].upper()
    assert manifest["backbone"]["weights"]["kind"] == "bundled"  # no external folder needed
    assert demo_bundle.model_config.use_molre and demo_bundle.model_config.molre.num_experts == 6
    assert demo_bundle.model_config.backbone.lora.r == 8
    assert demo_bundle.preprocessing.alignment == "center"
    size_mb = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) / 2**20
    assert size_mb < 8, f"the demo bundle grew to {size_mb:.1f} MB"
    card = (DEMO / "model_card.md").read_text(encoding="utf-8")
    assert "ynthetic" in card
    assert manifest["training"]["demo_pipeline"]["script"] == "scripts/train_demo_model.py"


def test_shipped_demo_is_calibrated_on_other_phantoms_and_reports_held_out_figures(demo_bundle):
    """Issue 17: the shipped calibration (focal prior correction + a temperature, thresholds at 90 %
    sensitivity) was fitted on calibration phantoms and its metrics measured on OTHER, held-out phantoms."""
    manifest = demo_bundle.manifest
    calibration = manifest["calibration"]
    assert calibration["method"] == "prior_correction+temperature" and calibration["prior_correction"]
    fitted_on, metrics = calibration["fitted_on"], manifest["metrics"]
    assert metrics["figures"] == "held-out"
    assert fitted_on["cases_csv_sha256"] != metrics["evaluation"]["cases_csv_sha256"], "fitted where it is reported"
    assert metrics["evaluation"]["overlap"]["n_train"] == 0 and metrics["evaluation"]["overlap"]["n_val"] == 0
    assert metrics["ece"] <= 0.05  # over findings with positives, held-out (docs/demo_model.md)
    assert set(manifest["thresholds"]) == set(demo_bundle.catalog.ids)


def test_models_manifest_offers_the_demo_bundle():
    entries = json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))["models"]
    demo = [e for e in entries if e["id"] == "demo"]
    assert len(demo) == 1 and demo[0]["path"] == "Models/demo" and demo[0]["synthetic"] is True


def test_the_model_list_quotes_the_shipped_demos_own_held_out_figures():
    """The model list's title and description (what the Slicer module's model box shows) quote the demo's
    mean AUC and ECE as its manifest records them (held-out): a retrained demo cannot leave old figures."""
    import re

    entry = next(e for e in json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))["models"]
                 if e["id"] == "demo")
    metrics = bundle.read_manifest(REPO / "Resources" / entry["path"])["metrics"]
    assert metrics["figures"] == "held-out"
    text = entry["title"] + " " + entry["description"]
    quoted_auc = re.findall(r"mean AUC (?:of )?(\d\.\d+)", text)
    quoted_ece = re.findall(r"ECE (\d\.\d+)", text)
    assert quoted_auc and quoted_ece, text
    assert {float(a) for a in quoted_auc} == {round(metrics["mean_auc"], 2)}, (quoted_auc, metrics["mean_auc"])
    assert {float(e) for e in quoted_ece} == {round(metrics["ece"], 2)}, (quoted_ece, metrics["ece"])


# --------------------------------------------------- train_backbone (end-to-end training of the backbone)
def test_train_backbone_trains_and_bundles_the_backbone_and_resumes_exactly(tmp_path):
    import torch

    from HeadCTMoLRELib.model import backbones, classifier as model
    from HeadCTMoLRELib.training import train
    from test_data import write_toy_dataset
    from test_train import make_start_bundle, tiny_config

    csv_path = write_toy_dataset(tmp_path / "cases", 8, splits=("train", "val", "train"))
    start = make_start_bundle(tmp_path / "start")
    config = tiny_config(train_backbone=True, lr_backbone=1e-3)
    straight = train.fit(csv_path, start, tmp_path / "straight", config, cache_dir=tmp_path / "cache")
    groups = {g["name"] for g in model.param_groups(straight.model, lr_backbone=1e-3)}
    assert groups == {"heads", "adapters", "backbone"}
    assert not any(name.startswith("encoder.") and "lora_" not in name for name in model.trainable_state_dict(straight.model))
    before = backbones.base_state_dict(bundle.build_model(bundle.load_bundle(start)).encoder)
    saved = bundle.load_bundle(straight.bundle_path)
    assert saved.manifest["backbone"]["weights"]["kind"] == "bundled"
    after = backbones.base_state_dict(bundle.build_model(saved).encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the backbone did not change"

    calls = {"n": 0}

    def stop_on_fourth_check():
        calls["n"] += 1
        return calls["n"] == 4

    assert train.fit(csv_path, start, tmp_path / "resumed", config, cache_dir=tmp_path / "cache",
                     should_stop=stop_on_fourth_check).status == "cancelled"
    resumed = train.fit(csv_path, start, tmp_path / "resumed", config, cache_dir=tmp_path / "cache", resume=True)
    a, b = backbones.base_state_dict(straight.model.encoder), backbones.base_state_dict(resumed.model.encoder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(train.TrainError):  # a frozen-backbone resume of a train_backbone checkpoint is refused
        train.fit(csv_path, start, tmp_path / "resumed", tiny_config(), cache_dir=tmp_path / "cache", resume=True)


# ------------------------------------------------------------------ the demo training script, at toy size
def test_demo_training_script_runs_both_stages_and_evaluates(tmp_path):
    """scripts/train_demo_model.py end to end with tiny numbers (one to three minutes, load-sensitive):
    stage A on phantom slices, stage B on other phantoms from the stage-A head, the calibration fitted on
    fresh calibration phantoms and the figures measured on held-out ones, the calibrated copy written."""
    import subprocess
    import sys

    out, work = tmp_path / "demo", tmp_path / "work"
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_demo_model.py"), "--out", str(out), "--work", str(work),
         "--n-pretrain", "8", "--n-pretrain-val", "4", "--n-train", "40", "--stage-a-steps", "20",
         "--curriculum-minutes", "1", "--n-curriculum", "6", "--curriculum-steps", "10",
         "--stage-b-minutes", "1.0", "--evaluate", "10", "--calibrate", "10", "--eval-seed", "77"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    trained = bundle.load_bundle(out)
    pipeline = trained.manifest["training"]["demo_pipeline"]
    assert pipeline["stage_a"]["steps_run"] == 20 and pipeline["stage_a"]["status"] == "completed"
    assert pipeline["stage_a"]["phantoms"] == {"train": 8, "val": 4, "seeds": [2024, 3024], "prevalence": 0.2,
                                               "focus": {f: 0.4 for f in ("chronic_subdural_hematoma",
                                                                          "lacunar_infarct", "venous_sinus_thrombosis")},
                                               "train_render_spacing_mm": 1.75,
                                               "seconds": pipeline["stage_a"]["phantoms"]["seconds"]}
    curriculum = pipeline["stage_a"]["curriculum"]
    assert curriculum["findings"] == ["chronic_subdural_hematoma", "lacunar_infarct", "venous_sinus_thrombosis"]
    assert curriculum["steps_run"] == 10 and curriculum["phantoms"] == {"train": 6, "val": 4, "seeds": [4024, 5024]}
    assert curriculum["prevalence"] == 0.5 and "stage A curriculum (focus findings alone) step 10" in completed.stderr
    assert trained.model_config.backbone.size == "demo" and trained.manifest["backbone"]["weights"]["kind"] == "bundled"
    assert trained.model_config.pooling == "per_finding" and pipeline["stage_b"]["pooling"] == "per_finding"
    assert pipeline["stage_a"]["patch_stem"] == "conv", "the default stage-A stem is recorded"
    assert trained.manifest["backbone"]["transformers_config"]["patch_stem"] == "conv", "and reaches the bundle"
    assert (work / "evaluation" / "evaluation.json").is_file() and (out / "model_card.md").is_file()
    assert "held-out phantoms (seed 77" in completed.stderr
    assert (work / "trained" / "manifest.json").is_file(), "the uncalibrated bundle stays in the work folder"
    manifest = bundle.read_manifest(out)
    fitted_on = manifest["calibration"]["fitted_on"]
    assert fitted_on["cases_csv"] == "labels.csv" and fitted_on["n_cases"] == 10  # the calibration phantoms
    assert manifest["calibration"]["prior_correction"] is not None, "the focal prior correction is kept"
    assert manifest["metrics"]["figures"] == "held-out" and manifest["thresholds"]
    held_out = json.loads((work / "evaluation" / "evaluation.json").read_text(encoding="utf-8"))
    assert held_out["fit_cases"]["n_cases"] == 10 and held_out["overlap"]["n_train"] == 0
    timings = pipeline["timings_s"]
    assert timings["cpu_s"] > 0 and timings["total_s"] > 0 and "load_average_1min_at_end" in timings
    shipped = json.dumps(bundle.read_manifest(out))
    assert str(tmp_path) not in shipped, "a folder of the making machine is in the manifest"
    assert bundle.read_manifest(out)["training"]["cases_csv"] == "labels.csv"  # recorded by name only (portable)
