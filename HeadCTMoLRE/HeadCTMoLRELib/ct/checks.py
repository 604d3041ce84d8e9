"""Sanity checks that every head CT input must pass, whatever its file format.

Geometry checks run on header information only (size, spacing, direction), before any voxel is
allocated; value checks run on the HU array (numpy, axis order z, y, x). Every refusal is a
``CTInputError`` whose message names the input, says what is wrong and what to do.

Thresholds (tool decisions, documented here once):

* z coverage, the extent of the volume along the patient head-feet axis (S), must be at least
  ``MIN_Z_COVERAGE_MM`` (50 mm); below ``FULL_Z_COVERAGE_MM`` (90 mm) the volume loads with a
  "partial coverage" warning. A head CT from vertex to skull base covers 110-200 mm.
* each voxel spacing must lie in [``MIN_SPACING_MM``, ``MAX_SPACING_MM``] = [0.05, 20] mm and no
  axis may span more than ``MAX_EXTENT_MM`` (600 mm; a head is about 200 mm wide).
* values must look like Hounsfield units: some air (< -500 HU) and some soft tissue (-100..100 HU).
  Raw CT numbers (air ~0, brain ~1060) and 8-bit windowed data (0..255) are refused with advice.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

AIR_HU = -1024.0
MIN_Z_COVERAGE_MM = 50.0
FULL_Z_COVERAGE_MM = 90.0
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MAX_EXTENT_MM = 600.0
SMALL_FOV_MM = 120.0
MAX_VOXELS = 2_000_000_000  # ~ 1024 x 1024 x 1900; anything larger is a corrupt header, not a head CT
MAX_PAYLOAD_BYTES = 16 * 1024 ** 3  # a file header promising more voxel bytes is corrupt; never allocated
MAX_NON_FINITE_FRACTION = 0.5  # above this share of NaN/inf voxels the volume is refused, below it they become air
HU_SAMPLE_VOXELS = 2_000_000  # value statistics use a regular subsample of about this many voxels


class CTInputError(ValueError):
    """The input cannot be used as a head CT; the message names the file, the problem and the remedy."""


def _fmt(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def check_grid(name: str, size, spacing_mm, direction) -> list[str]:
    """Refuse grids that cannot be a head CT; return warnings for doubtful ones.

    size: voxels per axis (x, y, z); spacing_mm: (x, y, z) mm; direction: 9 values, row-major, columns
    are the LPS unit vectors of the x, y, z axes. Runs before pixel data are read.
    """
    dims = len(size)
    if any(int(s) == 0 for s in size):
        raise CTInputError(f"{name}: empty image (a dimension is 0, size {_fmt(size)}); the file holds no volume.")
    if dims == 2:
        raise CTInputError(f"{name}: 2D image; a 3D head CT volume is required (load the whole series or volume).")
    if dims >= 4:
        volumes = int(np.prod([int(s) for s in size[3:]]))
        if volumes > 1:
            raise CTInputError(
                f"{name}: 4D image ({volumes} volumes); select one volume (e.g. export a single time point / "
                "energy as its own file).")
    if dims != 3 and not (dims >= 4 and all(int(s) == 1 for s in size[3:])):
        raise CTInputError(f"{name}: {dims}D image; a 3D head CT volume is required.")
    size3 = [int(s) for s in size[:3]]
    spacing3 = [float(s) for s in spacing_mm[:3]]
    if int(np.prod(size3, dtype=np.int64)) > MAX_VOXELS:
        raise CTInputError(
            f"{name}: header claims {_fmt(size3)} voxels ({np.prod(size3, dtype=np.float64) / 1e9:.1f} billion); "
            "the file is corrupt or not a head CT.")
    if min(size3) == 1:
        raise CTInputError(
            f"{name}: only 1 slice ({_fmt(size3)} voxels); insufficient coverage: a head CT needs a stack "
            f"covering >= ~{FULL_Z_COVERAGE_MM:.0f} mm.")
    if not all(np.isfinite(spacing3)) or min(spacing3) <= 0:
        raise CTInputError(f"{name}: zero, negative or undefined voxel spacing {_fmt(spacing3)} mm; "
                           "the header is corrupt (fix the spacing or re-export the volume).")
    extent = [n * s for n, s in zip(size3, spacing3)]
    lr, ap, si = patient_extent_mm(size3, spacing3, direction)
    if max(spacing3) > MAX_SPACING_MM or max(extent) > MAX_EXTENT_MM or min(spacing3) < MIN_SPACING_MM:
        raise CTInputError(
            f"{name}: implausible voxel spacing {_fmt(spacing3)} mm (head would be {lr / 1000:.1f} m wide and "
            f"{si / 1000:.1f} m tall); expected {MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm per voxel and at most "
            f"{MAX_EXTENT_MM:.0f} mm per axis. Check the header's units/pixdim.")
    warnings = []
    if si < MIN_Z_COVERAGE_MM:
        raise CTInputError(
            f"{name}: insufficient z coverage ({si:.0f} mm along the head-feet axis); a head CT needs "
            f">= ~{FULL_Z_COVERAGE_MM:.0f} mm (at least {MIN_Z_COVERAGE_MM:.0f} mm). Load the complete series.")
    if si < FULL_Z_COVERAGE_MM:
        warnings.append(f"partial head coverage: only {si:.0f} mm along the head-feet axis "
                        f"(a full head CT covers >= ~{FULL_Z_COVERAGE_MM:.0f} mm); findings outside it are missed.")
    if max(lr, ap) < SMALL_FOV_MM:
        warnings.append(f"small in-plane field of view ({lr:.0f} x {ap:.0f} mm); a head is 150-200 mm wide, "
                        "parts of it may be cut off.")
    return warnings


def direction_matrix(direction) -> np.ndarray:
    """3x3 matrix whose columns are the LPS unit vectors of the x, y, z voxel axes."""
    return np.asarray(direction, dtype=float).reshape(3, 3)


def patient_extent_mm(size, spacing_mm, direction) -> tuple[float, float, float]:
    """Coverage (mm) along patient L-R, A-P and S-I.

    For each patient axis: the length of a line along it through the slab spanned by the voxel axis most
    aligned with it (that axis' extent / |cos| of the angle between them), at most the bounding box.
    A stack tilted by 18.5 degrees whose slices step 5 mm head-feet covers 20 x 5 = 100 mm, and a
    3-slice stack tilted by 20 degrees still covers only ~16 mm, however wide its image planes are.
    """
    matrix = direction_matrix(direction)
    extents = np.asarray(size, float) * np.asarray(spacing_mm, float)
    bounding_box = (np.abs(matrix) * extents[None, :]).sum(axis=1)
    nearest = np.argmax(np.abs(matrix), axis=1)  # for each patient axis, the closest voxel axis
    lr, ap, si = (min(extents[nearest[row]] / abs(matrix[row, nearest[row]]), bounding_box[row])
                  for row in range(3))
    return float(lr), float(ap), float(si)


def orientation_code(direction) -> str:
    """Three letters, one per voxel axis x, y, z: the patient direction that increasing index points to.

    Identity (DICOM/ITK LPS) gives "LPS"; a sagittal stack with rows along P and columns toward I gives
    e.g. "PIR". Letters: L/R (x), P/A (y), S/I (z) of the LPS frame.
    """
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    matrix = direction_matrix(direction)
    code = ""
    for axis in range(3):
        column = matrix[:, axis]
        dominant = int(np.argmax(np.abs(column)))
        code += letters[dominant][0 if column[dominant] > 0 else 1]
    return code


def value_sample(hu: np.ndarray) -> np.ndarray:
    """A regular subsample (about HU_SAMPLE_VOXELS) of a z, y, x array, flattened, for statistics."""
    step = max(1, int(round((hu.size / HU_SAMPLE_VOXELS) ** (1.0 / 3.0))))
    return np.ascontiguousarray(hu[::step, ::step, ::step]).ravel()


def hu_percentiles(hu: np.ndarray) -> dict[str, float]:
    """Percentiles 1, 5, 25, 50, 75, 95, 99 of the HU values (keys "p1"...), from a subsample."""
    sample = value_sample(hu)
    qs = (1, 5, 25, 50, 75, 95, 99)
    return {f"p{q}": round(float(v), 1) for q, v in zip(qs, np.percentile(sample, qs))}


def replace_non_finite(name: str, values: np.ndarray) -> str | None:
    """Set NaN / infinite voxels to air (-1024 HU) in place and return a warning giving their count; refuse
    when more than MAX_NON_FINITE_FRACTION of the voxels are non-finite (the volume is corrupt)."""
    finite = np.isfinite(values)
    bad = int(values.size - np.count_nonzero(finite))
    if not bad:
        return None
    if bad > MAX_NON_FINITE_FRACTION * values.size:
        raise CTInputError(f"{name}: {bad} of {values.size} voxels are NaN or infinite; the volume is corrupt. "
                           "Re-export it.")
    values[~finite] = AIR_HU
    return (f"{name}: {bad} voxels are NaN or infinite (not a number); set to air ({AIR_HU:g} HU). Check the "
            "export: such voxels usually mark missing data.")


def check_hu_plausible(name: str, hu: np.ndarray, hu_offset: float | None) -> None:
    """Refuse values that are not Hounsfield units.

    hu: z, y, x array, float, after rescale and any user ``hu_offset`` (before padding is clamped).
    Head CT in HU holds air (about -1000) and soft tissue (brain 20-45). Raw CT numbers (HU + 1024)
    and 8-bit windowed data are refused with what to do; values are never silently re-interpreted.
    """
    sample = value_sample(hu)
    lo, hi = float(sample.min()), float(sample.max())
    air = float(np.mean(sample < -500))
    soft = float(np.mean((sample >= -100) & (sample <= 100)))
    raw_soft = float(np.mean((sample >= 900) & (sample <= 1150)))
    again = " (after the requested hu_offset)" if hu_offset else ""
    if lo >= 0 and hi <= 255 and np.all(sample == np.round(sample)):
        raise CTInputError(
            f"{name}: values {lo:g}..{hi:g}{again} look like windowed 8-bit display data, not Hounsfield units; "
            "export the original CT (DICOM series or an HU NIfTI) instead of a screenshot/8-bit conversion.")
    if air < 0.005 and raw_soft > 0.02 and lo > -200:
        raise CTInputError(
            f"{name}: values look like raw CT numbers, not Hounsfield units{again}: air is about {lo:.0f} instead of "
            "-1000 and brain about 1060 instead of 20-45. If you know the offset, rerun with hu_offset=-1024 "
            "(command line: --hu-offset -1024); otherwise fix the rescale intercept in the export.")
    if air < 0.005 or soft < 0.005:
        missing = "air (< -500 HU)" if air < 0.005 else "soft tissue (-100..100 HU)"
        raise CTInputError(
            f"{name}: values {lo:.0f}..{hi:.0f}{again} do not look like head CT Hounsfield units: no {missing} found. "
            "Check that this is a CT in HU; if the values carry a known offset, rerun with hu_offset=<offset> "
            "(--hu-offset).")


def clamp_to_air(hu: np.ndarray) -> int:
    """Set every value below air (-1024 HU: padding such as -1500/-2000/-3024) to -1024, in place.

    Returns how many voxels were changed. Below -1024 HU nothing physical exists, so this only removes
    outside-field-of-view padding that would distort intensity statistics.
    """
    below = hu < AIR_HU
    count = int(np.count_nonzero(below))
    if count:
        hu[below] = AIR_HU
    return count


def checked_values(name: str, image, hu_offset: float | None):
    """The value checks every source goes through (files, DICOM, Slicer nodes), with the same messages.

    image: 3-D SimpleITK image in HU (after rescale and any ``hu_offset``). NaN/inf voxels become air
    with a warning (``replace_non_finite``), values must look like HU (``check_hu_plausible``), padding
    below -1024 HU becomes air (a note). Returns (float32 image with the same geometry, warnings, notes).

    Memory: the checks read the image in place (no copy); a volume that needs no repair costs at most one
    float32 conversion (SimpleITK Cast) and the air clamp one more image, never a numpy copy besides.
    """
    view = sitk.GetArrayViewFromImage(image)  # read-only, no copy
    warnings, notes = [], []
    floating = np.issubdtype(view.dtype, np.floating)
    if floating and _count_slabs(view, lambda slab: ~np.isfinite(slab)):
        # rare (missing-data voxels): repair on a float32 copy, as before
        hu = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        warnings.append(replace_non_finite(name, hu))
        fixed = sitk.GetImageFromArray(hu)
        fixed.CopyInformation(image)
        image, view = fixed, hu
        del fixed
    check_hu_plausible(name, view, hu_offset)
    clamped = _count_slabs(view, lambda slab: slab < AIR_HU)
    del view
    if clamped:  # clamp and convert in one pass: one new float32 image
        image = sitk.Clamp(image, sitk.sitkFloat32, AIR_HU, float(np.finfo(np.float32).max))
        notes.append(f"{clamped} voxels below {AIR_HU:g} HU (outside-field-of-view padding) set to air")
    elif image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image, warnings, notes


def _count_slabs(values: np.ndarray, predicate, slab: int = 16) -> int:
    """How many voxels of a z, y, x array satisfy ``predicate``, a few slices at a time (small temporaries)."""
    return sum(int(np.count_nonzero(predicate(values[z:z + slab]))) for z in range(0, values.shape[0], slab))
