"""Frozen vision backbones (Hugging Face transformers, or native torch modules), adapted with peft LoRA.

Families (no timm/torchvision):

    "dinov3"      DINOv3 ViT (DINOv3ViTModel), patch 16, RoPE; slice feature = pooler_output (CLS after norm)
    "dinov2"      DINOv2 (Dinov2Model), patch 14; slice feature = pooler_output
    "siglip"      SigLIP vision tower (SiglipVisionModel; MedGemma's image encoder), head off;
                  slice feature = mean of last_hidden_state
    "videomae3d"  VideoMAE (VideoMAEModel), a genuine 3-D ViT: tubelets of 2 slices x 16 x 16 px; the
                  slices of one volume are its frames; volume feature = mean of last_hidden_state
    "medimageinsight"  MedImageInsight's DaViT image encoder (native torch, model/davit.py), 480 px;
                  slice feature = its image embedding (pooled stage-4 tokens after LayerNorm, times the
                  image projection: 1024-d, before the contrastive L2 normalisation)
    "pillar0"     Pillar0-HeadCT's Atlas vision encoder (native torch, model/atlas.py), a 3-D model:
                  valid slices resampled to num_frames (128) at 256 px; volume feature = its pooled
                  multi-scale embedding (1152-d for HeadCT, before the contrastive L2 normalisation)

2-D families give a `SliceEncoder`: pixels (N, 3, H, W) in 0..1 -> features (N, d). The 3-D family gives a
`VolumeEncoder`: pixels (B, S, C, H, W) (C = 3; Pillar0: its in_chans) + slice_mask (B, S) -> features (B, d); the valid slices of each
volume (inferior -> superior) are resampled linearly along the slice axis to the model's `num_frames`.
Both apply the family's intensity normalisation themselves (ImageNet mean/std, or 0.5/0.5 for SigLIP).

Weights come from a local folder in Hugging Face format (`from_pretrained(dir, local_files_only=True)`;
for native families a folder written by `headct-molre convert-weights`: config.json + model.safetensors)
or, without one, from random initialisation of the size's real configuration (so "base" has the true
ViT-B shape for benchmarks; "tiny" / "tiny-32" are small test models). No hub is ever contacted: the
package sets HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 before transformers is imported, and a source that
is not a local folder is refused; every weight of the architecture must be in the folder, none is silently
left at random. The base weights are frozen;
LoRA (r=8, alpha=16 by default) wraps exactly the attention projections of every encoder layer
(or also the MLP with targets="all-linear").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..settings import reject_unknown_settings
from .manifest_schema import patch_stem_of
from .patch_stem import check_patch_stem, install_patch_stem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

LORA_TARGET_CHOICES = ("attention", "all-linear")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters: rank r, scaling alpha / r, dropout, and which Linear layers to adapt."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str = "attention"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        if self.targets not in LORA_TARGET_CHOICES:
            raise ValueError(f"LoRA targets must be one of {LORA_TARGET_CHOICES}, got {self.targets!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraSpec":
        reject_unknown_settings(cls, data, "LoRA")
        return cls(**data)


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone: family, size, input image size in px (square), weight source, LoRA settings.

    source: where the weights come from (a local folder or a Hugging Face hub id); None = random init.
    num_frames: 3-D family only, slices per volume the model sees (default: the size's config, 16).
    """

    family: str
    size: str
    image_size: int = 224
    source: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    num_frames: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Unknown backbone family {self.family!r}; choose one of {sorted(FAMILIES)}.")
        sizes = FAMILIES[self.family].sizes
        if self.size not in sizes:
            raise ValueError(
                f"Backbone family {self.family!r} has no size {self.size!r}; choose one of {list(sizes)}."
            )
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive integer (px), got {self.image_size!r}.")
        if self.num_frames is not None and not FAMILIES[self.family].volumetric:
            raise ValueError(f"num_frames applies only to 3-D backbones, not to {self.family!r}.")
        if isinstance(self.lora, dict):  # tolerate a dict, as JSON gives it
            object.__setattr__(self, "lora", LoraSpec.from_dict(self.lora))

    @property
    def volumetric(self) -> bool:
        return FAMILIES[self.family].volumetric

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora"] = self.lora.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackboneSpec":
        reject_unknown_settings(cls, data, "backbone")
        data = dict(data)
        if isinstance(data.get("lora"), dict):
            data["lora"] = LoraSpec.from_dict(data["lora"])
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Families: transformers classes, real configurations, LoRA target patterns, slice features


