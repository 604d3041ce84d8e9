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

import numpy as np
import pydicom
import SimpleITK as sitk

from .checks import AIR_HU, CTInputError, check_grid
from .dicom_series import DicomSeries, DicomSlice

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


def read_slice_hu(header: DicomSlice, hu_offset: float | None) -> tuple[np.ndarray, int]:
    """Decode one slice and convert it to HU: float32 (rows, columns); also the padded pixel count."""
    try:
        ds = pydicom.dcmread(header.path)
    except Exception as error:  # noqa: BLE001 - the file changed or is damaged after the header scan
        raise CTInputError(f"{header.path}: cannot read the DICOM file ({error}); the file is corrupt.") from error
    try:
        stored = ds.pixel_array
    except Exception as error:  # noqa: BLE001 - decoder errors come in many types
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        raise CTInputError(
            f"{header.path}: cannot decode the pixel data ({getattr(syntax, 'name', syntax)}): {error}. Install the "
            "pylibjpeg decoders (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle) or re-export "
            "uncompressed.") from error
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


def build_volume(series: DicomSeries, hu_offset: float | None = None) -> tuple[sitk.Image, list[str], list[str], dict]:
    """Read a qualifying series into a 3-D float32 HU image (LPS, true geometry, regular orthogonal grid).

    Returns (image, warnings, notes, geometry facts for provenance). Raises CTInputError with the file
    names when the series cannot be assembled safely.
    """
    warnings: list[str] = []
    notes: list[str] = list(series.notes)
    _check_rescale(series, hu_offset, warnings)
    axes = plane_axes(series.first.orientation)
    row_dir, col_dir, normal = axes[:, 0], axes[:, 1], axes[:, 2]
    positions = np.array([s.position_mm for s in series.slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [series.slices[i] for i in order]
    along, positions = along[order], positions[order]
    numbers = [s.instance_number for s in slices]
    if None not in numbers and numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True):
        notes.append("InstanceNumber order differs from the slice positions; slices sorted by position (IPP)")
    gaps = np.diff(along)
    same = np.flatnonzero(gaps < SAME_POSITION_MM)
    if same.size:
        a, b = slices[same[0]], slices[same[0] + 1]
        raise CTInputError(
            f"two different images at the same position ({along[same[0]]:.2f} mm along the slice normal): "
            f"{a.path} and {b.path} ({same.size} such pair(s)); the series mixes acquisitions or reconstructions. "
            "Export a single acquisition, or choose the series explicitly.")
    step = regular_spacing_mm(gaps)
    biggest = int(np.argmax(gaps))
    if gaps[biggest] > MAX_GAP_FACTOR * step and gaps[biggest] > MAX_GAP_MM:
        raise CTInputError(
            f"gap of {gaps[biggest]:.1f} mm between {slices[biggest].path.name} and {slices[biggest + 1].path.name} "
            f"(typical spacing {step:.2f} mm; refused above {MAX_GAP_FACTOR:g}x and {MAX_GAP_MM:g} mm): slices are "
            "missing from the series. Export the complete series.")
    spacing_rows, spacing_cols = series.first.pixel_spacing_mm
    # refuse absurd or too-short grids from the headers alone, before any pixel is decoded
    check_grid(f"{len(slices)} slices", (series.first.columns, series.first.rows, len(slices)),
               (spacing_cols, spacing_rows, step), axes.ravel())
    u = positions @ row_dir  # in-plane offsets of each slice (mm)
    v = positions @ col_dir
    shift_px = max(np.ptp(u) / spacing_cols, np.ptp(v) / spacing_rows)
    uneven = bool(np.max(np.abs(gaps - step)) > max(0.02, 0.01 * step))
    sheared = bool(shift_px > IN_PLANE_SHIFT_TOLERANCE)
    tilt_deg = math.degrees(math.atan2(math.hypot(u[-1] - u[0], v[-1] - v[0]), along[-1] - along[0]))
    padded = 0
    hu_slices = []
    for header in slices:
        hu, count = read_slice_hu(header, hu_offset)
        hu_slices.append(hu)
        padded += count
    if padded:
        notes.append(f"{padded} padding pixels (PixelPaddingValue) set to air ({AIR_HU:g} HU)")
    geometry = {"gantry_tilt_deg": round(tilt_deg, 2), "resampled": uneven or sheared,
                "source_slice_gaps_mm": [round(float(g), 3) for g in (gaps.min(), np.median(gaps), gaps.max())]}
    if not (uneven or sheared):
        volume = np.stack(hu_slices)
        origin = positions[0]
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
                f"; gap of {gaps[k]:.1f} mm between {slices[k].path.name} and {slices[k + 1].path.name} "
                "(missing slice?) filled by linear interpolation" for k in isolated_gaps(gaps, step))
            warnings.append(f"uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm): resampled to a regular "
                            f"{spacing_z:.2f} mm grid from the true slice positions{gap_text}")
    image = sitk.GetImageFromArray(volume.astype(np.float32, copy=False))
    image.SetSpacing((float(spacing_cols), float(spacing_rows), float(spacing_z)))
    image.SetOrigin(tuple(float(x) for x in origin))
    image.SetDirection(tuple(float(x) for x in axes.ravel()))
    return image, warnings, notes, geometry


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
