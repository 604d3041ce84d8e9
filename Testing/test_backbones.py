"""Backbones: tiny configs of every family, exact LoRA targets, offline loading, base-weight bookkeeping."""

from __future__ import annotations

import re

import pytest
import torch

from HeadCTMoLRELib.model.backbones import (
    BackboneSpec,
    LoraSpec,
    SliceEncoder,
    VolumeEncoder,
    adapted_module_names,
    base_state_dict,
    base_weights_sha256,
    build_backbone,
    load_base_state_dict,
    lora_parameter_count,
    lora_target_pattern,
    resample_slices,
    save_backbone_pretrained,
    transformers_config_dict,
)

def _dinov2_attention_names() -> list[str]:
    """DINOv2's attention Linears under the installed transformers' naming (renamed during 5.x)."""
    from transformers import Dinov2Config, Dinov2Model

    plain = Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=14))
    if "encoder.layer.0.attention.q_proj" not in dict(plain.named_modules()):  # older 5.x: ViT-style names
        return ["encoder.layer.{i}.attention.attention.query", "encoder.layer.{i}.attention.attention.key",
                "encoder.layer.{i}.attention.attention.value", "encoder.layer.{i}.attention.output.dense"]
    return ["encoder.layer.{i}.attention.q_proj", "encoder.layer.{i}.attention.k_proj",
            "encoder.layer.{i}.attention.v_proj", "encoder.layer.{i}.attention.o_proj"]


TINY_IMAGE = {"dinov3": 32, "dinov2": 28, "siglip": 32, "videomae3d": 32}
INTENDED_ATTENTION = {
    "dinov3": ["model.layer.{i}.attention.q_proj", "model.layer.{i}.attention.k_proj",
               "model.layer.{i}.attention.v_proj", "model.layer.{i}.attention.o_proj"],
    "dinov2": _dinov2_attention_names(),
    "siglip": ["encoder.layers.{i}.self_attn.q_proj", "encoder.layers.{i}.self_attn.k_proj",
               "encoder.layers.{i}.self_attn.v_proj", "encoder.layers.{i}.self_attn.out_proj"],
    "videomae3d": ["encoder.layer.{i}.attention.attention.query", "encoder.layer.{i}.attention.attention.key",
                   "encoder.layer.{i}.attention.attention.value", "encoder.layer.{i}.attention.output.dense"],
}
INTENDED_MLP = {
    "dinov3": ["model.layer.{i}.mlp.up_proj", "model.layer.{i}.mlp.down_proj"],
    "dinov2": ["encoder.layer.{i}.mlp.fc1", "encoder.layer.{i}.mlp.fc2"],
    "siglip": ["encoder.layers.{i}.mlp.fc1", "encoder.layers.{i}.mlp.fc2"],
    "videomae3d": ["encoder.layer.{i}.intermediate.dense", "encoder.layer.{i}.output.dense"],
}


def tiny_spec(family: str, **changes) -> BackboneSpec:
    return BackboneSpec(family, "tiny", TINY_IMAGE[family], **changes)


