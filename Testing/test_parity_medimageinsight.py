"""MedImageInsight's DaViT: our native encoder + converter reproduce the public reference implementation.

Fixtures (Testing/Data/parity/medimageinsight/, provenance in PROVENANCE.md) were made by running the
reference code (visual-layer/MedImageInsight) outside the project on seeded random weights:
  tiny/  inputs, the state dict under the checkpoint's key names, outputs
  base/  outputs only (480 px, the real size); weights and input are regenerated here from the recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from HeadCTMoLRELib.model.backbones import BackboneSpec, adapted_module_names, build_backbone
from HeadCTMoLRELib.model.convert import ConversionError, convert_weights, medimageinsight_state
from HeadCTMoLRELib.model.davit import DaViTConfig, DaViTImageEncoder

DATA = Path(__file__).parent / "Data" / "parity" / "medimageinsight"
# float32 on CPU, same operations in a different order (SDPA vs explicit softmax): measured max |diff|
# 2e-6 (tiny) and 3e-5 (base) on outputs of magnitude ~0.3-1
ATOL, RTOL = 1e-4, 1e-4


def seeded_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixture recipe of PROVENANCE.md (one generator per key, seeded by crc32 of its name)."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    values = torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 1 + 0.1 * values if ("norm" in key and key.endswith(".weight")) else 0.1 * values
    fan_in = math.prod(shape[1:]) if not key.endswith("image_projection") else shape[0]
    return values * 0.5 / math.sqrt(fan_in)


def test_tiny_parity_through_the_pt_converter(tmp_path):
    checkpoint = load_file(str(DATA / "tiny" / "state_dict.safetensors"))
    # the released weights are a pickled .pt holding the whole UniCL model: add a text tower to drop
    checkpoint["lang_encoder.token_embedding.weight"] = torch.zeros(4, 2)
    checkpoint["logit_scale"] = torch.ones(())
    source = tmp_path / "medimageinsight.pt"
    torch.save(checkpoint, source)
    folder = convert_weights("medimageinsight", source, tmp_path / "converted", size="tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "conversion.json", "model.safetensors"]

    pixels = load_file(str(DATA / "tiny" / "inputs.safetensors"))["pixels"]
    expected = load_file(str(DATA / "tiny" / "outputs.safetensors"))
    encoder = build_backbone(BackboneSpec("medimageinsight", "tiny", 72), weights_dir=folder)
    with torch.no_grad():
        output = encoder.hf_model(pixel_values=pixels)  # LoRA B = 0: the frozen encoder's own output
        features = encoder.hf_model.norm(output.last_hidden_state.mean(dim=1))
    torch.testing.assert_close(output.pooler_output, expected["embedding"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(features, expected["features"], atol=ATOL, rtol=RTOL)
    # and the slice feature the classifier sees is that embedding (after the family's normalisation)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels * std + mean), expected["embedding"], atol=ATOL, rtol=RTOL)


def test_converter_refuses_pickles_that_need_code(tmp_path):
    source = tmp_path / "evil.pt"
    torch.save({"image_projection": torch.zeros(2, 2), "extra": argparse.Namespace(a=1)}, source)
    with pytest.raises(ConversionError, match=r"weights_only=True.*never unpickles"):
        convert_weights("medimageinsight", source, tmp_path / "out", size="tiny")
    assert not (tmp_path / "out").exists()


def test_converter_refuses_other_models(tmp_path):
    source = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file({"image_projection": torch.zeros(32, 16), "encoder.layer.0.attention.q_proj.weight": torch.zeros(4, 4)},
              str(source))
    with pytest.raises(ConversionError, match="not part of MedImageInsight's image encoder"):
        convert_weights("medimageinsight", source, tmp_path / "out", size="tiny")
    checkpoint = load_file(str(DATA / "tiny" / "state_dict.safetensors"))
    with pytest.raises(ConversionError, match="another shape than MedImageInsight size 'base'"):
        medimageinsight_state(checkpoint, "base")


def test_lora_on_exactly_the_attention_projections():
    encoder = build_backbone(BackboneSpec("medimageinsight", "tiny", 64))
    names = adapted_module_names(encoder)
    blocks = [(s, b) for s, depth in enumerate([1, 1, 2, 1]) for b in range(depth)]
    assert names == sorted(f"stages.{s}.blocks.{b}.{kind}.attn.{part}"
                           for s, b in blocks for kind in ("spatial", "channel") for part in ("qkv", "proj"))
    assert encoder.spec.lora.r == 8 and encoder.spec.lora.alpha == 16


def test_real_size_parameter_count_on_meta():
    """MedImageInsight: image encoder 360.6 M + image projection 2.1 M = 362.7 M (paper: ~364 M total)."""
    with torch.device("meta"):
        model = DaViTImageEncoder(DaViTConfig())
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 364e6) / 364e6 < 0.03
    assert model.projection.weight.numel() == 2048 * 1024
    assert total == 362_733_568  # the reference DaViT + projection at the same config, counted in the scratch run


@pytest.mark.slow
def test_real_size_parity_480px():
    expected = load_file(str(DATA / "base" / "outputs.safetensors"))
    # the reference checkpoint's key names and shapes at the real size, as the scratch run listed them
    shapes = {k: tuple(v) for k, v in json.loads((DATA / "base" / "keys.json").read_text()).items()}
    checkpoint = {key: seeded_tensor(key, shape) for key, shape in sorted(shapes.items())}
    config, state, _ = medimageinsight_state(checkpoint, "base")
    del checkpoint
    model = DaViTImageEncoder(config)
    model.load_state_dict(state, strict=True)
    del state
    pixels = torch.randn(1, 3, 480, 480, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        output = model(pixel_values=pixels)
        features = model.norm(output.last_hidden_state.mean(dim=1))
    torch.testing.assert_close(output.pooler_output[:, :64], expected["embedding"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(output.pooler_output.norm(dim=-1), expected["embedding_norm"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(features[:, :64], expected["features"], atol=ATOL, rtol=RTOL)
