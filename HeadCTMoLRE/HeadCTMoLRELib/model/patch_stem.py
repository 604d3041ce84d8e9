"""A convolutional patch stem for ViTs trained here (the demo backbone), in place of the linear patch embedding.

A ViT turns each P x P patch into a token with ONE linear map (a Conv2d with kernel = stride = P). A finding
of one or two pixels inside a patch (a lacune, a thrombosed sinus next to the bone, a dense vessel) is then a
small linear change of a token dominated by the patch's anatomy, and a small ViT trained from scratch in
minutes did not learn to see it (docs/demo_model.md). The conv stem gives every patch token local,
non-linear detectors first (the "early convolutions" of hybrid ViTs):

    (N, C, H, W) -> conv 3x3, stride 1, C -> w, GELU
                 -> conv 3x3, stride 2, w -> 2w, GELU
                 -> conv (P/2)x(P/2), stride P/2, 2w -> hidden     = (N, hidden, H/P, W/P)

the same token grid as the linear embedding (token (r, c) sees pixels r*P .. (r+1)*P of its patch, and one
pixel around it), so everything after it (RoPE, CLS and register tokens, the encoder) is unchanged.

It is an architecture setting of the transformers configuration: ``config.patch_stem`` ("linear", the
default and every published checkpoint, or "conv"), stored in config.json and in a bundle's backbone
configuration, so a folder or a bundle always rebuilds the stem its weights were trained with. Only the
DINOv3 family takes it (its embeddings hold ``patch_embeddings``); published foundation models have a
linear stem, so the conv stem is for backbones trained here (``training.pretrain``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .manifest_schema import PATCH_STEM_KEY, PATCH_STEMS, patch_stem_of

#: Families whose transformers model can take the conv stem (``model.embeddings.patch_embeddings``).
CONV_STEM_FAMILIES = ("dinov3",)
#: Channels of the first conv layer (the second has twice as many).
CONV_STEM_WIDTH = 16


class ConvPatchStem(nn.Module):
    """(N, C, H, W) -> (N, hidden, H / patch, W / patch): two 3x3 convolutions (the second of stride 2) with
    GELU, then a (patch / 2)-sized convolution of stride patch / 2. ``patch`` must be even and >= 4."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int, width: int = CONV_STEM_WIDTH) -> None:
        super().__init__()
        if not _fits_conv_stem(patch_size):
            raise ValueError(f"A conv patch stem needs an even patch size of at least 4 px, got {patch_size}.")
        half = patch_size // 2
        # plain attribute names: transformers' checkpoint key conversion rewrites names containing "layer"
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(2 * width, hidden_size, half, stride=half)
        self.act = nn.GELU()

    @property
    def weight(self):
        """The last convolution's weight (transformers reads ``patch_embeddings.weight.dtype``)."""
        return self.proj.weight

    def forward(self, pixels):
        return self.proj(self.act(self.conv2(self.act(self.conv1(pixels)))))


def _fits_conv_stem(patch_size: Any) -> bool:
    """The conv stem halves twice: it needs an even integer patch of at least 4 px."""
    return isinstance(patch_size, int) and not isinstance(patch_size, bool) and patch_size >= 4 and patch_size % 2 == 0


def check_patch_stem(family: str, config: Any, where: str) -> None:
    """ValueError unless the config's patch stem is known and, for "conv", the family can take it."""
    stem = patch_stem_of(config)
    if stem not in PATCH_STEMS:
        raise ValueError(f"{where}: {PATCH_STEM_KEY}={str(stem)[:40]!r} is not one of {list(PATCH_STEMS)}.")
    if stem == "conv":
        if family not in CONV_STEM_FAMILIES:
            raise ValueError(f"{where}: a conv patch stem is only built for the {list(CONV_STEM_FAMILIES)} "
                             f"families, not {family!r}.")
        patch = config.get("patch_size") if isinstance(config, dict) else getattr(config, "patch_size", None)
        if not _fits_conv_stem(patch):
            raise ValueError(f"{where}: a conv patch stem needs an even patch_size of at least 4 px, got {patch!r}.")


def install_patch_stem(model: nn.Module) -> nn.Module:
    """Give a freshly built transformers model the stem its config names (in place; returns it). A "linear"
    config is left as transformers built it; "conv" replaces ``embeddings.patch_embeddings``."""
    config = model.config
    if patch_stem_of(config) == "conv":
        model.embeddings.patch_embeddings = ConvPatchStem(int(config.num_channels), int(config.hidden_size),
                                                          int(config.patch_size))
    return model