@dataclass(frozen=True)
class _Family:
    config_class_name: str
    model_class_name: str
    model_type: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    attention_pattern: str  # regex over module names of the bare transformers model (re.fullmatch)
    mlp_pattern: str
    sizes: dict[str, dict[str, Any]]
    fixed_overrides: dict[str, Any]  # applied to every config, loaded or random
    volumetric: bool = False
    # where the classes live: "transformers", or a module of this package (native torch families)
    module: str = "transformers"
    # config entries that define the size (checked against the weights' config on load)
    shape_keys: tuple[str, ...] = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    native_image_size: int | None = None  # the input size the released weights were trained at (px)

    @property
    def native(self) -> bool:
        return self.module != "transformers"

    def classes(self) -> tuple[type, type]:
        import importlib

        module = importlib.import_module(self.module if not self.native else f"{__package__}.{self.module}")
        return getattr(module, self.config_class_name), getattr(module, self.model_class_name)


def _vit(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
    }


def _dinov2(hidden: int, layers: int, heads: int, mlp_ratio: int = 4, **extra: Any) -> dict[str, Any]:
    """Dinov2Config sizes its MLP by mlp_ratio, not intermediate_size; patch 14 throughout."""
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "mlp_ratio": mlp_ratio, "patch_size": 14, **extra}


_TINY = {"tiny": _vit(64, 2, 4, 128), "tiny-32": _vit(32, 2, 2, 64)}

