"""Build one HU volume with true geometry from a chosen DICOM series (see ``dicom_series``).

The geometry comes only from ImagePositionPatient (IPP) and ImageOrientationPatient (IOP), never from
file names, InstanceNumber, SliceThickness or SliceLocation:

* slices are sorted by their position along the image-plane normal n = row x column (IPP . n);
* two different images at one position are refused (mixed acquisitions);
* when the slices are evenly spaced and each IPP lies on the plane normal through the first one, the
  pixels are stacked as they are (no interpolation);
* otherwise (gantry tilt: IPP steps not parallel to n; uneven spacing; a missing slice) every output
  slice is interpolated from the two nearest true slices: bilinear in-plane shift by each slice's own
  IPP offset, linear along n. The output grid is orthogonal (axes = IOP row, IOP column, n), covers
  the union of all slices in-plane, and spans first to last slice at the regular spacing
  ``regular_spacing_mm`` (the smallest gap that is at least half the median gap). A warning says so.
  This matches dcm2niix's tilt correction and spacing equalisation.
* a gap larger than both ``MAX_GAP_FACTOR`` x the regular spacing and ``MAX_GAP_MM`` is refused:
  too much anatomy would be invented.

Values: stored pixel values equal to PixelPaddingValue (or inside PixelPaddingRangeLimit) become air
(-1024 HU); the rest are converted per slice with that slice's RescaleSlope/RescaleIntercept. A CT
slice without rescale is refused unless the user passes ``hu_offset`` (then slope 1, intercept 0 is
assumed with a warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from .checks import AIR_HU, CTInputError, check_grid
from .dicom_series import DicomSeries, DicomSlice, read_dataset

MAX_GAP_FACTOR = 2.5
MAX_GAP_MM = 10.0
SAME_POSITION_MM = 0.01
IN_PLANE_SHIFT_TOLERANCE = 0.05  # fraction of a pixel below which IPP offsets are rounding noise
TILT_REPORT_DEG = 0.5


def plane_axes(orientation: np.ndarray) -> np.ndarray:
    """3x3 matrix, columns = unit row direction r, column direction c (made orthogonal to r), normal n."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    col = orientation[3:] - np.dot(orientation[3:], row) * row
    col /= np.linalg.norm(col)
    return np.column_stack([row, col, np.cross(row, col)])


def _padding_mask(ds, stored: np.ndarray) -> np.ndarray | None:
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    bits = int(ds.get("BitsAllocated") or 16)

    def as_stored(value):  # a signed value may have been written with VR US
        value = int(value)
        if int(ds.get("PixelRepresentation") or 0) == 1 and value >= 2 ** (bits - 1):
            value -= 2 ** bits
        return value

    low = as_stored(pad)
    high = low if limit is None else as_stored(limit)
    low, high = min(low, high), max(low, high)
    return (stored >= low) & (stored <= high)


