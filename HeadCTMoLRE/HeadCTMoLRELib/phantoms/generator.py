"""One synthetic head CT case: pose and geometry, anatomy and findings, image formation, labels.

:func:`generate_phantom` samples the scan geometry (spacing, field of view, table height) and the head's
size, position and pose, builds a :class:`~HeadCTMoLRELib.phantoms.pathology.HeadWithFindings` on that
grid, blurs it in-plane (scanner point spread) and adds correlated Gaussian noise, and returns a
:class:`Phantom`: an int16 HU ``SimpleITK.Image`` in LPS with identity direction (axial; its numpy
array is ``(z, y, x)``), the catalog labels, optional finding masks and JSON-able metadata.

Randomness comes from four independent streams spawned from the seed (finding sampling, anatomy,
findings, noise), so the same seed gives the same head whichever findings are drawn on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..findings import FindingCatalog, default_catalog
from .findings import IMPLIED_LABELS, check_renderable, sample_findings
from .geometry import HeadGrid, head_rotation
from .pathology import HeadWithFindings

#: Range of the stored CT numbers (HU): air at -1024, the 12-bit top at 3071.
HU_MIN, HU_MAX = -1024, 3071

#: A finding is labelled only when its mask has a voxel at least this far (mm) above the lower edge of the
#: scan. The standard slice stacks (40 x 4 mm with template alignment, 20 x 8 mm with centre alignment)
#: start their first valid slice within about 6 mm of that edge (measured on 60 phantoms: -4.5 to +5.5 mm),
#: so a finding lying only in the lowest centimetre of the scan would be a positive label with nothing of it
#: in the model's input. Testing/test_phantom.py checks every positive label against both stacks.
COVERED_ABOVE_SCAN_BOTTOM_MM = 12.0


@dataclass
class Phantom:
    """One synthetic case.

    ``image``: int16 HU, LPS, identity direction, array order (z, y, x). ``labels``: every catalog id ->
    0/1 (1 when drawn or implied by a drawn finding). ``finding_masks``: drawn id -> bool (z, y, x) array
    when asked for. ``metadata``: seed, spacing, head size, pose, tissue HU and finding parameters (JSON-able).
    """

    image: sitk.Image
    labels: dict[str, int]
    finding_masks: dict[str, np.ndarray] | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def hu(self) -> np.ndarray:
        """(z, y, x) int16 HU array (a copy)."""
        return sitk.GetArrayFromImage(self.image)

    @property
    def positive_ids(self) -> tuple[str, ...]:
        """Catalog ids labelled 1, in catalog order."""
        return tuple(k for k, v in self.labels.items() if v)


# ----------------------------------------------------------------------------------------------------
# image formation


def _form_image(hu: np.ndarray, noise_sigma_hu: float, noise_rng: np.random.Generator) -> np.ndarray:
    """Blur a float32 (z, y, x) HU array in-plane (scanner PSF) and add in-plane correlated noise of
    standard deviation ``noise_sigma_hu`` (HU, quieter in air); returns int16 HU (z, y, x)."""
    hu = _blur_inplane(hu)
    noise = noise_rng.standard_normal(hu.shape, dtype=np.float32)
    noise = _blur_inplane(noise) * np.float32(noise_sigma_hu / 0.375)
    air = hu < -900
    hu += noise
    hu[air] -= noise[air] * 0.7  # air outside the head is quieter
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)


def _blur_inplane(a: np.ndarray) -> np.ndarray:
    """3-tap binomial blur along x then y of a (z, y, x) array (edge samples repeated)."""
    out = a * np.float32(0.5)
    out[:, :, 1:] += a[:, :, :-1] * np.float32(0.25)
    out[:, :, :-1] += a[:, :, 1:] * np.float32(0.25)
    out[:, :, 0] += a[:, :, 0] * np.float32(0.25)
    out[:, :, -1] += a[:, :, -1] * np.float32(0.25)
    res = out * np.float32(0.5)
    res[:, 1:, :] += out[:, :-1, :] * np.float32(0.25)
    res[:, :-1, :] += out[:, 1:, :] * np.float32(0.25)
    res[:, 0, :] += out[:, 0, :] * np.float32(0.25)
    res[:, -1, :] += out[:, -1, :] * np.float32(0.25)
    return res



def _findings_without_covered_signal(masks: dict[str, np.ndarray], lowest_covered_slice: int) -> dict[str, str]:
    """Drawn finding id -> why it is not labelled, for each (z, y, x) mask that is empty (the lesion was
    smaller than the voxels, or outside the scan) or lies entirely below image row ``lowest_covered_slice``."""
    dropped = {}
    for finding_id, mask in masks.items():
        if not mask.any():
            dropped[finding_id] = "nothing drawn (smaller than the voxels or outside the scan)"
        elif not mask[lowest_covered_slice:].any():
            dropped[finding_id] = (f"only in the lowest {COVERED_ABOVE_SCAN_BOTTOM_MM:g} mm of the scan, "
                                   "below the standard slice stacks")
    return dropped


# ----------------------------------------------------------------------------------------------------
# one case


def generate_phantom(findings: Iterable[str] | None, seed: int, *,
                     spacing_mm: tuple[float, float, float] | None = None,
                     size_px: int | None = None,
                     noise_sigma_hu: float | None = None,
                     return_masks: bool = False,
                     catalog: FindingCatalog | None = None) -> Phantom:
    """Draw one synthetic non-contrast head CT.

    ``findings``: renderable ids to draw (see :data:`RENDERABLE_FINDINGS`); None samples a random set with
    :func:`sample_findings` at prevalence 0.1. ``spacing_mm`` (x, y, z): in-plane 0.3-2 mm and slices
    0.3-10 mm; default samples 0.88-0.98 mm in-plane and 4, 4.5 or 5 mm slices. ``size_px`` (in-plane matrix,
    default 256, or larger when the field of view would be under 220 mm). ``noise_sigma_hu`` default 3-6.
    Same ``seed`` and arguments give the same voxels. The result is int16 HU, LPS, axial, covering the
    skull base (about 55-62 mm below the brain centre) to the vertex. A drawn finding with no mask voxel in
    the part of the scan that the standard slice stacks see (:data:`COVERED_ABOVE_SCAN_BOTTOM_MM`) is not
    labelled (nor are the labels it implies) and has no mask; ``metadata["labels_dropped"]`` says which and
    why (a tiny lacune or calcification between two slices, say). Raises ``ValueError`` for a finding
    that cannot be drawn or is not in ``catalog`` (default: :func:`~HeadCTMoLRELib.findings.default_catalog`),
    and for a spacing out of range.
    """
    setup_rng, rng, findings_rng, noise_rng = (np.random.default_rng(s)
                                                for s in np.random.SeedSequence(int(seed)).spawn(4))
    catalog = catalog or default_catalog()
    if findings is None:
        findings = sample_findings(setup_rng, 0.1)
    findings = tuple(dict.fromkeys(findings))
    check_renderable(findings)
    missing = [f for f in findings if f not in catalog]
    if missing:
        raise ValueError(f"Finding(s) {missing} are renderable but not in the catalog {catalog.source}.")
    in_plane, thickness = float(rng.uniform(0.88, 0.98)), float(rng.choice((4.0, 4.5, 5.0)))
    if spacing_mm is None:
        spacing_mm = (in_plane, in_plane, thickness)
    spacing = tuple(float(s) for s in spacing_mm)
    if not (0.3 <= spacing[0] <= 2 and 0.3 <= spacing[1] <= 2 and 0.3 <= spacing[2] <= 10):
        raise ValueError(f"spacing_mm {spacing} out of range: in-plane 0.3-2 mm, slices 0.3-10 mm.")
    if size_px is None:
        size_px = max(256, int(math.ceil(220 / min(spacing[:2]) / 16)) * 16)
    pose = {"yaw_deg": rng.uniform(-6, 6), "pitch_deg": rng.uniform(-10, 10), "roll_deg": rng.uniform(-4, 4),
            "shift_x_mm": rng.uniform(-8, 8), "shift_y_mm": rng.uniform(-10, 6)}
    z_bottom, z_top = -rng.uniform(55, 62), 90.0
    n_slices = int(math.ceil((z_top - z_bottom) / spacing[2]))
    table_z = float(rng.uniform(-150, 50))
    origin = (-(size_px - 1) / 2 * spacing[0], -(size_px - 1) / 2 * spacing[1], table_z + z_bottom)
    head_centre = (pose["shift_x_mm"], pose["shift_y_mm"], table_z)
    grid = HeadGrid((n_slices, size_px, size_px), spacing, origin, head_centre,
                    head_rotation(pose["yaw_deg"], pose["pitch_deg"], pose["roll_deg"]))
    lowest_covered = max(0, int(math.ceil(COVERED_ABOVE_SCAN_BOTTOM_MM / spacing[2] - 0.5)))
    head = HeadWithFindings(grid, rng, findings_rng, findings, lowest_covered_slice=lowest_covered)
    head.build_anatomy()
    head.render_findings()
    dropped = _findings_without_covered_signal(head.masks, lowest_covered)
    sigma_draw = float(noise_rng.uniform(3, 6))  # drawn even when given, so the noise itself is the same
    sigma = float(noise_sigma_hu if noise_sigma_hu is not None else sigma_draw)
    hu = _form_image(head.hu, sigma, noise_rng)

    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    positives = (set(findings) | head.extra_labels) - set(dropped)
    if "meningioma" in dropped:
        positives.discard("vasogenic_edema")  # its only source is the meningioma's surrounding oedema
    for f in list(positives):
        positives.update(IMPLIED_LABELS.get(f, ()))
    labels = {fid: int(fid in positives) for fid in catalog.ids}
    metadata = {
        "seed": int(seed), "findings_drawn": list(findings), "positive_labels": sorted(p for p in positives if p in catalog),
        "labels_dropped": dropped,
        "spacing_mm": list(spacing), "size_zyx": list(hu.shape), "noise_sigma_hu": round(sigma, 2),
        "head_inner_radii_mm": [round(float(r), 1) for r in head.radii], "skull_mm": round(head.skull_mm, 2),
        "pose": {k: round(float(v), 2) for k, v in pose.items()},
        "tissue_hu": {k: round(float(v), 1) for k, v in head.hu_values.items()},
        "finding_params": head.params, "catalog_version": catalog.version,
    }
    masks = {f: m for f, m in head.masks.items() if f not in dropped} if return_masks else None
    return Phantom(image=image, labels=labels, finding_masks=masks, metadata=metadata)

