"""Pillar-0's vision encoder: Atlas (multi-scale attention on volumetric tokens), natively in torch.

Architecture (learned from the public Atlas / Pillar-0 model code; written here from scratch):

    volume (B, C_in, D, H, W): C_in CT windows, D slices (axis 0 of the volume), H x W in-plane
    convolutional stem (BatchNorm3d throughout, bias-free convolutions):
        3x3x3 conv C_in -> 64, stride (1, 2, 2), BN, ReLU; 3x3x3 conv 64 -> E, stride 2, BN, ReLU;
        3x3x3 conv E -> E, BN, ReLU; three residual blocks x += BN(conv(GELU(BN(conv(x)))));
        channel LayerNorm, then a 3x3x3 conv E -> 2E with stride 2            => stride (4, 8, 8)
    tokens: the (g0, g1, g2) grid of width dim = 2E
    scales: scale s is the grid max-pooled by local2global^s; a scale larger than merge_ratio is cut
        into windows of merge_ratio^3 tokens, the first that is not ends the pyramid (one window)
    Atlas stages (len(depths) of them), each depth_i multi-scale attention blocks; a block, with one
        cross-window transformer block and one position MLP per scale:
        1. every scale adds a position embedding: MLP(3 -> 512 -> dim) of the centred, normalised
           (h, w, d) coordinates inside its window
        2. bottom-up: scale s+1 += max-pool of scale s (cascading, finest first)
        3. top-down, coarsest first: scale s attends (pre-norm, heads) to itself and to the keys /
           values of every coarser scale already updated (window j of scale s reads window
           j // (windows_s / windows_t) of scale t); then an MLP residual
        4. bottom-up again, s = 1 .. : each window of scale s-1 is attended by the co-located queries
           of scale s (one-to-one cross attention); then an MLP residual
        stage i hands scales i.. to stage i+1 and keeps scale i as its output
    embedding = concat over the kept scales of the max over their tokens            (B, dim x scales)

The released Pillar0-HeadCT (model.visual.* of the CLIP checkpoint) sees 11 CT windows of a
128 x 256 x 256 volume (D x H x W): a 32^3 token grid of width 384 (E = 192), merge_ratio 8 and
local2global 2, i.e. three scales (32^3 in 64 windows, 16^3 in 8 windows, 8^3 in one) and a
1152-d embedding. The stage depths are read from the checkpoint by the converter; the number of heads
is not visible in the weights (see docs/backbones.md for what is assumed).

Token grids must be cubic (the released model's is): the reference orders window grids as
(h, w, d) in some places and (d, h, w) in others, which only agree for cubic grids.

BatchNorm layers always use their running statistics (train() keeps them in eval mode): batches of
one or two volumes would otherwise replace the pre-trained statistics; fine-tuning still trains their
affine weights. The module is HF-like (`config`, `save_pretrained`, `from_pretrained` on a local folder
of config.json + model.safetensors); LoRA (peft) targets its attention Linears
`stages.I.blocks.J.scales.S.attn.{q,kv,proj}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .davit import NativeConfig, NativeFolderModel, _init_weights as init_linear_and_norm, _Mlp

MODEL_TYPE = "pillar0_atlas"
STEM_STRIDE = (4, 8, 8)  # (D, H, W) voxels per token


@dataclass
class AtlasConfig(NativeConfig):
    """Shape of an Atlas volume encoder; the defaults are Pillar0-HeadCT's (128 x 256 x 256, 11 windows)."""

    config_name = "Atlas"

    in_chans: int = 11
    stem_dim: int = 64
    num_features: int = 192  # stem width E; tokens have width dim = 2E
    dim: int = 384
    depths: list[int] = field(default_factory=lambda: [6, 6, 6])
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    merge_ratio: int = 8
    local2global: int = 2
    position_hidden: int = 512
    num_frames: int = 128  # D: slices of the volume the encoder sees
    image_size: int = 256  # H = W in px
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        self.depths = [int(d) for d in self.depths]
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"Atlas config: model_type must be {MODEL_TYPE!r}, got {self.model_type!r}.")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"Atlas config: depths must be positive per stage, got {self.depths}.")
        if self.dim != 2 * self.num_features:
            raise ValueError(f"Atlas config: dim {self.dim} must be twice num_features {self.num_features}.")
        if self.dim % self.num_heads:
            raise ValueError(f"Atlas config: dim {self.dim} is not divisible by {self.num_heads} heads.")
        if self.merge_ratio < 1 or self.local2global < 2:
            raise ValueError("Atlas config: merge_ratio must be >= 1 and local2global >= 2.")
        grid = self.token_grid
        if any(v < 1 for v in grid) or (grid[0] * STEM_STRIDE[0], grid[1] * STEM_STRIDE[1]) != (self.num_frames, self.image_size):
            raise ValueError(
                f"Atlas config: a {self.num_frames} x {self.image_size} x {self.image_size} volume must be a multiple "
                f"of the stem stride {STEM_STRIDE} (D x H x W)."
            )
        if len(set(grid)) != 1:
            raise ValueError(
                f"Atlas config: the token grid {grid} must be cubic (num_frames / 4 == image_size / 8); "
                "the reference's window ordering is only defined for cubic grids."
            )
        self.scale_layout()  # raises on grids that do not window evenly

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return (self.num_frames // STEM_STRIDE[0], self.image_size // STEM_STRIDE[1], self.image_size // STEM_STRIDE[2])

    def scale_layout(self) -> list[tuple[int, int]]:
        """(side, windows per side) of each scale: scale s has side^3 tokens in (windows per side)^3 windows."""
        side, m, l = self.token_grid[0], self.merge_ratio, self.local2global
        limit = math.ceil(math.log2(side ** 3 / m ** 3) / math.log2(l ** 3)) + 1 if side > m else 1
        layout = []
        for _ in range(limit):
            if side > m:
                if side % m:
                    raise ValueError(f"Atlas config: a scale of side {side} does not cut into windows of {m}.")
                layout.append((side, side // m))
            else:
                layout.append((side, 1))
                break
            if side % l:
                raise ValueError(f"Atlas config: a scale of side {side} does not pool by {l}.")
            side //= l
        return layout

    @property
    def num_scales(self) -> int:
        return len(self.scale_layout())

    @property
    def num_outputs(self) -> int:
        """Scales read out into the embedding: one per stage, at most one per scale."""
        return min(len(self.depths), self.num_scales)

    # The names backbones.py reads from every family's config.
    @property
    def hidden_size(self) -> int:
        return self.dim * self.num_outputs

    @property
    def input_multiple(self) -> int:
        return STEM_STRIDE[1]



@dataclass
class AtlasOutput:
    """scales: the kept scales' tokens, each (B, tokens, dim); pooler_output: (B, hidden_size) embedding."""

    scales: list[torch.Tensor]
    pooler_output: torch.Tensor

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return torch.cat(self.scales, dim=1)


# -------------------------------------------------------------------------------------------------
# Convolutional stem


class _ResidualConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv3d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(dim, eps=1e-5)
        self.conv2 = nn.Conv3d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm3d(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)))))


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of (B, C, D, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class _Stem(nn.Module):
    def __init__(self, config: AtlasConfig):
        super().__init__()
        c, s, e = config.in_chans, config.stem_dim, config.num_features
        self.conv1 = nn.Conv3d(c, s, 3, stride=(1, 2, 2), padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(s, eps=1e-4)
        self.conv2 = nn.Conv3d(s, e, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(e, eps=1e-4)
        self.conv3 = nn.Conv3d(e, e, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm3d(e, eps=1e-4)
        self.blocks = nn.Sequential(*(_ResidualConv(e) for _ in range(3)))
        self.down_norm = _ChannelNorm(e, eps=1e-6)
        self.down = nn.Conv3d(e, 2 * e, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.down(self.down_norm(self.blocks(x)))


# -------------------------------------------------------------------------------------------------
# Multi-scale attention


class _Attention(nn.Module):
    """Query / key-value projections and the output projection of one scale (heads, SDPA)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, C) -> (N, heads, T, C / heads)."""
        n, t, c = x.shape
        return self.q(x).view(n, t, self.heads, c // self.heads).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, c = x.shape
        k, v = self.kv(x).view(n, t, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v)
        n, h, t, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(n, t, h * d))


class _ScaleBlock(nn.Module):
    """The per-scale weights of a multi-scale block: pre-norms, attention, MLP."""

    def __init__(self, config: AtlasConfig):
        super().__init__()
        dim = config.dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = _Attention(dim, config.num_heads, config.qkv_bias)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * config.mlp_ratio))

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.queries(self.norm_q(x))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.keys_values(self.norm_kv(x))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm_mlp(x))


class _PositionMlp(nn.Module):
    """MLP(3 -> hidden -> dim) of window coordinates, centred and scaled to about [-1, 1] per axis."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(3, hidden)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, side: int, like: torch.Tensor) -> torch.Tensor:
        axis = torch.arange(side, device=like.device, dtype=torch.float32)
        if side > 1:
            axis = (axis - side // 2) / (side // 2)
        coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, side ** 3, 3)
        return self.fc2(F.relu(self.fc1(coords.to(like.dtype))))


def _grid_of_windows(x: torch.Tensor, batch: int, windows: int, side: int) -> torch.Tensor:
    """(B * windows^3, side^3, C) window tokens -> (B, W*side, W*side, W*side, C) full grid."""
    c = x.shape[-1]
    x = x.view(batch, windows, windows, windows, side, side, side, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, windows * side, windows * side, windows * side, c)


def _windows_of_grid(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, G, G, G, C) -> (B * (G/window)^3, window^3, C), windows and tokens in (d, h, w) order."""
    b, g, _, _, c = x.shape
    n = g // window
    x = x.view(b, n, window, n, window, n, window, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b * n ** 3, window ** 3, c)


class _MultiScaleBlock(nn.Module):
    def __init__(self, config: AtlasConfig, num_scales: int):
        super().__init__()
        self.scales = nn.ModuleList(_ScaleBlock(config) for _ in range(num_scales))
        self.positions = nn.ModuleList(_PositionMlp(config.dim, config.position_hidden) for _ in range(num_scales))

    def forward(self, xs: list[torch.Tensor], layout: list[tuple[int, int]], batch: int, pool: int) -> list[torch.Tensor]:
        """xs[s]: (B * windows_s^3, window_s^3, dim) for the scales this stage still holds (finest first)."""
        n = len(xs)
        window = [side // windows for side, windows in layout]
        xs = [x + self.positions[s](window[s], x) for s, x in enumerate(xs)]
        # 1. local -> global: each scale adds the max-pool of the (already updated) finer one
        for s in range(n - 1):
            grid = _grid_of_windows(xs[s], batch, layout[s][1], window[s])  # (B, G, G, G, C)
            pooled = F.max_pool3d(grid.permute(0, 4, 1, 2, 3), pool).permute(0, 2, 3, 4, 1)
            xs[s + 1] = xs[s + 1] + _windows_of_grid(pooled, window[s + 1])
        # 2. top-down: self attention plus attention to every coarser, already updated scale
        for s in range(n - 1, -1, -1):
            block = self.scales[s]
            keys, values = zip(*([block.keys_values(xs[s])] + [
                tuple(kv.repeat_interleave(xs[s].shape[0] // xs[t].shape[0], dim=0)
                      for kv in self.scales[t].keys_values(xs[t]))
                for t in range(n - 1, s, -1)
            ]))
            x = xs[s] + block.attn.attend(block.queries(xs[s]), torch.cat(keys, 2), torch.cat(values, 2))
            xs[s] = block.mlp_residual(x)
        # 3. bottom-up: the co-located queries of scale s read each window of scale s-1
        for s in range(1, n):
            block = self.scales[s]
            fine_windows, fine_window = layout[s - 1][1], window[s - 1]
            q = block.queries(xs[s])  # (B * w_s^3, heads, window_s^3, d)
            h, d = q.shape[1], q.shape[-1]
            q = _grid_of_windows(q.transpose(1, 2).reshape(q.shape[0], q.shape[2], h * d), batch, layout[s][1], window[s])
            part = fine_window // pool  # side of scale s's block over one window of scale s-1
            q = _windows_of_grid(q, part)  # windows in scale s-1's order
            q = q.view(q.shape[0], part ** 3, h, d).transpose(1, 2)
            k, v = self.scales[s - 1].keys_values(xs[s - 1])
            out = block.attn.attend(q, k, v)  # (B * w_{s-1}^3, part^3, C)
            out = _windows_of_grid(_grid_of_windows(out, batch, fine_windows, part), window[s])
            xs[s] = block.mlp_residual(xs[s] + out)
        return xs


class _Stage(nn.Module):
    def __init__(self, config: AtlasConfig, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(_MultiScaleBlock(config, config.num_scales) for _ in range(depth))

    def forward(self, xs: list[torch.Tensor], layout: list[tuple[int, int]], batch: int, pool: int) -> list[torch.Tensor]:
        for block in self.blocks:
            xs = block(xs, layout, batch, pool)
        return xs


class AtlasEncoder(NativeFolderModel, nn.Module):
    """forward(pixel_values (B, in_chans, D, H, W)) -> AtlasOutput (kept scales, (B, hidden_size) embedding)."""

    config_class = AtlasConfig

    def __init__(self, config: AtlasConfig):
        super().__init__()
        self.config = config
        self.stem = _Stem(config)
        self.stages = nn.ModuleList(_Stage(config, depth) for depth in config.depths)
        self.apply(_init_weights)

    def train(self, mode: bool = True) -> "AtlasEncoder":
        super().train(mode)
        for module in self.modules():  # BatchNorm keeps its running statistics (see the module docstring)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def scale_tokens(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Stem + pyramid: one (B * windows^3, window^3, dim) tensor per scale."""
        config = self.config
        expected = (config.in_chans, config.num_frames, config.image_size, config.image_size)
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"Atlas encoder expects (B, {', '.join(map(str, expected))}) volumes, "
                             f"got {tuple(pixel_values.shape)}.")
        grid = self.stem(pixel_values)  # (B, C, G, G, G)
        tokens = []
        for s, (side, windows) in enumerate(config.scale_layout()):
            pooled = F.max_pool3d(grid, config.local2global ** s) if s else grid
            tokens.append(_windows_of_grid(pooled.permute(0, 2, 3, 4, 1), side // windows))
        return tokens

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> AtlasOutput:
        config = self.config
        batch = pixel_values.shape[0]
        xs = self.scale_tokens(pixel_values)
        layout = config.scale_layout()
        kept = []
        for i, stage in enumerate(self.stages):
            xs = stage(xs, layout, batch, config.local2global)
            if i < len(self.stages) - 1 and len(xs) > 1:
                kept.append(xs[0])
                xs, layout = xs[1:], layout[1:]
        kept.append(xs[0])
        scales = [x.reshape(batch, -1, x.shape[-1]) for x in kept]
        return AtlasOutput(scales=scales, pooler_output=torch.cat([x.amax(dim=1) for x in scales], dim=1))


def _init_weights(module: nn.Module) -> None:
    """Random initialisation: Kaiming 3-D convolutions, unit BatchNorms; Linears and LayerNorms as DaViT's."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm3d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    else:
        init_linear_and_norm(module)