def read_slice_hu(header: DicomSlice, hu_offset: float | None, frames: dict | None = None) -> tuple[np.ndarray, int]:
    """Decode one slice (or one frame of a multi-frame file) and convert it to HU: float32 (rows, columns);
    also the padded pixel count. ``frames`` caches decoded multi-frame files (path -> (dataset, frames)) so
    an Enhanced CT file is decoded once for all its frames. The file is read the way the header scan read
    it (without preamble when it has none)."""
    cached = None if frames is None else frames.get(header.path)
    if cached is None:
        try:
            ds = read_dataset(header.path, header.forced, False)
        except Exception as error:  # noqa: BLE001 - the file changed or is damaged after the header scan
            raise CTInputError(f"{header.path}: cannot read the DICOM file ({error}); the file is corrupt.") from error
        try:
            pixels = ds.pixel_array
        except Exception as error:  # noqa: BLE001 - decoder errors come in many types
            syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
            raise CTInputError(
                f"{header.path}: cannot decode the pixel data ({getattr(syntax, 'name', syntax)}): {error}. Install "
                "the pylibjpeg decoders (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle) or "
                "re-export uncompressed.") from error
        cached = (ds, pixels)
        if frames is not None and header.frame_index is not None:
            frames[header.path] = cached
    ds, pixels = cached
    if header.frame_index is not None:
        if pixels.ndim == 2 and header.frames == 1:
            pixels = pixels[None]
        if pixels.ndim != 3 or header.frame_index >= pixels.shape[0]:
            raise CTInputError(f"{header.path}: pixel data hold {pixels.shape[0] if pixels.ndim == 3 else 1} frames, "
                               f"the header {header.frames}; the file is corrupt.")
        stored = pixels[header.frame_index]
    else:
        stored = pixels
    if stored.shape != (header.rows, header.columns):
        raise CTInputError(f"{header.path}: pixel data shape {stored.shape} does not match Rows x Columns "
                           f"{header.rows}x{header.columns}; the file is corrupt.")
    slope = header.rescale_slope if header.rescale_slope is not None else 1.0
    intercept = header.rescale_intercept if header.rescale_intercept is not None else 0.0
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = _padding_mask(ds, stored)
    padded = 0
    if padding is not None:
        padded = int(np.count_nonzero(padding))
        hu[padding] = AIR_HU
    if hu_offset:
        hu += np.float32(hu_offset)
    return hu, padded


def _check_rescale(series: DicomSeries, hu_offset: float | None, warnings: list[str]) -> None:
    missing = [s for s in series.slices if s.rescale_slope is None or s.rescale_intercept is None]
    if not missing:
        return
    if hu_offset is None:
        raise CTInputError(
            f"{missing[0].path}: CT image without RescaleSlope/RescaleIntercept (required for CT; "
            f"{len(missing)} of {len(series.slices)} files): the stored values cannot be converted to HU. "
            "If you know the stored values are HU + 1024, rerun with hu_offset=-1024 (--hu-offset -1024).")
    warnings.append(f"RescaleSlope/RescaleIntercept missing in {len(missing)} file(s): assumed slope 1, "
                    f"intercept 0, then applied the requested hu_offset {hu_offset:+g}")


def regular_spacing_mm(gaps: np.ndarray) -> float:
    """Output slice spacing: the smallest gap that is at least half the median gap (mm)."""
    median = float(np.median(gaps))
    return float(np.min(gaps[gaps >= 0.5 * median]))


def isolated_gaps(gaps: np.ndarray, step: float) -> list[int]:
    """Indices of gaps that look like missing slices: > 1.5 x the regular step and > 1.5 x each
    neighbouring gap (a deliberate change of spacing, as in GE 4 mm / 7 mm series, is not a gap)."""
    found = []
    for k, gap in enumerate(gaps):
        neighbours = gaps[max(k - 1, 0):k].tolist() + gaps[k + 1:k + 2].tolist()
        if gap > 1.5 * step and all(gap > 1.5 * n for n in neighbours):
            found.append(k)
    return found


def _shifted(image: np.ndarray, offset_rows: float, offset_cols: float, shape: tuple[int, int]) -> np.ndarray:
    """Sample image (rows, cols) at (i + offset_rows, j + offset_cols) for an output of ``shape``, bilinear;
    outside the image -> air. Integer offsets copy pixels exactly."""
    out = image
    for axis, offset, length in ((1, offset_cols, shape[1]), (0, offset_rows, shape[0])):
        size = out.shape[axis]
        coords = np.arange(length) + offset
        base = np.floor(coords)
        frac = (coords - base).astype(np.float32)
        i0 = np.clip(base.astype(int), 0, size - 1)
        i1 = np.clip(base.astype(int) + 1, 0, size - 1)
        valid = (coords >= -1e-6) & (coords <= size - 1 + 1e-6)
        if axis == 1:
            out = out[:, i0] * (1 - frac) + out[:, i1] * frac
            out[:, ~valid] = AIR_HU
        else:
            out = out[i0, :] * (1 - frac)[:, None] + out[i1, :] * frac[:, None]
            out[~valid, :] = AIR_HU
    return out.astype(np.float32)


