"""Normal anatomy of the synthetic head CT phantom: what a head without findings looks like.

:class:`HeadAnatomy` draws one head into two arrays of the grid's shape, ``(z, y, x)``: ``hu`` (float32
CT numbers in HU, before blur and noise) and ``tissue`` (uint8 tissue codes below, which findings use to
decide where they may go). It draws, from the outside in: scalp with subcutaneous fat, the skull with
outer and inner tables around the diploe, the skull base (orbital roofs, petrous ridges, mastoid air
cells, orbits with globe and lens, maxillary, sphenoid and frontal sinuses), extra-axial CSF, a folded
cortical ribbon with sulci over white matter, the posterior fossa (cerebellar folia, brainstem, fourth
ventricle, cisterns), the interhemispheric and sylvian fissures with the falx, deep grey nuclei, lateral
and third ventricles, middle cerebral arteries, the superior sagittal and transverse sinuses, and
pineal and choroid plexus calcifications. Every size and CT number is drawn per head from a range.

Everything is placed in the head frame of :class:`~HeadCTMoLRELib.phantoms.geometry.HeadGrid` (mm; x to
the patient's left, y posterior, z superior; origin near the centre of the brain). Three structural
findings change the normal anatomy itself rather than being drawn on top, so they are constructor
arguments: atrophy (wide sulci, more extra-axial CSF), hydrocephalus (large ventricles and temporal
horns, effaced sulci) and a midline shift (deep structures displaced along x).
"""

from __future__ import annotations

import math

import numpy as np

from .geometry import HeadGrid, ellipsoid_distance, ellipsoid_rho, segment_distance

# tissue codes of the label map used to place findings
(AIR, SOFT, FAT, BONE, CSF, VENTRICLE, GM, WM, DEEP_GM, POSTERIOR_FOSSA, SINUS_AIR, MASTOID_AIR, BLOOD_VESSEL,
 BLOOD) = range(14)

#: Dural venous sinus cross-sections (mm): superior sagittal sinus triangle depth and base, transverse sinus
#: depth (inward from the inner table) and height. Mean adult areas on MR venography (Shapira et al.,
#: J Clin Neurosci 2017;40:190: SSS 36.7 mm2, right / left TS 53.3 / 46.9 mm2).
SSS_DEPTH_MM, SSS_BASE_MM = 8.1, 8.9
TS_DEPTH_MM, TS_HEIGHT_MM = 6.75, 7.6


