"""Rigid alignment of a head CT to the standard head frame (the shipped head CT template's space).

The head frame is the LPS physical space of ``Resources/templates/scct_head_ct_template_2mm.nrrd``
(Rorden et al. 2012 CT template, MNI space with x and y negated: x = patient left, y = posterior,
z = superior, mm; the mid-sagittal plane is x = 0). Alignment finds ``head_to_patient``, a rigid 4 x 4
matrix taking a head-frame LPS point (mm) to the input image's patient LPS point (mm).

Methods:
- ``"template"``: registration of the input (fixed) to the template (moving) by a similarity transform
  (rotation, translation and one isotropic scale, since heads differ in size from the MNI-sized template;
  correlation of clipped HU over the input's dilated head mask, the template sampled by trilinear
  interpolation; fixed points whose image falls outside the template do not count). A pitch x z-shift grid
  search (all candidates in one ``grid_sample`` call), then Adam steps at 8 mm and 4 mm, started from the
  head-mask centroids. The head frame keeps only the rotation, anchored at the stack centre (so
  ``head_to_patient`` is rigid and the stack keeps true mm). Accepted when the head masks agree (Dice over
  the scanned part of the template) and the motion is plausible, otherwise it falls back to ``"center"``
  with a warning.
- ``"center"``: patient axes; the input's head-mask centroid goes to the template's head-mask centroid.
- ``"none"``: patient axes; the input image's geometric centre goes to the head-frame centre.

Everything runs in torch (float32) on the device the caller picks (CPU: deterministic); connected
components use SimpleITK on the host. Geometry (4 x 4 matrices) is float64 numpy.
"""

from __future__ import annotations

import functools
import math
import warnings as python_warnings
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..resources import resource_path

TEMPLATE_FILE = ("templates", "scct_head_ct_template_2mm.nrrd")

# Middle of the slice stack in the head frame (LPS mm). With the default 40 x 4 mm slices the stack spans
# z = -58 .. +102 mm: below the foramen magnum (template z ~ -50) to just above the template's scalp at the
# vertex (~ +100). Registration scales the template to the head (rigid frame, anchored at this point), so
# smaller and larger heads fill the same range. y = 18 mm centres the template head's antero-posterior
# extent (nose tip -88, occiput +124).
HEAD_FRAME_CENTER_MM = (0.0, 18.0, 22.0)

AIR_HU = -1024.0
MAX_HU = 3071.0
HEAD_THRESHOLD_HU = -300.0  # skin and fat are above, air below
COARSE_SPACING_MM = 4.0
REGISTRATION_CLIP_HU = (-1024.0, 1200.0)
PITCH_GRID_DEG = (-30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0)
Z_SHIFT_GRID_MM = (-20.0, 0.0, 20.0)
# Optimiser: rotation (rad) and log-scale are expressed as motion (mm) at this distance from the centre,
# so one Adam learning rate (mm per step) suits all seven parameters.
LEVER_ARM_MM = 80.0
DESCENT_SCHEDULE = ((8.0, 15, 2.0, 0.3), (4.0, 15, 0.5, 0.1))  # (spacing mm, steps, first lr, last lr)
FINE_POINT_STRIDE = 3  # every 3rd fixed voxel at 4 mm (a regular, deterministic subsample)
MIN_INSIDE_FRACTION = 0.25  # a pose mapping fewer fixed head voxels into the template is not evaluated

MIN_DICE = 0.80  # head masks after a good rigid alignment overlap at 0.85-0.95
MIN_TEMPLATE_COVERAGE = 0.5  # fraction of the template head inside the scan; less (a skull cap) fits any way
MAX_ROTATION_DEG = 35.0  # heads in a CT gantry are rarely tilted more than ~25 deg
HEAD_SCALE_RANGE = (0.75, 1.25)  # head size relative to the (MNI-sized) template
MAX_CENTER_SHIFT_MM = 60.0  # registration may move the head centre this far from the centroid start
MIN_HEAD_VOLUME_ML = 200.0  # below this the input holds no head we can centre on


@dataclass
class Alignment:
    """Result of aligning one CT to the head frame.

    head_to_patient: float64 (4, 4) rigid; head-frame LPS mm -> input patient LPS mm (column vectors).
    info: JSON-able description (method requested/used, fallback flag, quality numbers, angles).
    warnings: human-readable problems met (fallbacks and why).
    """

    head_to_patient: np.ndarray
    info: dict
    warnings: list[str] = field(default_factory=list)


def rigid_matrix(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """4 x 4 homogeneous matrix from a (3, 3) rotation and a (3,) translation (mm)."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation
    return matrix


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle (degrees) of a (3, 3) rotation matrix."""
    cos_angle = (np.trace(rotation) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos_angle, -1.0, 1.0))))


