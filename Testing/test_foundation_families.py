"""The paper's native foundation families go through the same commands as the others: convert-weights,
new-model, info, infer, train, fine-tune, evaluate (tiny configs, no download, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from HeadCTMoLRELib import cli
from HeadCTMoLRELib.model import backbones, bundle

from test_data import write_toy_dataset

PARITY = Path(__file__).parent / "Data" / "parity"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def toy_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-families")
    return write_toy_dataset(root / "cases", 6, splits=("train", "val", "train")), root / "cache"


def through_every_command(capsys, tmp_path, toy_cases, family, image_size, model_type, fine_tune=()):
    """convert-weights (the parity fixture's tiny weights), new-model, info, infer, train, fine-tune, evaluate;
    returns the trained and the fine-tuned bundle."""
    cases_csv, cache = toy_cases
    fixture = PARITY / family / "tiny" / "state_dict.safetensors"
    converted = tmp_path / f"{family}-tiny"
    code, out, err = run(capsys, "convert-weights", fixture, "--family", family, "--size", "tiny", "--out", converted)
    assert code == 0, err
    assert "kept" in out and (converted / "model.safetensors").is_file()
    code, _, err = run(capsys, "convert-weights", fixture, "--family", family, "--size", "tiny", "--out", converted)
    assert code == 2 and "already exists" in err

    start = tmp_path / "start"
    code, out, err = run(capsys, "new-model", "--backbone", family, "--size", "tiny", "--image-size", image_size,
                         "--alignment", "none", "--backbone-path", converted, "--out", start)
    assert code == 0, err
    manifest = bundle.read_manifest(start)
    assert manifest["backbone"]["weights"]["kind"] == "external"
    assert manifest["backbone"]["transformers_config"]["model_type"] == model_type
    assert manifest["model"]["backbone"]["family"] == family
    code, out, _ = run(capsys, "info", start, "--verify")
    assert code == 0 and f"{family} tiny" in out and "All file hashes verified" in out

    case = cases_csv.parent / "case_00.nii.gz"
    code, out, err = run(capsys, "infer", case, "--model", start, "--device", "cpu", "--json")
    assert code == 0, err
    assert len(json.loads(out)["findings"]) == 75
    code, _, err = run(capsys, "infer", case, "--model", start, "--device", "cpu", "--out", tmp_path / "maps")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "maps").iterdir()} >= {"findings.tsv", "attention.nrrd", "experts.nrrd"}

    common = ["--cases", cases_csv, "--epochs", 1, "--min-epochs", 1, "--batch-size", 2, "--device", "cpu",
              "--precision", "fp32", "--cache", cache, "--workers", 0, "--no-augment"]
    code, _, err = run(capsys, "train", "--model", start, "--out", tmp_path / "run", *common)
    assert code == 0, err
    trained = bundle.load_bundle(tmp_path / "run" / "model")
    assert trained.manifest["training"]["epochs_run"] == 1
    code, _, err = run(capsys, "fine-tune", "--model", tmp_path / "run" / "model", "--out", tmp_path / "ft",
                       *fine_tune, *common)
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", "--cases", cases_csv, "--model", tmp_path / "ft" / "model",
                         "--out", tmp_path / "eval", "--device", "cpu", "--cache", cache, "--json",
                         "--bootstrap", 10)
    assert code == 0, err
    assert "per_finding" in json.loads(out)
    return trained, bundle.load_bundle(tmp_path / "ft" / "model")


def test_medimageinsight_from_converted_weights_through_every_command(capsys, tmp_path, toy_cases):
    through_every_command(capsys, tmp_path, toy_cases, "medimageinsight", 32, "medimageinsight_davit")


def test_medimageinsight_defaults_to_its_own_input_size(capsys, tmp_path):
    code, _, err = run(capsys, "new-model", "--backbone", "medimageinsight", "--size", "tiny", "--out", tmp_path / "b")
    assert code == 0, err
    manifest = bundle.read_manifest(tmp_path / "b")
    assert manifest["preprocessing"]["image_size"] == 480 and manifest["model"]["backbone"]["image_size"] == 480


def test_pillar0_from_converted_weights_through_every_command(capsys, tmp_path, toy_cases):
    """Pillar0 (tiny Atlas, the parity fixture's weights): frozen + LoRA + MoLRE with `train`, then the
    paper's fully fine-tuned + MoLRE with `fine-tune --train-backbone`; one routing decision per volume."""
    trained, tuned = through_every_command(capsys, tmp_path, toy_cases, "pillar0", 64, "pillar0_atlas",
                                           fine_tune=["--train-backbone"])
    assert not trained.manifest["training"]["config"]["train_backbone"]
    assert tuned.manifest["training"]["config"]["train_backbone"]
    assert tuned.manifest["backbone"]["weights"]["kind"] != "external"  # fine-tuned weights travel with the bundle
    usage = trained.manifest["training"]["history"][-1]["expert_usage"]  # mean gate per routed volume
    assert len(usage) == 6 and abs(sum(usage) - 1) < 1e-5


def test_pillar0_headct_bundles_get_the_eleven_windows_and_geometry(capsys, tmp_path):
    """new-model --size headct writes Pillar-0's preprocessing (11 channels in the reference's order,
    128 x 256 x 256, -1 HU outside); only the bundle is made (the real-size model is built on random weights)."""
    pre = backbones.default_preprocessing("pillar0", "headct")
    assert len(pre["windows_hu"]) == 11 and pre["windows_hu"][-1] == "minmax"
    assert pre["windows_hu"][0] == (-1350.0, 150.0) and pre["windows_hu"][5] == (0.0, 80.0)  # lung, brain
    assert (pre["num_slices"], pre["image_size"], pre["outside_hu"]) == (128, 256, -1.0)
    assert backbones.default_preprocessing("dinov3", "tiny") == {} and backbones.default_preprocessing("pillar0", "tiny") == {}


def test_pillar0_eleven_windows_new_model_and_infer_on_the_sample(capsys, tmp_path):
    """The headct input path at the tiny size (tiny-11: 11 input channels): new-model writes the 11 windows
    and the model's depth; infer on the shipped sample runs them through the Atlas encoder."""
    sample = Path(__file__).resolve().parents[1] / "Resources" / "Samples" / "GE_head_axial_1x1x5mm.nii.gz"
    code, _, err = run(capsys, "new-model", "--backbone", "pillar0", "--size", "tiny-11", "--random-backbone",
                       "--alignment", "center", "--out", tmp_path / "b")
    assert code == 0, err
    pre = bundle.read_manifest(tmp_path / "b")["preprocessing"]
    assert pre["windows_hu"] == [list(w) for w in backbones.PILLAR0_WINDOWS_HU[:-1]] + ["minmax"]
    assert (pre["num_slices"], pre["image_size"], pre["outside_hu"]) == (32, 64, -1.0)
    code, out, err = run(capsys, "infer", sample, "--model", tmp_path / "b", "--device", "cpu", "--json")
    assert code == 0, err
    findings = json.loads(out)["findings"]
    assert len(findings) == 75


def test_pillar0_defaults_to_its_own_volume(capsys, tmp_path):
    code, _, err = run(capsys, "new-model", "--backbone", "pillar0", "--size", "tiny", "--random-backbone",
                       "--out", tmp_path / "b")
    assert code == 0, err
    manifest = bundle.read_manifest(tmp_path / "b")  # the tiny size fixes its 32 x 64 x 64 volume
    assert manifest["preprocessing"]["image_size"] == 64 and manifest["model"]["backbone"]["image_size"] == 64
    assert backbones.default_image_size("pillar0", "headct") == backbones.default_image_size("pillar0") == 256