FAMILIES: dict[str, _Family] = {
    # DINOv3 LVD-1689M checkpoints: ViT-S/B/L with patch 16 and 4 register tokens.
    "dinov3": _Family(
        "DINOv3ViTConfig",
        "DINOv3ViTModel",
        "dinov3_vit",
        IMAGENET_MEAN,
        IMAGENET_STD,
        r"model\.layer\.\d+\.attention\.(?:q|k|v|o)_proj",
        r"model\.layer\.\d+\.mlp\.(?:up|down|gate)_proj",
        {
            **{k: {**v, "patch_size": 16, "num_register_tokens": 0} for k, v in _TINY.items()},
            # The demo model's backbone (Resources/Models/demo): ViT with 4 layers of width 128, trained on
            # synthetic phantoms by scripts/train_demo_model.py; no published checkpoint has this size.
            "demo": {**_vit(128, 4, 4, 256), "patch_size": 8, "num_register_tokens": 0},
            "small": {**_vit(384, 12, 6, 1536), "patch_size": 16, "num_register_tokens": 4, "image_size": 224},
            "base": {**_vit(768, 12, 12, 3072), "patch_size": 16, "num_register_tokens": 4, "image_size": 224},
            "large": {**_vit(1024, 24, 16, 4096), "patch_size": 16, "num_register_tokens": 4, "image_size": 224},
        },
        # DINOv3 randomly rescales/jitters RoPE coordinates in train mode (a pre-training augmentation);
        # fine-tuning through a frozen backbone should see the same geometry in training and inference.
        {"pos_embed_rescale": None, "pos_embed_jitter": None, "pos_embed_shift": None},
    ),
    # DINOv2 (facebook/dinov2-*): patch 14, 518 px position table (interpolated to other sizes).
    "dinov2": _Family(
        "Dinov2Config",
        "Dinov2Model",
        "dinov2",
        IMAGENET_MEAN,
        IMAGENET_STD,
        # transformers >= 5.2x names the projections q/k/v/o_proj; earlier 5.x (as 4.x) used
        # attention.attention.query/key/value and attention.output.dense.
        r"encoder\.layer\.\d+\.attention\.(?:(?:q|k|v|o)_proj|attention\.(?:query|key|value)|output\.dense)",
        r"encoder\.layer\.\d+\.mlp\.(?:fc1|fc2|weights_in|weights_out)",
        {
            "tiny": _dinov2(64, 2, 4, mlp_ratio=2),
            "tiny-32": _dinov2(32, 2, 2, mlp_ratio=2),
            "small": _dinov2(384, 12, 6, image_size=518),
            "base": _dinov2(768, 12, 12, image_size=518),
            "large": _dinov2(1024, 24, 16, image_size=518),
        },
        {},
    ),
    # SigLIP vision towers: base/16-224, large/16-256, so400m/14 at 896 px as in MedGemma (head off).
    "siglip": _Family(
        "SiglipVisionConfig",
        "SiglipVisionModel",
        "siglip_vision_model",
        SIGLIP_MEAN,
        SIGLIP_STD,
        # Anchored to the encoder: a bare "out_proj" would also wrap the pooling head's
        # nn.MultiheadAttention, where LoRA silently does nothing.
        r"encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj",
        r"encoder\.layers\.\d+\.mlp\.(?:fc1|fc2)",
        {
            **{k: {**v, "patch_size": 16} for k, v in _TINY.items()},
            "base": {**_vit(768, 12, 12, 3072), "patch_size": 16, "image_size": 224},
            "large": {**_vit(1024, 24, 16, 4096), "patch_size": 16, "image_size": 256},
            "so400m": {**_vit(1152, 27, 16, 4304), "patch_size": 14, "image_size": 896},
        },
        {"vision_use_head": False},
    ),
    # VideoMAE (MCG-NJU/videomae-*): tubelet 2 x 16 x 16, 16 frames, mean pooling, fixed sin-cos positions.
    "videomae3d": _Family(
        "VideoMAEConfig",
        "VideoMAEModel",
        "videomae",
        IMAGENET_MEAN,
        IMAGENET_STD,
        r"encoder\.layer\.\d+\.attention\.(?:attention\.(?:query|key|value)|output\.dense)",
        r"encoder\.layer\.\d+\.(?:intermediate\.dense|output\.dense)",
        {
            **{k: {**v, "patch_size": 16, "tubelet_size": 2, "num_frames": 8} for k, v in _TINY.items()},
            "small": {**_vit(384, 12, 6, 1536), "patch_size": 16, "tubelet_size": 2, "num_frames": 16},
            "base": {**_vit(768, 12, 12, 3072), "patch_size": 16, "tubelet_size": 2, "num_frames": 16},
            "large": {**_vit(1024, 24, 16, 4096), "patch_size": 16, "tubelet_size": 2, "num_frames": 16},
        },
        {"use_mean_pooling": True},
        volumetric=True,
    ),
    # MedImageInsight (Microsoft, lion-ai/MedImageInsights): DaViT image encoder + image projection, 480 px.
    "medimageinsight": _Family(
        "DaViTConfig",
        "DaViTImageEncoder",
        "medimageinsight_davit",
        IMAGENET_MEAN,
        IMAGENET_STD,
        r"stages\.\d+\.blocks\.\d+\.(?:spatial|channel)\.attn\.(?:qkv|proj)",
        r"stages\.\d+\.blocks\.\d+\.(?:spatial|channel)\.mlp\.(?:fc1|fc2)",
        {
            # random tiny shapes for tests (also the parity fixture's): widths 8..32, windows of 4 tokens
            "tiny": {"embed_dims": [8, 16, 24, 32], "depths": [1, 1, 2, 1], "num_heads": [2, 2, 2, 4],
                     "num_groups": [2, 2, 2, 4], "window_size": 4, "projection_dim": 16},
            "base": {"embed_dims": [256, 512, 1024, 2048], "depths": [1, 1, 9, 1], "num_heads": [8, 16, 32, 64],
                     "num_groups": [8, 16, 32, 64], "window_size": 12, "projection_dim": 1024, "image_size": 480},
        },
        {},
        module="davit",
        shape_keys=("embed_dims", "depths", "num_heads", "num_groups", "projection_dim"),
        native_image_size=480,
    ),
    # Pillar0-HeadCT (Yala lab): the Atlas vision encoder of the Pillar-0 CLIP model (native torch,
    # model/atlas.py); a genuine 3-D model: the valid slices resampled to num_frames, H = W = image_size;
    # volume feature = its pooled embedding (max over the tokens of each kept scale, concatenated).
    # Pillar-0's evaluation code feeds the windowed volume without mean/std normalisation: identity here.
    "pillar0": _Family(
        "AtlasConfig",
        "AtlasEncoder",
        "pillar0_atlas",
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        r"stages\.\d+\.blocks\.\d+\.scales\.\d+\.attn\.(?:q|kv|proj)",
        r"stages\.\d+\.blocks\.\d+\.scales\.\d+\.mlp\.(?:fc1|fc2)",
        {
            # tiny shapes for tests (also the parity fixture's): 3 windows, 32 x 64 x 64 -> an 8^3 token grid,
            # three scales (8^3, 4^3, 2^3), width 16; the stem keeps the reference's fixed 64 channels
            "tiny": {"in_chans": 3, "stem_dim": 64, "num_features": 8, "dim": 16, "depths": [1, 1, 1],
                     "num_heads": 2, "merge_ratio": 2, "local2global": 2, "num_frames": 32, "image_size": 64},
            # tiny with Pillar-0's 11 channels: tests of the headct input path (windows, depth order) at a small cost
            "tiny-11": {"in_chans": 11, "stem_dim": 64, "num_features": 8, "dim": 16, "depths": [1, 1, 1],
                        "num_heads": 2, "merge_ratio": 2, "local2global": 2, "num_frames": 32, "image_size": 64},
            # the released Pillar0-HeadCT: 11 CT windows, 128 x 256 x 256, width 384, 3 scales -> 1152-d;
            # depths: see docs/backbones.md (the converter reads them from the checkpoint)
            "headct": {"in_chans": 11, "stem_dim": 64, "num_features": 192, "dim": 384, "depths": [6, 6, 6],
                       "num_heads": 6, "merge_ratio": 8, "local2global": 2, "num_frames": 128, "image_size": 256},
        },
        {},
        volumetric=True,
        module="atlas",
        # widths and geometry define the size; per-stage depths and heads come with the weights
        shape_keys=("in_chans", "num_features", "dim", "merge_ratio", "local2global"),
        native_image_size=256,
    ),
}


