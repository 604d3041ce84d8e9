"""MedImageInsight's image encoder: a DaViT (Dual Attention Vision Transformer), natively in torch.

Architecture (learned from the public MedImageInsight model code and config; written here from scratch):

    pixels (N, 3, H, W), ImageNet-normalised, 480 px for the released model
    4 stages; stage i: a strided convolutional patch embedding (7x7/4, then 3x3/2 three times; the last
        three apply a LayerNorm over their input tokens first), then depth_i pairs of blocks:
        spatial block: x += dwconv3x3(x); x += WindowAttention(LN(x)) (heads, windows of w x w tokens,
                       the grid zero-padded to a multiple of w); x += dwconv3x3(x); x += MLP(LN(x))
        channel block: the same with channel group attention (the token axis is attended over per
                       group of channels: softmax((q^T k) / sqrt(N)) of size (C/g x C/g))
    embedding = LN(mean over the tokens of stage 4) @ image_projection        (N, projection_dim)

The real size ("base") has stage widths 256/512/1024/2048, depths 1/1/9/1, heads and groups 8/16/32/64,
window 12, MLP ratio 4 and a 2048 -> 1024 projection: 360.6 M parameters in the image encoder plus
2.1 M in the projection (total 362.7 M; the text tower is not used and not converted).

The module is HF-like (`config`, `save_pretrained`, `from_pretrained` on a local folder holding
config.json + model.safetensors) so that backbones.py treats it as any other family; LoRA (peft)
targets its attention Linears: `stages.I.blocks.J.{spatial,channel}.attn.{qkv,proj}`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

MODEL_TYPE = "medimageinsight_davit"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class NativeConfig:
    """JSON round trip of a native backbone's dataclass config (``config_name`` names it in messages)."""

    config_name = "native backbone"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"_attn_implementation"})
        if unknown:
            raise ValueError(f"{cls.config_name} config has unknown entries {unknown}; it was written by another program.")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class DaViTConfig(NativeConfig):
    """Shape of a DaViT image encoder; the defaults are MedImageInsight's released model (480 px)."""

    config_name = "DaViT"

    embed_dims: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [1, 1, 9, 1])
    num_heads: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    num_groups: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    patch_size: list[int] = field(default_factory=lambda: [7, 3, 3, 3])
    patch_stride: list[int] = field(default_factory=lambda: [4, 2, 2, 2])
    patch_padding: list[int] = field(default_factory=lambda: [3, 1, 1, 1])
    patch_prenorm: list[bool] = field(default_factory=lambda: [False, True, True, True])
    window_size: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    projection_dim: int = 1024
    image_size: int = 480
    layer_norm_eps: float = 1e-5
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        for name in ("embed_dims", "depths", "num_heads", "num_groups", "patch_size", "patch_stride",
                     "patch_padding", "patch_prenorm"):
            setattr(self, name, list(getattr(self, name)))
        stages = len(self.embed_dims)
        lengths = {name: len(getattr(self, name)) for name in ("depths", "num_heads", "num_groups", "patch_size",
                                                                "patch_stride", "patch_padding", "patch_prenorm")}
        wrong = {k: v for k, v in lengths.items() if v != stages}
        if wrong:
            raise ValueError(f"DaViT config: every per-stage list needs {stages} entries, got {wrong}.")
        for dim, heads, groups in zip(self.embed_dims, self.num_heads, self.num_groups):
            if dim % heads or dim % groups:
                raise ValueError(f"DaViT config: width {dim} is not divisible by {heads} heads / {groups} groups.")
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"DaViT config: model_type must be {MODEL_TYPE!r}, got {self.model_type!r}.")

    # The names backbones.py reads from every family's config.
    @property
    def hidden_size(self) -> int:
        """Size of the exposed embedding (after the image projection)."""
        return self.projection_dim

    @property
    def input_multiple(self) -> int:
        """Any image size works (strided convolutions, windows zero-padded): no multiple is required."""
        return 1



@dataclass
class EncoderOutput:
    """last_hidden_state: (N, tokens, C_last) stage-4 tokens; pooler_output: (N, projection_dim) embedding."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


class _PatchEmbed(nn.Module):
    """Strided convolution from the previous stage's grid (or the image) to this stage's tokens."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, padding: int, prenorm: bool, eps: float):
        super().__init__()
        self.prenorm = prenorm
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(in_dim if prenorm else out_dim, eps=eps)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """x: (N, 3, H, W) image or (N, H*W, C) tokens -> (N, H'*W', out_dim) tokens and (H', W')."""
        if x.dim() == 3:
            if self.prenorm:
                x = self.norm(x)
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if not self.prenorm:
            x = self.norm(x)
        return x, grid


