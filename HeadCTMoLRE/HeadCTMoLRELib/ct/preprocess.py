"""Head CT -> slice stack for the 2D model, and the way back to patient space.

Input: a 3D ``SimpleITK.Image`` in HU with true LPS geometry (any direction matrix, any spacing), or any
object with an ``.image`` attribute holding one (e.g. ``ctio.CTVolume``; its ``.warnings`` are carried over).

Output: a ``SliceStack``: the volume resampled to ``num_slices`` axial slices of ``image_size`` x
``image_size`` pixels (default 40 x 224 x 224 at 1 x 1 x 4 mm) in the standard head frame (see
``alignment.py``), each slice turned into C channels by the HU windows (default [0,80], [-20,180], [-800,2000]; a "minmax" entry: the scan's own range)
scaled to 0..1. Array layout follows the numpy view of an LPS identity-direction image: slice (k)
inferior -> superior, row (j) anterior -> posterior, column (i) patient right -> left (radiological
display: anterior at the top, patient's left on the viewer's right).

Resampling is anti-aliased: along each input axis downsampled by 3 or more, a Gaussian with
sigma = (output spacing - input spacing) / 2 mm (the usual rule sigma = (factor - 1) / 2 input voxels)
is applied before any decimation; a factor 2-3 is box-averaged (see ``anti_alias``); then linear
interpolation. Outside the scanned volume is air (-1024 HU).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .slice_stack import MINMAX_EPS, MINMAX_WINDOW, PreprocessConfig, SliceStack, stack_to_image  # noqa: F401 (re-exported)
from .alignment import (AIR_HU, HEAD_FRAME_CENTER_MM, DeviceVolume, VoxelGrid, align_to_head_frame, as_hu,
                        body_mask, rigid_matrix)

MIN_VALID_SLICE_FRACTION = 0.5  # a slice counts as scanned when half of its central disc was scanned


def apply_windows(hu, windows_hu):
    """(...) HU array of ONE scan (numpy or torch, any device) -> float32 (C, ...) of the same kind with
    channel c = clip((hu - low_c) / (high_c - low_c), 0, 1) for a (low, high) window, or, for the entry
    "minmax", clip((hu - hu.min()) / (hu.max() - hu.min() + 1e-8), 0, 1) (min and max over the whole array)."""
    if isinstance(hu, torch.Tensor):
        hu = hu.to(torch.float32)
        channels = []
        for window in windows_hu:
            if window == MINMAX_WINDOW:
                low, high = hu.min(), hu.max()
                channels.append(((hu - low) / (high - low + MINMAX_EPS)).clamp(0.0, 1.0))
            else:
                low, high = window
                channels.append(((hu - low) / (high - low)).clamp(0.0, 1.0))
        return torch.stack(channels)
    hu = np.asarray(hu, dtype=np.float32)
    channels = []
    for window in windows_hu:
        if window == MINMAX_WINDOW:
            low, high = hu.min(), hu.max()
            channels.append(np.clip((hu - low) / (high - low + np.float32(MINMAX_EPS)), 0.0, 1.0))
        else:
            low, high = window
            channels.append(np.clip((hu - np.float32(low)) / np.float32(high - low), 0.0, 1.0))
    return np.stack(channels).astype(np.float32, copy=False)


def _as_image(volume) -> tuple[sitk.Image, list[str]]:
    image = getattr(volume, "image", volume)
    if not isinstance(image, sitk.Image):
        raise TypeError(f"preprocess() needs a SimpleITK.Image in HU (or an object with .image), got {type(volume).__name__}.")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"preprocess() needs a 3D scalar CT volume; got a {image.GetDimension()}D image with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per pixel. Load the whole series "
                         "(not one slice or a colour screenshot).")
    return image, list(getattr(volume, "warnings", []) or [])


def _stack_grid(config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(origin_mm (3,), spacing_mm (3,), size (x, y, z)) of the stack grid in the head frame."""
    size = (config.image_size, config.image_size, config.num_slices)
    spacing = np.array([config.pixel_spacing_mm, config.pixel_spacing_mm, config.slice_spacing_mm])
    origin = np.array(HEAD_FRAME_CENTER_MM) - (np.array(size) - 1) / 2.0 * spacing
    return origin, spacing, size


