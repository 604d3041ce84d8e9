"""`headct-molre compare` at tiny sizes on toy cases: both arms per backbone, Table 2 / figures / JSON, resume."""

from __future__ import annotations

import json

import pytest

from HeadCTMoLRELib import cli

from test_data import write_toy_dataset


@pytest.mark.slow
def test_compare_tiny_backbones_writes_table2_and_resumes(tmp_path, capsys):
    cases = write_toy_dataset(tmp_path / "cases", 6, splits=("train", "val", "test"))
    argv = ["compare", "--cases", str(cases), "--backbones", "dinov3:tiny,medimageinsight:tiny,deepcntd",
            "--out", str(tmp_path / "out"), "--epochs", "1", "--min-epochs", "1", "--batch-size", "2",
            "--device", "cpu", "--precision", "fp32", "--image-size", "32", "--bootstrap", "20",
            "--cache", str(tmp_path / "cache"), "--no-augment"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "plan:" in captured.err and "not available: DeepCNTD" in captured.err
    out = tmp_path / "out"
    result = json.loads((out / "table2.json").read_text())
    assert [r["backbone"] for r in result["backbones"]] == ["dinov3-tiny", "medimageinsight-tiny"]
    for row in result["backbones"]:
        assert row["arms"]["lora"]["parameters"]["molre"] == 0 and row["arms"]["molre"]["parameters"]["molre"] > 0
        assert row["arms"]["lora"]["parameters"]["total"] < row["arms"]["molre"]["parameters"]["total"]
    assert result["evaluated_split"] == "test"
    for name in ("table2.md", "fig2_strata.png", "fig3_radar_dinov3-tiny.png", "fig3_radar_medimageinsight-tiny.png"):
        assert (out / name).is_file()
    assert "DeepCNTD | not available" in (out / "table2.md").read_text()
    stamp = (out / "dinov3-tiny" / "molre" / "run" / "compare_done.json").stat().st_mtime
    assert cli.main(argv) == 0  # resumes: finished arms are not trained again
    assert (out / "dinov3-tiny" / "molre" / "run" / "compare_done.json").stat().st_mtime == stamp


def test_compare_accepts_pillar0_headct_and_fine_tunes_it_in_full(tmp_path):
    from HeadCTMoLRELib.evaluation import compare
    from HeadCTMoLRELib.training.train import TrainConfig

    (tmp_path / "pillar0-headct").mkdir()
    choices, notes = compare.parse_backbones("pillar0:headct,medimageinsight:tiny,deepcntd", tmp_path)
    assert [(c.family, c.size, c.folder) for c in choices] == [
        ("pillar0", "headct", tmp_path / "pillar0-headct"), ("medimageinsight", "tiny", None)]
    assert notes == [compare.NOT_AVAILABLE["deepcntd"]]
    config = TrainConfig(max_epochs=2, batch_size=2)
    rows = compare.plan(choices, 10, config)  # parameters counted on the meta device
    assert rows[0]["protocol"] == "fully fine-tuned" and rows[1]["protocol"] == "frozen + LoRA"
    assert rows[0]["backbone_parameters"] == 115_903_424
    assert rows[0]["weight_memory_gb"] == round(115_903_424 * 16 / 1e9, 2)  # weights, gradients, AdamW moments
    assert compare.arm_config(choices[0], config).train_backbone
    assert not compare.arm_config(choices[0], config, frozen_backbones=True).train_backbone
    assert not compare.arm_config(choices[1], config).train_backbone
    with pytest.raises(compare.CompareError, match="no weights folder"):
        compare.parse_backbones("pillar0:headct", tmp_path / "elsewhere")