@dataclass
class StackPlan:
    """Slices of one orientation ordered along their normal: ``order`` indexes the input slices; ``along``,
    ``u``, ``v`` are each ordered slice's position (mm) along the normal, the row and the column direction;
    ``step`` the regular output spacing (mm); ``axes`` the columns row, column, normal (LPS)."""

    order: np.ndarray
    along: np.ndarray
    u: np.ndarray
    v: np.ndarray
    gaps: np.ndarray
    step: float
    axes: np.ndarray


def plan_stack(positions: np.ndarray, axes: np.ndarray, labels: list[str]) -> StackPlan:
    """Order slices at ``positions`` (n, 3 LPS mm) in the planes spanned by ``axes`` (3x3, columns row,
    column, normal); refuse two images at one position and gaps that would invent too much anatomy.
    ``labels`` name the slices in messages (file names)."""
    along = positions @ axes[:, 2]
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    ordered = [labels[i] for i in order]
    gaps = np.diff(along)
    same = np.flatnonzero(gaps < SAME_POSITION_MM)
    if same.size:
        raise CTInputError(
            f"two different images at the same position ({along[same[0]]:.2f} mm along the slice normal): "
            f"{ordered[same[0]]} and {ordered[same[0] + 1]} ({same.size} such pair(s)); the series mixes "
            "acquisitions or reconstructions. Export a single acquisition, or choose the series explicitly.")
    step = regular_spacing_mm(gaps)
    biggest = int(np.argmax(gaps))
    if gaps[biggest] > MAX_GAP_FACTOR * step and gaps[biggest] > MAX_GAP_MM:
        raise CTInputError(
            f"gap of {gaps[biggest]:.1f} mm between {Path(ordered[biggest]).name} and "
            f"{Path(ordered[biggest + 1]).name} (typical spacing {step:.2f} mm; refused above {MAX_GAP_FACTOR:g}x "
            f"and {MAX_GAP_MM:g} mm): slices are missing from the series. Export the complete series.")
    return StackPlan(order=order, along=along, u=positions @ axes[:, 0], v=positions @ axes[:, 1], gaps=gaps,
                     step=step, axes=axes)


def stack_to_grid(hu_slices: list[np.ndarray], plan: StackPlan, pixel_spacing: tuple[float, float],
                  labels: list[str]) -> tuple[sitk.Image, list[str], dict]:
    """Put slices (in plan order, each (rows, columns) HU) on a regular orthogonal grid: stacked as they are
    when evenly spaced on one normal, else resampled from the true positions (``_resample_regular``).
    pixel_spacing: (between rows, between columns) mm. Returns the image (LPS), warnings and geometry facts."""
    spacing_rows, spacing_cols = pixel_spacing
    along, u, v, gaps, step, axes = plan.along, plan.u, plan.v, plan.gaps, plan.step, plan.axes
    ordered = [labels[i] for i in plan.order]
    shift_px = max(np.ptp(u) / spacing_cols, np.ptp(v) / spacing_rows)
    uneven = bool(np.max(np.abs(gaps - step)) > max(0.02, 0.01 * step))
    sheared = bool(shift_px > IN_PLANE_SHIFT_TOLERANCE)
    tilt_deg = math.degrees(math.atan2(math.hypot(u[-1] - u[0], v[-1] - v[0]), along[-1] - along[0]))
    warnings = []
    geometry = {"gantry_tilt_deg": round(tilt_deg, 2), "resampled": uneven or sheared,
                "source_slice_gaps_mm": [round(float(g), 3) for g in (gaps.min(), np.median(gaps), gaps.max())]}
    if not (uneven or sheared):
        volume = np.stack(hu_slices)
        origin = axes[:, 0] * u[0] + axes[:, 1] * v[0] + axes[:, 2] * along[0]
        spacing_z = float(np.mean(gaps))
    else:
        volume, origin, spacing_z = _resample_regular(hu_slices, along, u, v, axes, step,
                                                      (spacing_rows, spacing_cols))
        if sheared and tilt_deg >= TILT_REPORT_DEG:
            warnings.append(f"gantry tilt {tilt_deg:.1f} deg detected (slice positions are not perpendicular to the "
                            "image planes): resampled onto an orthogonal grid from the true slice positions")
        elif sheared:
            warnings.append(f"slice positions shift in-plane by up to {shift_px:.1f} pixels: resampled onto an "
                            "orthogonal grid from the true slice positions")
        if uneven:
            gap_text = "".join(
                f"; gap of {gaps[k]:.1f} mm between {Path(ordered[k]).name} and {Path(ordered[k + 1]).name} "
                "(missing slice?) filled by linear interpolation" for k in isolated_gaps(gaps, step))
            warnings.append(f"uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm): resampled to a regular "
                            f"{spacing_z:.2f} mm grid from the true slice positions{gap_text}")
    image = sitk.GetImageFromArray(volume.astype(np.float32, copy=False))
    image.SetSpacing((float(spacing_cols), float(spacing_rows), float(spacing_z)))
    image.SetOrigin(tuple(float(x) for x in origin))
    image.SetDirection(tuple(float(x) for x in axes.ravel()))
    return image, warnings, geometry