# Pillar-0's CT windows as its public preprocessing defines them (rve.ANATOMICAL_WINDOWS["CT"], center /
# width in HU, in this channel order), each mapped to 0..1 over [center - width / 2, center + width / 2];
# then an 11th channel, the scan's own min..max ("minmax"). See docs/backbones.md (Pillar0) for the sources.
PILLAR0_CT_WINDOWS = (
    ("lung", -600.0, 1500.0), ("mediastinum", 50.0, 400.0), ("abdomen", 40.0, 400.0), ("liver", 80.0, 150.0),
    ("bone", 400.0, 1800.0), ("brain", 40.0, 80.0), ("subdural", 75.0, 215.0), ("stroke", 40.0, 40.0),
    ("temporal_bone", 600.0, 2800.0), ("soft_tissue", 50.0, 350.0),
)
PILLAR0_WINDOWS_HU = tuple((c - w / 2.0, c + w / 2.0) for _, c, w in PILLAR0_CT_WINDOWS) + ("minmax",)

# PreprocessConfig fields a family's released weights expect, where they differ from the defaults.
# Pillar0-HeadCT: its 11 channels, 128 slices of 256 x 256 px, outside the scan -1 HU (the reference pads its
# volume with -1 before windowing). The reference's voxel spacing is not published: 1 mm pixels (256 mm field of
# view) and 1.5 mm slices (192 mm, skull base to vertex) are OUR assumption (docs/backbones.md).
_PILLAR0_HEADCT_PREPROCESSING = {"windows_hu": PILLAR0_WINDOWS_HU, "num_slices": 128, "image_size": 256,
                                 "in_plane_fov_mm": 256.0, "slice_spacing_mm": 1.5, "outside_hu": -1.0}


def default_preprocessing(family: str, size: str | None = None) -> dict:
    """PreprocessConfig keyword arguments for a family's size (empty: the defaults). For pillar0 headct
    Pillar-0's own 11 windows and geometry; another pillar0 size built for 11 input channels (tiny-11) gets
    the same windows and outside fill, with its own depth (num_frames slices) and the default spacing."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown backbone family {family!r}; choose one of {sorted(FAMILIES)}.")
    if family != "pillar0":
        return {}
    if size == "headct":
        return dict(_PILLAR0_HEADCT_PREPROCESSING)
    shape = FAMILIES[family].sizes.get(size, {})
    if int(shape.get("in_chans", 3)) != len(PILLAR0_WINDOWS_HU):
        return {}
    return {"windows_hu": PILLAR0_WINDOWS_HU, "num_slices": int(shape["num_frames"]),
            "outside_hu": _PILLAR0_HEADCT_PREPROCESSING["outside_hu"]}


def input_channels(family: str, size: str | None = None) -> int:
    """Channels (windows) per voxel a family's size takes: 3 except Pillar0 sizes (their in_chans)."""
    fam = FAMILIES[family]
    return int(fam.sizes.get(size, {}).get("in_chans", 3)) if family == "pillar0" else 3


def default_image_size(family: str, size: str | None = None) -> int:
    """The slice size (px) a family's released weights expect: 480 for MedImageInsight, 256 for Pillar0, else 224;
    a 3-D size whose configuration fixes its slice size (e.g. pillar0 tiny, 64 px) gives that."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown backbone family {family!r}; choose one of {sorted(FAMILIES)}.")
    fam = FAMILIES[family]
    if fam.volumetric and size in fam.sizes and "image_size" in fam.sizes[size]:
        return int(fam.sizes[size]["image_size"])
    return fam.native_image_size or 224


def available_sizes(family: str) -> list[str]:
    """Size names a family offers, e.g. ['tiny', 'tiny-32', 'small', 'base', 'large']."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown backbone family {family!r}; choose one of {sorted(FAMILIES)}.")
    return list(FAMILIES[family].sizes)


def lora_target_pattern(family: str, targets: str = "attention") -> str:
    """Regex (for re.fullmatch over module names of the bare transformers model) of the adapted Linears."""
    fam = FAMILIES[family]
    if targets == "attention":
        return fam.attention_pattern
    if targets == "all-linear":
        return f"(?:{fam.attention_pattern})|(?:{fam.mlp_pattern})"
    raise ValueError(f"LoRA targets must be one of {LORA_TARGET_CHOICES}, got {targets!r}.")


def random_init_config_dict(spec: BackboneSpec) -> dict[str, Any]:
    """Configuration keyword arguments of the size's architecture, as used for random initialisation.

    Real sizes keep their checkpoint's config image size (position tables of the true shape); tiny
    sizes and the 3-D family (fixed sin-cos positions, no interpolation) take `spec.image_size`.
    """
    fam = FAMILIES[spec.family]
    values = dict(fam.sizes[spec.size])
    values.setdefault("image_size", spec.image_size)
    if fam.volumetric and spec.num_frames is not None:
        values["num_frames"] = spec.num_frames
    values.update(fam.fixed_overrides)
    return values


# --------------------------------------------------------------------------------------------------
# Encoders


