"""Honest labels: a synthetic, untrained or random-backbone bundle says so on every output path (terminal table,
JSON, TSV, info), `new-model` refuses a silent random backbone and `train` a random frozen one."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from HeadCTMoLRELib import cli
from HeadCTMoLRELib.model import bundle
from HeadCTMoLRELib.model.status import bundle_status

REAL_NIFTI = "real/derived/GE_head_axial_1x1x5mm.nii.gz"


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from HeadCTMoLRELib.slicer.selftest import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("status") / "tiny")


def test_status_of_demo_new_and_trained_manifests(tiny):
    demo = bundle.read_manifest(cli.default_demo_model())
    status = bundle_status(demo)
    assert status.synthetic and not status.untrained and not status.random_backbone
    assert status.label.startswith("SYNTHETIC MODEL")
    fresh = bundle_status(bundle.read_manifest(tiny))
    assert fresh.untrained and fresh.random_backbone and "UNTRAINED + RANDOM BACKBONE" in fresh.label
    real = copy.deepcopy(demo)
    real["synthetic_training_data"] = False
    real["training"]["synthetic_training_data"] = False
    real["model"]["backbone"]["source"] = "/models/dinov3-vitb16"
    assert bundle_status(real).label == "" and bundle_status(real).warnings == ()
    real["training"]["epochs_run"] = 0  # a run that stopped before its first epoch trained nothing
    assert bundle_status(real).untrained
    scratch = copy.deepcopy(bundle.read_manifest(tiny))
    scratch["training"] = {"epochs_run": 3, "config": {"train_backbone": True}}
    assert not bundle_status(scratch).random_backbone  # a backbone trained from scratch is not random any more


def test_every_infer_output_of_an_untrained_bundle_carries_the_label(capsys, tmp_path, tiny, test_data):
    code, out, _ = run(capsys, "infer", str(test_data / REAL_NIFTI), "--model", str(tiny), "--device", "cpu",
                       "--out", str(tmp_path / "o"), "--top", "3")
    assert code == 0 and out.lstrip("!\n ").startswith("UNTRAINED") and out.count("UNTRAINED + RANDOM BACKBONE") >= 2
    rows = list(csv.DictReader(open(tmp_path / "o" / "findings.tsv"), delimiter="\t"))
    assert len(rows) == 75 and all(r["model_status"].startswith("UNTRAINED") for r in rows)
    saved = json.loads((tmp_path / "o" / "findings.json").read_text())
    assert saved["model_status"]["untrained"] and saved["model_status"]["random_backbone"]
    code, out, _ = run(capsys, "infer", str(test_data / REAL_NIFTI), "--model", str(tiny), "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["model_status"]["label"].startswith("UNTRAINED")


def test_demo_bundle_is_labelled_synthetic_in_infer_and_info(capsys, test_data):
    code, out, _ = run(capsys, "infer", str(test_data / REAL_NIFTI), "--model", str(cli.default_demo_model()),
                       "--device", "cpu", "--top", "3")
    assert code == 0 and "SYNTHETIC MODEL" in out.splitlines()[1]
    code, out, _ = run(capsys, "demo", "--device", "cpu", "--no-phantom", "--json")
    assert code == 0 and json.loads(out)["model_status"]["synthetic"] is True  # at the top, not only nested
    code, out, _ = run(capsys, "info", str(cli.default_demo_model()))
    assert code == 0 and "SYNTHETIC MODEL" in out
    code, out, _ = run(capsys, "info", str(cli.default_demo_model()), "--json")
    assert json.loads(out)["model_status"]["synthetic"] is True


def test_new_model_refuses_a_silent_random_backbone_for_a_real_size(capsys, tmp_path):
    code, _, err = run(capsys, "new-model", "--backbone", "dinov3", "--size", "large", "--out", str(tmp_path / "m"))
    assert code == 2 and "--backbone-path" in err and "--random-backbone" in err
    assert not (tmp_path / "m").exists()


def test_train_refuses_a_random_frozen_backbone_before_any_work(capsys, tmp_path, tiny):
    code, _, err = run(capsys, "train", "--cases", str(tmp_path / "never_read.csv"), "--model", str(tiny),
                       "--out", str(tmp_path / "run"))
    assert code == 2 and "randomly initialised" in err and "--train-backbone" in err
    assert not (tmp_path / "run").exists()


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    from HeadCTMoLRELib import __version__

    assert capsys.readouterr().out.strip() == f"headct-molre {__version__}"
