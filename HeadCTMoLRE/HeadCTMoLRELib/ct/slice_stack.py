"""The slice stack's parameters and geometry, and the way back to patient space: numpy and SimpleITK only.

``PreprocessConfig`` (what a model bundle asks of preprocessing), ``SliceStack`` (the model input and its
geometry) and ``stack_to_image`` (per-slice values back on the original image grid) live here, apart from
``preprocess.py`` (which needs torch to build a stack), so that the Slicer GUI process can show a result
that the worker computed without importing torch. ``preprocess`` re-exports all three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


MINMAX_WINDOW = "minmax"  # a windows_hu entry: the scan's own min..max range (per volume)
MINMAX_EPS = 1e-8  # added to max - min, as Pillar-0's reference windowing
OUTSIDE_AIR_HU = -1024.0  # == alignment.AIR_HU (not imported: this module stays torch-free)


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; stored in model bundles (``to_dict``) so inference can honour them.

    image_size: H = W of each slice fed to the model (pixels).
    in_plane_fov_mm: square field of view (mm); in-plane pixel spacing = in_plane_fov_mm / image_size.
    slice_spacing_mm: head-frame z spacing (mm).
    num_slices: S; the stack covers num_slices * slice_spacing_mm in z (fixed so volumes batch).
    windows_hu: one entry per channel, in channel order: a (low, high) HU window, mapped to 0..1 as
        clip((hu - low) / (high - low), 0, 1), or the string "minmax" (MINMAX_WINDOW): the volume's own range,
        clip((hu - min) / (max - min + 1e-8), 0, 1) with min and max over the whole slice stack of that scan
        (outside fill included), as Pillar-0's 11th channel.
    alignment: "template" (rigid to the shipped head CT template), "center" or "none".
    outside_hu: the HU value given to stack voxels outside the scanned volume (and to invalid slices) before
        the windows: air (-1024) by default; Pillar0-HeadCT's reference pads its volume with -1 HU.
    """

    image_size: int = 224
    in_plane_fov_mm: float = 224.0
    slice_spacing_mm: float = 4.0
    num_slices: int = 40
    windows_hu: tuple[tuple[float, float], ...] = ((0, 80), (-20, 180), (-800, 2000))
    alignment: str = "template"
    outside_hu: float = OUTSIDE_AIR_HU

    def __post_init__(self):
        if self.image_size < 1 or self.num_slices < 1:
            raise ValueError(f"image_size and num_slices must be positive (got {self.image_size}, "
                             f"{self.num_slices}).")
        if self.in_plane_fov_mm <= 0 or self.slice_spacing_mm <= 0:
            raise ValueError(f"in_plane_fov_mm and slice_spacing_mm must be positive (got "
                             f"{self.in_plane_fov_mm}, {self.slice_spacing_mm}).")
        object.__setattr__(self, "windows_hu", _checked_windows(self.windows_hu))
        if not (isinstance(self.outside_hu, (int, float)) and not isinstance(self.outside_hu, bool)
                and -5000.0 <= float(self.outside_hu) <= 40000.0):
            raise ValueError(f"outside_hu must be a number of HU in [-5000, 40000] (got {self.outside_hu!r}).")
        object.__setattr__(self, "outside_hu", float(self.outside_hu))
        if self.alignment not in ("template", "center", "none"):
            raise ValueError(f"alignment must be 'template', 'center' or 'none' (got {self.alignment!r}).")

    @property
    def pixel_spacing_mm(self) -> float:
        return self.in_plane_fov_mm / self.image_size

    def to_dict(self) -> dict:
        """JSON-able dict (windows as lists; outside_hu only when it is not air, so that the manifests and
        cache keys of configurations that existed before it stay as they were)."""
        data = dataclasses.asdict(self)
        data["windows_hu"] = [w if w == MINMAX_WINDOW else list(w) for w in self.windows_hu]
        if data["outside_hu"] == OUTSIDE_AIR_HU:
            del data["outside_hu"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        """Inverse of ``to_dict``; unknown keys are an error (a bundle asks for something we cannot do)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown preprocessing parameters {unknown}; this version understands {sorted(known)}. "
                             "Update HeadCTMoLRE or use a model bundle made for this version.")
        values = dict(data)
        if "windows_hu" in values:
            values["windows_hu"] = tuple(w if isinstance(w, str) else tuple(w) for w in values["windows_hu"])
        return cls(**values)


def _checked_windows(windows) -> tuple:
    """windows_hu as stored: (low, high) float pairs with high > low, or the string MINMAX_WINDOW."""
    checked = []
    for window in windows:
        if isinstance(window, str):
            if window != MINMAX_WINDOW:
                raise ValueError(f"windows_hu entry {window!r} is not a (low, high) HU pair or {MINMAX_WINDOW!r}.")
            checked.append(window)
            continue
        try:
            low, high = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ValueError(f"windows_hu entry {window!r} is not a (low, high) HU pair or {MINMAX_WINDOW!r}.") from None
        if not high > low:
            raise ValueError(f"windows_hu window {window!r} needs high > low.")
        checked.append((low, high))
    if not checked:
        raise ValueError(f"windows_hu needs at least one (low, high) pair with high > low; got {windows}.")
    return tuple(checked)


@dataclass
class SliceStack:
    """The model input and its geometry.

    pixels: float32 (S, C, H, W), 0..1; channel c = window c; slice inferior -> superior, row anterior ->
        posterior, column patient right -> left.
    slice_valid: bool (S,): the slice lies (mostly) inside the scanned volume (at least half of its central
        disc, diameter fov / 2, inside the input grid); invalid slices are air.
    head_mask: bool (S, H, W): head (skin and inside), False on invalid slices.
    slice_positions_mm: float64 (S, 3): slice centres in the ORIGINAL image's patient LPS mm.
    origin_mm, spacing_mm: float64 (3,) head-frame grid, x y z order: LPS mm of pixel (0, 0, 0) and the
        spacing (col, row, slice); the grid is axis-aligned (identity direction) in the head frame.
    head_to_patient: float64 (4, 4) rigid: head-frame LPS mm -> original patient LPS mm.
    alignment: JSON-able description of the alignment (method, fallback, quality).
    """

    pixels: np.ndarray
    slice_valid: np.ndarray
    head_mask: np.ndarray
    slice_positions_mm: np.ndarray
    origin_mm: np.ndarray
    spacing_mm: np.ndarray
    head_to_patient: np.ndarray
    alignment: dict
    warnings: list[str] = field(default_factory=list)
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    def stack_index_to_patient(self, kji: np.ndarray) -> np.ndarray:
        """(..., 3) continuous (slice, row, col) indices -> (..., 3) patient LPS mm."""
        kji = np.asarray(kji, dtype=np.float64)
        frame = self.origin_mm + kji[..., ::-1] * self.spacing_mm
        return frame @ self.head_to_patient[:3, :3].T + self.head_to_patient[:3, 3]

    def patient_to_stack_index(self, lps: np.ndarray) -> np.ndarray:
        """(..., 3) patient LPS mm -> (..., 3) continuous (slice, row, col) indices (inverse of the above)."""
        lps = np.asarray(lps, dtype=np.float64)
        rotation, translation = self.head_to_patient[:3, :3], self.head_to_patient[:3, 3]
        frame = (lps - translation) @ rotation  # R^T (p - t), row-vector form
        return ((frame - self.origin_mm) / self.spacing_mm)[..., ::-1]

    def grid_image(self, values: np.ndarray) -> sitk.Image:
        """float32 SimpleITK image of (S, H, W) values placed on the stack grid in patient space."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
        image.SetSpacing([float(s) for s in self.spacing_mm])
        image.SetOrigin([float(v) for v in self.stack_index_to_patient(np.zeros(3))])
        image.SetDirection([float(v) for v in self.head_to_patient[:3, :3].ravel()])
        return image


def stack_to_image(values: np.ndarray, stack: SliceStack, reference: sitk.Image, *,
                   interpolation: str = "linear", default_value: float = 0.0) -> sitk.Image:
    """Put per-slice or per-pixel stack values back on the original image grid.

    values: (S,) one number per slice (spread over the slice inside ``stack.head_mask``; ``default_value``
        elsewhere) or (S, H, W) one per stack pixel.
    reference: the ORIGINAL input image (or anything with its geometry); only its grid is used.
    interpolation: "linear" (attention, probabilities) or "nearest" (label maps such as expert indices).
    Returns a float32 image on the reference's grid (same size, spacing, origin, direction; LPS mm).
    """
    values = np.asarray(values, dtype=np.float32)
    s, h, w = stack.head_mask.shape
    if values.shape == (s,):
        values = np.where(stack.head_mask, values[:, None, None], np.float32(default_value))
    elif values.shape != (s, h, w):
        raise ValueError(f"stack_to_image: values must have shape ({s},) or ({s}, {h}, {w}); got {values.shape}.")
    modes = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}.")
    reference = getattr(reference, "image", reference)
    return sitk.Resample(stack.grid_image(values), reference, sitk.Transform(), modes[interpolation],
                         float(default_value), sitk.sitkFloat32)
