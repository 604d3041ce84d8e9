"""Synthetic non-contrast head CT phantoms with known findings, for tests, the demo model and benchmarks.

No shareable labelled head CT exists, so this module draws one procedurally: nested analytic surfaces
(scalp, subcutaneous fat, skull with outer/inner tables and diploe, extra-axial CSF, a folded cortical
ribbon with sulci, white matter, deep grey nuclei, ventricles, cisterns, posterior fossa, skull base
with orbits, sinuses and mastoid air cells, physiological calcifications), then findings on top, then
in-plane blur and correlated Gaussian noise. Every number is sampled per case from a range (HU facts in
``/work/shared/data/README.md``), and the head has a random size, position and a few degrees of rotation.

Conventions: the image is a ``SimpleITK.Image`` of int16 HU in LPS with identity direction (axial);
``sitk.GetArrayFromImage`` gives a ``(z, y, x)`` array. The *head frame* used to draw anatomy is in mm
with x to the patient's left, y posterior and z superior, origin near the centre of the brain.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .findings import FindingCatalog, default_catalog

#: How each renderable finding is drawn (finding id -> short description).
RENDERABLE_FINDINGS: dict[str, str] = {
    "epidural_hematoma": "biconvex 55-75 HU collection under the inner table, 6-22 mm thick",
    "subdural_hematoma": "crescentic 50-72 HU collection along a convexity, 3-14 mm thick",
    "chronic_subdural_hematoma": "crescentic 10-32 HU collection along a convexity, 5-18 mm thick",
    "subarachnoid_hemorrhage": "50-70 HU blood replacing CSF in convexity sulci, sylvian fissure or basal cisterns",
    "intraparenchymal_hemorrhage": "irregular 55-75 HU hematoma with an edema rim (lobar, basal ganglia, thalamus or cerebellum)",
    "lobar_hemorrhage": "irregular 55-75 HU hematoma 10-25 mm under the cortex of a lobe",
    "basal_ganglia_hemorrhage": "irregular 55-75 HU hematoma centred on the lentiform nucleus",
    "thalamic_hemorrhage": "irregular 55-75 HU hematoma centred on a thalamus",
    "cerebellar_hemorrhage": "irregular 55-75 HU hematoma in a cerebellar hemisphere",
    "intraventricular_hemorrhage": "50-70 HU blood layering in the dependent (posterior) lateral ventricles",
    "acute_infarct": "cone-shaped arterial territory 6-9 HU darker than parenchyma, grey-white contrast lost",
    "hypodense_acute_infarct": "arterial territory 11-18 HU darker with effaced sulci (also labels acute_infarct)",
    "chronic_infarct": "sharply marginated CSF-density (2-12 HU) wedge reaching the cortex",
    "lacunar_infarct": "1-3 round CSF-density foci of 2.5-6 mm in basal ganglia, thalamus or internal capsule",
    "small_vessel_ischemic_disease": "bilateral patchy periventricular white matter 6-12 HU darker",
    "hyperdense_vessel": "65-90 HU middle cerebral artery (M1) or basilar segment instead of 38-45 HU",
    "venous_sinus_thrombosis": "superior sagittal or transverse sinus at 70-88 HU instead of 40-50 HU",
    "skull_fracture": "1-2.5 mm lucent line through the calvarium, sometimes a depressed fragment",
    "pneumocephalus": "air locules (or a frontal air collection) in the non-dependent extra-axial space",
    "scalp_hematoma": "lentiform 40-70 HU swelling of the scalp, 6-22 mm thick",
    "meningioma": "round 45-62 HU dural-based mass, sometimes calcified or with surrounding edema",
    "cystic_lesion": "well-defined round 0-12 HU lesion, 6-22 mm radius",
    "lipoma": "small -100 to -60 HU midline lesion (pericallosal or quadrigeminal)",
    "hydrocephalus": "lateral, third and temporal horns enlarged (Evans index > 0.3), sulci effaced",
    "midline_shift": "deep midline structures displaced 5-14 mm away from a mass, ipsilateral ventricle compressed",
    "atrophy": "wide sulci, 3-6 mm extra-axial CSF, mildly enlarged ventricles",
    "pathological_calcification": "basal ganglia, dentate or scattered parenchymal foci of 120-600 HU",
    "sinusitis": "mucosal thickening or opacification (15-40 HU) of a maxillary, sphenoid or frontal sinus",
    "mastoid_opacification": "mastoid air cells filled with 15-45 HU fluid, one or both sides",
}

#: Labels that are also true whenever a finding is drawn (a basal ganglia hematoma is an IPH...).
IMPLIED_LABELS: dict[str, tuple[str, ...]] = {
    "lobar_hemorrhage": ("intraparenchymal_hemorrhage",),
    "basal_ganglia_hemorrhage": ("intraparenchymal_hemorrhage",),
    "thalamic_hemorrhage": ("intraparenchymal_hemorrhage",),
    "cerebellar_hemorrhage": ("intraparenchymal_hemorrhage",),
    "hypodense_acute_infarct": ("acute_infarct",),
    "hyperdense_vessel": ("vessel_occlusion",),
    "chronic_infarct": ("encephalomalacia",),
    "hydrocephalus": ("ventricular_enlargement",),
    "midline_shift": ("mass_effect",),
}

_IPH_SITES = ("lobar_hemorrhage", "basal_ganglia_hemorrhage", "thalamic_hemorrhage", "cerebellar_hemorrhage")
_MASS_EFFECT_CAUSES = ("subdural_hematoma", "epidural_hematoma", "chronic_subdural_hematoma",
                       "lobar_hemorrhage", "meningioma")
#: (cause, consequence, probability) applied once, in order, by :func:`sample_findings`.
_CO_OCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("subdural_hematoma", "midline_shift", 0.35),
    ("epidural_hematoma", "skull_fracture", 0.6),
    ("pneumocephalus", "skull_fracture", 0.5),
    ("skull_fracture", "scalp_hematoma", 0.6),
    ("hyperdense_vessel", "acute_infarct", 0.5),
    ("thalamic_hemorrhage", "intraventricular_hemorrhage", 0.3),
    ("subarachnoid_hemorrhage", "intraventricular_hemorrhage", 0.15),
)

HU_MIN, HU_MAX = -1024, 3071


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
        return tuple(k for k, v in self.labels.items() if v)


# ----------------------------------------------------------------------------------------------------
# sampling which findings a case has


def sample_findings(rng: np.random.Generator | int, prevalence: float | Mapping[str, float] = 0.1,
                    allowed: Iterable[str] | None = None) -> tuple[str, ...]:
    """Draw a random set of renderable findings with realistic co-occurrence.

    Each allowed finding is drawn independently with ``prevalence`` (a probability, or id -> probability);
    then rules add consequences (fracture under an epidural hematoma, midline shift with a large subdural
    hematoma, ...), a midline shift always gets a cause, and hydrocephalus excludes atrophy. The marginal
    prevalence of consequences is therefore somewhat higher than asked.
    """
    rng = np.random.default_rng(rng)
    allowed_ids = tuple(RENDERABLE_FINDINGS) if allowed is None else tuple(allowed)
    _check_renderable(allowed_ids)
    chosen = []
    for finding_id in allowed_ids:
        p = prevalence.get(finding_id, 0.0) if isinstance(prevalence, Mapping) else float(prevalence)
        if rng.random() < p:
            chosen.append(finding_id)
    for cause, consequence, p in _CO_OCCURRENCE:
        if cause in chosen and consequence in allowed_ids and consequence not in chosen and rng.random() < p:
            chosen.append(consequence)
    if "midline_shift" in chosen and not any(c in chosen for c in _MASS_EFFECT_CAUSES):
        causes = [c for c in _MASS_EFFECT_CAUSES if c in allowed_ids] or ["subdural_hematoma"]
        chosen.append(str(rng.choice(causes)))
    if "hydrocephalus" in chosen and "atrophy" in chosen:
        chosen.remove("atrophy")
    return tuple(f for f in RENDERABLE_FINDINGS if f in chosen)


def _check_renderable(finding_ids: Iterable[str]) -> None:
    unknown = [f for f in finding_ids if f not in RENDERABLE_FINDINGS]
    if unknown:
        raise ValueError(f"Cannot draw finding(s) {unknown}: the phantom renders only {sorted(RENDERABLE_FINDINGS)}.")


# ----------------------------------------------------------------------------------------------------
# geometry: the voxel grid seen in the head frame


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Head frame -> world rotation: pitch about x (nodding), roll about y, yaw about z."""
    a, b, c = np.radians([pitch_deg, roll_deg, yaw_deg])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Grid:
    """Head-frame coordinates (mm, float32 (z, y, x) arrays) of every voxel, and boxes in index space."""

    def __init__(self, shape_zyx, spacing_xyz, origin_xyz, head_center_xyz, rotation):
        self.shape = tuple(int(s) for s in shape_zyx)
        self.spacing = np.asarray(spacing_xyz, float)
        self.origin = np.asarray(origin_xyz, float)
        self.center = np.asarray(head_center_xyz, float)
        self.rotation = np.asarray(rotation, float)
        nz, ny, nx = self.shape
        world = [self.origin[i] + self.spacing[i] * np.arange(n) - self.center[i]
                 for i, n in enumerate((nx, ny, nz))]
        rt = self.rotation.T  # world -> head frame
        wx = world[0][None, None, :].astype(np.float32)
        wy = world[1][None, :, None].astype(np.float32)
        wz = world[2][:, None, None].astype(np.float32)
        self.x, self.y, self.z = (np.float32(rt[i, 0]) * wx + np.float32(rt[i, 1]) * wy
                                  + np.float32(rt[i, 2]) * wz for i in range(3))

    def box(self, center, radii, margin_mm: float = 2.0):
        """Index slices (z, y, x) covering the head-frame box center +- (radii + margin) (maybe empty)."""
        c, r = np.asarray(center, float), np.asarray(radii, float) + margin_mm
        corners = np.array([[c[0] + sx * r[0], c[1] + sy * r[1], c[2] + sz * r[2]]
                            for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        index = ((corners @ self.rotation.T) + self.center - self.origin) / self.spacing
        lo = np.floor(index.min(0)).astype(int)
        hi = np.ceil(index.max(0)).astype(int) + 1
        nz, ny, nx = self.shape
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, (nx, ny, nz))
        hi = np.maximum(hi, lo)  # an empty box when the region lies outside the grid
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _ellipsoid_rho(x, y, z, center, radii):
    """Normalised ellipsoid radius (< 1 inside) of head-frame points."""
    return np.sqrt(((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
                   + ((z - center[2]) / radii[2]) ** 2)


def _ellipsoid_distance(x, y, z, ax, ay, az_up, az_down):
    """Approximate signed distance (mm, > 0 outside) to an ellipsoid centred at the origin whose
    superior half has semi-axis az_up and inferior half az_down (first-order: (rho - 1) / |grad rho|)."""
    az = np.where(z > 0, np.float32(az_up), np.float32(az_down))
    nx, ny, nz = x / np.float32(ax), y / np.float32(ay), z / az
    rho = np.sqrt(nx * nx + ny * ny + nz * nz)
    grad = np.sqrt((nx / np.float32(ax)) ** 2 + (ny / np.float32(ay)) ** 2 + (nz / az) ** 2)
    return (rho - 1) * rho / np.maximum(grad, np.float32(1e-6))


def _segment_distance(x, y, z, start, end):
    """Distance (mm) of points to the segment start-end."""
    a, b = np.asarray(start, np.float32), np.asarray(end, np.float32)
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0, 1)
    return np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)


# tissue codes of the label map used to place findings
(AIR, SOFT, FAT, BONE, CSF, VENTRICLE, GM, WM, DEEP_GM, POSTERIOR_FOSSA, SINUS_AIR, MASTOID_AIR, BLOOD_VESSEL,
 BLOOD) = range(14)


class _Head:
    """Builds one head: parameters, anatomy (``hu`` and ``tissue`` arrays) and findings on top."""

    def __init__(self, grid: _Grid, anatomy_rng: np.random.Generator, findings_rng: np.random.Generator,
                 findings: tuple[str, ...]):
        # anatomy and findings draw from separate streams: the same seed gives the same head whichever
        # findings are drawn on it (every anatomy draw is made whether or not a finding changes it)
        self.grid, self.rng, self.findings_rng, self.findings = grid, anatomy_rng, findings_rng, findings
        rng = anatomy_rng
        u = rng.uniform
        self.hu_values = {
            "wm": u(25, 30), "csf": u(3, 10), "fat": u(-105, -70), "soft": u(35, 50),
            "cortical_bone": u(1100, 1700), "diploe": u(300, 600), "venous_blood": u(40, 50),
        }
        self.hu_values["gm"] = self.hu_values["wm"] + u(8, 12)
        scale = u(0.92, 1.08)
        self.radii = np.array([u(64, 71), u(80, 89), u(70, 76)]) * scale  # inner table, above z = 0
        self.radius_below = u(50, 56) * scale
        self.skull_mm, self.scalp_mm = u(5.5, 7.5), u(4.5, 7.0)
        atrophy, hydro = "atrophy" in findings, "hydrocephalus" in findings
        self.gap_mm = u(3.0, 6.0) if atrophy else u(0.8, 2.0)  # extra-axial CSF
        self.sulcus_halfwidth = u(1.8, 2.8) if atrophy else (u(0.25, 0.45) if hydro else u(0.6, 1.0))
        self.sulcus_depth = u(14, 20) if atrophy else (u(5, 8) if hydro else u(10, 15))
        self.ventricle_scale = u(1.6, 2.0) if hydro else (u(1.2, 1.35) if atrophy else u(0.85, 1.1))
        horn_draw = u(2.5, 3.5)
        self.temporal_horn_scale = horn_draw if hydro else 1.0
        side_draws = findings_rng.choice((-1.0, 1.0), size=len(RENDERABLE_FINDINGS))
        self.side = {f: float(side_draws[i]) for i, f in enumerate(RENDERABLE_FINDINGS)}  # +1 left, -1 right
        shift_draw = findings_rng.uniform(5, 14)
        self.shift_mm = 0.0
        if "midline_shift" in findings:
            cause = next((c for c in _MASS_EFFECT_CAUSES if c in findings), None)
            away = -self.side[cause] if cause else self.side["midline_shift"]
            self.shift_mm = float(away * shift_draw)
        self.params: dict[str, dict] = {}
        self.masks: dict[str, np.ndarray] = {}
        nz, ny, nx = grid.shape
        self.hu = np.full(grid.shape, -1000.0, np.float32)
        self.tissue = np.zeros(grid.shape, np.uint8)

    # --- helpers -----------------------------------------------------------------------------------

    def _local(self, center, radii, margin=2.0):
        box = self.grid.box(center, radii, margin)
        g = self.grid
        return box, (g.x[box], g.y[box], self.deep_x[box], g.z[box])

    def _paint(self, box, mask, value, tissue=None):
        if not mask.any():
            return
        self.hu[box][mask] = value if np.isscalar(value) else value[mask]
        if tissue is not None:
            self.tissue[box][mask] = tissue

    def _record(self, finding_id: str, box, mask, **params):
        full = self.masks.get(finding_id)
        if full is None:
            full = self.masks[finding_id] = np.zeros(self.grid.shape, bool)
        if box is not None:
            full[box] |= mask
        self.params.setdefault(finding_id, {}).update(
            {k: (round(float(v), 2) if isinstance(v, (float, np.floating)) else v) for k, v in params.items()})

    # --- anatomy -----------------------------------------------------------------------------------

    def build_anatomy(self):
        g, v = self.grid, self.hu_values
        ax, ay, az_up = self.radii
        self.d_in = _ellipsoid_distance(g.x, g.y, g.z, ax, ay, az_up, self.radius_below)
        # the face and neck make the head outline much wider than the brain below the skull base
        d_face = _ellipsoid_distance(g.x, g.y + 4, g.z, ax, ay + 4, az_up, 125.0)
        self.d_out = np.where(g.z > 0, self.d_in, np.minimum(self.d_in, d_face))
        # midline shift: deep structures use a displaced x (bell-shaped in y and z around the septum)
        if self.shift_mm:
            bell = np.exp(-((g.y + 5) / 45.0) ** 2 - ((g.z - 12) / 35.0) ** 2)
            self.deep_x = g.x - np.float32(self.shift_mm) * bell
        else:
            self.deep_x = g.x
        # orbital roofs: the anterior cranial fossa floor, sloping down backwards
        self.floor = np.where(g.y < -0.45 * ay, np.float32(-22.0) + np.float32(0.12) * (g.y + 0.45 * ay),
                              np.float32(-200.0))
        outer = self.skull_mm + self.scalp_mm
        head = self.d_out < outer
        self._set(head, v["soft"], SOFT)
        fat = (self.d_out > self.skull_mm + 1.0) & (self.d_out < outer - 1.5)
        self._set(fat, v["fat"], FAT)
        bone = (self.d_in >= 0) & (self.d_in < self.skull_mm)
        tables = bone & ((self.d_in < 1.6) | (self.d_in > self.skull_mm - 1.9))
        self._set(bone, v["diploe"], BONE)
        self.hu[tables] = v["cortical_bone"]
        below_floor = (self.d_in < 0) & (g.z < self.floor)
        self._set(below_floor, v["soft"], SOFT)
        self._set(below_floor & (g.z > self.floor - 2.5), v["cortical_bone"] * 0.8, BONE)
        self._skull_base()
        self._brain()

    def _set(self, mask, value, tissue):
        self.hu[mask] = value
        self.tissue[mask] = tissue

    def _inner_extent(self, z):
        """Half-width and half-length (mm) of the intracranial cross-section at head-frame height z."""
        rz = self.radii[2] if z > 0 else self.radius_below
        f = math.sqrt(max(1 - (z / rz) ** 2, 0.0))
        return self.radii[0] * f, self.radii[1] * f

    def _skull_base(self):
        v, u = self.hu_values, self.rng.uniform
        for s in (-1, 1):
            # petrous ridge: dense oblique bone between middle and posterior fossa
            box, (x, y, _, z) = self._local((s * 32, 16, -38), (26, 20, 14))
            d = _segment_distance(x, y, z, (s * 12, 2, -40), (s * 48, 28, -36))
            self._paint(box, (d < 6.0) & (self.d_in[box] < 0), v["cortical_bone"], BONE)
            # mastoid air cells: irregular honeycomb of air in bone, behind the petrous ridge
            half_width, _ = self._inner_extent(-40)
            centre = (s * (half_width + 3), 24, -40)
            box, (x, y, _, z) = self._local(centre, (9, 12, 11))
            inside = _ellipsoid_rho(x, y, z, centre, (9, 12, 11)) < 1
            cells = (np.sin(x * 1.9 + np.sin(z)) * np.sin(y * 1.7 + 1) * np.sin(z * 1.6 + 2 + np.sin(x))) > -0.2
            self._paint(box, inside, v["cortical_bone"] * 0.7, BONE)
            self._paint(box, inside & cells, -1000.0, MASTOID_AIR)
            # orbits in front of the anterior fossa: fat cone, globe with lens
            _, half_length = self._inner_extent(-36)
            globe = (s * 31, -(half_length + self.skull_mm + 10), -36)
            fat_c = (s * 27, globe[1] + 15, -36)
            box, (x, y, _, z) = self._local(fat_c, (13, 21, 12))
            self._paint(box, (_ellipsoid_rho(x, y, z, fat_c, (12, 20, 11)) < 1) & (self.d_in[box] > 0), v["fat"], FAT)
            box, (x, y, _, z) = self._local(globe, (12, 12, 12))
            self._paint(box, _ellipsoid_rho(x, y, z, globe, (11.5, 11.5, 11.5)) < 1, u(8, 15), SOFT)
            lens = (globe[0], globe[1] - 9, globe[2])
            self._paint(box, _ellipsoid_rho(x, y, z, lens, (4, 1.8, 4)) < 1, u(90, 120), SOFT)
            _, half_length = self._inner_extent(-60)
            self._sinus(f"maxillary_{'left' if s > 0 else 'right'}",
                        (s * 26, -(half_length * 0.55 + 10), -68), (12, 16, 15))
        self._sinus("sphenoid", (0, -20, -40), (13, 10, 8))
        _, half_length = self._inner_extent(-4)
        self._sinus("frontal", (0, -(half_length + self.skull_mm * 0.4), -4), (14, 3.2, 10))

    def _sinus(self, name, centre, radii):
        box, (x, y, _, z) = self._local(centre, np.add(radii, 2.5))
        wall = _ellipsoid_rho(x, y, z, centre, np.add(radii, 2.5)) < 1
        air = _ellipsoid_rho(x, y, z, centre, radii) < 1
        self._paint(box, wall & ~air & (self.tissue[box] != SINUS_AIR), self.hu_values["cortical_bone"] * 0.8, BONE)
        self._paint(box, air, -1000.0, SINUS_AIR)
        self.sinuses = getattr(self, "sinuses", {})
        self.sinuses[name] = (centre, radii)

    def _brain(self):
        g, v, rng = self.grid, self.hu_values, self.rng
        intracranial = (self.d_in < 0) & (g.z >= self.floor)
        self._set(intracranial, v["csf"], CSF)
        brain = intracranial & (self.d_in < -self.gap_mm)
        self._set(brain, v["wm"], WM)
        # cortical ribbon folded by a sum of random plane waves; its zero set forms the sulci
        idx = np.flatnonzero(brain & (self.d_in > -self.gap_mm - self.sulcus_depth - 4))
        depth = -self.gap_mm - self.d_in.ravel()[idx]
        px, py, pz = g.x.ravel()[idx], g.y.ravel()[idx], g.z.ravel()[idx]
        folds = np.zeros(idx.size, np.float32)
        k_total = 0.0
        for _ in range(6):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            k = 2 * math.pi / rng.uniform(16, 26)
            k_total += k * k / 2
            folds += np.cos(np.float32(k) * (direction[0] * px + direction[1] * py + direction[2] * pz)
                            + np.float32(rng.uniform(0, 2 * math.pi)))
        fold_mm = np.abs(folds) / np.float32(math.sqrt(k_total))  # ~ distance to the sulcus centre
        cortex_mm = rng.uniform(2.5, 3.5)
        gm = (depth < cortex_mm) | ((fold_mm < self.sulcus_halfwidth + cortex_mm) & (depth < self.sulcus_depth + cortex_mm))
        sulcus = (fold_mm < self.sulcus_halfwidth) & (depth < self.sulcus_depth)
        flat_hu, flat_tissue = self.hu.reshape(-1), self.tissue.reshape(-1)
        flat_hu[idx[gm]] = v["gm"]
        flat_tissue[idx[gm]] = GM
        flat_hu[idx[sulcus]] = v["csf"]
        flat_tissue[idx[sulcus]] = CSF
        self._posterior_fossa(intracranial)
        self._midline_and_fissures(brain)
        self._deep_structures()
        self._venous_sinuses()
        self._normal_calcifications()

    def _posterior_fossa(self, intracranial):
        g, v = self.grid, self.hu_values
        tent = -10 - 0.35 * np.abs(g.x) - 0.12 * np.maximum(g.y - 20, 0)
        fossa = intracranial & (g.y > 4) & (g.z < tent) & (self.tissue != CSF) & (self.d_in < -self.gap_mm)
        folia = np.sin(g.z * np.float32(1.1) + np.sin(g.y * np.float32(0.25)) * 2)
        cerebellum = fossa & (folia > -0.75)
        self._set(fossa, v["csf"], CSF)
        self._set(cerebellum, v["gm"] - 3.0, POSTERIOR_FOSSA)
        box, (x, y, dx, z) = self._local((0, 8, -30), (20, 20, 30))
        cistern = _ellipsoid_rho(dx, y, z, (0, 8, -40), (16, 15, 34)) < 1
        brainstem = _ellipsoid_rho(dx, y, z, (0, 10, -40), (13, 12, 32)) < 1
        fourth = _ellipsoid_rho(dx, y, z, (0, 25, -36), (5.5, 3.5, 7)) < 1
        self._paint(box, cistern & (self.tissue[box] != BONE), v["csf"], CSF)
        self._paint(box, brainstem, v["wm"] + 4, POSTERIOR_FOSSA)
        self._paint(box, fourth, v["csf"], VENTRICLE)

    def _midline_and_fissures(self, brain):
        g, v = self.grid, self.hu_values
        # interhemispheric fissure with the falx, above the corpus callosum and at the poles
        box, (x, y, dx, z) = self._local((0, 0, 20), (8, self.radii[1], 60))
        region = brain[box] & ((z > 30 - 0.004 * y * y) | (np.abs(y) > 45))
        fissure = region & (np.abs(dx) < 1.8 + (self.gap_mm - 1) * 0.5)
        self._paint(box, fissure, v["csf"], CSF)
        self._paint(box, region & (np.abs(dx) < 0.6), v["venous_blood"] + 15, SOFT)
        # sylvian fissures and suprasellar cistern
        for s in (-1, 1):
            centre = (s * self.radii[0] * 0.72, -10, -8)
            box, (x, y, dx, z) = self._local(centre, (self.radii[0] * 0.3, 20, 8))
            tilt = z - centre[2] - 0.25 * (s * dx - centre[0] * s)
            sylvian = (np.abs(tilt) < 1.2 + self.sulcus_halfwidth) & (np.abs(y - centre[1]) < 18)
            sylvian &= np.isin(self.tissue[box], (GM, WM, CSF)) & (s * dx > 28)
            self._paint(box, sylvian, v["csf"], CSF)
        box, (x, y, dx, z) = self._local((0, -8, -22), (14, 12, 5))
        star = _ellipsoid_rho(dx, y, z, (0, -8, -22), (13, 10, 4)) < 1
        self._paint(box, star & (self.tissue[box] != BONE), v["csf"], CSF)

    def _ventricle_parts(self):
        """Head-frame ellipsoids (centre, radii) of the lateral ventricles, per side, scaled."""
        vs, th = self.ventricle_scale, self.temporal_horn_scale
        parts = []
        for s in (-1, 1):
            side_scale = vs * (0.6 if self.shift_mm and np.sign(self.shift_mm) != s else 1.0)
            rx = 5.5 * side_scale
            parts += [
                (s, (s * (1.5 + rx), -20, 13), (rx, 13, 8 * side_scale)),
                (s, (s * (1.5 + rx * 1.1), 4, 21), (rx * 1.05, 22, 6 * side_scale)),
                (s, (s * (12 + rx), 28, 12), (rx * 1.3, 9, 8 * side_scale)),
                (s, (s * (16 + rx * 0.6), 42, 9), (3.5 * side_scale, 10, 4 * side_scale)),
                (s, (s * 30, -2, -18), (2.0 * th, 11, 2.2 * th)),
            ]
        return parts

    def _deep_structures(self):
        v, rng = self.hu_values, self.rng
        # grey nuclei first, ventricles over them
        frontal_horn_rx = 5.5 * self.ventricle_scale
        nuclei = []
        for s in (-1, 1):
            nuclei += [((s * (1.5 + 2 * frontal_horn_rx + 2.5), -17, 12), (5, 10, 8), v["gm"] - 2),  # caudate
                       ((s * (19 + frontal_horn_rx * 0.4), -4, 2), (6, 13, 9), v["gm"] - 3),  # lentiform
                       ((s * 10, 13, 4), (8, 11, 8), v["gm"] - 3),  # thalamus
                       ((s * (35 + frontal_horn_rx * 0.3), -4, 0), (2.2, 17, 12), v["gm"])]  # insula
        self.nuclei_centres = {"lentiform": {s: nuclei[4 * i + 1][0] for i, s in enumerate((-1, 1))},
                               "thalamus": {s: nuclei[4 * i + 2][0] for i, s in enumerate((-1, 1))}}
        for centre, radii, value in nuclei:
            box, (x, y, dx, z) = self._local(centre, radii)
            inside = (_ellipsoid_rho(dx, y, z, centre, radii) < 1) & np.isin(self.tissue[box], (WM, GM))
            self._paint(box, inside, value, DEEP_GM)
        for s, centre, radii in self._ventricle_parts():
            box, (x, y, dx, z) = self._local(centre, radii)
            inside = (_ellipsoid_rho(dx, y, z, centre, radii) < 1) & (s * dx > 1.0)
            self._paint(box, inside & (self.tissue[box] != BONE), v["csf"], VENTRICLE)
        third = ((0, 4, 2), (1.6 * max(self.ventricle_scale, 1) ** 2, 14, 9))
        box, (x, y, dx, z) = self._local(*third)
        self._paint(box, _ellipsoid_rho(dx, y, z, *third) < 1, v["csf"], VENTRICLE)
        # normal middle cerebral arteries in the sylvian cisterns (the hyperdense vessel sign replaces one)
        for s in (-1, 1):
            self._vessel((s * 5, -10, -17), (s * 31, -8, -12), 1.6, rng.uniform(38, 45), "mca", s)

    def _vessel(self, start, end, radius, value, name, side):
        centre = np.add(start, end) / 2
        half = np.abs(np.subtract(end, start)) / 2 + radius
        box, (x, y, dx, z) = self._local(centre, half)
        tube = _segment_distance(dx, y, z, start, end) < radius
        tube &= self.tissue[box] != BONE
        self._paint(box, tube, value, BLOOD_VESSEL)
        return box, tube

    def _venous_sinuses(self):
        v = self.hu_values
        self.venous = {}
        box, (x, y, dx, z) = self._local((0, 0, 20), (6, self.radii[1] + 2, self.radii[2]))
        d = self.d_in[box]
        sss = (d > -6) & (d < 0) & (np.abs(x) < (d + 6) * 0.55) & (z > 0)
        self._paint(box, sss, v["venous_blood"], BLOOD_VESSEL)
        self.venous["superior_sagittal"] = (box, sss)
        for s in (-1, 1):
            box, (x, y, dx, z) = self._local((s * 40, 45, -24), (32, 40, 6))
            d = self.d_in[box]
            ts = (d > -5) & (d < 0) & (np.abs(z + 24) < 2.8) & (y > 15) & (np.abs(x) > 6)
            self._paint(box, ts, v["venous_blood"], BLOOD_VESSEL)
            self.venous[f"transverse_{s}"] = (box, ts)

    def _normal_calcifications(self):
        rng = self.rng
        spots = []
        if rng.random() < 0.75:
            spots.append(((0, 24, 3), rng.uniform(2, 3.5)))  # pineal
        if rng.random() < 0.65:
            spots += [((s * (12 + 5.5 * self.ventricle_scale * 1.5), 28, 12), rng.uniform(1.2, 2.2)) for s in (-1, 1)]
        for centre, r in spots:
            box, (x, y, dx, z) = self._local(centre, (r, r, r))
            self._paint(box, _ellipsoid_rho(dx, y, z, centre, (r, r, r)) < 1, rng.uniform(120, 350))

    # --- findings ----------------------------------------------------------------------------------

    def render_findings(self):
        self.rng = self.findings_rng
        order = ("atrophy", "hydrocephalus", "midline_shift",  # anatomy already changed; record masks
                 "small_vessel_ischemic_disease", "acute_infarct", "hypodense_acute_infarct", "chronic_infarct",
                 "lacunar_infarct", "hyperdense_vessel", "venous_sinus_thrombosis", "pathological_calcification",
                 "cystic_lesion", "lipoma", "intraparenchymal_hemorrhage", *(_IPH_SITES),
                 "intraventricular_hemorrhage", "subarachnoid_hemorrhage", "chronic_subdural_hematoma",
                 "subdural_hematoma", "epidural_hematoma", "meningioma", "skull_fracture", "scalp_hematoma",
                 "pneumocephalus", "sinusitis", "mastoid_opacification")
        for finding_id in order:
            if finding_id in self.findings:
                getattr(self, f"_draw_{finding_id}")(finding_id)

    def _draw_atrophy(self, fid):
        self._record(fid, None, None, extra_axial_csf_mm=self.gap_mm, sulcus_halfwidth_mm=self.sulcus_halfwidth)
        self.masks[fid] |= (self.tissue == CSF) & (self.d_in < 0)

    def _draw_hydrocephalus(self, fid):
        self._record(fid, None, None, ventricle_scale=self.ventricle_scale)
        self.masks[fid] |= self.tissue == VENTRICLE

    def _draw_midline_shift(self, fid):
        self._record(fid, None, None, shift_mm=self.shift_mm)
        self.masks[fid] |= (self.tissue == VENTRICLE) & (np.abs(self.deep_x - self.grid.x) > 2)

    def _convexity_point(self, side, elevation_deg=(5, 45), azimuth_deg=(-60, 60)):
        """Unit direction (normalised ellipsoid coordinates) towards a lateral convexity point."""
        az = math.radians(self.rng.uniform(*azimuth_deg))
        el = math.radians(self.rng.uniform(*elevation_deg))
        return np.array([side * math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])

    def _angle_to(self, direction, box):
        g = self.grid
        ax, ay, az_up = self.radii
        az = np.where(g.z[box] > 0, np.float32(az_up), np.float32(self.radius_below))
        px, py, pz = g.x[box] / ax, g.y[box] / ay, g.z[box] / az
        norm = np.sqrt(px * px + py * py + pz * pz) + 1e-6
        cos = (px * direction[0] + py * direction[1] + pz * direction[2]) / norm
        return np.arccos(np.clip(cos, -1, 1))

    def _surface_box(self, direction, extent_rad, thickness_mm):
        point = direction * self.radii
        reach = extent_rad * self.radii.max() + thickness_mm + 10
        return self.grid.box(point, (reach, reach, reach))

    def _extra_axial(self, fid, direction, extent_rad, thickness_mm, value, profile_power):
        box = self._surface_box(direction, extent_rad, thickness_mm)
        angle = self._angle_to(direction, box)
        local_t = thickness_mm * np.clip(1 - (angle / extent_rad) ** profile_power, 0, 1) ** 0.5
        d = self.d_in[box]
        mask = (d < 0) & (d > -local_t) & (self.grid.z[box] > self.floor[box] + 2) & (self.tissue[box] != BONE)
        hu = value + self.rng.normal(0, 1.5, size=mask.shape).astype(np.float32)
        self._paint(box, mask, hu, BLOOD)
        self._record(fid, box, mask, thickness_mm=thickness_mm, extent_rad=extent_rad, hu=value)

    def _draw_epidural_hematoma(self, fid):
        u = self.rng.uniform
        direction = self._convexity_point(self.side[fid], (0, 40))
        self._extra_axial(fid, direction, u(0.22, 0.42), u(6, 22), u(55, 75), 2)
        self.impact = direction

    def _draw_subdural_hematoma(self, fid):
        u = self.rng.uniform
        self._extra_axial(fid, self._convexity_point(self.side[fid], (5, 40)), u(0.6, 1.0), u(3, 14), u(50, 72), 4)

    def _draw_chronic_subdural_hematoma(self, fid):
        u = self.rng.uniform
        self._extra_axial(fid, self._convexity_point(self.side[fid], (5, 40)), u(0.6, 1.0), u(5, 18), u(10, 32), 4)

    def _blob(self, centre, radius, box_radius=None):
        """Irregular round mask (lobulated surface) around ``centre`` (deep, shifted coordinates)."""
        box, coords = self._local(centre, (box_radius or radius * 1.4,) * 3)
        x, y, dx, z = coords
        rx, ry, rz = dx - centre[0], y - centre[1], z - centre[2]
        r = np.sqrt(rx * rx + ry * ry + rz * rz) + 1e-6
        a, b = self.rng.uniform(0, 2 * math.pi, 2)
        lobes = 1 + 0.18 * np.sin(3 * np.arctan2(ry, rx) + a) * np.cos(2 * np.arccos(rz / r) + b)
        return box, r / lobes, r

    def _hematoma(self, fid, centre, radius):
        u = self.rng.uniform
        value = u(55, 75)
        box, r, _ = self._blob(centre, radius, radius + 8)
        parenchyma = np.isin(self.tissue[box], (GM, WM, DEEP_GM, POSTERIOR_FOSSA, CSF))
        edema = (r < radius + u(2, 6)) & parenchyma
        self.hu[box][edema] -= u(5, 9)
        clot = (r < radius) & parenchyma
        hu = value + self.rng.normal(0, 2, size=clot.shape).astype(np.float32)
        self._paint(box, clot, hu, BLOOD)
        self._record(fid, box, clot, radius_mm=radius, hu=value, centre_mm=[round(float(c), 1) for c in centre])

    def _lobar_centre(self, side):
        direction = self._convexity_point(side, (5, 45), (-70, 70))
        return direction * (self.radii - self.rng.uniform(16, 28))

    def _draw_lobar_hemorrhage(self, fid):
        self._hematoma(fid, self._lobar_centre(self.side[fid]), self.rng.uniform(6, 18))

    def _draw_basal_ganglia_hemorrhage(self, fid):
        centre = np.add(self.nuclei_centres["lentiform"][self.side[fid]], self.rng.uniform(-3, 3, 3))
        self._hematoma(fid, centre, self.rng.uniform(5, 16))

    def _draw_thalamic_hemorrhage(self, fid):
        centre = np.add(self.nuclei_centres["thalamus"][self.side[fid]], self.rng.uniform(-2, 2, 3))
        self._hematoma(fid, centre, self.rng.uniform(5, 12))

    def _draw_cerebellar_hemorrhage(self, fid):
        centre = (self.side[fid] * self.rng.uniform(15, 28), self.rng.uniform(35, 45), self.rng.uniform(-42, -32))
        self._hematoma(fid, centre, self.rng.uniform(5, 13))

    def _draw_intraparenchymal_hemorrhage(self, fid):
        site = [s for s in _IPH_SITES if s not in self.findings]
        site = str(self.rng.choice(site or list(_IPH_SITES)))
        self.side.setdefault(site, self.side[fid])
        getattr(self, f"_draw_{site}")(site)
        self._record(fid, None, None, site=site)
        self.masks[fid] |= self.masks[site]
        self.extra_labels = getattr(self, "extra_labels", set()) | {site}

    def _draw_intraventricular_hemorrhage(self, fid):
        u = self.rng.uniform
        sides = (-1, 1) if self.rng.random() < 0.5 else (self.side[fid],)
        value, level = u(50, 70), u(18, 32)  # blood posterior (dependent) to y = level
        for s in sides:
            box, (x, y, dx, z) = self._local((s * 20, 35, 12), (16, 20, 16))
            mask = (self.tissue[box] == VENTRICLE) & (y > level) & (s * dx > 0)
            self._paint(box, mask, value, BLOOD)
            self._record(fid, box, mask, hu=value, level_mm=level)

    def _draw_subarachnoid_hemorrhage(self, fid):
        u = self.rng.uniform
        pattern = str(self.rng.choice(("convexity", "basal", "sylvian")))
        value = u(50, 70)
        if pattern == "convexity":
            centre = self._convexity_point(self.side[fid], (10, 60)) * self.radii
            radius = u(15, 40)
        elif pattern == "basal":
            centre, radius = np.array([0.0, -6.0, -20.0]), u(18, 32)
        else:
            centre, radius = np.array([self.side[fid] * self.radii[0] * 0.72, -10, -8]), u(15, 30)
        box, (x, y, dx, z) = self._local(centre, (radius, radius, radius))
        near = _ellipsoid_rho(x, y, z, centre, (radius, radius, radius)) < 1
        mask = near & (self.tissue[box] == CSF) & (self.d_in[box] < 0)
        self._paint(box, mask, value, BLOOD)
        self._record(fid, box, mask, pattern=pattern, radius_mm=radius, hu=value)

    def _territory(self, side, half_angle_deg, axis=None):
        """Cone from the hemisphere's core towards a cortical territory: (box, mask of parenchyma)."""
        if axis is None:
            az = math.radians(self.rng.uniform(-70, 70))
            el = math.radians(self.rng.uniform(-5, 40))
            axis = np.array([side * math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        apex = np.array([side * 14.0, 0.0, 8.0])
        box = self.grid.box(apex + axis * 45, (60, 60, 60))
        g = self.grid
        vx, vy, vz = self.deep_x[box] - apex[0], g.y[box] - apex[1], g.z[box] - apex[2]
        norm = np.sqrt(vx * vx + vy * vy + vz * vz) + 1e-6
        cos = (vx * axis[0] + vy * axis[1] + vz * axis[2]) / norm
        cone = (cos > math.cos(math.radians(half_angle_deg))) & (norm > 8) & (side * self.deep_x[box] > 1)
        parenchyma = np.isin(self.tissue[box], (GM, WM, DEEP_GM))
        return box, cone & parenchyma, cone

    def _draw_acute_infarct(self, fid):
        u = self.rng.uniform
        box, mask, _ = self._territory(self.side[fid], u(18, 32))
        drop = u(6, 9)
        gm = mask & (self.tissue[box] != WM)
        self.hu[box][mask] -= drop
        self.hu[box][gm] -= u(3, 5)  # grey-white differentiation is lost first
        self._record(fid, box, mask, hu_drop=drop)

    def _draw_hypodense_acute_infarct(self, fid):
        u = self.rng.uniform
        box, mask, cone = self._territory(self.side[fid], u(18, 32))
        drop = u(11, 18)
        effaced_sulci = cone & (self.tissue[box] == CSF) & (self.d_in[box] < -self.gap_mm)  # swelling
        mask |= effaced_sulci
        self.hu[box][mask] = self.hu_values["wm"] - drop
        self._record(fid, box, mask, hu_drop=drop)
        self._record("acute_infarct", box, mask)

    def _draw_chronic_infarct(self, fid):
        u = self.rng.uniform
        box, mask, _ = self._territory(self.side[fid], u(12, 22))
        value = u(2, 12)
        deep = mask & (self.d_in[box] > -self.gap_mm - u(22, 35))
        self._paint(box, deep, value, CSF)
        self._record(fid, box, deep, hu=value)

    def _draw_lacunar_infarct(self, fid):
        u = self.rng.uniform
        for _ in range(int(self.rng.integers(1, 4))):
            s = float(self.rng.choice((-1, 1)))
            base = self.nuclei_centres[str(self.rng.choice(("lentiform", "thalamus")))][s]
            centre, r = np.add(base, self.rng.uniform(-4, 4, 3)), u(2.5, 6)
            box, (x, y, dx, z) = self._local(centre, (r, r, r))
            mask = _ellipsoid_rho(dx, y, z, centre, (r, r, r)) < 1
            self._paint(box, mask, u(5, 15), CSF)
            self._record(fid, box, mask)

    def _draw_small_vessel_ischemic_disease(self, fid):
        u = self.rng.uniform
        drop = u(6, 12)
        box, (x, y, dx, z) = self._local((0, 5, 20), (40, 50, 22))
        patch = np.sin(x * 0.35 + 1.0) * np.sin(y * 0.3) * np.sin(z * 0.4 + 2.0) > -0.4
        ring = np.zeros(patch.shape, bool)
        for s, centre, radii in self._ventricle_parts()[:4] + self._ventricle_parts()[5:9]:
            ring |= _ellipsoid_rho(dx, y, z, centre, np.add(radii, u(6, 11))) < 1
        mask = ring & patch & (self.tissue[box] == WM)
        self.hu[box][mask] -= drop
        self._record(fid, box, mask, hu_drop=drop)

    def _draw_hyperdense_vessel(self, fid):
        s = self.side[fid]
        if self.rng.random() < 0.75:
            box, tube = self._vessel((s * 5, -10, -17), (s * 31, -8, -12), self.rng.uniform(1.8, 2.6),
                                     self.rng.uniform(65, 90), "mca", s)
            where = "middle cerebral artery"
        else:
            box, tube = self._vessel((0, -2, -48), (0, -4, -22), self.rng.uniform(2.0, 2.8),
                                     self.rng.uniform(65, 90), "basilar", 0)
            where = "basilar artery"
        self._record(fid, box, tube, vessel=where)

    def _draw_venous_sinus_thrombosis(self, fid):
        names = [n for n in self.venous if self.venous[n][1].any()]
        name = names[int(self.rng.integers(len(names)))]
        box, mask = self.venous[name]
        value = self.rng.uniform(70, 88)
        self._paint(box, mask, value)
        self._record(fid, box, mask, sinus=name, hu=value)

    def _draw_pathological_calcification(self, fid):
        u = self.rng.uniform
        kind = str(self.rng.choice(("basal_ganglia", "granulomas", "dentate")))
        if kind == "basal_ganglia":
            spots = [(np.add(self.nuclei_centres["lentiform"][s], (0, u(-2, 2), u(-2, 2))), u(2.5, 5)) for s in (-1, 1)]
        elif kind == "dentate":
            spots = [((s * 14, 42, -38), u(2.5, 4)) for s in (-1, 1)]
        else:
            spots = [(self._lobar_centre(float(self.rng.choice((-1, 1)))), u(1.5, 3.5))
                     for _ in range(int(self.rng.integers(2, 6)))]
        for centre, r in spots:
            box, (x, y, dx, z) = self._local(centre, (r, r, r))
            mask = _ellipsoid_rho(dx, y, z, centre, (r, r, r)) < 1
            self._paint(box, mask, u(120, 600))
            self._record(fid, box, mask, kind=kind)

    def _draw_cystic_lesion(self, fid):
        u = self.rng.uniform
        r = u(6, 20)
        if self.rng.random() < 0.5:  # middle cranial fossa arachnoid cyst
            centre = np.array([self.side[fid] * (self.radii[0] * 0.62), -28, -28 + r * 0.3])
        else:
            centre = self._lobar_centre(self.side[fid]) * 0.85
        box, (x, y, dx, z) = self._local(centre, (r, r * 1.2, r))
        mask = (_ellipsoid_rho(dx, y, z, centre, (r, r * 1.2, r)) < 1) & (self.d_in[box] < 0) & (self.tissue[box] != BONE)
        value = u(0, 12)
        self._paint(box, mask, value, CSF)
        self._record(fid, box, mask, radius_mm=r, hu=value)

    def _draw_lipoma(self, fid):
        u = self.rng.uniform
        centre = (0, u(-12, 8), 27) if self.rng.random() < 0.5 else (0, 23, -7)
        r = u(3.5, 8)
        box, (x, y, dx, z) = self._local(centre, (r, r, r))
        mask = _ellipsoid_rho(dx, y, z, centre, (r * 0.8, r, r * 0.8)) < 1
        self._paint(box, mask, u(-100, -60), FAT)
        self._record(fid, box, mask, radius_mm=r)

    def _draw_meningioma(self, fid):
        u = self.rng.uniform
        r = u(8, 22)
        direction = self._convexity_point(self.side[fid], (10, 70))
        centre = direction * (self.radii - r * 0.55)
        box, (x, y, dx, z) = self._local(centre, (r + 16,) * 3)
        rr = _ellipsoid_rho(x, y, z, centre, (r, r, r))
        inside = (rr < 1) & (self.d_in[box] < 0) & (self.tissue[box] != BONE)
        value = u(45, 62)
        self._paint(box, inside, value + self.rng.normal(0, 1.5, inside.shape).astype(np.float32), SOFT)
        extras = {}
        if self.rng.random() < 0.35:
            edema = (rr < u(1.5, 2.0)) & (self.tissue[box] == WM)
            self.hu[box][edema] -= u(8, 12)
            extras["edema"] = True
            self.extra_labels = getattr(self, "extra_labels", set()) | {"vasogenic_edema"}
        if self.rng.random() < 0.3:
            calc = inside & (np.sin(x * 1.7) * np.sin(y * 1.9) * np.sin(z * 1.5) > 0.55)
            self._paint(box, calc, u(150, 400))
            extras["calcified"] = True
        self._record(fid, box, inside, radius_mm=r, hu=value, **extras)

    def _draw_skull_fracture(self, fid):
        u = self.rng.uniform
        direction = getattr(self, "impact", None)
        if direction is None:
            direction = self._convexity_point(self.side[fid], (0, 50))
        self.impact = direction
        point = direction * (self.radii + self.skull_mm / 2)
        tangent = np.cross(direction, self.rng.normal(size=3))
        tangent /= np.linalg.norm(tangent)
        normal = np.cross(direction, tangent)
        length, width = u(15, 40), u(1.0, 2.5)
        box = self.grid.box(point, (length + 5,) * 3)
        g = self.grid
        px, py, pz = g.x[box] - point[0], g.y[box] - point[1], g.z[box] - point[2]
        across = px * normal[0] + py * normal[1] + pz * normal[2]
        along = px * tangent[0] + py * tangent[1] + pz * tangent[2]
        skull = self.tissue[box] == BONE
        crack = skull & (np.abs(across) < width / 2) & (np.abs(along) < length)
        self._paint(box, crack, u(20, 45), SOFT)
        params = {"length_mm": length, "width_mm": width}
        if self.rng.random() < 0.3:  # depressed fragment pushed inwards
            depth = u(3, 7)
            angle = self._angle_to(direction, box)
            cap = angle < u(0.10, 0.16)
            d = self.d_in[box]
            old = cap & skull
            new = cap & (d < -depth + self.skull_mm) & (d > -depth)
            self._paint(box, old, self.hu_values["soft"], SOFT)
            self._paint(box, new, self.hu_values["cortical_bone"], BONE)
            crack |= old | new
            params["depressed_mm"] = depth
        self._record(fid, box, crack, **params)

    def _draw_scalp_hematoma(self, fid):
        u = self.rng.uniform
        direction = getattr(self, "impact", None)
        if direction is None:
            direction = self._convexity_point(self.side[fid], (0, 60))
        extent, thickness = u(0.2, 0.4), u(6, 22)
        box = self._surface_box(direction, extent, thickness + self.skull_mm + self.scalp_mm)
        angle = self._angle_to(direction, box)
        local_t = thickness * np.clip(1 - (angle / extent) ** 2, 0, 1) ** 0.5
        d = self.d_in[box] - self.skull_mm
        mask = (d > 0.5) & (d < self.scalp_mm + local_t)
        value = u(40, 70)
        self._paint(box, mask, value + self.rng.normal(0, 2, mask.shape).astype(np.float32), SOFT)
        self._record(fid, box, mask, thickness_mm=thickness, hu=value)

    def _draw_pneumocephalus(self, fid):
        u = self.rng.uniform
        if self.rng.random() < 0.3:  # frontal air collection separating the frontal lobes
            box, (x, y, dx, z) = self._local((0, -self.radii[1] + 12, 25), (40, 20, 30))
            d = self.d_in[box]
            mask = (d < 0) & (d > -u(4, 9)) & (y < -self.radii[1] * 0.55) & (z > 5) & (self.tissue[box] != BONE)
            self._paint(box, mask, u(-1000, -900))
            self._record(fid, box, mask, kind="frontal collection")
            return
        for _ in range(int(self.rng.integers(1, 7))):
            direction = self._convexity_point(float(self.rng.choice((-1, 1))), (5, 50), (-150, -60))
            r = u(1.5, 4.5)
            centre = direction * (self.radii - u(1.5, 5))
            box, (x, y, dx, z) = self._local(centre, (r, r, r))
            mask = (_ellipsoid_rho(x, y, z, centre, (r, r, r)) < 1) & (self.tissue[box] != BONE)
            self._paint(box, mask, u(-1000, -900))
            self._record(fid, box, mask, kind="locules")

    def _draw_sinusitis(self, fid):
        u = self.rng.uniform
        names = list(self.sinuses)
        picked = self.rng.choice(names, size=int(self.rng.integers(1, 3)), replace=False)
        for name in picked:
            centre, radii = self.sinuses[name]
            box, (x, y, dx, z) = self._local(centre, radii)
            air = self.tissue[box] == SINUS_AIR
            rho = _ellipsoid_rho(x, y, z, centre, radii)
            full = self.rng.random() < 0.4
            mucosa = air & ((rho > 1 - u(3, 6) / min(radii)) | full)
            self._paint(box, mucosa, u(15, 40), SOFT)
            self._record(fid, box, mucosa, sinuses=sorted(set(self.params.get(fid, {}).get("sinuses", []) + [str(name)])))

    def _draw_mastoid_opacification(self, fid):
        sides = (-1, 1) if self.rng.random() < 0.4 else (self.side[fid],)
        for s in sides:
            box, (x, y, dx, z) = self._local((s * (self.radii[0] * 0.72 + 4), 26, -42), (10, 12, 11))
            mask = (self.tissue[box] == MASTOID_AIR) & (s * x > 0)
            self._paint(box, mask, self.rng.uniform(15, 45), SOFT)
            self._record(fid, box, mask, sides=len(sides))

    # --- image formation ---------------------------------------------------------------------------

    def finish(self, noise_sigma_hu: float, noise_rng: np.random.Generator) -> np.ndarray:
        """Blur in-plane (scanner PSF), add correlated noise; returns int16 HU (z, y, x)."""
        hu = _blur_inplane(self.hu)
        noise = noise_rng.standard_normal(self.grid.shape, dtype=np.float32)
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


# ----------------------------------------------------------------------------------------------------
# public entry points


def generate_phantom(findings: Iterable[str] | None, seed: int, *,
                     spacing_mm: tuple[float, float, float] | None = None,
                     size_px: int | None = None,
                     noise_sigma_hu: float | None = None,
                     return_masks: bool = False,
                     catalog: FindingCatalog | None = None) -> Phantom:
    """Draw one synthetic non-contrast head CT.

    ``findings``: renderable ids to draw (see :data:`RENDERABLE_FINDINGS`); None samples a random set with
    :func:`sample_findings` at prevalence 0.1. ``spacing_mm`` (x, y, z): in-plane 0.5-1 mm and slice
    1-5 mm; default samples 0.88-0.98 mm in-plane and 4, 4.5 or 5 mm slices. ``size_px`` (in-plane matrix,
    default 256, or larger when the field of view would be under 220 mm). ``noise_sigma_hu`` default 3-6.
    Same ``seed`` and arguments give the same voxels. The result is int16 HU, LPS, axial, covering the
    skull base (about 55-62 mm below the brain centre) to the vertex.
    """
    setup_rng, rng, findings_rng, noise_rng = (np.random.default_rng(s)
                                                for s in np.random.SeedSequence(int(seed)).spawn(4))
    catalog = catalog or default_catalog()
    if findings is None:
        findings = sample_findings(setup_rng, 0.1)
    findings = tuple(dict.fromkeys(findings))
    _check_renderable(findings)
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
    grid = _Grid((n_slices, size_px, size_px), spacing, origin, head_centre,
                 _rotation(pose["yaw_deg"], pose["pitch_deg"], pose["roll_deg"]))
    head = _Head(grid, rng, findings_rng, findings)
    head.build_anatomy()
    head.render_findings()
    sigma_draw = float(noise_rng.uniform(3, 6))
    sigma = float(noise_sigma_hu if noise_sigma_hu is not None else sigma_draw)
    hu = head.finish(sigma, noise_rng)

    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    positives = set(findings) | getattr(head, "extra_labels", set())
    for f in list(positives):
        positives.update(IMPLIED_LABELS.get(f, ()))
    labels = {fid: int(fid in positives) for fid in catalog.ids}
    metadata = {
        "seed": int(seed), "findings_drawn": list(findings), "positive_labels": sorted(p for p in positives if p in catalog),
        "spacing_mm": list(spacing), "size_zyx": list(hu.shape), "noise_sigma_hu": round(sigma, 2),
        "head_inner_radii_mm": [round(float(r), 1) for r in head.radii], "skull_mm": round(head.skull_mm, 2),
        "pose": {k: round(float(v), 2) for k, v in pose.items()},
        "tissue_hu": {k: round(float(v), 1) for k, v in head.hu_values.items()},
        "finding_params": head.params, "catalog_version": catalog.version,
    }
    masks = {f: m for f, m in head.masks.items()} if return_masks else None
    return Phantom(image=image, labels=labels, finding_masks=masks, metadata=metadata)


# ----------------------------------------------------------------------------------------------------
# datasets on disk


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_phantom_dataset(out_dir: str | Path, n: int, seed: int, *, fmt: str = "nifti",
                          findings: Iterable[str] | None = None,
                          prevalence: float | Mapping[str, float] = 0.1,
                          spacing_mm: tuple[float, float, float] | None = None,
                          catalog: FindingCatalog | None = None) -> Path:
    """Write ``n`` phantoms and their labels; returns the path of ``labels.csv``.

    ``fmt="nifti"`` writes ``case_0000.nii.gz`` ...; ``fmt="dicom"`` writes one CT series folder per case
    (``case_0000/slice_000.dcm`` ..., uint16 with RescaleIntercept -1024). ``labels.csv`` has a ``path``
    column (relative to ``out_dir``) and one 0/1 column per catalog id, in catalog order;
    ``metadata.json`` holds each case's seed, geometry, pose and finding parameters. ``findings``
    restricts which findings may be drawn (default: all renderable); each case draws its set with
    :func:`sample_findings` at ``prevalence``. Case ``i`` depends only on ``(seed, i)``.
    """
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', not {fmt!r}.")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    catalog = catalog or default_catalog()
    allowed = tuple(RENDERABLE_FINDINGS) if findings is None else tuple(findings)
    _check_renderable(allowed)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows, metadata = [], []
    for index in range(n):
        case_seed = _case_seed(seed, index)
        rng = np.random.default_rng([case_seed, 1])
        drawn = sample_findings(rng, prevalence, allowed)
        phantom = generate_phantom(drawn, case_seed, spacing_mm=spacing_mm, catalog=catalog)
        name = f"case_{index:04d}"
        if fmt == "nifti":
            relative = f"{name}.nii.gz"
            sitk.WriteImage(phantom.image, str(out / relative), True)
        else:
            relative = name
            write_dicom_series(phantom, out / relative, series_seed=case_seed, patient_id=name)
        rows.append([relative] + [phantom.labels[fid] for fid in catalog.ids])
        metadata.append({"path": relative, **phantom.metadata})
    labels_path = out / "labels.csv"
    with labels_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *catalog.ids])
        writer.writerows(rows)
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1), encoding="utf-8")
    return labels_path


