"""Pillar0's Atlas: our native encoder + converter reproduce the public reference model code.

Fixtures (Testing/Data/parity/pillar0/, provenance in PROVENANCE.md) were made by running the reference
(Pillar-0's remote code, transcribed into a scratch folder outside the project) on seeded random weights:
  tiny/    inputs, the state dict under the released checkpoint's key names (model.visual.*), outputs;
  widths/  Pillar0-HeadCT's widths on a 64 x 128 x 128 volume: key names and outputs (weights regenerated);
  real/    the assumed real configuration on its full volume: key names and outputs (slow test).
The real size's parameter count is checked on the meta device (random init, no download).
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from HeadCTMoLRELib.model.atlas import AtlasConfig, AtlasEncoder
from HeadCTMoLRELib.model.backbones import BackboneSpec, adapted_module_names, build_backbone
from HeadCTMoLRELib.model.convert import ConversionError, convert_weights, pillar0_state

DATA = Path(__file__).parent / "Data" / "parity" / "pillar0"
# float32 on CPU, the same operations in the same order: measured max |diff| 0.0 (values up to 5.3)
ATOL, RTOL = 1e-5, 1e-5  # real widths / real size: 1e-4 (measured 0.0 on values up to 3.9 / 145)


def seeded_tensor(key: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The fixture recipe of PROVENANCE.md (one generator per tensor, seeded by crc32 of its reference name)."""
    if dtype == "torch.int64":
        return torch.full(shape, 7, dtype=torch.int64)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
    if key.endswith("running_var"):
        return 1.0 + 0.2 * values.abs()
    if len(shape) == 1:
        norm = "norm" in key or any(f"conv_down.{i}" in key for i in (1, 4, 7))
        return 1 + 0.1 * values if norm and key.endswith(".weight") else 0.1 * values
    return values * 0.5 / math.sqrt(math.prod(shape[1:]))


def tiny_inputs():
    pixels = load_file(str(DATA / "tiny" / "inputs.safetensors"))["levels"].float() / 255  # (B, C, D, H, W)
    return pixels, load_file(str(DATA / "tiny" / "outputs.safetensors"))


