"""Geometry of the synthetic head phantom: the voxel grid seen in the head frame, and analytic shapes.

Two frames meet here. The *image* is LPS world space in mm (x to the patient's left, y posterior, z
superior), sampled on an axial grid with identity direction, whose numpy arrays are ``(z, y, x)``.
The *head frame* is the same LPS axes rotated by the head's pose and centred near the middle of the
brain; anatomy and findings are drawn there. :class:`HeadGrid` holds, for every voxel, its head-frame
coordinates (mm, float32 ``(z, y, x)`` arrays) and maps head-frame boxes back to voxel index slices.
The shape functions take such coordinate arrays and return arrays of the same shape.
"""

from __future__ import annotations

import math

import numpy as np


def head_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """3 x 3 head frame -> LPS world rotation: pitch about x (nodding), roll about y, yaw about z (degrees)."""
    a, b, c = np.radians([pitch_deg, roll_deg, yaw_deg])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class HeadGrid:
    """Head-frame coordinates (mm, float32 (z, y, x) arrays) of every voxel, and boxes in index space.

    ``shape_zyx``: voxels per axis; ``spacing_xyz`` (mm), ``origin_xyz`` (LPS mm, centre of voxel 0) and
    ``head_center_xyz`` (LPS mm, where the head frame's origin lies) in (x, y, z) order; ``rotation``:
    3 x 3 head frame -> world matrix (:func:`head_rotation`). ``x``, ``y``, ``z``: head-frame coordinates
    of every voxel, float32 arrays of ``shape_zyx``.
    """

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


def ellipsoid_rho(x, y, z, center, radii):
    """Normalised ellipsoid radius (< 1 inside) of head-frame points (centre and radii in mm, x, y, z)."""
    return np.sqrt(((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
                   + ((z - center[2]) / radii[2]) ** 2)


def ellipsoid_distance(x, y, z, ax, ay, az_up, az_down):
    """Approximate signed distance (mm, > 0 outside) to an ellipsoid centred at the origin whose
    superior half has semi-axis az_up and inferior half az_down (first-order: (rho - 1) / |grad rho|)."""
    az = np.where(z > 0, np.float32(az_up), np.float32(az_down))
    nx, ny, nz = x / np.float32(ax), y / np.float32(ay), z / az
    rho = np.sqrt(nx * nx + ny * ny + nz * nz)
    grad = np.sqrt((nx / np.float32(ax)) ** 2 + (ny / np.float32(ay)) ** 2 + (nz / az) ** 2)
    return (rho - 1) * rho / np.maximum(grad, np.float32(1e-6))


def segment_distance(x, y, z, start, end):
    """Distance (mm) of points to the segment start-end."""
    a, b = np.asarray(start, np.float32), np.asarray(end, np.float32)
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0, 1)
    return np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2)