def series_axes(series: DicomSeries) -> np.ndarray:
    """Plane axes of a series (columns row, column, normal): from the median orientation of its slices,
    so that orientation jitter within the tolerance does not favour one slice."""
    return plane_axes(np.median(np.array([s.orientation for s in series.slices]), axis=0))


def build_volume(series: DicomSeries, hu_offset: float | None = None) -> tuple[sitk.Image, list[str], list[str], dict]:
    """Read a qualifying candidate into a 3-D float32 HU image (LPS, true geometry, regular orthogonal grid).

    Returns (image, warnings, notes, geometry facts for provenance). Raises CTInputError with the file
    names when the series cannot be assembled safely.
    """
    warnings: list[str] = []
    notes: list[str] = list(series.notes)
    _check_rescale(series, hu_offset, warnings)
    axes = series_axes(series)
    labels = [str(s.path) if s.frame_index is None else f"{s.path} frame {s.frame_index + 1}" for s in series.slices]
    plan = plan_stack(np.array([s.position_mm for s in series.slices]), axes, labels)
    slices = [series.slices[i] for i in plan.order]
    numbers = [s.instance_number for s in slices]
    if None not in numbers and len(set(numbers)) > 1 and numbers != sorted(numbers) \
            and numbers != sorted(numbers, reverse=True):
        notes.append("InstanceNumber order differs from the slice positions; slices sorted by position (IPP)")
    spacing_rows, spacing_cols = series.first.pixel_spacing_mm
    # refuse absurd or too-short grids from the headers alone, before any pixel is decoded
    check_grid(f"{len(slices)} slices", (series.first.columns, series.first.rows, len(slices)),
               (spacing_cols, spacing_rows, plan.step), axes.ravel())
    padded = 0
    hu_slices = []
    decoded: dict = {}
    for header in slices:
        hu, count = read_slice_hu(header, hu_offset, decoded)
        hu_slices.append(hu)
        padded += count
    decoded.clear()
    if padded:
        notes.append(f"{padded} padding pixels (PixelPaddingValue) set to air ({AIR_HU:g} HU)")
    image, grid_warnings, geometry = stack_to_grid(hu_slices, plan, (spacing_rows, spacing_cols), labels)
    return image, warnings + grid_warnings, notes, geometry


ORTHOGONAL_TOLERANCE = 1e-4  # |cos| between voxel axes below which a direction matrix is orthogonal