class HeadAnatomy:
    """One head's parameters and its normal anatomy as ``hu`` (float32 HU) and ``tissue`` (uint8 codes)
    arrays of ``grid.shape`` (z, y, x).

    ``rng`` draws every parameter, in the same order whatever the structural findings, so one seed gives
    the same head with or without them. ``shift_mm``: midline shift along head-frame x (> 0 towards the
    patient's left), 0 for none. Call :meth:`build_anatomy` once to fill the arrays.
    """

    def __init__(self, grid: HeadGrid, rng: np.random.Generator, *, atrophy: bool = False,
                 hydrocephalus: bool = False, shift_mm: float = 0.0):
        self.grid, self.anatomy_rng, self.shift_mm = grid, rng, float(shift_mm)
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
        # one draw per parameter whichever branch is taken, so later draws do not depend on the findings
        self.gap_mm = u(3.0, 6.0) if atrophy else u(0.8, 2.0)  # extra-axial CSF
        self.sulcus_halfwidth = u(1.8, 2.8) if atrophy else (u(0.25, 0.45) if hydrocephalus else u(0.6, 1.0))
        self.sulcus_depth = u(14, 20) if atrophy else (u(5, 8) if hydrocephalus else u(10, 15))
        self.ventricle_scale = u(1.6, 2.0) if hydrocephalus else (u(1.2, 1.35) if atrophy else u(0.85, 1.1))
        horn_draw = u(2.5, 3.5)
        self.temporal_horn_scale = horn_draw if hydrocephalus else 1.0
        self.hu = np.full(grid.shape, -1000.0, np.float32)
        self.tissue = np.zeros(grid.shape, np.uint8)
        self.sinuses: dict[str, tuple] = {}  # paranasal sinus name -> (centre, radii) in head-frame mm
        self.venous: dict[str, tuple] = {}  # dural venous sinus name -> (box, mask)
        self.nuclei_centres: dict[str, dict] = {}  # "lentiform" / "thalamus" -> side (+1 left) -> centre mm

    # --- helpers -----------------------------------------------------------------------------------

    def _local(self, center, radii, margin=2.0):
        """Index box around a head-frame ellipsoid and the coordinates (x, y, deep x, z) in it, in mm."""
        box = self.grid.box(center, radii, margin)
        g = self.grid
        return box, (g.x[box], g.y[box], self.deep_x[box], g.z[box])

    def _paint(self, box, mask, value, tissue=None):
        """Set HU (a scalar or an array of the box's shape) and optionally the tissue code under mask."""
        if not mask.any():
            return
        self.hu[box][mask] = value if np.isscalar(value) else value[mask]
        if tissue is not None:
            self.tissue[box][mask] = tissue

    # --- anatomy -----------------------------------------------------------------------------------

    def build_anatomy(self):
        """Fill ``hu`` and ``tissue``. Also keeps, as (z, y, x) float32 arrays in mm: ``d_in``, the signed
        distance to the inner table (< 0 inside the skull), ``d_out`` for the head outline, ``deep_x``
        (x displaced by the midline shift) and ``floor``, the height of the anterior cranial fossa floor."""
        g, v = self.grid, self.hu_values
        ax, ay, az_up = self.radii
        self.d_in = ellipsoid_distance(g.x, g.y, g.z, ax, ay, az_up, self.radius_below)
        # the face and neck make the head outline much wider than the brain below the skull base
        d_face = ellipsoid_distance(g.x, g.y + 4, g.z, ax, ay + 4, az_up, 125.0)
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
        v, u = self.hu_values, self.anatomy_rng.uniform
        for s in (-1, 1):
            # petrous ridge: dense oblique bone between middle and posterior fossa
            box, (x, y, _, z) = self._local((s * 32, 16, -38), (26, 20, 14))
            d = segment_distance(x, y, z, (s * 12, 2, -40), (s * 48, 28, -36))
            self._paint(box, (d < 6.0) & (self.d_in[box] < 0), v["cortical_bone"], BONE)
            # mastoid air cells: irregular honeycomb of air in bone, behind the petrous ridge
            half_width, _ = self._inner_extent(-40)
            centre = (s * (half_width + 3), 24, -40)
            box, (x, y, _, z) = self._local(centre, (9, 12, 11))
            inside = ellipsoid_rho(x, y, z, centre, (9, 12, 11)) < 1
            cells = (np.sin(x * 1.9 + np.sin(z)) * np.sin(y * 1.7 + 1) * np.sin(z * 1.6 + 2 + np.sin(x))) > -0.2
            self._paint(box, inside, v["cortical_bone"] * 0.7, BONE)
            self._paint(box, inside & cells, -1000.0, MASTOID_AIR)
            # orbits in front of the anterior fossa: fat cone, globe with lens
            _, half_length = self._inner_extent(-36)
            globe = (s * 31, -(half_length + self.skull_mm + 10), -36)
            fat_c = (s * 27, globe[1] + 15, -36)
            box, (x, y, _, z) = self._local(fat_c, (13, 21, 12))
            self._paint(box, (ellipsoid_rho(x, y, z, fat_c, (12, 20, 11)) < 1) & (self.d_in[box] > 0), v["fat"], FAT)
            box, (x, y, _, z) = self._local(globe, (12, 12, 12))
            self._paint(box, ellipsoid_rho(x, y, z, globe, (11.5, 11.5, 11.5)) < 1, u(8, 15), SOFT)
            lens = (globe[0], globe[1] - 9, globe[2])
            self._paint(box, ellipsoid_rho(x, y, z, lens, (4, 1.8, 4)) < 1, u(90, 120), SOFT)
            _, half_length = self._inner_extent(-60)
            self._sinus(f"maxillary_{'left' if s > 0 else 'right'}",
                        (s * 26, -(half_length * 0.55 + 10), -68), (12, 16, 15))
        self._sinus("sphenoid", (0, -20, -40), (13, 10, 8))
        _, half_length = self._inner_extent(-4)
        self._sinus("frontal", (0, -(half_length + self.skull_mm * 0.4), -4), (14, 3.2, 10))

    def _sinus(self, name, centre, radii):
        box, (x, y, _, z) = self._local(centre, np.add(radii, 2.5))
        wall = ellipsoid_rho(x, y, z, centre, np.add(radii, 2.5)) < 1
        air = ellipsoid_rho(x, y, z, centre, radii) < 1
        self._paint(box, wall & ~air & (self.tissue[box] != SINUS_AIR), self.hu_values["cortical_bone"] * 0.8, BONE)
        self._paint(box, air, -1000.0, SINUS_AIR)
        self.sinuses[name] = (centre, radii)

    def _brain(self):
        g, v, rng = self.grid, self.hu_values, self.anatomy_rng
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
        cistern = ellipsoid_rho(dx, y, z, (0, 8, -40), (16, 15, 34)) < 1
        brainstem = ellipsoid_rho(dx, y, z, (0, 10, -40), (13, 12, 32)) < 1
        fourth = ellipsoid_rho(dx, y, z, (0, 25, -36), (5.5, 3.5, 7)) < 1
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
        star = ellipsoid_rho(dx, y, z, (0, -8, -22), (13, 10, 4)) < 1
        self._paint(box, star & (self.tissue[box] != BONE), v["csf"], CSF)

    def _ventricle_parts(self):
        """Lateral ventricles as head-frame ellipsoids (side, centre mm, radii mm), scaled: per side (right,
        then left) frontal horn, body, atrium, occipital horn and temporal horn."""
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
        v, rng = self.hu_values, self.anatomy_rng
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
            inside = (ellipsoid_rho(dx, y, z, centre, radii) < 1) & np.isin(self.tissue[box], (WM, GM))
            self._paint(box, inside, value, DEEP_GM)
        for s, centre, radii in self._ventricle_parts():
            box, (x, y, dx, z) = self._local(centre, radii)
            inside = (ellipsoid_rho(dx, y, z, centre, radii) < 1) & (s * dx > 1.0)
            self._paint(box, inside & (self.tissue[box] != BONE), v["csf"], VENTRICLE)
        third = ((0, 4, 2), (1.6 * max(self.ventricle_scale, 1) ** 2, 14, 9))
        box, (x, y, dx, z) = self._local(*third)
        self._paint(box, ellipsoid_rho(dx, y, z, *third) < 1, v["csf"], VENTRICLE)
        # normal middle cerebral arteries in the sylvian cisterns (the hyperdense vessel sign replaces one)
        for s in (-1, 1):
            self._vessel((s * 5, -10, -17), (s * 31, -8, -12), 1.6, rng.uniform(38, 45))

    def _vessel(self, start, end, radius, value):
        """Paint a tube (radius mm, value HU) along the head-frame segment start-end, sparing bone."""
        centre = np.add(start, end) / 2
        half = np.abs(np.subtract(end, start)) / 2 + radius
        box, (x, y, dx, z) = self._local(centre, half)
        tube = segment_distance(dx, y, z, start, end) < radius
        tube &= self.tissue[box] != BONE
        self._paint(box, tube, value, BLOOD_VESSEL)
        return box, tube

    def _venous_sinuses(self):
        """Superior sagittal sinus (a triangle under the inner table, SSS_DEPTH_MM deep and SSS_BASE_MM wide)
        and transverse sinuses (TS_DEPTH_MM x TS_HEIGHT_MM): the mean adult cross-sections (see the constants).
        They were about half of that before, which the demo's 3.5 mm pixels could not tell from the bone."""
        v = self.hu_values
        depth, half_base = SSS_DEPTH_MM, SSS_BASE_MM / 2
        box, (x, y, dx, z) = self._local((0, 0, 20), (half_base + 2, self.radii[1] + 2, self.radii[2]))
        d = self.d_in[box]
        sss = (d > -depth) & (d < 0) & (np.abs(x) < (d + depth) * (half_base / depth)) & (z > 0)
        self._paint(box, sss, v["venous_blood"], BLOOD_VESSEL)
        self.venous["superior_sagittal"] = (box, sss)
        for s in (-1, 1):
            box, (x, y, dx, z) = self._local((s * 40, 45, -24), (32, 40, TS_HEIGHT_MM / 2 + 2))
            d = self.d_in[box]
            ts = (d > -TS_DEPTH_MM) & (d < 0) & (np.abs(z + 24) < TS_HEIGHT_MM / 2) & (y > 15) & (np.abs(x) > 6)
            self._paint(box, ts, v["venous_blood"], BLOOD_VESSEL)
            self.venous[f"transverse_{s}"] = (box, ts)

    def _normal_calcifications(self):
        rng = self.anatomy_rng
        spots = []
        if rng.random() < 0.75:
            spots.append(((0, 24, 3), rng.uniform(2, 3.5)))  # pineal
        if rng.random() < 0.65:
            spots += [((s * (12 + 5.5 * self.ventricle_scale * 1.5), 28, 12), rng.uniform(1.2, 2.2)) for s in (-1, 1)]
        for centre, r in spots:
            box, (x, y, dx, z) = self._local(centre, (r, r, r))
            self._paint(box, ellipsoid_rho(dx, y, z, centre, (r, r, r)) < 1, rng.uniform(120, 350))