class _Encoder(nn.Module):
    """Shared part of slice and volume encoders: the peft-wrapped model and the intensity normalisation."""

    volumetric = False

    def __init__(self, spec: BackboneSpec, backbone: nn.Module) -> None:
        super().__init__()
        fam = FAMILIES[spec.family]
        self.spec = spec
        self.backbone = backbone  # a peft PeftModel around the transformers model
        self.feature_dim = int(self.hf_config.hidden_size)
        # input sides must be multiples of this (ViT patch size; native encoders state their own)
        self.patch_size = int(getattr(self.hf_config, "input_multiple", None) or self.hf_config.patch_size)
        self.register_buffer("pixel_mean", torch.tensor(fam.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(fam.std).view(3, 1, 1), persistent=False)

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (with LoRA layers injected)."""
        return self.backbone.get_base_model()

    @property
    def hf_config(self):
        return self.hf_model.config

    @property
    def in_channels(self) -> int:
        """Channels (CT windows) per pixel the backbone takes: 3, or a Pillar0 size's in_chans."""
        return int(getattr(self.hf_config, "in_chans", 3)) if self.spec.family == "pillar0" else 3

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) in 0..1 -> the family's normalised intensities (Pillar0: unchanged)."""
        if self.spec.family == "pillar0":
            return pixels
        return (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)

    def _check_image(self, pixels: torch.Tensor, leading_dims: int, shape_text: str) -> None:
        if pixels.dim() != leading_dims + 3:
            raise ValueError(f"Expected pixels of shape {shape_text}, got {tuple(pixels.shape)}.")
        if pixels.shape[-3] != self.in_channels:
            if self.spec.family == "pillar0":
                raise ValueError(
                    f"This Pillar0 backbone ({self.spec.size}) takes {self.in_channels} CT windows per voxel, but "
                    f"the preprocessing renders {pixels.shape[-3]}; make the bundle with `new-model --backbone "
                    f"pillar0 --size {self.spec.size}`, which writes the matching windows (docs/backbones.md).")
            raise ValueError(f"Expected pixels of shape {shape_text}, got {tuple(pixels.shape)}.")
        if not pixels.is_floating_point():
            raise ValueError(f"Expected float pixels in 0..1, got dtype {pixels.dtype}.")
        height, width = pixels.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"{self.spec.family} backbone needs image sizes that are multiples of its patch size "
                f"{self.patch_size} px, got {height} x {width} px."
            )


