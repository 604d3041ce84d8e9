"""The conv patch stem (model/patch_stem.py): same token grid, stored in the config, rebuilt from folders and
bundles, refused where it cannot be built, and never left at random when weights are loaded."""

from __future__ import annotations

import json

import pytest
import torch

from HeadCTMoLRELib.model import backbones, bundle, classifier, patch_stem
from HeadCTMoLRELib.model.manifest_schema import stored_patch_stem

SPEC = backbones.BackboneSpec("dinov3", "tiny", 32)


def conv_config(spec: backbones.BackboneSpec = SPEC) -> dict:
    return {**backbones.random_init_config_dict(spec), "patch_stem": "conv"}


def conv_encoder(seed: int = 0):
    torch.manual_seed(seed)
    return backbones.build_backbone(SPEC, transformers_config=conv_config()).eval()


def test_conv_stem_keeps_the_token_grid_and_changes_only_the_patch_embedding():
    encoder = conv_encoder()
    hf = encoder.hf_model
    assert isinstance(hf.embeddings.patch_embeddings, patch_stem.ConvPatchStem)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = hf.embeddings.patch_embeddings(encoder.normalise(pixels))
    assert tokens.shape == (2, hf.config.hidden_size, 32 // 16, 32 // 16)
    with torch.no_grad():
        assert encoder(pixels).shape == (2, hf.config.hidden_size)
    torch.manual_seed(0)
    linear = backbones.build_backbone(SPEC).eval()
    stem_keys = {k for k in backbones.base_state_dict(encoder) if "patch_embeddings" in k}
    assert stem_keys and all(k.split("patch_embeddings.")[1].split(".")[0] in ("conv1", "conv2", "proj") for k in stem_keys)
    assert (set(backbones.base_state_dict(encoder)) - stem_keys
            == {k for k in backbones.base_state_dict(linear) if "patch_embeddings" not in k})
    # the stem is frozen with the rest of the base; LoRA stays on the attention projections only
    assert not any(p.requires_grad for n, p in hf.named_parameters() if "patch_embeddings" in n)
    assert backbones.adapted_module_names(encoder) == backbones.adapted_module_names(linear)


def test_a_pixel_sized_spot_changes_its_own_token_non_linearly():
    """Token (r, c) sees its patch (and one pixel around it): a one-pixel spot moves that token, and the
    response is not linear in the spot's contrast (the linear stem's would be)."""
    stem = conv_encoder().hf_model.embeddings.patch_embeddings
    base = torch.zeros(1, 3, 32, 32)
    spot = base.clone()
    spot[0, :, 5, 6] = 1.0  # inside token (0, 0) of the 16 px grid
    with torch.no_grad():
        change = (stem(spot) - stem(base)).abs().sum(1)[0]
        half = stem(base + (spot - base) / 2) - stem(base)
        full = stem(spot) - stem(base)
    assert change[0, 0] > 0 and change[1, 1] == 0 and change[0, 1] == 0
    assert not torch.allclose(full, 2 * half, atol=1e-6)


def test_folder_with_a_conv_stem_round_trips_bit_for_bit(tmp_path):
    encoder = conv_encoder()
    folder = backbones.save_backbone_pretrained(encoder, tmp_path / "backbone")
    assert json.loads((folder / "config.json").read_text())["patch_stem"] == "conv"
    reloaded = backbones.build_backbone(SPEC, weights_dir=folder).eval()
    assert isinstance(reloaded.hf_model.embeddings.patch_embeddings, patch_stem.ConvPatchStem)
    assert backbones.base_weights_sha256(reloaded) == backbones.base_weights_sha256(encoder)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels), encoder(pixels), rtol=0, atol=0)


def test_a_folder_missing_the_stem_weights_is_refused_not_left_random(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = backbones.save_backbone_pretrained(conv_encoder(), tmp_path / "backbone")
    weights = next(folder.glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if "patch_embeddings.conv1" not in k}, str(weights))
    with pytest.raises(ValueError, match=r"patch stem \(missing \[.conv1"):
        backbones.build_backbone(SPEC, weights_dir=folder)
    # and a linear-stem folder whose config was edited to say "conv" is refused the same way
    linear = backbones.save_backbone_pretrained(backbones.build_backbone(SPEC), tmp_path / "linear")
    config = json.loads((linear / "config.json").read_text())
    (linear / "config.json").write_text(json.dumps({**config, "patch_stem": "conv"}))
    with pytest.raises(ValueError, match="unexpected"):
        backbones.build_backbone(SPEC, weights_dir=linear)


@pytest.mark.parametrize("family, size, image, changes, message", [
    ("dinov3", "tiny", 32, {"patch_stem": "wavelet"}, "not one of"),
    ("dinov3", "tiny", 32, {"patch_stem": "conv", "patch_size": 3}, "even patch_size"),
    ("dinov2", "tiny", 28, {"patch_stem": "conv"}, "only built for"),
])
def test_unknown_or_unbuildable_stems_are_refused_before_building(family, size, image, changes, message):
    spec = backbones.BackboneSpec(family, size, image)
    values = {**backbones.random_init_config_dict(spec), **changes}
    with pytest.raises(ValueError, match=message):
        backbones.build_backbone(spec, transformers_config=values)


def test_bundle_with_a_conv_stem_rebuilds_it_and_says_so(tmp_path):
    from HeadCTMoLRELib import findings
    from HeadCTMoLRELib.ct import preprocess
    from HeadCTMoLRELib.evaluation.model_card import model_card

    folder = backbones.save_backbone_pretrained(conv_encoder(), tmp_path / "backbone")
    catalog = findings.default_catalog()
    torch.manual_seed(0)
    model = classifier.build_classifier(classifier.ModelConfig(backbone=SPEC, num_findings=len(catalog)),
                                        backbone_weights_dir=str(folder)).eval()
    with torch.no_grad():
        for tensor in classifier.trainable_state_dict(model).values():
            tensor.copy_(torch.randn_like(tensor) * 0.05)
    out = bundle.save_bundle(model, tmp_path / "bundle", catalog=catalog,
                             preprocessing=preprocess.PreprocessConfig(image_size=32, alignment="center"),
                             backbone_weights_dir=folder, bundle_backbone=True)
    manifest = bundle.read_manifest(out)
    assert stored_patch_stem(manifest) == "conv"
    loaded = bundle.build_model(bundle.load_bundle(out)).eval()
    assert isinstance(loaded.encoder.hf_model.embeddings.patch_embeddings, patch_stem.ConvPatchStem)
    pixels = torch.rand(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=1e-6)
    assert "conv patch stem" in bundle.describe(manifest)
    assert "conv patch stem" in model_card(manifest)


def test_stored_patch_stem_reads_linear_when_absent():
    assert stored_patch_stem({}) == "linear"
    assert stored_patch_stem({"backbone": {"transformers_config": {"hidden_size": 8}}}) == "linear"
    assert stored_patch_stem({"backbone": {"transformers_config": {"patch_stem": "conv"}}}) == "conv"


def test_a_bundle_naming_an_unknown_patch_stem_is_refused_when_read(tmp_path):
    from bundle_fixtures import edit_manifest, make_bundle

    out = make_bundle(tmp_path / "bundle")
    edit_manifest(out, lambda m: m["backbone"]["transformers_config"].update(patch_stem="wavelet"), reseal=True)
    with pytest.raises(bundle.BundleError, match=r"transformers_config\.patch_stem.*not one of 'linear', 'conv'"):
        bundle.load_bundle(out)
