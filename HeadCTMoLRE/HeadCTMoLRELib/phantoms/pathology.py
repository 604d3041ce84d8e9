"""Findings drawn on the synthetic head: how each renderable finding changes the normal anatomy.

:class:`HeadWithFindings` is a :class:`~HeadCTMoLRELib.phantoms.anatomy.HeadAnatomy` that, after the
anatomy is built, draws the requested findings on top of its ``hu`` (float32 HU) and ``tissue`` arrays,
``(z, y, x)``, in a fixed order (structural changes, then ischaemia, masses, blood, bone, air, sinuses).
For each drawn finding it keeps a bool ``(z, y, x)`` mask of the voxels it changed (``masks``) and the
parameters it drew (``params``: sizes in mm, CT numbers in HU, site, ...; JSON-able). Labels that a
drawing makes true beyond the finding itself (the site of an unspecified hematoma, the edema around a
meningioma) are collected in ``extra_labels``. Positions are in the head frame (mm, x to the patient's
left, y posterior, z superior). What each finding looks like is summarised in
:data:`~HeadCTMoLRELib.phantoms.findings.RENDERABLE_FINDINGS`.
"""

from __future__ import annotations

import math

import numpy as np

from .anatomy import (BLOOD, BONE, CSF, DEEP_GM, FAT, GM, MASTOID_AIR, POSTERIOR_FOSSA, SINUS_AIR, SOFT,
                              VENTRICLE, WM, HeadAnatomy)
from .findings import IPH_SITES, MASS_EFFECT_CAUSES, RENDERABLE_FINDINGS
from .geometry import HeadGrid, ellipsoid_rho