def tiny_input(family: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = TINY_IMAGE[family]
    if family == "videomae3d":
        return torch.rand(2, 6, 3, size, size, generator=generator)
    return torch.rand(3, 3, size, size, generator=generator)


def expected_names(templates: list[str], layers: int = 2) -> list[str]:
    return sorted(t.format(i=i) for i in range(layers) for t in templates)


@pytest.fixture(scope="module", params=sorted(TINY_IMAGE))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tiny_encoder(family):
    torch.manual_seed(0)
    return build_backbone(tiny_spec(family)).eval()


def test_every_family_builds_a_tiny_encoder_with_the_right_output_shape(family, tiny_encoder):
    assert isinstance(tiny_encoder, VolumeEncoder if family == "videomae3d" else SliceEncoder)
    assert tiny_encoder.feature_dim == 64
    with torch.no_grad():
        features = tiny_encoder(tiny_input(family))
    assert features.shape == ((2, 64) if family == "videomae3d" else (3, 64))
    assert torch.isfinite(features).all()


def test_lora_wraps_exactly_the_attention_projections(family, tiny_encoder):
    assert adapted_module_names(tiny_encoder) == expected_names(INTENDED_ATTENTION[family])
    assert lora_parameter_count(tiny_encoder) == 8 * 8 * (64 + 64)  # 2 layers x 4 Linears x r (in + out)


def test_all_linear_targets_add_the_mlp_and_nothing_else(family):
    encoder = build_backbone(tiny_spec(family, lora=LoraSpec(targets="all-linear")))
    assert adapted_module_names(encoder) == expected_names(INTENDED_ATTENTION[family] + INTENDED_MLP[family])


def test_base_is_frozen_and_only_lora_trains(tiny_encoder):
    trainable = [name for name, p in tiny_encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)


def test_every_adapted_layer_changes_the_output_when_its_lora_b_changes(family, tiny_encoder):
    """Catches adapters that sit on a layer the forward pass never calls (the SigLIP head out_proj trap)."""
    pixels = tiny_input(family)
    with torch.no_grad():
        reference = tiny_encoder(pixels)
        for name, module in tiny_encoder.hf_model.named_modules():
            if not hasattr(module, "lora_B"):
                continue
            weight = module.lora_B["default"].weight
            saved = weight.clone()
            weight.normal_(std=0.5)
            changed = (tiny_encoder(pixels) - reference).abs().max().item()
            weight.copy_(saved)
            assert changed > 1e-4, f"LoRA on {name} has no effect on the {family} feature"
        torch.testing.assert_close(tiny_encoder(pixels), reference)


def test_siglip_pattern_skips_the_pooling_head_a_bare_out_proj_would_hit():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with_head = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=16, vision_use_head=True,
    ))
    names = [name for name, _ in with_head.named_modules()]
    assert "head.attention.out_proj" in [n for n in names if n.endswith("out_proj")]  # the trap exists
    pattern = lora_target_pattern("siglip")
    assert sorted(n for n in names if re.fullmatch(pattern, n)) == expected_names(INTENDED_ATTENTION["siglip"])


def test_saved_tiny_backbone_reloads_offline_with_identical_output(family, tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_backbone_pretrained(tiny_encoder, tmp_path)
    assert (tmp_path / "config.json").is_file() and list(tmp_path.glob("*.safetensors"))
    reloaded = build_backbone(tiny_spec(family), weights_dir=tmp_path).eval()
    assert base_weights_sha256(reloaded) == base_weights_sha256(tiny_encoder)
    pixels = tiny_input(family, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels), tiny_encoder(pixels), rtol=0, atol=0)


def test_base_weights_rebuild_from_stored_config_and_state(family, tiny_encoder):
    rebuilt = build_backbone(tiny_spec(family), transformers_config=transformers_config_dict(tiny_encoder)).eval()
    assert base_weights_sha256(rebuilt) != base_weights_sha256(tiny_encoder)  # fresh random weights
    load_base_state_dict(rebuilt, base_state_dict(tiny_encoder))
    assert base_weights_sha256(rebuilt) == base_weights_sha256(tiny_encoder)
    assert not any(".base_layer." in key or "lora_" in key for key in base_state_dict(tiny_encoder))
    pixels = tiny_input(family)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), tiny_encoder(pixels), rtol=0, atol=0)


def test_load_base_state_dict_names_missing_keys(tiny_encoder):
    state = base_state_dict(tiny_encoder)
    state.pop(sorted(state)[0])
    with pytest.raises(KeyError, match="missing"):
        load_base_state_dict(tiny_encoder, state)


def test_encoder_applies_the_family_normalisation_itself():
    torch.manual_seed(0)
    dinov3 = build_backbone(tiny_spec("dinov3")).eval()
    siglip = build_backbone(tiny_spec("siglip")).eval()
    pixels = tiny_input("dinov3")
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(dinov3(pixels), dinov3.hf_model(pixel_values=imagenet).pooler_output)
        expected = siglip.hf_model(pixel_values=(pixels - 0.5) / 0.5).last_hidden_state.mean(1)
        torch.testing.assert_close(siglip(pixels), expected)