class SliceEncoder(_Encoder):
    """2-D backbone + LoRA: forward(pixels (N, 3, H, W), 0..1) -> slice features (N, feature_dim)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_image(pixels, 1, "(N, 3, H, W)")
        pixel_values = self.normalise(pixels)
        if self.spec.family == "siglip":
            needs_interpolation = tuple(pixels.shape[-2:]) != (self.hf_config.image_size,) * 2
            output = self.backbone(pixel_values=pixel_values, interpolate_pos_encoding=needs_interpolation)
            return output.last_hidden_state.mean(dim=1)
        return self.backbone(pixel_values=pixel_values).pooler_output


class VolumeEncoder(_Encoder):
    """3-D backbone + LoRA: forward(pixels (B, S, C, H, W), slice_mask (B, S)) -> volume features (B, d).

    C = 3 windows (Pillar0: its size's in_chans, 11 for headct). The valid slices of each volume (in order,
    inferior -> superior) are resampled linearly along the slice axis to `num_frames` (endpoints kept);
    padding slices never reach the model, except for Pillar0 at its own depth (see ``frames``).
    """

    volumetric = True

    @property
    def num_frames(self) -> int:
        return int(self.hf_config.num_frames)

    def frames(self, pixels: torch.Tensor, slice_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S, C, H, W) + (B, S) -> (B, num_frames, C, H, W): valid slices resampled per volume.

        Pillar0 with S == num_frames (its own geometry, e.g. headct's 128 slices) takes the whole stack as it
        is, invalid slices included: like the reference's centre pad / crop of the volume to 128 slices, the
        slices outside the scan carry the outside_hu fill (-1 HU) through the windows, and no slice is stretched."""
        whole_stack = self.spec.family == "pillar0" and pixels.shape[1] == self.num_frames
        volumes = []
        for index in range(pixels.shape[0]):
            if whole_stack and (slice_mask is None or bool(slice_mask[index].any())):
                volumes.append(pixels[index])
                continue
            slices = pixels[index] if slice_mask is None else pixels[index][slice_mask[index]]
            if slices.shape[0] == 0:
                raise ValueError(f"Volume {index} of the batch has no valid slices (slice_mask all False).")
            volumes.append(resample_slices(slices, self.num_frames))
        return torch.stack(volumes)

    def forward(self, pixels: torch.Tensor, slice_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_image(pixels, 2, "(B, S, C, H, W)")
        size = self.hf_config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(
                f"The 3-D backbone was built for {size} x {size} px slices, got {tuple(pixels.shape[-2:])}; "
                f"preprocess to {size} px."
            )
        pixel_values = self.normalise(self.frames(pixels, slice_mask))
        if self.spec.family == "pillar0":
            # (B, frames, C, H, W) -> (B, C, D, H, W), D reversed: our slices run inferior -> superior, and
            # Pillar-0's reference flips its cached volume along depth before the model (docs/backbones.md)
            return self.backbone(pixel_values=pixel_values.transpose(1, 2).flip(2)).pooler_output
        return self.backbone(pixel_values=pixel_values).last_hidden_state.mean(dim=1)


def resample_slices(slices: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(S, C, H, W) -> (num_frames, C, H, W), linear along the slice axis, first/last slices kept."""
    if slices.shape[0] == num_frames:
        return slices
    if slices.shape[0] == 1:
        return slices.expand(num_frames, *slices.shape[1:])
    as_volume = slices.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, S, H, W)
    height, width = slices.shape[-2:]
    resampled = F.interpolate(as_volume, size=(num_frames, height, width), mode="trilinear", align_corners=True)
    return resampled.squeeze(0).permute(1, 0, 2, 3)


# --------------------------------------------------------------------------------------------------
# Building


def build_backbone(
    spec: BackboneSpec,
    *,
    weights_dir: str | Path | None = None,
    transformers_config: dict[str, Any] | None = None,
) -> SliceEncoder | VolumeEncoder:
    """Build the backbone of `spec`, freeze it, and wrap its attention Linears with LoRA.

    weights_dir: a local folder in Hugging Face format (config.json + *.safetensors); never downloads.
    Without it: `spec.source` if set (a local folder; a hub id is refused), otherwise random
    initialisation from `transformers_config` (e.g. stored in a model bundle) or from the size's real
    configuration. The configuration is checked against the spec (check_transformers_config) BEFORE the
    model is built, so a hostile config never allocates. Returns a SliceEncoder (2-D families) or
    VolumeEncoder (3-D family).
    """
    fam = FAMILIES[spec.family]
    if weights_dir is not None:
        folder = Path(weights_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Backbone weights folder {folder} does not exist; pass a folder in Hugging Face format "
                "(config.json + *.safetensors)."
            )
        model = _load_pretrained(spec, folder)
    elif spec.source and transformers_config is None:
        model = _load_pretrained(spec, _resolve_source(spec.source))
    else:
        model = _random_model(spec, transformers_config)
    _check_architecture(spec, model)
    peft_model = _wrap_with_lora(model, lora_target_pattern(spec.family, spec.lora.targets), spec.lora)
    encoder_class = VolumeEncoder if fam.volumetric else SliceEncoder
    return encoder_class(spec, peft_model)


def _resolve_source(source: str) -> Path:
    """The local folder of a backbone source; anything else (e.g. a hub id) is refused: no downloads."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    raise FileNotFoundError(
        f"Backbone source {source!r} is not a local folder, and HeadCTMoLRE never downloads at run time. "
        "Download the model elsewhere and pass its local folder (Hugging Face format: config.json + "
        "*.safetensors) as the backbone weights directory."
    )


def _load_pretrained(spec: BackboneSpec, location: Path) -> nn.Module:
    """from_pretrained on a checked local folder (local_files_only: never downloads); fp32, SDPA.
    Refuses a folder whose weights miss any parameter of the architecture (no silent random init)."""
    fam = FAMILIES[spec.family]
    _, model_class = fam.classes()
    values = _check_local_folder(spec, location)
    if fam.native:
        return model_class.from_pretrained(location)
    own_stem = patch_stem_of(values) != "linear"
    # a non-linear patch stem is not transformers' own: its load report would list the stem as missing and
    # unexpected; the stem is loaded and checked below, every other key as usual
    with _transformers_errors_only(own_stem):
        model, info = model_class.from_pretrained(
            str(location),
            local_files_only=True,
            attn_implementation="sdpa",
            use_safetensors=True,
            dtype=torch.float32,
            output_loading_info=True,
            **fam.fixed_overrides,
        )
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if own_stem:  # transformers built its linear stem; the folder holds another
        missing = sorted(set(missing) - _load_patch_stem(model, location))
    if missing or mismatched:
        shown = ", ".join(map(str, (missing or mismatched)[:5]))
        raise ValueError(
            f"Backbone folder {location} lacks weights of the architecture ({len(missing)} missing, "
            f"{len(mismatched)} of the wrong shape: {shown}); they would be random. Use the complete "
            "checkpoint folder."
        )
    return model


@contextlib.contextmanager
def _transformers_errors_only(active: bool):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    if active:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _load_patch_stem(model: nn.Module, location: Path) -> set[str]:
    """Install the non-linear patch stem the folder's config names (patch_stem.py) on a model transformers
    built with its linear one, and load the stem's tensors from the folder's *.safetensors (read one by
    one, strict: a missing or extra stem tensor is refused). Returns the linear stem's parameter names,
    which transformers reported missing and which the model no longer has."""
    from safetensors import safe_open

    replaced = {f"embeddings.patch_embeddings.{name}" for name, _ in model.embeddings.patch_embeddings.named_parameters()}
    install_patch_stem(model)
    stem = model.embeddings.patch_embeddings
    state: dict[str, torch.Tensor] = {}
    for path in sorted(location.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if "embeddings.patch_embeddings." in key:
                    state[key.split("embeddings.patch_embeddings.", 1)[1]] = handle.get_tensor(key)
    expected = set(stem.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Backbone folder {location} does not hold the weights of its {patch_stem_of(model.config)} patch stem "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); they would be random. Use the complete "
            "folder written by save_pretrained()."
        )
    stem.load_state_dict(state, strict=True)
    return replaced


def _check_local_folder(spec: BackboneSpec, folder: Path) -> dict[str, Any]:
    """Check a Hugging Face folder before anything is built; returns its config.json values."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"Backbone folder {folder} has no config.json; pass a folder in Hugging Face format "
            "(config.json + model.safetensors), e.g. one written by save_pretrained()."
        )
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"Backbone folder {folder} has no *.safetensors weights (pickled .bin files are refused); "
            "convert the checkpoint to safetensors."
        )
    if config_path.stat().st_size > 1024 * 1024:
        raise ValueError(f"Backbone folder {folder}: config.json is larger than 1 MiB; not a model configuration.")
    try:
        with config_path.open(encoding="utf-8") as handle:
            values = json.load(handle)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"Backbone folder {folder}: config.json is not valid JSON ({str(error)[:200]}).") from None
    if not isinstance(values, dict):
        raise ValueError(f"Backbone folder {folder}: config.json is not a JSON object.")
    model_type = values.get("model_type")
    expected = FAMILIES[spec.family].model_type
    accepted = {expected, "siglip"} if spec.family == "siglip" else {expected}
    if model_type not in accepted:
        raise ValueError(
            f"Backbone folder {folder} holds a {model_type!r} model, but family {spec.family!r} needs "
            f"model_type {expected!r}; choose the matching --backbone family or another folder."
        )
    if spec.family == "siglip" and isinstance(values.get("vision_config"), dict):
        values = values["vision_config"]  # a full SiGLIP checkpoint: the vision tower's part
    check_transformers_config(spec, values, where=f"Backbone folder {folder}")
    return values


def _random_model(spec: BackboneSpec, transformers_config: dict[str, Any] | None) -> nn.Module:
    fam = FAMILIES[spec.family]
    config_class, _ = fam.classes()
    if transformers_config is not None:
        check_transformers_config(spec, transformers_config)  # before anything is allocated
        values = {k: v for k, v in transformers_config.items() if k not in ("transformers_version", "architectures")}
        config = config_class.from_dict(values)
    else:
        config = config_class(**random_init_config_dict(spec))
    if not fam.native:
        config._attn_implementation = "sdpa"
    return _bare_model(spec.family, config)


def _bare_model(family: str, config) -> nn.Module:
    """The family's model class built on ``config`` (random weights), with the patch stem the config names."""
    _, model_class = FAMILIES[family].classes()
    model = model_class(config)
    return model if FAMILIES[family].native else install_patch_stem(model)


#: Bounds of the configuration values that size a backbone (a stored or downloaded config.json is checked
#: against them, and against the spec's size, before any model is built).
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "image_size": (8, 4096), "patch_size": (1, 64), "num_channels": (3, 3), "num_register_tokens": (0, 64),
    "num_frames": (1, 512), "tubelet_size": (1, 8), "mlp_ratio": (1, 16),
    "depths": (1, 64), "in_chans": (1, 64), "stem_dim": (1, 1024), "num_features": (1, 4096), "dim": (1, 8192),
    "num_heads": (1, 256), "merge_ratio": (1, 64), "local2global": (2, 8), "position_hidden": (1, 4096),
}
MAX_INTERMEDIATE_RATIO = 16


def check_transformers_config(spec: BackboneSpec, values: Any, where: str = "backbone configuration") -> None:
    """Raise ValueError unless ``values`` (a transformers config as a dict) has the shape of ``spec``'s
    family and size: model_type, the size's width, depth and heads, and bounded image size, patch
    size, MLP width, register tokens and frames. Cheap: nothing is built."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} is not a JSON object.")
    fam = FAMILIES[spec.family]
    model_type = values.get("model_type")
    accepted = {fam.model_type, "siglip"} if spec.family == "siglip" else {fam.model_type}
    if model_type is not None and model_type not in accepted:
        raise ValueError(f"{where} is a {str(model_type)[:40]!r} model, but family {spec.family!r} needs "
                         f"model_type {fam.model_type!r}.")
    expected = fam.sizes[spec.size]
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for key in fam.shape_keys:  # width, depth, heads (native families: their own shape keys)
        value = values.get(key)
        if plain(value) != plain(expected[key]) or isinstance(value, bool):
            raise ValueError(
                f"Backbone weights have {key}={str(value)[:40]}, but size {spec.size!r} of "
                f"{spec.family!r} means {key}={expected[key]}; set the size that matches the weights."
            )
    for key, (low, high) in CONFIG_BOUNDS.items():
        value = values.get(key)
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple)) and 0 < len(value) <= 16 else [value]  # per stage
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high for v in items):
            raise ValueError(f"{where}: {key}={str(value)[:40]} is outside [{low}, {high}].")
    check_patch_stem(spec.family, values, where)
    intermediate = values.get("intermediate_size")
    if intermediate is not None and "hidden_size" in expected:
        limit = MAX_INTERMEDIATE_RATIO * expected["hidden_size"]
        if isinstance(intermediate, bool) or not isinstance(intermediate, int) or not 1 <= intermediate <= limit:
            raise ValueError(f"{where}: intermediate_size={str(intermediate)[:40]} is outside [1, {limit}].")


def _check_architecture(spec: BackboneSpec, model: nn.Module) -> None:
    """The model's shape must be the one its spec names (catches a 'base' spec with ViT-L weights)."""
    fam = FAMILIES[spec.family]
    expected = fam.sizes[spec.size]
    config = model.config

    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for key in fam.shape_keys:
        if plain(getattr(config, key)) != plain(expected[key]):
            raise ValueError(
                f"Backbone weights have {key}={getattr(config, key)}, but size {spec.size!r} of "
                f"{spec.family!r} means {key}={expected[key]}; set the size that matches the weights."
            )
    if FAMILIES[spec.family].volumetric:
        if spec.num_frames is not None and config.num_frames != spec.num_frames:
            raise ValueError(
                f"3-D backbone weights expect {config.num_frames} frames, but the spec asks for {spec.num_frames}."
            )
        if config.image_size != spec.image_size:
            raise ValueError(
                f"3-D backbone weights expect {config.image_size} px slices (no position interpolation), "
                f"but the spec asks for {spec.image_size} px; set image_size={config.image_size}."
            )


def _wrap_with_lora(model: nn.Module, pattern: str, lora: LoraSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    matched = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    if not matched:
        raise RuntimeError(f"No module of {type(model).__name__} matches the LoRA target pattern {pattern!r}.")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers helper
        return get_peft_model(model, config)  # freezes every non-LoRA parameter


# --------------------------------------------------------------------------------------------------
# Introspection and base weights (for model bundles)


def adapted_module_names(encoder: SliceEncoder | VolumeEncoder) -> list[str]:
    """Names (in the bare transformers model) of the Linear layers that carry LoRA, sorted."""
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, module in encoder.hf_model.named_modules() if isinstance(module, LoraLayer))


def transformers_config_dict(encoder: SliceEncoder | VolumeEncoder) -> dict[str, Any]:
    """The transformers configuration as a JSON-ready dict (rebuild with build_backbone(transformers_config=)),
    without ``_name_or_path``: the folder it was loaded from on the machine that made it, not needed to rebuild."""
    data = encoder.hf_config.to_dict()
    data.pop("_name_or_path", None)
    return json.loads(json.dumps(data, default=str))


def base_state_dict(encoder: SliceEncoder | VolumeEncoder) -> dict[str, torch.Tensor]:
    """Frozen base weights under their Hugging Face names (LoRA excluded, '.base_layer' removed)."""
    state = {}
    for name, tensor in encoder.hf_model.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def load_base_state_dict(encoder: SliceEncoder | VolumeEncoder, state: dict[str, torch.Tensor]) -> None:
    """Load base weights saved by `base_state_dict`; every key must match exactly."""
    adapted = set(adapted_module_names(encoder))
    mapped = {}
    for name, tensor in state.items():
        module_name, _, leaf = name.rpartition(".")
        mapped[f"{module_name}.base_layer.{leaf}" if module_name in adapted else name] = tensor
    expected = {k for k in encoder.hf_model.state_dict() if "lora_" not in k}
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise KeyError(
            f"Backbone base weights do not match the architecture: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}."
        )
    encoder.hf_model.load_state_dict(mapped, strict=False)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of tensors, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_weights_sha256(encoder: SliceEncoder | VolumeEncoder) -> str:
    """Fingerprint of the frozen base weights (to record which backbone weights a bundle was trained on)."""
    return state_dict_sha256(base_state_dict(encoder))


def lora_parameter_count(encoder: SliceEncoder | VolumeEncoder) -> int:
    return sum(p.numel() for name, p in encoder.named_parameters() if "lora_" in name)


def save_backbone_pretrained(encoder: SliceEncoder | VolumeEncoder, directory: str | Path) -> Path:
    """Write the frozen base model (without LoRA) as a Hugging Face folder (config.json + model.safetensors)."""
    plain = _bare_model(encoder.spec.family, encoder.hf_config)
    plain.load_state_dict(base_state_dict(encoder), strict=True)
    directory = Path(directory)
    plain.save_pretrained(directory, safe_serialization=True)
    return directory