def write_dicom_series(phantom: Phantom, folder: str | Path, *, series_seed: int = 0,
                       patient_id: str = "PHANTOM") -> Path:
    """Write ``phantom.image`` as an axial CT series (one file per slice, uint16 + RescaleIntercept
    -1024, ImagePositionPatient / ImageOrientationPatient in LPS mm). UIDs derive from ``series_seed``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = phantom.image
    hu = sitk.GetArrayFromImage(image).astype(np.int32)
    stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)
    sx, sy, sz = image.GetSpacing()
    ox, oy, oz = image.GetOrigin()
    entropy = [str(series_seed), patient_id]
    study_uid = generate_uid(entropy_srcs=entropy + ["study"])
    series_uid = generate_uid(entropy_srcs=entropy + ["series"])
    frame_uid = generate_uid(entropy_srcs=entropy + ["frame"])
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=entropy + [f"slice{k}"])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice_{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, f"Phantom^{patient_id}"
        ds.StudyDescription, ds.SeriesDescription = "Synthetic head CT phantom", "HEAD NON-CONTRAST (synthetic)"
        ds.BodyPartExamined, ds.ImageType = "HEAD", ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [f"{ox:.4f}", f"{oy:.4f}", f"{oz + k * sz:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{oz + k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{sz:.4f}"
        ds.KVP, ds.ConvolutionKernel = 120, "SYNTH"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
    return folder
