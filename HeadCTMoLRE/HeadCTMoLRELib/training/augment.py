"""Training augmentation of slice stacks, in torch on the training device (CPU or GPU).

Input and output: pixels float (B, S, C, H, W) in 0..1 (C windows: 3, or Pillar0's 11) (slice inferior -> superior, row anterior ->
posterior, column patient right -> left, as preprocess.SliceStack) and slice_valid bool (B, S).

The paper's augmentations, each drawn per volume:

- geometric, all in ONE ``grid_sample`` call over the (S, H, W) volume, in millimetres of the stack grid
  (pixel spacing ``pixel_spacing_mm`` in-plane, ``slice_spacing_mm`` between slices):
  * rotation by an angle in +-``rotation_rad`` (0.1 rad) about each of the three axes;
  * anisotropic scaling, one factor per axis in ``scale`` (0.85-1.15; > 1 enlarges the head);
  * mirroring per axis with probability ``mirror_p`` = {"lr", "ap", "si"}. The paper mirrors every axis
    with p = 0.5 (the default). Left-right mirroring is anatomically harmless (heads are nearly
    symmetric and no catalog finding is lateralised). Anterior-posterior and superior-inferior
    mirroring produce heads that cannot occur; SI mirroring only reverses slice order, which the 2-D
    model's attention pooling ignores. Set a probability to 0 to turn an axis off;
  * elastic deformation (Simard et al., as nnU-Net / batchgenerators): a displacement field
    alpha * (G_sigma * U), U uniform in [-1, 1] per millimetre-sized voxel of a 1 mm grid (the paper's
    1 x 1 mm in-plane pixels), G_sigma a Gaussian of sigma mm. alpha in ``elastic_alpha`` (0-200) and
    sigma in ``elastic_sigma_mm`` (10-13) are therefore in the paper's units of 1-mm voxels; the
    resulting displacement has a standard deviation of about alpha * 0.577 / ((4 pi)^(3/4) sigma^(3/2))
    mm, i.e. up to ~0.55 mm at alpha 200, sigma 10. The field is drawn on a coarse grid of sigma / 1.5 mm
    with the variance the 1 mm grid would have, smoothed there and upsampled (same statistics, a
    fraction of the cost).
  Outside the stack is 0 in every channel: air for the default windows; for Pillar0's 11 channels this is
  not the -1 HU outside fill of its preprocessing (a known difference at the warped border, see docs/backbones.md). ``slice_valid`` is resampled with the pixels (as a
  fourth channel): an output slice is valid when at least half of its central disc samples valid input,
  the rule preprocess uses; a volume left with no valid slice keeps its unaugmented geometry.
- brightness: pixels multiplied by a factor in ``brightness`` (0.99-1.01);
- Gaussian noise with a variance in ``noise_variance`` (0-0.03) in the backbone's normalised units,
  i.e. a pixel standard deviation of sqrt(variance) * ``intensity_std`` (0.226, the ImageNet std the
  DINO backbones divide by), then clipped to 0..1.

Randomness comes only from the ``torch.Generator`` passed in, so a run is reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from ..settings import reject_unknown_settings

AXES = ("lr", "ap", "si")  # column (W), row (H), slice (S) axis of the stack


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges and probabilities of each augmentation (see the module docstring for units)."""

    rotation_rad: float = 0.1
    scale: tuple[float, float] = (0.85, 1.15)
    mirror_p: dict = field(default_factory=lambda: {"lr": 0.5, "ap": 0.5, "si": 0.5})
    elastic_alpha: tuple[float, float] = (0.0, 200.0)
    elastic_sigma_mm: tuple[float, float] = (10.0, 13.0)
    brightness: tuple[float, float] = (0.99, 1.01)
    noise_variance: tuple[float, float] = (0.0, 0.03)
    intensity_std: float = 0.226
    p_rotation: float = 1.0
    p_scale: float = 1.0
    p_elastic: float = 0.5
    p_brightness: float = 1.0
    p_noise: float = 0.5

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mirror_p) - set(AXES))
        if unknown:
            raise ValueError(f"mirror_p axes must be among {AXES}, got {unknown}.")
        object.__setattr__(self, "mirror_p", {axis: float(self.mirror_p.get(axis, 0.0)) for axis in AXES})
        for name in ("scale", "elastic_alpha", "elastic_sigma_mm", "brightness", "noise_variance"):
            low, high = (float(v) for v in getattr(self, name))
            if high < low:
                raise ValueError(f"AugmentConfig.{name} needs low <= high, got {(low, high)}.")
            object.__setattr__(self, name, (low, high))
        if self.scale[0] <= 0 or self.elastic_sigma_mm[0] <= 0:
            raise ValueError("AugmentConfig: scale and elastic sigma must be positive.")

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all (the identity)."""
        return cls(rotation_rad=0.0, scale=(1.0, 1.0), mirror_p={}, elastic_alpha=(0.0, 0.0),
                   brightness=(1.0, 1.0), noise_variance=(0.0, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AugmentConfig":
        reject_unknown_settings(cls, data, "augmentation")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


def _uniform(generator: torch.Generator, shape, low: float, high: float, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def _apply_with(p: float, values: torch.Tensor, neutral: float, generator, device) -> torch.Tensor:
    """values where a Bernoulli(p) draw says so, ``neutral`` elsewhere (one draw per row)."""
    keep = torch.rand(values.shape[0], generator=generator, device=device) < p
    return torch.where(keep.view(-1, *([1] * (values.dim() - 1))), values, torch.full_like(values, neutral))


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles (rad) about x (lr), y (ap), z (si) -> (B, 3, 3) rotation Rz Ry Rx."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def _gaussian_smooth(field_: torch.Tensor, sigma_cells: torch.Tensor) -> torch.Tensor:
    """(B, 3, D, H, W) -> same, separable Gaussian with per-volume sigma (in cells), zero padding."""
    radius = int(math.ceil(3 * float(sigma_cells.max())))
    offsets = torch.arange(-radius, radius + 1, device=field_.device, dtype=field_.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma_cells[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (B, K)
    batch, channels = field_.shape[:2]
    out = field_.reshape(1, batch * channels, *field_.shape[2:])
    weight = kernels.repeat_interleave(channels, dim=0)  # (B*3, K)
    for axis in range(3):
        shape = [batch * channels, 1, 1, 1, 1]
        shape[2 + axis] = weight.shape[1]
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, weight.view(shape), padding=tuple(padding), groups=batch * channels)
    return out.view_as(field_)


def elastic_displacement_mm(batch: int, size_shw: tuple[int, int, int], spacing_mm: tuple[float, float, float],
                            alpha: torch.Tensor, sigma_mm: torch.Tensor, generator, device) -> torch.Tensor:
    """(B, S, H, W, 3) displacement in mm (x = lr, y = ap, z = si) of an elastic deformation with the
    given per-volume alpha (B,) and sigma_mm (B,) (units: see the module docstring)."""
    extent_mm = [n * d for n, d in zip(size_shw, spacing_mm)]
    cell_mm = max(1.0, float(sigma_mm.min()) / 1.5)
    coarse = [max(2, int(math.ceil(e / cell_mm)) + 1) for e in extent_mm]
    # Uniform[-1, 1] per 1 mm voxel, averaged over a cell of cell_mm^3 voxels: variance (1/3) / cell_mm^3.
    std = math.sqrt(1.0 / 3.0) / cell_mm ** 1.5
    noise = torch.randn((batch, 3, *coarse), generator=generator, device=device) * std
    smooth = _gaussian_smooth(noise, sigma_mm.to(device) / cell_mm)
    field_ = F.interpolate(smooth, size=size_shw, mode="trilinear", align_corners=True)
    return (field_ * alpha.view(-1, 1, 1, 1, 1)).permute(0, 2, 3, 4, 1)


def _identity(config: AugmentConfig) -> tuple[bool, bool]:
    """(geometry is the identity, intensity is the identity)."""
    geometric = (config.rotation_rad == 0 and config.scale == (1.0, 1.0) and not any(config.mirror_p.values())
                 and config.elastic_alpha[1] == 0)
    intensity = config.brightness == (1.0, 1.0) and config.noise_variance[1] == 0
    return geometric, intensity


def augment_batch(pixels: torch.Tensor, slice_valid: torch.Tensor, config: AugmentConfig, generator: torch.Generator,
                  *, pixel_spacing_mm: float, slice_spacing_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch (shapes and units in the module docstring); returns new tensors (pixels in 0..1,
    slice_valid bool (B, S)). ``generator`` must live on ``pixels.device``."""
    if pixels.dim() != 5:
        raise ValueError(f"augment_batch expects pixels (B, S, C, H, W), got {tuple(pixels.shape)}.")
    geometric_identity, intensity_identity = _identity(config)
    if not geometric_identity:
        pixels, slice_valid = _geometric(pixels, slice_valid, config, generator, pixel_spacing_mm, slice_spacing_mm)
    if not intensity_identity:
        pixels = _intensity(pixels, config, generator)
    return pixels, slice_valid