class HeadWithFindings(HeadAnatomy):
    """A head whose anatomy is drawn from ``anatomy_rng`` and whose findings from ``findings_rng``.

    The two streams are separate so that one seed gives the same head whichever findings are drawn on
    it. ``findings``: renderable ids to draw. Call :meth:`build_anatomy`, then :meth:`render_findings`.
    """

    def __init__(self, grid: HeadGrid, anatomy_rng: np.random.Generator, findings_rng: np.random.Generator,
                 findings: tuple[str, ...], lowest_covered_slice: int = 0):
        # one side per renderable finding (+1 left, -1 right) and one shift size are always drawn, so the
        # stream does not depend on which findings are asked for
        side_draws = findings_rng.choice((-1.0, 1.0), size=len(RENDERABLE_FINDINGS))
        side = {f: float(side_draws[i]) for i, f in enumerate(RENDERABLE_FINDINGS)}
        shift_draw = findings_rng.uniform(5, 14)
        shift_mm = 0.0
        if "midline_shift" in findings:
            cause = next((c for c in MASS_EFFECT_CAUSES if c in findings), None)
            away = -side[cause] if cause else side["midline_shift"]
            shift_mm = float(away * shift_draw)
        super().__init__(grid, anatomy_rng, atrophy="atrophy" in findings,
                         hydrocephalus="hydrocephalus" in findings, shift_mm=shift_mm)
        self.rng, self.findings, self.side = findings_rng, findings, side
        self.params: dict[str, dict] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.extra_labels: set[str] = set()
        self.impact = None  # unit direction of a head injury, shared by hematoma, fracture and scalp swelling
        # first image row (z index) that the standard slice stacks are sure to see; findings near the skull
        # base are placed so that part of them lies at or above it
        self.lowest_covered_slice = int(lowest_covered_slice)

    def _record(self, finding_id: str, box, mask, **params):
        """Add ``mask`` (in ``box``; None for none) to the finding's mask and merge its parameters."""
        full = self.masks.get(finding_id)
        if full is None:
            full = self.masks[finding_id] = np.zeros(self.grid.shape, bool)
        if box is not None:
            full[box] |= mask
        self.params.setdefault(finding_id, {}).update(
            {k: (round(float(v), 2) if isinstance(v, (float, np.floating)) else v) for k, v in params.items()})

    def render_findings(self):
        """Draw every requested finding on the built anatomy, in a fixed order."""
        order = ("atrophy", "hydrocephalus", "midline_shift",  # anatomy already changed; record masks
                 "small_vessel_ischemic_disease", "acute_infarct", "hypodense_acute_infarct", "chronic_infarct",
                 "lacunar_infarct", "hyperdense_vessel", "venous_sinus_thrombosis", "pathological_calcification",
                 "cystic_lesion", "lipoma", "intraparenchymal_hemorrhage", *IPH_SITES,
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

    def _blob(self, centre, box_radius):
        """Box around ``centre`` (deep, shifted coordinates) and, in it, a lobulated radius (mm): a blob of
        radius R is where it is below R."""
        box, (_, y, dx, z) = self._local(centre, (box_radius,) * 3)
        rx, ry, rz = dx - centre[0], y - centre[1], z - centre[2]
        r = np.sqrt(rx * rx + ry * ry + rz * rz) + 1e-6
        a, b = self.rng.uniform(0, 2 * math.pi, 2)
        lobes = 1 + 0.18 * np.sin(3 * np.arctan2(ry, rx) + a) * np.cos(2 * np.arccos(rz / r) + b)
        return box, r / lobes

    def _hematoma(self, fid, centre, radius):
        u = self.rng.uniform
        value = u(55, 75)
        box, r = self._blob(centre, radius + 8)
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
        free_sites = [s for s in IPH_SITES if s not in self.findings]
        site = str(self.rng.choice(free_sites or list(IPH_SITES)))
        getattr(self, f"_draw_{site}")(site)
        self._record(fid, None, None, site=site)
        self.masks[fid] |= self.masks[site]
        self.extra_labels.add(site)

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
        near = ellipsoid_rho(x, y, z, centre, (radius, radius, radius)) < 1
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
            mask = ellipsoid_rho(dx, y, z, centre, (r, r, r)) < 1
            self._paint(box, mask, u(5, 15), CSF)
            self._record(fid, box, mask)

    def _draw_small_vessel_ischemic_disease(self, fid):
        u = self.rng.uniform
        drop = u(6, 12)
        box, (x, y, dx, z) = self._local((0, 5, 20), (40, 50, 22))
        patch = np.sin(x * 0.35 + 1.0) * np.sin(y * 0.3) * np.sin(z * 0.4 + 2.0) > -0.4
        ring = np.zeros(patch.shape, bool)
        parts = self._ventricle_parts()
        for s, centre, radii in parts[:4] + parts[5:9]:  # all but the temporal horns
            ring |= ellipsoid_rho(dx, y, z, centre, np.add(radii, u(6, 11))) < 1
        mask = ring & patch & (self.tissue[box] == WM)
        self.hu[box][mask] -= drop
        self._record(fid, box, mask, hu_drop=drop)

    def _draw_hyperdense_vessel(self, fid):
        s = self.side[fid]
        if self.rng.random() < 0.75:
            box, tube = self._vessel((s * 5, -10, -17), (s * 31, -8, -12), self.rng.uniform(1.8, 2.6),
                                     self.rng.uniform(65, 90))
            where = "middle cerebral artery"
        else:
            box, tube = self._vessel((0, -2, -48), (0, -4, -22), self.rng.uniform(2.0, 2.8),
                                     self.rng.uniform(65, 90))
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
            mask = ellipsoid_rho(dx, y, z, centre, (r, r, r)) < 1
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
        mask = (ellipsoid_rho(dx, y, z, centre, (r, r * 1.2, r)) < 1) & (self.d_in[box] < 0) & (self.tissue[box] != BONE)
        value = u(0, 12)
        self._paint(box, mask, value, CSF)
        self._record(fid, box, mask, radius_mm=r, hu=value)

    def _draw_lipoma(self, fid):
        u = self.rng.uniform
        centre = (0, u(-12, 8), 27) if self.rng.random() < 0.5 else (0, 23, -7)
        r = u(3.5, 8)
        box, (x, y, dx, z) = self._local(centre, (r, r, r))
        mask = ellipsoid_rho(dx, y, z, centre, (r * 0.8, r, r * 0.8)) < 1
        self._paint(box, mask, u(-100, -60), FAT)
        self._record(fid, box, mask, radius_mm=r)

    def _draw_meningioma(self, fid):
        u = self.rng.uniform
        r = u(8, 22)
        direction = self._convexity_point(self.side[fid], (10, 70))
        centre = direction * (self.radii - r * 0.55)
        box, (x, y, dx, z) = self._local(centre, (r + 16,) * 3)
        rr = ellipsoid_rho(x, y, z, centre, (r, r, r))
        inside = (rr < 1) & (self.d_in[box] < 0) & (self.tissue[box] != BONE)
        value = u(45, 62)
        self._paint(box, inside, value + self.rng.normal(0, 1.5, inside.shape).astype(np.float32), SOFT)
        extras = {}
        if self.rng.random() < 0.35:
            edema = (rr < u(1.5, 2.0)) & (self.tissue[box] == WM)
            self.hu[box][edema] -= u(8, 12)
            extras["edema"] = True
            self.extra_labels.add("vasogenic_edema")
        if self.rng.random() < 0.3:
            calc = inside & (np.sin(x * 1.7) * np.sin(y * 1.9) * np.sin(z * 1.5) > 0.55)
            self._paint(box, calc, u(150, 400))
            extras["calcified"] = True
        self._record(fid, box, inside, radius_mm=r, hu=value, **extras)

    def _draw_skull_fracture(self, fid):
        u = self.rng.uniform
        direction = self.impact
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
        direction = self.impact
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
            mask = (ellipsoid_rho(x, y, z, centre, (r, r, r)) < 1) & (self.tissue[box] != BONE)
            self._paint(box, mask, u(-1000, -900))
            self._record(fid, box, mask, kind="locules")

    def _draw_sinusitis(self, fid):
        u = self.rng.uniform
        names = [n for n in self.sinuses if self._has_covered_air(*self.sinuses[n])]
        count = int(self.rng.integers(1, 3))
        picked = self.rng.choice(names, size=min(count, len(names)), replace=False) if names else []
        for name in picked:
            centre, radii = self.sinuses[name]
            box, (x, y, dx, z) = self._local(centre, radii)
            air = self.tissue[box] == SINUS_AIR
            rho = ellipsoid_rho(x, y, z, centre, radii)
            full = self.rng.random() < 0.4
            mucosa = air & ((rho > 1 - u(3, 6) / min(radii)) | full)
            self._paint(box, mucosa, u(15, 40), SOFT)
            self._record(fid, box, mucosa, sinuses=sorted(set(self.params.get(fid, {}).get("sinuses", []) + [str(name)])))

    def _has_covered_air(self, centre, radii) -> bool:
        """True when the paranasal sinus (head-frame centre and radii, mm) has air voxels at or above
        ``lowest_covered_slice`` (the maxillary sinuses often lie below it, at the bottom of the scan)."""
        box = self.grid.box(centre, radii)
        air = self.tissue[box] == SINUS_AIR
        return bool(air[max(0, self.lowest_covered_slice - box[0].start):].any())

    def _draw_mastoid_opacification(self, fid):
        sides = (-1, 1) if self.rng.random() < 0.4 else (self.side[fid],)
        for s in sides:
            box, (x, y, dx, z) = self._local((s * (self.radii[0] * 0.72 + 4), 26, -42), (10, 12, 11))
            mask = (self.tissue[box] == MASTOID_AIR) & (s * x > 0)
            self._paint(box, mask, self.rng.uniform(15, 45), SOFT)
            self._record(fid, box, mask, sides=len(sides))