def test_siglip_accepts_other_image_sizes_by_interpolating_positions():
    encoder = build_backbone(tiny_spec("siglip")).eval()
    with torch.no_grad():
        assert encoder(torch.rand(2, 3, 64, 64)).shape == (2, 64)


def test_dinov3_output_does_not_depend_on_train_mode():
    """DINOv3 jitters RoPE coordinates in train mode by default; fine-tuning must not."""
    torch.manual_seed(0)
    encoder = build_backbone(tiny_spec("dinov3"))
    pixels = tiny_input("dinov3")
    with torch.no_grad():
        torch.testing.assert_close(encoder.train()(pixels), encoder.eval()(pixels))


def test_volume_encoder_ignores_padding_slices():
    torch.manual_seed(0)
    encoder = build_backbone(tiny_spec("videomae3d")).eval()
    pixels = tiny_input("videomae3d")
    mask = torch.tensor([[True] * 6, [False, True, True, True, True, False]])
    padded = pixels.clone()
    padded[1, 0] = 1.0
    padded[1, 5] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(encoder(padded, mask)[1], encoder(pixels[1:, 1:5])[0])


def test_resample_slices_keeps_end_slices_and_interpolates_linearly():
    slices = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    resampled = resample_slices(slices, 5)
    torch.testing.assert_close(resampled[:, 0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]))
    assert resample_slices(slices, 3) is slices


@pytest.mark.parametrize(
    ("family_name", "size", "lora_parameters", "feature_dim"),
    [("dinov3", "base", 589_824, 768), ("dinov3", "large", 1_572_864, 1024),
     ("dinov2", "base", 589_824, 768), ("siglip", "so400m", 1_990_656, 1152)],
)
def test_real_sizes_have_the_published_lora_parameter_counts(family_name, size, lora_parameters, feature_dim):
    with torch.device("meta"):  # true architecture, no memory
        encoder = build_backbone(BackboneSpec(family_name, size, 224))
    assert lora_parameter_count(encoder) == lora_parameters
    assert encoder.feature_dim == feature_dim
    assert encoder.patch_size == {"dinov3": 16, "dinov2": 14, "siglip": 14}[family_name]


def test_spec_round_trip_and_validation():
    spec = BackboneSpec("dinov3", "base", 224, source="/models/dinov3-vitb16", lora=LoraSpec(r=4, alpha=8))
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="family"):
        BackboneSpec("resnet", "base")
    with pytest.raises(ValueError, match="no size 'so400m'"):
        BackboneSpec("dinov3", "so400m")
    with pytest.raises(ValueError, match="Unknown backbone settings"):
        BackboneSpec.from_dict({"family": "dinov3", "size": "base", "colour": "red"})
    with pytest.raises(ValueError, match="targets"):
        LoraSpec(targets="everything")


def test_hub_id_is_refused_offline_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local folder"):
        build_backbone(BackboneSpec("dinov3", "tiny", 32, source="facebook/dinov3-vitb16-pretrain-lvd1689m"))


def test_bad_weight_folders_are_refused_with_a_reason(tmp_path, tiny_encoder, family):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(tiny_spec(family), weights_dir=tmp_path / "missing")
    save_backbone_pretrained(tiny_encoder, tmp_path / "saved")
    other = "dinov2" if family != "dinov2" else "dinov3"
    with pytest.raises(ValueError, match="holds a"):
        build_backbone(tiny_spec(other), weights_dir=tmp_path / "saved")
    with pytest.raises(ValueError, match="size 'tiny-32'"):
        build_backbone(BackboneSpec(family, "tiny-32", TINY_IMAGE[family]), weights_dir=tmp_path / "saved")
    for weights in (tmp_path / "saved").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        build_backbone(tiny_spec(family), weights_dir=tmp_path / "saved")