def _geometric(pixels, slice_valid, config, generator, pixel_spacing_mm, slice_spacing_mm):
    batch, slices, channels, height, width = pixels.shape
    device, dtype = pixels.device, torch.float32
    spacing = (slice_spacing_mm, pixel_spacing_mm, pixel_spacing_mm)  # s, h, w
    half_mm = torch.tensor([width * pixel_spacing_mm, height * pixel_spacing_mm, slices * slice_spacing_mm],
                           device=device, dtype=dtype) / 2  # x, y, z half extents

    angles = _uniform(generator, (batch, 3), -config.rotation_rad, config.rotation_rad, device)
    angles = _apply_with(config.p_rotation, angles, 0.0, generator, device)
    scales = _apply_with(config.p_scale, _uniform(generator, (batch, 3), *config.scale, device), 1.0, generator, device)
    mirror_p = torch.tensor([config.mirror_p[a] for a in AXES], device=device)
    mirror = torch.where(torch.rand((batch, 3), generator=generator, device=device) < mirror_p, -1.0, 1.0)
    # output point p (mm from the centre) samples input point R diag(mirror / scale) p (+ elastic).
    matrix = _rotation_matrices(angles) @ torch.diag_embed(mirror / scales)

    # Output voxel centres in mm (align_corners=False convention: centres at (i + 0.5) / n of the extent).
    axes = [((torch.arange(n, device=device, dtype=dtype) + 0.5) / n * 2 - 1) for n in (slices, height, width)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    points = torch.stack([x, y, z], dim=-1) * half_mm  # (S, H, W, 3) mm
    sampled = torch.einsum("bij,shwj->bshwi", matrix, points)
    alpha = _apply_with(config.p_elastic, _uniform(generator, (batch,), *config.elastic_alpha, device), 0.0,
                        generator, device)
    if config.elastic_alpha[1] > 0:
        sigma = _uniform(generator, (batch,), *config.elastic_sigma_mm, device)
        sampled = sampled + elastic_displacement_mm(batch, (slices, height, width), spacing, alpha, sigma,
                                                    generator, device)
    grid = (sampled / half_mm).to(pixels.dtype)

    valid_channel = slice_valid.to(pixels.dtype)[:, None, :, None, None].expand(batch, 1, slices, height, width)
    volume = torch.cat([pixels.permute(0, 2, 1, 3, 4), valid_channel], dim=1)  # (B, 4, S, H, W)
    warped = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    new_pixels = warped[:, :channels].permute(0, 2, 1, 3, 4)
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    disc = torch.hypot(rows - (height - 1) / 2, cols - (width - 1) / 2) <= min(height, width) / 4
    new_valid = (warped[:, channels][:, :, disc] > 0.5).float().mean(dim=-1) >= 0.5
    keep_old = ~new_valid.any(dim=1)  # never leave a volume without a valid slice
    if keep_old.any():
        new_pixels = torch.where(keep_old.view(-1, 1, 1, 1, 1), pixels, new_pixels)
        new_valid = torch.where(keep_old.view(-1, 1), slice_valid.bool(), new_valid)
    return new_pixels.contiguous(), new_valid


def _intensity(pixels, config, generator):
    batch, device = pixels.shape[0], pixels.device
    factor = _apply_with(config.p_brightness, _uniform(generator, (batch,), *config.brightness, device), 1.0,
                         generator, device)
    variance = _apply_with(config.p_noise, _uniform(generator, (batch,), *config.noise_variance, device), 0.0,
                           generator, device)
    std = (variance.sqrt() * config.intensity_std).to(pixels.dtype)
    noise = torch.randn(pixels.shape, generator=generator, device=device, dtype=pixels.dtype)
    shape = (-1, 1, 1, 1, 1)
    return (pixels * factor.to(pixels.dtype).view(shape) + noise * std.view(shape)).clamp_(0.0, 1.0)