# ---------------------------------------------------------------- voxel grids and volumes on a device

@dataclass(frozen=True)
class VoxelGrid:
    """Geometry of a volume stored as a (z, y, x) array, in ITK terms.

    size: voxels along x, y, z. spacing_mm: (3,) x y z. origin_mm: (3,) LPS mm of the centre of voxel
    (0, 0, 0). direction: (3, 3), column k = LPS unit vector of voxel axis k (x, y, z).
    """

    size: tuple[int, int, int]
    spacing_mm: np.ndarray
    origin_mm: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, image: sitk.Image) -> "VoxelGrid":
        return cls(tuple(int(n) for n in image.GetSize()), np.array(image.GetSpacing(), float),
                   np.array(image.GetOrigin(), float), np.array(image.GetDirection(), float).reshape(3, 3))

    def index_to_patient(self) -> np.ndarray:
        """4 x 4: continuous (i, j, k) index (x, y, z order) -> LPS mm."""
        return rigid_matrix(self.direction * self.spacing_mm[None, :], self.origin_mm)

    def patient_to_index(self) -> np.ndarray:
        """4 x 4: LPS mm -> continuous (i, j, k) index, D^T (p - o) / s."""
        rotation = self.direction.T / self.spacing_mm[:, None]
        return rigid_matrix(rotation, -rotation @ self.origin_mm)

    def center_mm(self) -> np.ndarray:
        """LPS mm of the centre of the voxel grid."""
        return self.origin_mm + self.direction @ ((np.array(self.size) - 1) / 2.0 * self.spacing_mm)

    def shrunk(self, factors) -> "VoxelGrid":
        """Geometry after averaging bins of ``factors`` (x, y, z) voxels (ITK BinShrink: floor(size / f))."""
        factors = np.asarray(factors, int)
        return VoxelGrid(tuple(int(n) // int(f) for n, f in zip(self.size, factors)), self.spacing_mm * factors,
                         self.origin_mm + self.direction @ ((factors - 1) / 2.0 * self.spacing_mm), self.direction)


def as_hu(values: torch.Tensor) -> torch.Tensor:
    """Stored voxel values (any dtype) -> a NEW float32 tensor clamped to [-1024, 3071] HU (scanner padding
    such as -1500/-3024 becomes air). Used chunk by chunk on ``raw`` volumes, so that no full float copy of
    a large CT is ever made."""
    return values.to(torch.float32, copy=True).clamp_(AIR_HU, MAX_HU)


RAW_CHUNK_VOXELS = 1 << 22  # voxels converted to float32 at once when reading a raw volume (~16 MiB)


@dataclass
class DeviceVolume:
    """A CT on a torch device: ``hu`` (z, y, x) and ``grid`` its geometry.

    raw=False: ``hu`` is float32 clamped to [-1024, 3071] HU. raw=True: ``hu`` holds the image's stored
    values (any dtype, HU but not clamped; on the CPU a read-only view of the image's own buffer), and every
    consumer converts it with ``as_hu`` one chunk at a time (``box_shrink``, ``preprocess.anti_alias``)."""

    hu: torch.Tensor
    grid: VoxelGrid
    raw: bool = False

    @classmethod
    def from_image(cls, image: sitk.Image, device=None, *, raw: bool = False) -> "DeviceVolume":
        """Upload a 3D scalar SimpleITK image (any pixel type, HU) to ``device`` (None: CPU). raw=False
        converts to clamped float32 (one float copy); raw=True keeps the stored values (no copy on the CPU,
        the stored dtype on a GPU) for consumers that convert chunk by chunk."""
        array = sitk.GetArrayViewFromImage(image)
        with python_warnings.catch_warnings():  # read-only view: torch never writes to it (as_hu copies)
            python_warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(array)
        target = torch.device(device or "cpu")
        if raw:
            return cls(source.to(device=target), VoxelGrid.of(image), raw=True)
        return cls(as_hu(source.to(device=target)), VoxelGrid.of(image))

    def float_hu(self) -> torch.Tensor:
        """``hu`` as clamped float32 (a full copy when raw: for small volumes or when nothing is filtered)."""
        return as_hu(self.hu) if self.raw else self.hu


def box_shrink(volume: DeviceVolume, factors) -> DeviceVolume:
    """Average bins of ``factors`` (x, y, z) voxels (capped at the size), like ITK BinShrink. A raw volume
    is converted slab by slab (whole bins of slices), so only the small result is ever float32 in full."""
    factors = [max(1, min(int(f), n)) for f, n in zip(factors, volume.grid.size)]
    if max(factors) == 1:
        return DeviceVolume(volume.float_hu(), volume.grid)
    kernel = factors[::-1]
    if not volume.raw:
        return DeviceVolume(F.avg_pool3d(volume.hu[None, None], kernel_size=kernel, stride=kernel)[0, 0],
                            volume.grid.shrunk(factors))
    fz = factors[2]
    slab = max(fz, (RAW_CHUNK_VOXELS // max(1, volume.hu[0].numel())) // fz * fz)
    usable = (volume.hu.shape[0] // fz) * fz
    grid = volume.grid.shrunk(factors)
    # written into one preallocated result: small results kept between large temporaries would pin the
    # allocator's heap (glibc) and the process would grow by a slab per slab
    shrunk = torch.empty(grid.size[::-1], dtype=torch.float32, device=volume.hu.device)
    for start in range(0, usable, slab):
        stop = min(start + slab, usable)
        shrunk[start // fz:stop // fz] = F.avg_pool3d(as_hu(volume.hu[start:stop])[None, None], kernel_size=kernel,
                                                      stride=kernel)[0, 0]
    return DeviceVolume(shrunk, grid)


def coarse_volume(volume: DeviceVolume, spacing_mm: float = COARSE_SPACING_MM) -> DeviceVolume:
    """Box-average down to about ``spacing_mm`` per axis (own grid)."""
    return box_shrink(volume, [max(1, int(round(spacing_mm / s))) for s in volume.grid.spacing_mm])


def axis_aligned(volume: DeviceVolume) -> DeviceVolume:
    """The volume with its voxel axes permuted/flipped to the closest LPS order (no interpolation), so that
    axial, sagittal and coronal storage of the same scan give the same coarse volume and alignment."""
    grid = volume.grid
    nearest_axis = np.argmax(np.abs(grid.direction), axis=1)  # for LPS axis a, the voxel axis closest to it
    if sorted(nearest_axis) != [0, 1, 2]:
        return volume  # ~45 degree oblique: no unambiguous order, keep the stored one
    signs = np.sign(grid.direction[np.arange(3), nearest_axis])
    if np.array_equal(nearest_axis, [0, 1, 2]) and np.all(signs > 0):
        return volume
    hu = volume.hu.permute(*(2 - nearest_axis[::-1]))  # tensor dim of voxel axis k is 2 - k
    flips = [2 - axis for axis in range(3) if signs[axis] < 0]
    hu = (hu.flip(flips) if flips else hu).contiguous()
    size = np.array(grid.size)[nearest_axis]
    corner = np.where(signs > 0, 0, size - 1)  # new index 0 along LPS axis a = old index corner[a]
    old_index = np.zeros(3)
    old_index[nearest_axis] = corner
    origin = grid.origin_mm + grid.direction @ (old_index * grid.spacing_mm)
    direction = grid.direction[:, nearest_axis] * signs[None, :]
    return DeviceVolume(hu, VoxelGrid(tuple(int(n) for n in size), grid.spacing_mm[nearest_axis], origin, direction),
                        volume.raw)


# ---------------------------------------------------------------- head masks

def _morphology(mask: torch.Tensor, offsets_zyx: np.ndarray, erode: bool) -> torch.Tensor:
    """Binary erosion (``erode``) or dilation of a bool (z, y, x) mask by the structuring element given as
    its (K, 3) integer offsets (z, y, x), by shifted AND / OR. Outside the volume counts as foreground for
    the erosion and as background for the dilation (ITK's boundary conditions)."""
    radius = np.abs(offsets_zyx).max(axis=0)
    padding = [int(r) for r in radius[::-1] for _ in range(2)]  # F.pad order: x, y, z
    padded = F.pad(mask.to(torch.uint8), padding, value=1 if erode else 0).bool()
    result = mask.clone()
    for dz, dy, dx in offsets_zyx:
        shifted = padded[radius[0] + dz:radius[0] + dz + mask.shape[0], radius[1] + dy:radius[1] + dy + mask.shape[1],
                         radius[2] + dx:radius[2] + dx + mask.shape[2]]
        result = result & shifted if erode else result | shifted
    return result


def _structuring_offsets(radius_xyz, shape: str) -> list[np.ndarray]:
    """Offset sets (z, y, x) whose successive application gives a ``shape`` ("box": separable, one set per
    axis; "ball": ITK's ball, one set) of half-widths ``radius_xyz`` voxels."""
    radius = np.array(radius_xyz[::-1], int)
    if shape == "box":
        return [np.array([[d if a == axis else 0 for a in range(3)] for d in range(-r, r + 1) if d])
                for axis, r in enumerate(radius) if r > 0]
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij"), -1).reshape(-1, 3)
    inside = (((grid / np.maximum(radius, 1)) ** 2).sum(-1) <= 1.0) & np.any(grid != 0, axis=1)
    return [grid[inside]] if inside.any() else []


def open_mask(mask: torch.Tensor, radius_xyz, shape: str = "box") -> torch.Tensor:
    """Binary opening of a bool (z, y, x) mask by a box or ball of half-widths ``radius_xyz`` voxels."""
    offsets = _structuring_offsets(radius_xyz, shape)
    for offset_set in offsets:
        mask = _morphology(mask, offset_set, erode=True)
    for offset_set in offsets:
        mask = _morphology(mask, offset_set, erode=False)
    return mask


def dilate_mask(mask: torch.Tensor, radius_xyz, shape: str = "box") -> torch.Tensor:
    """Binary dilation of a bool (z, y, x) mask by a box or ball of half-widths ``radius_xyz`` voxels."""
    for offset_set in _structuring_offsets(radius_xyz, shape):
        mask = _morphology(mask, offset_set, erode=False)
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """bool (z, y, x) -> bool: the largest face-connected component (all False when the mask is empty)."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    counts = np.bincount(labels.ravel())
    if len(counts) < 2:
        return np.zeros(mask.shape, bool)
    return labels == (int(np.argmax(counts[1:])) + 1)


def body_mask(hu: torch.Tensor, opening_radius_xyz, shape: str = "box") -> np.ndarray:
    """bool (z, y, x) numpy mask of the largest body above -300 HU in a (z, y, x) HU tensor after an opening
    by a box or ball of ``opening_radius_xyz`` voxels (cuts off the table and headrest); all False when empty."""
    opened = open_mask(hu > HEAD_THRESHOLD_HU, opening_radius_xyz, shape)
    return largest_component(opened.cpu().numpy())


def head_mask(volume: DeviceVolume) -> np.ndarray:
    """bool (z, y, x) head mask of a coarse (~4 mm) volume: largest body, opened by a ball of one voxel."""
    return body_mask(volume.hu, (1, 1, 1), "ball")


def mask_centroid_mm(mask: np.ndarray, grid: VoxelGrid) -> tuple[np.ndarray, float]:
    """(centroid LPS mm (3,), volume ml) of a bool (z, y, x) mask on ``grid``; NaN centroid when empty."""
    kji = np.argwhere(mask)
    volume_ml = len(kji) * float(np.prod(grid.spacing_mm)) / 1000.0
    if len(kji) == 0:
        return np.full(3, np.nan), 0.0
    return grid.index_to_patient()[:3] @ np.append(kji.mean(axis=0)[::-1], 1.0), volume_ml


def image_center_mm(image: sitk.Image) -> np.ndarray:
    """Physical LPS point (mm) of the centre of the image's voxel grid."""
    return VoxelGrid.of(image).center_mm()


# ---------------------------------------------------------------- the template

@functools.lru_cache(maxsize=1)
def load_head_template() -> sitk.Image:
    """The shipped head CT template: int16 HU, identity direction, LPS, 2 mm (the head frame itself)."""
    path = resource_path(*TEMPLATE_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"Head CT template missing: {path}. Reinstall the extension or restore Resources/templates/ "
            "from the source repository; or preprocess with alignment='center'."
        )
    return sitk.ReadImage(str(path))


@dataclass(frozen=True)
class _TemplateLevel:
    """Template at one registration spacing: clipped HU as (1, 1, z, y, x), its grid, and (3,) x y z tensors
    taking template LPS mm p to grid_sample coordinates p * scale + shift (align_corners=True: -1 and +1 are
    the centres of the first and last voxels, ITK index 0 and n - 1), with the bounds of ITK's "inside"
    (continuous index within [-0.5, n - 0.5]) in those coordinates."""

    hu: torch.Tensor
    grid: VoxelGrid
    mm_to_normalised_scale: torch.Tensor
    mm_to_normalised_shift: torch.Tensor
    inside_low: torch.Tensor
    inside_high: torch.Tensor

    @classmethod
    def of(cls, volume: DeviceVolume) -> "_TemplateLevel":
        size = np.array(volume.grid.size, float)
        per_index = 2.0 / np.maximum(size - 1, 1)
        scale = per_index / volume.grid.spacing_mm
        shift = -volume.grid.origin_mm * scale - 1.0

        def tensor(values):
            return torch.as_tensor(values, dtype=torch.float32, device=volume.hu.device)

        return cls(_clip(volume.hu)[None, None].contiguous(), volume.grid, tensor(scale), tensor(shift),
                   tensor(-0.5 * per_index - 1.0), tensor((size - 0.5) * per_index - 1.0))


@functools.lru_cache(maxsize=1)
def _template_head() -> tuple[np.ndarray, VoxelGrid, np.ndarray]:
    """(head mask bool (z, y, x) at 4 mm, its grid, head-mask centroid LPS mm) of the template (head frame)."""
    coarse = coarse_volume(DeviceVolume.from_image(load_head_template()))
    mask = head_mask(coarse)
    return mask, coarse.grid, mask_centroid_mm(mask, coarse.grid)[0]


@functools.lru_cache(maxsize=4)
def _template_pyramid(device: str) -> dict[float, _TemplateLevel]:
    """Clipped template at each descent spacing (mm), on ``device``; cached per device."""
    levels = {}
    volume = coarse_volume(DeviceVolume.from_image(load_head_template(), device))
    for spacing_mm in sorted({level[0] for level in DESCENT_SCHEDULE}):
        shrunk = coarse_volume(volume, spacing_mm) if spacing_mm > COARSE_SPACING_MM else volume
        levels[spacing_mm] = _TemplateLevel.of(shrunk)
    return levels


def template_head_centroid_mm() -> np.ndarray:
    """Head-mask centroid of the template, head-frame LPS mm (where 'center' alignment puts the head)."""
    return _template_head()[2].copy()


def _clip(hu: torch.Tensor) -> torch.Tensor:
    return torch.clamp(hu, *REGISTRATION_CLIP_HU)


# ---------------------------------------------------------------- registration

@dataclass
class _FixedPoints:
    """Scan voxels the metric is computed over: LPS mm (P, 3) and clipped HU (P,), on the device."""

    points_mm: torch.Tensor
    hu: torch.Tensor


def _fixed_points(scan: DeviceVolume, mask: torch.Tensor, stride: int = 1) -> _FixedPoints:
    kji = torch.nonzero(mask)[::stride]
    hu = scan.hu[kji[:, 0], kji[:, 1], kji[:, 2]]
    index_to_patient = torch.as_tensor(scan.grid.index_to_patient(), dtype=torch.float32, device=hu.device)
    points = kji.flip(-1).to(torch.float32) @ index_to_patient[:3, :3].T + index_to_patient[:3, 3]
    return _FixedPoints(points, _clip(hu))


def _similarity(params: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """params (B, 7) = (rotation vector * LEVER_ARM_MM, translation mm, log scale * LEVER_ARM_MM) ->
    (A (B, 3, 3), offset (B, 3)) with template point = A @ scan point + offset. As ITK's Similarity3D:
    T(p) = s R (p - c) + c + t."""
    w = params[:, :3] / LEVER_ARM_MM
    zero = torch.zeros_like(w[:, 0])
    skew = torch.stack([zero, -w[:, 2], w[:, 1], w[:, 2], zero, -w[:, 0], -w[:, 1], w[:, 0], zero], -1).view(-1, 3, 3)
    # Rodrigues: R = I + sin(a)/a K + (1 - cos(a))/a^2 K^2 (closed form: no host synchronisation, unlike
    # matrix_exp); the tiny offset keeps the gradient finite at a = 0, where both factors are smooth.
    angle = torch.sqrt((w * w).sum(-1) + 1e-12)[:, None, None]
    rotation = (torch.eye(3, dtype=params.dtype, device=params.device) + torch.sin(angle) / angle * skew
                + (1 - torch.cos(angle)) / (angle * angle) * (skew @ skew))
    matrix = torch.exp(params[:, 6] / LEVER_ARM_MM)[:, None, None] * rotation
    offset = centre + params[:, 3:6] - matrix @ centre
    return matrix, offset


def _correlation(params: torch.Tensor, centre: torch.Tensor, fixed: _FixedPoints,
                 template: _TemplateLevel) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) correlation of scan and transformed template over the fixed points that land inside the
    template (index within [-0.5, n - 0.5] as ITK), and (B,) that inside fraction; one grid_sample call."""
    matrix, offset = _similarity(params, centre)
    # template LPS mm -> grid_sample coordinates, folded into the transform (template direction = identity)
    normalised = fixed.points_mm @ (matrix * template.mm_to_normalised_scale[None, :, None]).transpose(1, 2) \
        + (offset * template.mm_to_normalised_scale + template.mm_to_normalised_shift)[:, None, :]  # (B, P, 3)
    moving = F.grid_sample(template.hu, normalised[None, None], mode="bilinear", padding_mode="border",
                           align_corners=True)[0, 0, 0]  # (B, P)
    weight = ((normalised >= template.inside_low) & (normalised <= template.inside_high)).all(-1).to(torch.float32)
    count = weight.sum(-1).clamp(min=1.0)
    f = fixed.hu[None, :] - (fixed.hu[None, :] * weight).sum(-1, keepdim=True) / count[:, None]
    m = moving - (moving * weight).sum(-1, keepdim=True) / count[:, None]
    f, m = f * weight, m * weight
    correlation = (f * m).sum(-1) / torch.sqrt((f * f).sum(-1) * (m * m).sum(-1) + 1e-6)
    return correlation, weight.mean(-1)


class _AdamDescent:
    """Adam on -correlation over the seven pose parameters, as tensors updated in place (torch.optim.Adam's
    arithmetic: bias-corrected moments, eps added to the corrected root), so that one step can be recorded
    as a CUDA graph and replayed: the registration's arithmetic is tiny and its time on a GPU is kernel-launch
    latency (~190 launches per step)."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, params: torch.Tensor, centre, fixed: _FixedPoints, template: _TemplateLevel):
        self.params = params.detach().clone().requires_grad_(True)
        self.first_moment = torch.zeros_like(self.params)
        self.second_moment = torch.zeros_like(self.params)
        self.steps_done = torch.zeros((), dtype=self.params.dtype, device=self.params.device)
        self.lr = torch.zeros((), dtype=self.params.dtype, device=self.params.device)
        self.centre, self.fixed, self.template = centre, fixed, template

    def step(self) -> None:
        beta1, beta2 = self.BETAS
        correlation, _ = _correlation(self.params, self.centre, self.fixed, self.template)
        (gradient,) = torch.autograd.grad(-correlation.sum(), self.params)
        with torch.no_grad():
            self.steps_done.add_(1)
            self.first_moment.mul_(beta1).add_(gradient, alpha=1 - beta1)
            self.second_moment.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            correction1 = 1 - torch.pow(beta1, self.steps_done)
            correction2 = 1 - torch.pow(beta2, self.steps_done)
            denominator = (self.second_moment.sqrt() / correction2.sqrt()).add_(self.EPS)
            self.params.sub_(self.lr / correction1 * self.first_moment / denominator)


def _learning_rates(steps: int, first_lr: float, last_lr: float) -> list[float]:
    """Cosine decay from first_lr to last_lr (mm per step)."""
    return [last_lr + (first_lr - last_lr) * 0.5 * (1 + math.cos(math.pi * step / steps)) for step in range(steps)]


def _descend(params: torch.Tensor, centre: torch.Tensor, fixed: _FixedPoints, template: _TemplateLevel,
             steps: int, first_lr: float, last_lr: float) -> torch.Tensor:
    """Adam on -correlation for a fixed number of steps; no host synchronisation inside the loop. On CUDA,
    after two eager warm-up steps, one step is captured as a CUDA graph and replayed for the others."""
    descent = _AdamDescent(params, centre, fixed, template)
    rates = _learning_rates(steps, first_lr, last_lr)
    device = descent.params.device
    warmup = 2
    if device.type != "cuda" or steps <= warmup + 1:
        for rate in rates:
            descent.lr.fill_(rate)
            descent.step()
        return descent.params.detach()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # autograd must run once outside capture on the capturing stream's side
        for rate in rates[:warmup]:
            descent.lr.fill_(rate)
            descent.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        descent.step()  # recorded, not run
    for rate in rates[warmup:]:
        descent.lr.fill_(rate)
        graph.replay()
    return descent.params.detach()


def _register(scan: DeviceVolume, scan_mask: np.ndarray, scan_centroid: np.ndarray,
              template_centroid: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Similarity registration of clipped HU (fixed = the scan at ~4 mm, moving = the template); returns
    (A (3, 3), offset (3,)) of template point = A @ scan point + offset, as one (3, 4) float64 array, the
    final correlation and the fraction of fixed points inside the template.

    1. Grid search at 8 mm over head pitch (chin up/down, the rotation the head outline constrains least)
       and superior-inferior shift (partial scans bias the centroid start), by correlation.
    2. Adam at 8 mm from the best grid point, then at 4 mm (every FINE_POINT_STRIDE-th fixed voxel)."""
    device = scan.hu.device
    pyramid = _template_pyramid(str(device))
    fixed_mask = dilate_mask(torch.as_tensor(scan_mask, device=device), (2, 2, 2), "ball")
    clipped = DeviceVolume(_clip(scan.hu), scan.grid)
    levels = {}
    for spacing_mm, _, _, _ in DESCENT_SCHEDULE:
        if spacing_mm > COARSE_SPACING_MM:
            factors = [max(1, min(int(round(spacing_mm / s)), n)) for s, n in zip(scan.grid.spacing_mm, scan.grid.size)]
            shrunk = box_shrink(clipped, factors)
            mask = F.avg_pool3d(fixed_mask.to(torch.float32)[None, None], factors[::-1], factors[::-1])[0, 0] >= 0.5
            levels[spacing_mm] = _fixed_points(shrunk, mask)
        else:
            levels[spacing_mm] = _fixed_points(clipped, fixed_mask, FINE_POINT_STRIDE)
    centre = torch.as_tensor(scan_centroid, dtype=torch.float32, device=device)

    pitch, shift = np.meshgrid(np.radians(PITCH_GRID_DEG), Z_SHIFT_GRID_MM, indexing="ij")
    candidates = np.zeros((pitch.size, 7))
    candidates[:, 0] = pitch.ravel() * LEVER_ARM_MM
    candidates[:, 3:6] = template_centroid - scan_centroid
    candidates[:, 5] += shift.ravel()
    candidates = torch.as_tensor(candidates, dtype=torch.float32, device=device)
    first_spacing = DESCENT_SCHEDULE[0][0]
    with torch.no_grad():
        correlation, inside = _correlation(candidates, centre, levels[first_spacing], pyramid[first_spacing])
        best = torch.argmax(torch.where(inside >= MIN_INSIDE_FRACTION, correlation, -math.inf))
    params = candidates[best][None]
    for spacing_mm, steps, first_lr, last_lr in DESCENT_SCHEDULE:
        params = _descend(params, centre, levels[spacing_mm], pyramid[spacing_mm], steps, first_lr, last_lr)
    with torch.no_grad():
        last_spacing = DESCENT_SCHEDULE[-1][0]
        correlation, inside = _correlation(params, centre, levels[last_spacing], pyramid[last_spacing])
        matrix, offset = _similarity(params, centre)
        result = torch.cat([matrix[0], offset[0][:, None]], 1).double().cpu().numpy()
    return result, float(correlation[0]), float(inside[0])


def _fit_quality(head_to_patient: np.ndarray, scan_mask: np.ndarray, scan_grid: VoxelGrid) -> dict:
    """Dice of the template head mask and the input head mask sampled (nearest) at the same head-frame
    points, counted only where the template maps inside the scanned input (partial scans are not penalised
    for what was not scanned), and the fraction of the template head inside the scan."""
    template_mask, template_grid, _ = _template_head()
    kji = np.indices(template_mask.shape).reshape(3, -1).T
    to_scan_index = scan_grid.patient_to_index() @ head_to_patient @ template_grid.index_to_patient()
    index = kji[:, ::-1] @ to_scan_index[:3, :3].T + to_scan_index[:3, 3]
    nearest = np.floor(index + 0.5).astype(np.int64)
    inside = np.all((nearest >= 0) & (nearest < np.array(scan_grid.size)), axis=1)
    input_head = np.zeros(len(kji), bool)
    i, j, k = nearest[inside].T
    input_head[inside] = scan_mask[k, j, i]
    template_head = template_mask.ravel()
    a, b = template_head & inside, input_head & inside
    denominator = a.sum() + b.sum()
    dice = float(2.0 * (a & b).sum() / denominator) if denominator else 0.0
    coverage = float(a.sum() / max(1, template_head.sum()))
    return {"head_dice": round(dice, 4), "template_head_coverage": round(coverage, 4)}


def _center_alignment(head_centroid_mm: np.ndarray) -> np.ndarray:
    return rigid_matrix(np.eye(3), head_centroid_mm - template_head_centroid_mm())


def _none_alignment(grid: VoxelGrid) -> np.ndarray:
    return rigid_matrix(np.eye(3), grid.center_mm() - np.array(HEAD_FRAME_CENTER_MM))


def _template_alignment(scan: DeviceVolume, scan_mask: np.ndarray,
                        scan_centroid: np.ndarray) -> tuple[np.ndarray, dict, str | None]:
    """Try template registration; return (matrix, info, reason it was rejected or None)."""
    template_centroid = template_head_centroid_mm()
    # The scan is the fixed image: every scanned head voxel must find its match in the (complete) template,
    # so a partial scan cannot improve its score by sliding anatomy out of the overlap.
    patient_to_template, correlation, inside = _register(scan, scan_mask, scan_centroid, template_centroid)
    if not inside >= MIN_INSIDE_FRACTION or not np.isfinite(patient_to_template).all():
        detail = f"only {inside:.0%} of the head maps inside the template"
        return np.eye(4), {"error": detail}, f"registration failed ({detail})"
    # Registration allows an isotropic scale (heads are smaller than the MNI-sized template; without it the
    # rotation optimum is flat). The head frame keeps only the rotation, anchored at the stack centre.
    similarity, offset = patient_to_template[:, :3], patient_to_template[:, 3]
    scale = float(np.cbrt(np.linalg.det(similarity)))
    head_to_patient_rotation = (similarity / scale).T
    stack_centre = np.linalg.solve(similarity, np.array(HEAD_FRAME_CENTER_MM) - offset)
    matrix = rigid_matrix(head_to_patient_rotation, stack_centre - head_to_patient_rotation @ np.array(HEAD_FRAME_CENTER_MM))
    quality = _fit_quality(matrix, scan_mask, scan.grid)
    quality["correlation"] = round(correlation, 4)
    quality["head_scale_vs_template"] = round(1.0 / scale, 4)
    angle = rotation_angle_deg(matrix[:3, :3])
    shift = float(np.linalg.norm(matrix[:3, :3] @ template_centroid + matrix[:3, 3] - scan_centroid))
    quality.update(rotation_deg=round(angle, 3), center_shift_mm=round(shift, 2))
    reason = None
    if quality["template_head_coverage"] < MIN_TEMPLATE_COVERAGE:
        reason = f"scan covers only {quality['template_head_coverage']:.0%} of the template head"
    elif quality["head_dice"] < MIN_DICE:
        reason = f"head masks overlap poorly after registration (Dice {quality['head_dice']:.2f} < {MIN_DICE})"
    elif angle > MAX_ROTATION_DEG:
        reason = f"implausible head rotation {angle:.0f} deg (> {MAX_ROTATION_DEG:.0f})"
    elif not HEAD_SCALE_RANGE[0] <= quality["head_scale_vs_template"] <= HEAD_SCALE_RANGE[1]:
        reason = f"implausible head size ({quality['head_scale_vs_template']:.2f} x the template)"
    elif shift > MAX_CENTER_SHIFT_MM:
        reason = f"implausible shift {shift:.0f} mm from the head centroid (> {MAX_CENTER_SHIFT_MM:.0f})"
    return matrix, quality, reason


def align_to_head_frame(hu, method: str = "template", *, device=None) -> Alignment:
    """Find the rigid head-frame -> patient mapping of a CT.

    hu: 3D SimpleITK image in HU (any pixel type, any direction; LPS mm geometry), or a DeviceVolume
        already on the device (then ``device`` is ignored).
    method: "template", "center" or "none" (see module docstring). "template" falls back to "center",
    and "center" to "none", with a warning, when they cannot be trusted.
    device: torch device for the registration (None: CPU).
    Returns an Alignment (4 x 4 head_to_patient, JSON-able info, warnings).
    """
    if method not in ("template", "center", "none"):
        raise ValueError(f"Unknown alignment method {method!r}: use 'template', 'center' or 'none'.")
    info: dict = {"requested": method, "method": method, "fell_back": False}
    warnings: list[str] = []
    grid = hu.grid if isinstance(hu, DeviceVolume) else VoxelGrid.of(hu)
    if method == "none":
        return Alignment(_none_alignment(grid), info, warnings)

    volume = hu if isinstance(hu, DeviceVolume) else DeviceVolume.from_image(hu, device)
    with torch.no_grad():
        scan = coarse_volume(axis_aligned(volume))
        scan_mask = head_mask(scan)
    centroid, volume_ml = mask_centroid_mm(scan_mask, scan.grid)
    info["head_volume_ml"] = round(volume_ml, 1)
    if volume_ml < MIN_HEAD_VOLUME_ML:
        info.update(method="none", fell_back=True)
        warnings.append(f"Alignment: no head found in the image (body above {HEAD_THRESHOLD_HU:.0f} HU: "
                        f"{volume_ml:.0f} ml); using the image centre and patient axes. Check that the input "
                        "is a head CT in HU.")
        return Alignment(_none_alignment(grid), info, warnings)

    if method == "template":
        matrix, quality, reason = _template_alignment(scan, scan_mask, centroid)
        info["quality"] = quality
        if reason is None:
            info["rotation_matrix"] = matrix[:3, :3].round(6).tolist()
            info["translation_mm"] = matrix[:3, 3].round(3).tolist()
            return Alignment(matrix, info, warnings)
        info.update(method="center", fell_back=True, fallback_reason=reason)
        warnings.append(f"Alignment to the head template rejected: {reason}. Using the head centre and the "
                        "scanner axes instead; slices may be tilted relative to the standard head frame.")
    return Alignment(_center_alignment(centroid), info, warnings)