def _gaussian_kernel(sigma_voxels: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma_voxels)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma_voxels) ** 2)
    return kernel / kernel.sum()


FILTER_CHUNK_VOXELS = 1 << 22  # input voxels filtered at once: bounds conv1d's working memory (~16 MiB float32)


def _filter_along(hu: torch.Tensor, dim: int, kernel: np.ndarray, stride: int, left_pad: int,
                  chunk_voxels: int = FILTER_CHUNK_VOXELS, *, raw: bool = False) -> torch.Tensor:
    """Correlate every line of a (z, y, x) tensor along ``dim`` with ``kernel`` (border values extended by
    ``left_pad`` voxels before and as many after as keep floor(n / stride) outputs) and keep every
    ``stride``-th output: output m starts at input m * stride - left_pad.

    Memory: the output plus one chunk of about ``chunk_voxels`` input voxels at a time (the lines are cut
    along another axis), never a padded or transposed copy of the whole volume; the lines are the same
    whatever the chunk, so the result does not depend on it. raw=True: ``hu`` holds stored values (any
    dtype), converted to clamped float32 HU chunk by chunk (``alignment.as_hu``); the output is float32."""
    n = hu.shape[dim]
    right_pad = len(kernel) - stride - left_pad
    out_length = (n + left_pad + right_pad - len(kernel)) // stride + 1
    out_shape = list(hu.shape)
    out_shape[dim] = out_length
    out = torch.empty(out_shape, dtype=torch.float32, device=hu.device)
    weights = torch.as_tensor(kernel, dtype=torch.float32, device=hu.device).view(1, 1, -1)
    split = 0 if dim != 0 else 1  # cut the lines into chunks along an axis they do not run along
    step = max(1, chunk_voxels // max(1, hu.numel() // max(1, hu.shape[split])))
    for start in range(0, hu.shape[split], step):
        part = hu.narrow(split, start, min(step, hu.shape[split] - start))
        moved = part.movedim(dim, -1)
        lines = moved.reshape(-1, 1, n)
        if raw:
            lines = as_hu(lines)
        if left_pad or right_pad:
            lines = F.pad(lines, (left_pad, right_pad), mode="replicate")
        filtered = F.conv1d(lines, weights, stride=stride)
        out.narrow(split, start, part.shape[split]).copy_(
            filtered.reshape(*moved.shape[:-1], out_length).movedim(-1, dim))
    return out


def anti_alias(volume: DeviceVolume, output_spacing_along_axes: np.ndarray) -> DeviceVolume:
    """Low-pass a volume (HU on its device; a raw one is converted chunk by chunk) before it is sampled at
    ``output_spacing_along_axes`` (mm, one per input axis, x y z order), returning a smaller float32 volume
    on a grid at most half the output spacing (separable 1D convolutions, border values extended).

    Per input axis, with ratio = output / input spacing:
    - ratio >= 3 (e.g. 0.5 -> 4 mm slices): Gaussian with sigma = (output - input spacing) / 2 mm, then
      bins of floor(ratio / 2) voxels averaged (one strided convolution with the Gaussian * box kernel;
      the data are band-limited by then);
    - 2 <= ratio < 3 (e.g. 0.45 -> 1 mm pixels): bins of 2 averaged (sigma of the box ~ the rule above);
    - ratio < 2: untouched (linear interpolation suffices).
    Bins follow ITK BinShrink: floor(size / factor) voxels, each at the mean position of its bin.
    """
    grid = volume.grid
    ratio = np.asarray(output_spacing_along_axes, float) / grid.spacing_mm
    hu, factors, raw = volume.hu, np.ones(3, int), volume.raw
    # the axis shrunk most first (thin-slice z, usually): every later pass then reads a smaller volume
    for axis in sorted(range(3), key=lambda a: -ratio[a]):
        size = grid.size[axis]
        if ratio[axis] >= 3 and size > 1:
            factor = min(int(ratio[axis] // 2), size)
            gaussian = _gaussian_kernel((output_spacing_along_axes[axis] - grid.spacing_mm[axis]) / 2.0
                                        / grid.spacing_mm[axis])
            kernel, left_pad = np.convolve(gaussian, np.full(factor, 1.0 / factor)), len(gaussian) // 2
        elif 2 <= ratio[axis] < 3 and size > 1:
            factor, kernel, left_pad = 2, np.array([0.5, 0.5]), 0
        else:
            continue
        hu = _filter_along(hu, 2 - axis, kernel, factor, left_pad, raw=raw)  # the first filter converts
        factors[axis], raw = factor, False
    return DeviceVolume(as_hu(hu) if raw else hu, grid.shrunk(factors))


def _output_spacing_along_input_axes(grid: VoxelGrid, frame_to_patient_rotation: np.ndarray,
                                     stack_spacing_mm: np.ndarray) -> np.ndarray:
    """For each input axis (unit vector u in patient space), the stack's sampling distance along it:
    sqrt(sum_i (v_i * spacing_i)^2) with v = u in head-frame coordinates (exact when the axes line up)."""
    input_axes_frame = frame_to_patient_rotation.T @ grid.direction  # columns = input axes in the head frame
    return np.sqrt(((input_axes_frame * stack_spacing_mm[:, None]) ** 2).sum(axis=0))


def _resample_to_stack(volume: DeviceVolume, stack_index_to_patient: np.ndarray,
                       size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(trilinear samples (S, H, W) of ``volume`` at the stack voxels, bool (S, H, W) inside the volume)
    (``stack_index_to_patient``: 4 x 4, continuous (i, j, k) stack index -> LPS mm; ``size`` x y z); the
    samples outside are border values, to be replaced by the caller. As ITK's
    Resample: a point is inside when its continuous index lies within [-0.5, n - 0.5] on every axis,
    with border values extended there."""
    grid = volume.grid
    n = np.array(grid.size, float)
    # align_corners=True: normalised -1 / +1 are the centres of the first / last voxels (ITK index 0, n - 1)
    index_to_normalised = rigid_matrix(np.diag(2.0 / np.maximum(n - 1, 1)), -np.ones(3))
    stack_to_normalised = index_to_normalised @ grid.patient_to_index() @ stack_index_to_patient
    affine = torch.as_tensor(stack_to_normalised[:3].T, dtype=torch.float32, device=volume.hu.device)  # (4, 3)
    steps = [torch.arange(count, dtype=torch.float32, device=volume.hu.device) for count in size]
    points = (steps[2][:, None, None, None] * affine[2] + steps[1][None, :, None, None] * affine[1]
              + (steps[0][None, None, :, None] * affine[0] + affine[3]))[None]  # (1, S, H, W, 3) x y z
    samples = F.grid_sample(volume.hu[None, None], points, mode="bilinear", padding_mode="border",
                            align_corners=True)[0, 0]
    low = torch.as_tensor(-0.5 * 2.0 / np.maximum(n - 1, 1) - 1.0, dtype=torch.float32, device=points.device)
    high = torch.as_tensor((n - 0.5) * 2.0 / np.maximum(n - 1, 1) - 1.0, dtype=torch.float32, device=points.device)
    inside = ((points[0] >= low) & (points[0] <= high)).all(-1)
    return samples, inside


def _slice_scanned_fraction(stack: SliceStack, grid: VoxelGrid, step: int = 4) -> np.ndarray:
    """(S,) fraction of each slice's central disc (diameter half the field of view, where the brain lies;
    sampled every ``step`` pixels) that falls inside the input voxel grid."""
    s, _, h, w = stack.pixels.shape
    rows, cols = np.meshgrid(np.arange(0, h, step), np.arange(0, w, step), indexing="ij")
    central = np.hypot(rows - (h - 1) / 2, cols - (w - 1) / 2) <= min(h, w) / 4
    rows, cols = rows[central], cols[central]
    kji = np.stack(np.broadcast_arrays(np.arange(s)[:, None], rows[None], cols[None]), axis=-1)
    lps = stack.stack_index_to_patient(kji.astype(np.float64))
    to_index = grid.patient_to_index()
    index = lps @ to_index[:3, :3].T + to_index[:3, 3]
    size = np.array(grid.size)
    return np.all((index >= -0.5) & (index <= size - 0.5), axis=-1).mean(axis=1)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """bool (S, H, W) -> bool (S, H, W) with 2D holes filled in every slice: background that cannot reach
    the slice border (4-connected). One 2D labelling of the background of all slices stacked in a column,
    each slice framed by background rows and columns, so every slice's outer background is one label."""
    s, h, w = mask.shape
    tiles = np.zeros((s, h + 1, w + 2), np.uint8)
    tiles[:, 1:, 1:-1] = mask
    tiles = np.concatenate([tiles.reshape(s * (h + 1), w + 2), np.zeros((1, w + 2), np.uint8)])
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(1 - tiles)))
    outside = labels == labels[0, 0]
    return ~outside[:-1].reshape(s, h + 1, w + 2)[:, 1:, 1:-1]


def head_mask_slices(hu_stack: torch.Tensor) -> np.ndarray:
    """bool (S, H, W) head mask of a (S, H, W) HU stack (tensor on any device): largest body above -300 HU
    (opened in-plane by a 5 x 5 box to drop the table and headrest), holes (sinus and mastoid air) filled
    slice by slice."""
    return fill_holes_per_slice(body_mask(hu_stack, (2, 2, 0)))


def preprocess(volume, config: PreprocessConfig = PreprocessConfig(), *, device=None) -> SliceStack:
    """CT volume (HU, LPS) -> SliceStack (S x C x H x W windows in the standard head frame + geometry).

    volume: 3D SimpleITK.Image in HU (any pixel type, direction and spacing), or an object with
        ``.image`` (and optionally ``.warnings``).
    config: PreprocessConfig. Raises ValueError for non-3D or multi-component images.
    device: torch device (or name) for alignment, resampling and windows; None: CPU. The SliceStack
        holds numpy arrays whatever the device.
    """
    image, warnings = _as_image(volume)
    with torch.no_grad():  # raw: the stored voxels, converted to float chunk by chunk (memory ~ the output)
        hu = DeviceVolume.from_image(image, device, raw=True)
    alignment = align_to_head_frame(hu, config.alignment)
    warnings += alignment.warnings
    origin, spacing, size = _stack_grid(config)
    stack = SliceStack(
        pixels=np.zeros((size[2], len(config.windows_hu), size[1], size[0]), np.float32),
        slice_valid=np.zeros(size[2], bool), head_mask=np.zeros(size[::-1], bool),
        slice_positions_mm=np.zeros((size[2], 3)), origin_mm=origin, spacing_mm=spacing,
        head_to_patient=alignment.head_to_patient, alignment=alignment.info, warnings=warnings, config=config)

    stack.slice_valid = _slice_scanned_fraction(stack, hu.grid) >= MIN_VALID_SLICE_FRACTION
    stack_index_to_patient = alignment.head_to_patient @ rigid_matrix(np.diag(spacing), origin)
    with torch.no_grad():
        smoothed = anti_alias(hu, _output_spacing_along_input_axes(hu.grid, alignment.head_to_patient[:3, :3], spacing))
        hu_stack, inside = _resample_to_stack(smoothed, stack_index_to_patient, size)
        valid = torch.as_tensor(stack.slice_valid, device=hu_stack.device)[:, None, None]
        scanned = inside & valid  # the rest is filled: air for the head mask, config.outside_hu for the windows
        hu_stack = torch.where(scanned, hu_stack, torch.full_like(hu_stack, AIR_HU))
        windowed = hu_stack if config.outside_hu == AIR_HU else torch.where(
            scanned, hu_stack, torch.full_like(hu_stack, config.outside_hu))
        pixels = apply_windows(windowed, config.windows_hu).transpose(0, 1).contiguous()
        stack.pixels = pixels.cpu().numpy()
        stack.head_mask = head_mask_slices(hu_stack)
    centre_rows = np.stack([np.arange(size[2]), np.full(size[2], (size[1] - 1) / 2), np.full(size[2], (size[0] - 1) / 2)], -1)
    stack.slice_positions_mm = stack.stack_index_to_patient(centre_rows)
    if not stack.slice_valid.any():
        stack.warnings.append("Preprocess: no slice of the head frame lies inside the scanned volume; the stack "
                              "is all air. Check the image geometry (origin, spacing) and that it is a head CT.")
    elif not stack.head_mask.any():
        stack.warnings.append("Preprocess: no head (tissue above -300 HU) inside the slice stack. Check that the "
                              "input is a head CT in HU.")
    return stack