def orthogonal_image(image: sitk.Image, name: str) -> tuple[sitk.Image, list[str]]:
    """A 3-D image on an orthogonal grid, for volume files and Slicer nodes.

    image: 3-D SimpleITK image whose direction matrix may be sheared (non-orthogonal: uncorrected gantry
    tilt). Orthogonal within ``ORTHOGONAL_TOLERANCE``: returned with its direction orthonormalised. When
    the x and y axes are orthogonal but z is not perpendicular to them (tilt), the slices are resampled
    onto an orthogonal grid by the same resampler as DICOM tilt correction, with a warning. Any other
    shear (x not perpendicular to y) is refused.
    """
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    matrix = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    units = matrix / np.linalg.norm(matrix, axis=0)
    cosines = np.abs(units.T @ units - np.eye(3))
    if cosines.max() <= ORTHOGONAL_TOLERANCE:
        u, _, vt = np.linalg.svd(units)
        fixed = sitk.Image(image)
        fixed.SetDirection(tuple(float(x) for x in (u @ vt).ravel()))
        return fixed, []
    if cosines[0, 1] > ORTHOGONAL_TOLERANCE:
        angle = math.degrees(math.acos(min(1.0, cosines[0, 1])))
        raise CTInputError(f"{name}: the image rows and columns are not perpendicular ({90 - angle:.1f} deg "
                           "between them, a sheared in-plane grid); such a grid cannot be a CT slice. Re-export "
                           "the volume from the original DICOM series.")
    axes = plane_axes(np.concatenate([units[:, 0], units[:, 1]]))  # row, column, their normal
    voxels = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (z, y, x)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    positions = origin[None, :] + np.arange(voxels.shape[0])[:, None] * spacing[2] * units[:, 2][None, :]
    labels = [f"{name} slice {k}" for k in range(voxels.shape[0])]
    plan = plan_stack(positions, axes, labels)
    tilt = math.degrees(math.acos(min(1.0, abs(float(np.dot(units[:, 2], axes[:, 2]))))))
    grid, _, _ = stack_to_grid([voxels[k] for k in plan.order], plan, (spacing[1], spacing[0]), labels)
    return grid, [f"{name}: sheared grid (direction matrix not orthogonal: slices stacked {tilt:.1f} deg off their "
                  "normal, an uncorrected gantry tilt): resampled onto an orthogonal grid from the true slice "
                  "positions"]


def _resample_regular(hu_slices, along, u, v, axes, step, pixel_spacing) -> tuple[np.ndarray, np.ndarray, float]:
    """Interpolate slices at true positions onto a regular orthogonal grid; returns (z,y,x HU, origin, dz)."""
    spacing_rows, spacing_cols = pixel_spacing
    rows, cols = hu_slices[0].shape
    n_out = int(round((along[-1] - along[0]) / step)) + 1
    spacing_z = float((along[-1] - along[0]) / (n_out - 1))
    u_min, v_min = float(u.min()), float(v.min())
    shape = (rows + int(math.ceil((v.max() - v_min) / spacing_rows - 1e-6)),
             cols + int(math.ceil((u.max() - u_min) / spacing_cols - 1e-6)))

    def sample(k: int) -> np.ndarray:
        return _shifted(hu_slices[k], (v_min - v[k]) / spacing_rows, (u_min - u[k]) / spacing_cols, shape)

    volume = np.empty((n_out,) + shape, dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for j in range(n_out):
        target = along[0] + j * spacing_z
        k = int(np.clip(np.searchsorted(along, target, side="right") - 1, 0, len(along) - 2))
        weight = float(np.clip((target - along[k]) / (along[k + 1] - along[k]), 0.0, 1.0))
        for needed in (k, k + 1):
            if needed not in cache:
                cache[needed] = sample(needed)
        for stale in [key for key in cache if key < k]:
            del cache[stale]
        volume[j] = cache[k] * (1 - weight) + cache[k + 1] * weight
    origin = axes[:, 0] * u_min + axes[:, 1] * v_min + axes[:, 2] * along[0]
    return volume, origin, spacing_z