class _PositionConv(nn.Module):
    """Depth-wise 3x3 convolution on the token grid (a conditional position encoding), added as a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, _, channels = x.shape
        image = x.transpose(1, 2).reshape(batch, channels, *grid)
        return self.conv(image).flatten(2).transpose(1, 2)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping w x w windows of the token grid.

    The grid is zero-padded at the bottom/right to a multiple of w; padded tokens take part in the
    attention of their window (unmasked, as in the reference) and are cropped afterwards.
    """

    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, _, channels = x.shape
        height, width = grid
        w = self.window
        x = x.view(batch, height, width, channels)
        pad_h, pad_w = (-height) % w, (-width) % w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // w, (width + pad_w) // w
        windows = x.view(batch, rows, w, cols, w, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, channels)
        qkv = self.qkv(windows).view(windows.shape[0], w * w, 3, self.heads, channels // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (windows, heads, w*w, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(-1, w * w, channels))
        out = out.view(batch, rows, cols, w, w, channels).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, rows * w, cols * w, channels)[:, :height, :width]
        return out.reshape(batch, height * width, channels)


class ChannelAttention(nn.Module):
    """Channel group attention: per group of C/g channels, a (C/g x C/g) attention over the token axis,
    scaled by 1/sqrt(number of tokens)."""

    def __init__(self, dim: int, groups: int, qkv_bias: bool):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.groups, channels // self.groups)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each (batch, groups, group_dim, tokens)
        weights = torch.softmax((q * tokens ** -0.5) @ k.transpose(-1, -2), dim=-1)  # (b, g, gd, gd)
        out = (weights @ v).permute(0, 3, 1, 2).reshape(batch, tokens, channels)
        return self.proj(out)


class _DualBlock(nn.Module):
    """pos1 -> attention (pre-norm) -> pos2 -> MLP (pre-norm), each added as a residual."""

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: float, eps: float):
        super().__init__()
        self.pos1 = _PositionConv(dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attention
        self.pos2 = _PositionConv(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.pos1(x, grid)
        x = x + self.attn(self.norm1(x), grid)
        x = x + self.pos2(x, grid)
        return x + self.mlp(self.norm2(x))


class _BlockPair(nn.Module):
    def __init__(self, config: DaViTConfig, stage: int):
        super().__init__()
        dim, eps = config.embed_dims[stage], config.layer_norm_eps
        self.spatial = _DualBlock(dim, WindowAttention(dim, config.num_heads[stage], config.window_size,
                                                       config.qkv_bias), config.mlp_ratio, eps)
        self.channel = _DualBlock(dim, ChannelAttention(dim, config.num_groups[stage], config.qkv_bias),
                                  config.mlp_ratio, eps)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.channel(self.spatial(x, grid), grid)


class _Stage(nn.Module):
    def __init__(self, config: DaViTConfig, stage: int):
        super().__init__()
        in_dim = 3 if stage == 0 else config.embed_dims[stage - 1]
        self.embed = _PatchEmbed(in_dim, config.embed_dims[stage], config.patch_size[stage],
                                 config.patch_stride[stage], config.patch_padding[stage],
                                 config.patch_prenorm[stage], config.layer_norm_eps)
        self.blocks = nn.ModuleList(_BlockPair(config, stage) for _ in range(config.depths[stage]))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.embed(x, grid)
        for block in self.blocks:
            x = block(x, grid)
        return x, grid


class NativeFolderModel:
    """HF-like persistence of a native encoder: local folders only, config.json + model.safetensors (no pickle).
    The class needs ``config`` (a NativeConfig) and ``config_class``."""

    def save_pretrained(self, directory: str | Path, **_: Any) -> Path:
        return save_native_folder(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **_: Any):
        return load_native_folder(cls, directory)


class DaViTImageEncoder(NativeFolderModel, nn.Module):
    """forward(pixel_values (N, 3, H, W), normalised) -> EncoderOutput (tokens, (N, projection_dim) embedding)."""

    config_class = DaViTConfig

    def __init__(self, config: DaViTConfig):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(_Stage(config, i) for i in range(len(config.embed_dims)))
        self.norm = nn.LayerNorm(config.embed_dims[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.embed_dims[-1], config.projection_dim, bias=False)
        self.apply(_init_weights)

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> EncoderOutput:
        x, grid = pixel_values, tuple(pixel_values.shape[-2:])
        for stage in self.stages:
            x, grid = stage(x, grid)
        pooled = self.norm(x.mean(dim=1))
        return EncoderOutput(last_hidden_state=x, pooler_output=self.projection(pooled))


def _init_weights(module: nn.Module) -> None:
    """Random initialisation as the reference's: truncated normal (std 0.02) Linears, normal Convs, unit LNs."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -------------------------------------------------------------------------------------------------
# Folders of native (non-transformers) backbones: config.json + model.safetensors


def save_native_folder(model: nn.Module, directory: str | Path) -> Path:
    """Write `model.config` as config.json and every tensor as model.safetensors (no pickle)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "model_type": model.config.model_type})
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return directory


def load_native_folder(model_class: type, directory: str | Path) -> nn.Module:
    """Rebuild `model_class` from config.json and load model.safetensors; every tensor name must match."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} lacks {path.name}; convert the released checkpoint with "
                "`headct-molre convert-weights` to get a folder holding config.json + model.safetensors."
            )
    config = model_class.config_class.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    model = model_class(config)
    state = load_file(str(weights_path))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{weights_path} does not fit the architecture of its config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {sorted(wrong)[:5]}."
        )
    model.load_state_dict(state, strict=True)
    return model
