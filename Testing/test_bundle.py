"""Model bundles: round trip, self-description, and every refusal (changed, missing, extra, pickle,
unknown version, edited catalog, unknown preprocessing, moved or altered external backbone)."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch

from bundle_fixtures import edit_manifest, make_bundle, make_classifier
from HeadCTMoLRELib.model import backbones, bundle, classifier as model
from HeadCTMoLRELib.ct import preprocess


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_bundle, target)
    return target


def _inputs(image_size=32, slices=6):
    torch.manual_seed(123)
    pixels = torch.rand(1, slices, 3, image_size, image_size)
    mask = torch.ones(1, slices, dtype=torch.bool)
    mask[0, -1] = False
    return pixels, mask


def test_round_trip_reproduces_the_saved_model_outputs_exactly(tmp_path):
    classifier, catalog = make_classifier()
    pre = preprocess.PreprocessConfig(image_size=32, alignment="center")
    path = bundle.save_bundle(classifier, tmp_path / "b", catalog=catalog, preprocessing=pre)
    loaded = bundle.load_bundle(path)
    rebuilt = bundle.build_model(loaded)
    pixels, mask = _inputs()
    saved, reloaded = classifier.state_dict(), rebuilt.state_dict()
    assert set(saved) == set(reloaded) and all(torch.equal(saved[k], reloaded[k]) for k in saved)  # bit for bit
    with torch.no_grad():
        expected = classifier(pixels, mask)
        actual = rebuilt(pixels, mask)
    # The same weights give the same outputs up to a few float32 ulps: the reloaded tensors live at other memory
    # alignments (one safetensors buffer), and on some CPUs (AMD EPYC here) the vectorised kernels then round
    # differently (measured: 1.2e-7 at most).
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual.router_weights, expected.router_weights, rtol=1e-6, atol=1e-6)
    assert loaded.catalog.version == catalog.version
    assert loaded.preprocessing == pre
    assert loaded.model_config == classifier.config


def test_manifest_describes_the_model_fully(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format"] == bundle.FORMAT_NAME and manifest["format_version"] == bundle.FORMAT_VERSION
    assert len(manifest["findings"]["findings"]) == 75 and manifest["findings"]["version"]
    assert manifest["preprocessing"]["windows_hu"] == [[0, 80], [-20, 180], [-800, 2000]]
    assert manifest["model"]["molre"] == {"num_experts": 6, "rank": 8, "router_hidden": 256, "load_balance_weight": 0.0}
    assert manifest["model"]["backbone"]["lora"]["r"] == 8 and manifest["model"]["backbone"]["lora"]["alpha"] == 16
    assert manifest["backbone"]["weights"]["kind"] == "bundled"
    assert manifest["backbone"]["transformers_config"]["hidden_size"] == 64
    assert set(manifest["parameters"]) >= {"total", "trainable", "molre"}
    assert manifest["parameters"]["molre"] == 6 * 17 * 64 + 65 * 256 + 257 * 6
    assert list(manifest["thresholds"]) == [row["id"] for row in manifest["findings"]["findings"]]
    assert set(manifest["files"]) == {bundle.ADAPTERS_FILE, bundle.BACKBONE_FILE}
    assert "Research use only" in manifest["intended_use"]


def test_bundle_files_are_readable_by_other_users(tiny_bundle):
    for path in [tiny_bundle, *tiny_bundle.rglob("*")]:
        assert path.stat().st_mode & stat.S_IROTH, path


def test_describe_names_backbone_adapters_findings_and_preprocessing(tiny_bundle):
    text = bundle.describe(bundle.read_manifest(tiny_bundle))
    for expected in ("dinov3 tiny at 32 px", "LoRA r=8 alpha=16", "MoLRE K=6", "Findings: 75", "Hemorrhage 12",
                     "40 slices of 4.0 mm", "weights/adapters.safetensors"):
        assert expected in text


def test_changed_weight_file_is_refused(bundle_copy):
    path = bundle_copy / bundle.ADAPTERS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(bundle.BundleError, match="adapters.safetensors has changed"):
        bundle.load_bundle(bundle_copy)


def test_missing_weight_file_is_refused(bundle_copy):
    (bundle_copy / bundle.BACKBONE_FILE).unlink()
    with pytest.raises(bundle.BundleError, match="backbone.safetensors listed in the manifest is missing"):
        bundle.load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["weights/pytorch_model.bin", "extra.pt", "model.pkl"])
def test_pickle_files_in_a_bundle_are_refused(bundle_copy, name):
    (bundle_copy / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(bundle.BundleError, match="pickle"):
        bundle.load_bundle(bundle_copy)


def test_unlisted_safetensors_file_is_refused(bundle_copy):
    shutil.copy(bundle_copy / bundle.ADAPTERS_FILE, bundle_copy / "weights" / "other.safetensors")
    with pytest.raises(bundle.BundleError, match="not listed in the manifest"):
        bundle.load_bundle(bundle_copy)


def _edit_manifest(folder, edit):
    """A re-sealed edit: reaches the checks behind the manifest digest (test_hostile_inputs covers hand edits)."""
    edit_manifest(folder, edit, reseal=True)


def test_unknown_format_version_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(bundle.BundleError, match="format version 99 is not supported"):
        bundle.load_bundle(bundle_copy)


def test_edited_catalog_is_refused(bundle_copy):
    def swap_first_two(m):
        rows = m["findings"]["findings"]
        rows[0], rows[1] = rows[1], rows[0]
    _edit_manifest(bundle_copy, swap_first_two)
    with pytest.raises(bundle.BundleError, match="catalog"):
        bundle.load_bundle(bundle_copy)


def test_preprocessing_this_code_cannot_honour_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m["preprocessing"].update(spline_magic=True))
    with pytest.raises(bundle.BundleError, match="preprocessing cannot be honoured"):
        bundle.load_bundle(bundle_copy)


def test_thresholds_for_unknown_findings_are_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m["thresholds"].update(not_a_finding=0.3))
    with pytest.raises(bundle.BundleError, match="not_a_finding"):
        bundle.load_bundle(bundle_copy)


def test_folder_without_manifest_and_broken_json_are_refused(tmp_path, bundle_copy):
    with pytest.raises(bundle.BundleError, match="no manifest.json"):
        bundle.load_bundle(tmp_path)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(bundle.BundleError, match="not valid JSON"):
        bundle.load_bundle(bundle_copy)


def test_existing_output_folder_is_not_overwritten_by_default(tiny_bundle):
    classifier, catalog = make_classifier()
    with pytest.raises(bundle.BundleError, match="already exists"):
        bundle.save_bundle(classifier, tiny_bundle, catalog=catalog, preprocessing=preprocess.PreprocessConfig())


def test_failed_save_leaves_no_partial_bundle(tmp_path):
    classifier, catalog = make_classifier()

    class Exploding:
        def to_dict(self):
            raise RuntimeError("boom while writing the manifest")

    with pytest.raises(RuntimeError, match="boom"):
        bundle.save_bundle(classifier, tmp_path / "never", catalog=catalog, preprocessing=Exploding())
    assert not (tmp_path / "never").exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder was removed too


def test_external_backbone_is_referenced_by_hash_and_checked(tmp_path):
    classifier, catalog = make_classifier()
    backbone_dir = backbones.save_backbone_pretrained(classifier.encoder, tmp_path / "hf-backbone")
    spec = backbones.BackboneSpec(family="dinov3", size="tiny", image_size=32, source=str(backbone_dir))
    config = model.ModelConfig(backbone=spec, num_findings=len(catalog))
    external = model.build_classifier(config, backbone_weights_dir=backbone_dir).eval()
    model.load_trainable_state_dict(external, model.trainable_state_dict(classifier))
    path = bundle.save_bundle(external, tmp_path / "ext", catalog=catalog,
                              preprocessing=preprocess.PreprocessConfig(image_size=32),
                              backbone_weights_dir=backbone_dir)
    manifest = bundle.read_manifest(path)
    assert manifest["backbone"]["weights"]["kind"] == "external"
    assert bundle.BACKBONE_FILE not in manifest["files"]
    loaded = bundle.load_bundle(path)
    rebuilt = bundle.build_model(loaded)
    pixels, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels, mask).logits, classifier(pixels, mask).logits)

    moved = tmp_path / "moved-backbone"
    shutil.move(str(backbone_dir), moved)
    with pytest.raises(bundle.BundleError, match="does not exist on this machine"):
        bundle.build_model(loaded)
    bundle.build_model(loaded, backbone_folder=moved)  # the user points at the new place

    weights = next(moved.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(bundle.BundleError, match="does not match the bundle"):
        bundle.build_model(loaded, backbone_folder=moved)


def test_backbone_folder_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(bundle.BundleError, match="never loads pickle"):
        bundle.backbone_folder_hashes(tmp_path)


def test_update_bundle_writes_calibration_and_documents_and_keeps_it_valid(bundle_copy):
    bundle.update_bundle(bundle_copy, thresholds={"subdural_hematoma": 0.2}, temperature=1.5,
                         metrics={"mean_auc": 0.91}, extra_files={"model_card.md": "# Card\n"})
    loaded = bundle.load_bundle(bundle_copy)  # hashes still verify, including the new document
    assert loaded.thresholds["subdural_hematoma"] == 0.2 and loaded.thresholds["epidural_hematoma"] == 0.5
    assert loaded.temperature == 1.5 and loaded.manifest["metrics"]["mean_auc"] == 0.91
    assert "model_card.md" in loaded.manifest["files"]
    (bundle_copy / "model_card.md").write_text("# Edited by hand\n")
    with pytest.raises(bundle.BundleError, match="model_card.md has changed"):
        bundle.load_bundle(bundle_copy)


def test_update_bundle_refuses_unknown_findings_and_weight_files(bundle_copy):
    with pytest.raises(bundle.BundleError, match="not_a_finding"):
        bundle.update_bundle(bundle_copy, thresholds={"not_a_finding": 0.1})
    with pytest.raises(bundle.BundleError, match="cannot write"):
        bundle.update_bundle(bundle_copy, extra_files={"weights/x.safetensors": b""})


def test_signed_bundles_verify_and_any_change_after_signing_is_refused(bundle_copy, tmp_path, capsys):
    from HeadCTMoLRELib import cli
    from HeadCTMoLRELib.model import signing

    assert cli.main(["keygen", "--out", str(tmp_path / "keys" / "lab.key")]) == 0
    assert cli.main(["keygen", "--out", str(tmp_path / "keys" / "lab.key")]) == 2  # never overwritten
    assert (tmp_path / "keys" / "lab.key").stat().st_mode & 0o077 == 0
    assert cli.main(["keygen", "--out", str(tmp_path / "other.key")]) == 0
    capsys.readouterr()
    assert not bundle.load_bundle(bundle_copy).signature.signed
    assert cli.main(["verify", str(bundle_copy), "--trusted-keys", str(tmp_path / "keys")]) == 2
    assert "not signed" in capsys.readouterr().err

    assert cli.main(["sign", str(bundle_copy), "--key", str(tmp_path / "keys" / "lab.key"), "--signer", "Lab A"]) == 0
    status = bundle.load_bundle(bundle_copy, trusted_keys=signing.read_trusted_keys(tmp_path / "keys")).signature
    assert status.signed and status.trusted and status.signer == "Lab A"
    assert cli.main(["verify", str(bundle_copy), "--trusted-keys", str(tmp_path / "keys")]) == 0
    assert "signed by key" in capsys.readouterr().out
    assert cli.main(["verify", str(bundle_copy), "--trusted-keys", str(tmp_path / "other.key.pub")]) == 2
    capsys.readouterr()

    original = (bundle_copy / "signature.json").read_text()
    forged = json.loads(original)
    forged["signer"] = "Famous Hospital"
    (bundle_copy / "signature.json").write_text(json.dumps(forged))
    with pytest.raises(bundle.BundleError, match="does not verify"):
        bundle.load_bundle(bundle_copy)
    (bundle_copy / "signature.json").write_text(original)
    edit_manifest(bundle_copy, lambda m: m["thresholds"].update(subdural_hematoma=0.2))  # re-sealed edit
    with pytest.raises(bundle.BundleError, match="changed after it was signed"):
        bundle.load_bundle(bundle_copy)
    assert cli.main(["info", str(bundle_copy), "--verify"]) == 2


def test_update_bundle_removes_a_signature_it_would_invalidate(bundle_copy, tmp_path):
    from HeadCTMoLRELib.model import signing

    key, _ = signing.generate_keypair(tmp_path / "k")
    signing.sign_manifest_digest(bundle_copy, bundle.read_manifest(bundle_copy)["integrity"]["manifest_sha256"], key)
    assert bundle.load_bundle(bundle_copy).signature.signed
    bundle.update_bundle(bundle_copy, temperature=1.3)
    loaded = bundle.load_bundle(bundle_copy)
    assert not loaded.signature.signed and loaded.temperature == 1.3
    with pytest.raises(bundle.BundleError, match=r"thresholds.subdural_hematoma: 1.5 is outside"):
        bundle.update_bundle(bundle_copy, thresholds={"subdural_hematoma": 1.5})  # the schema guards writes too
    assert bundle.load_bundle(bundle_copy).thresholds["subdural_hematoma"] == 0.5