def test_tiny_parity_through_the_converter(tmp_path):
    checkpoint = load_file(str(DATA / "tiny" / "state_dict.safetensors"))
    # the released file is the whole CLIP model: add a text side and a logit scale to drop
    checkpoint["model.text.projection.weight"] = torch.zeros(4, 48)
    checkpoint["model.logit_scale"] = torch.ones(())
    source = tmp_path / "pillar0.pt"
    torch.save({"model": checkpoint}, source)
    folder = convert_weights("pillar0", source, tmp_path / "converted", size="tiny")
    provenance = json.loads((folder / "conversion.json").read_text())
    assert provenance["tensors_dropped"] == 2 and provenance["tensors_kept"] == 234

    pixels, expected = tiny_inputs()
    encoder = build_backbone(BackboneSpec("pillar0", "tiny", 64), weights_dir=folder).eval()
    atlas = encoder.hf_model
    with torch.no_grad():
        torch.testing.assert_close(atlas.stem(pixels), expected["stem"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(atlas(pixel_values=pixels).pooler_output, expected["embedding"], atol=ATOL, rtol=RTOL)
        # the volume feature the classifier sees: slices (B, S, 3, H, W), S == num_frames (no resampling),
        # in our order (inferior -> superior), i.e. the reference's depth axis reversed (it flips its volume)
        features = encoder(pixels.flip(2).permute(0, 2, 1, 3, 4))
        assert not torch.allclose(encoder(pixels.permute(0, 2, 1, 3, 4)), expected["embedding"], atol=1e-3)
    torch.testing.assert_close(features, expected["embedding"], atol=ATOL, rtol=RTOL)
    assert encoder.feature_dim == 48


def test_parity_does_not_depend_on_the_batch():
    checkpoint = load_file(str(DATA / "tiny" / "state_dict.safetensors"))
    config, state, _ = pillar0_state(checkpoint, "tiny")
    model = AtlasEncoder(config).eval()
    model.load_state_dict(state, strict=True)
    pixels, expected = tiny_inputs()
    with torch.no_grad():
        second = model(pixel_values=pixels[1:]).pooler_output
    torch.testing.assert_close(second, expected["embedding"][1:], atol=ATOL, rtol=RTOL)


def test_tiny_fixture_follows_the_recipe():
    """The stored tiny state dict is the recipe's (so the real-width test below regenerates honestly)."""
    checkpoint = load_file(str(DATA / "tiny" / "state_dict.safetensors"))
    for key in ("patch_embeds.brain_ct.conv_down.4.running_var", "atlas_models.1.blocks.0.posemb.2.cpb_mlp.0.weight",
                "atlas_models.0.blocks.0.blocks.0.norm1_q.weight", "patch_embeds.brain_ct.conv1.2.conv2.bias"):
        tensor = checkpoint[f"model.visual.{key}"]
        torch.testing.assert_close(seeded_tensor(key, tuple(tensor.shape), str(tensor.dtype)), tensor, atol=0, rtol=0)


def test_parity_at_the_released_widths(tmp_path):
    """Pillar0-HeadCT's widths (11 windows, stem 64 -> 192, width 384, 6 heads, merge 8, local2global 2),
    one block per stage on a 64 x 128 x 128 volume (two scales); the released config.json's geometry is
    read by the converter. Weights and input are regenerated from the fixture's seeds (PROVENANCE.md)."""
    shapes = json.loads((DATA / "widths" / "keys.json").read_text())
    checkpoint = {k: seeded_tensor(k[len("model.visual."):], tuple(shape), dtype) for k, (shape, dtype) in shapes.items()}
    save_file(checkpoint, str(tmp_path / "model.safetensors"))
    del checkpoint
    reference = json.loads((DATA / "widths" / "reference_config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"vision_cfg": {"model_config": reference}}))
    folder = convert_weights("pillar0", tmp_path / "model.safetensors", tmp_path / "converted", size="headct")
    model = AtlasEncoder.from_pretrained(folder).eval()
    assert (model.config.num_frames, model.config.image_size, model.config.depths) == (64, 128, [1, 1])
    levels = torch.randint(0, 256, (1, 11, 64, 128, 128), generator=torch.Generator().manual_seed(4321), dtype=torch.uint8)
    with torch.no_grad():
        embedding = model(pixel_values=levels.float() / 255).pooler_output
    expected = load_file(str(DATA / "widths" / "outputs.safetensors"))["embedding"]
    torch.testing.assert_close(embedding, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_real_size_parity_128x256x256():
    """The assumed Pillar0-HeadCT configuration at its full volume (11 x 128 x 256 x 256, stages [6, 6, 6]):
    minutes of CPU. Weights and input regenerated from the fixture's seeds; converted in memory."""
    shapes = json.loads((DATA / "real" / "keys.json").read_text())
    checkpoint = {k: seeded_tensor(k[len("model.visual."):], tuple(shape), dtype) for k, (shape, dtype) in shapes.items()}
    config, state, _ = pillar0_state(checkpoint, "headct")
    del checkpoint
    assert config.depths == [6, 6, 6] and config.num_scales == 3
    model = AtlasEncoder(config).eval()
    model.load_state_dict(state, strict=True)
    del state
    levels = torch.randint(0, 256, (1, 11, 128, 256, 256), generator=torch.Generator().manual_seed(5678), dtype=torch.uint8)
    with torch.no_grad():
        embedding = model(pixel_values=levels.float() / 255).pooler_output
    expected = load_file(str(DATA / "real" / "outputs.safetensors"))["embedding"]
    torch.testing.assert_close(embedding, expected, atol=1e-4, rtol=1e-4)


def test_converter_refuses_pickles_that_need_code_and_other_models(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model.visual.patch_embeds.brain_ct.conv_down.0.weight": torch.zeros(1), "x": argparse.Namespace()}, evil)
    with pytest.raises(ConversionError, match=r"weights_only=True.*never unpickles"):
        convert_weights("pillar0", evil, tmp_path / "out", size="tiny")
    other = tmp_path / "vit.safetensors"
    save_file({"encoder.layer.0.attention.q_proj.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(ConversionError, match="not part of Pillar-0's Atlas vision tower"):
        convert_weights("pillar0", other, tmp_path / "out", size="tiny")
    assert not (tmp_path / "out").exists()
    checkpoint = load_file(str(DATA / "tiny" / "state_dict.safetensors"))
    with pytest.raises(ConversionError, match="another shape than Pillar0 size 'headct'"):
        pillar0_state(checkpoint, "headct")
    del checkpoint["model.visual.atlas_models.2.blocks.0.blocks.1.attn.q.weight"]
    with pytest.raises(ConversionError, match="missing"):
        pillar0_state(checkpoint, "tiny")


def test_converter_reads_heads_from_a_released_config_beside_the_weights(tmp_path):
    source = tmp_path / "model.safetensors"
    save_file(load_file(str(DATA / "tiny" / "state_dict.safetensors")), str(source))
    released = {"model_type": "clip_multimodal_atlas", "vision_cfg": {"model_config": {
        "modalities": {"brain_ct": {"merge_ratio": [2, 2, 2], "local2global": [2, 2, 2]}},
        "model": {"stages": [1, 1, 1], "atlas_args": {"dim": 16, "num_heads": 4}}}}}
    (tmp_path / "config.json").write_text(json.dumps(released))
    folder = convert_weights("pillar0", source, tmp_path / "converted", size="tiny")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_heads"] == 4 and config["depths"] == [1, 1, 1] and config["model_type"] == "pillar0_atlas"


def test_lora_on_exactly_the_attention_projections():
    encoder = build_backbone(BackboneSpec("pillar0", "tiny", 64))
    # every stage allocates one block per scale (3), as the reference does, used or not
    assert adapted_module_names(encoder) == sorted(
        f"stages.{i}.blocks.0.scales.{s}.attn.{part}" for i in range(3) for s in range(3) for part in ("q", "kv", "proj"))


def test_batchnorm_keeps_its_statistics_in_training():
    encoder = build_backbone(BackboneSpec("pillar0", "tiny", 64))
    encoder.train()
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert norms and not any(m.training for m in norms)
    before = norms[0].running_mean.clone()
    encoder(torch.rand(1, 32, 3, 64, 64)).sum().backward()
    torch.testing.assert_close(norms[0].running_mean, before)


def test_the_released_windows_are_required_not_faked():
    """HeadCT weights take 11 CT windows; 3 rendered windows are refused with the reason, never padded."""
    small = {**AtlasConfig().to_dict(), "depths": [1], "num_frames": 32, "image_size": 64}  # HeadCT widths, 8^3 grid
    encoder = build_backbone(BackboneSpec("pillar0", "headct", 64), transformers_config=small)
    assert encoder.hf_config.in_chans == 11
    with pytest.raises(ValueError, match="takes 11 CT windows per voxel, but the preprocessing renders 3"):
        encoder(torch.rand(1, 32, 3, 64, 64))


def test_real_size_parameter_count_on_meta():
    """Pillar0-HeadCT's vision tower: 115.9 M (paper: 113.9 M, within 3 %). It counts the convolutional stem
    (9.31 M: 11 windows -> 64 -> 192 channels, three residual blocks, 192 -> 384 down-sampling) and three
    Atlas stages of 6 multi-scale blocks, each with one cross-window transformer block (1.78 M) and one
    position MLP (0.20 M) per scale for all 3 scales (106.6 M, including the per-scale weights a later
    stage allocates but no longer uses, as the reference does). BatchNorm statistics (buffers), the text
    tower and the CLIP projection are not counted."""
    with torch.device("meta"):
        model = AtlasEncoder(AtlasConfig())
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 113.9e6) / 113.9e6 < 0.03
    assert total == 115_903_424  # the transcribed reference at the same configuration (PROVENANCE.md)
    assert sum(p.numel() for p in model.stem.parameters()) == 9_313_472
    assert model.config.hidden_size == 1152 and model.config.scale_layout() == [(32, 4), (16, 2), (8, 1)]
