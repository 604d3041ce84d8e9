"""Rigid alignment of a head CT to the standard head frame (the shipped head CT template's space).

The head frame is the LPS physical space of ``Resources/templates/scct_head_ct_template_2mm.nrrd``
(Rorden et al. 2012 CT template, MNI space with x and y negated: x = patient left, y = posterior,
z = superior, mm; the mid-sagittal plane is x = 0). Alignment finds ``head_to_patient``, a rigid 4 x 4
matrix taking a head-frame LPS point (mm) to the input image's patient LPS point (mm).

Methods:
- ``"template"``: registration of the input (fixed) to the template (moving) by a similarity transform
  (rotation, translation and one isotropic scale, since heads differ in size from the MNI-sized template;
  normalised correlation of clipped HU; a pitch x z-shift grid search, then gradient descent at 8 mm
  and 4 mm), started from the head-mask centroids. The head frame keeps only its rotation, anchored at
  the stack centre (so ``head_to_patient`` is rigid and the stack keeps true mm). Accepted when the
  head masks agree (Dice over the scanned part of the template) and the motion is plausible, otherwise it
  falls back to ``"center"`` with a warning.
- ``"center"``: patient axes; the input's head-mask centroid goes to the template's head-mask centroid.
- ``"none"``: patient axes; the input image's geometric centre goes to the head-frame centre.

No torch here; everything is SimpleITK + numpy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .resources import resource_path

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


def clamp_hu(image: sitk.Image) -> sitk.Image:
    """Float32 copy with HU clamped to [-1024, 3071] (scanner padding such as -1500/-3024 becomes air)."""
    if image.GetPixelID() == sitk.sitkFloat32:  # maybe clamped already (preprocess clamps once, then aligns)
        extremes = sitk.MinimumMaximumImageFilter()
        extremes.Execute(image)
        if extremes.GetMinimum() >= AIR_HU and extremes.GetMaximum() <= MAX_HU:
            return image
    return sitk.Clamp(image, sitk.sitkFloat32, AIR_HU, MAX_HU)


def coarse_image(hu: sitk.Image, spacing_mm: float = COARSE_SPACING_MM) -> sitk.Image:
    """Box-average ``hu`` (float32 HU, any orientation) down to about ``spacing_mm`` per axis (own grid)."""
    factors = [max(1, int(round(spacing_mm / s))) for s in hu.GetSpacing()]
    factors = [min(f, n) for f, n in zip(factors, hu.GetSize())]
    return sitk.BinShrink(hu, factors) if max(factors) > 1 else hu


def head_mask(hu: sitk.Image) -> sitk.Image:
    """uint8 mask of the largest connected body above -300 HU (head and skin; the table is cut off by an
    opening). Works on any float HU image; returns an all-zero mask when nothing is above threshold."""
    body = sitk.BinaryThreshold(hu, HEAD_THRESHOLD_HU, 1e9, 1, 0)
    body = sitk.BinaryMorphologicalOpening(body, [1] * hu.GetDimension())
    components = sitk.RelabelComponent(sitk.ConnectedComponent(body), sortByObjectSize=True)
    return sitk.Cast(components == 1, sitk.sitkUInt8)


def mask_centroid_mm(mask: sitk.Image) -> tuple[np.ndarray, float]:
    """(centroid LPS mm (3,), volume ml) of a uint8 mask; centroid is NaN when the mask is empty."""
    array = sitk.GetArrayViewFromImage(mask)
    kji = np.argwhere(array > 0)
    volume_ml = len(kji) * float(np.prod(mask.GetSpacing())) / 1000.0
    if len(kji) == 0:
        return np.full(3, np.nan), 0.0
    ijk = kji.mean(axis=0)[::-1]
    return np.array(mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])), volume_ml


def image_center_mm(image: sitk.Image) -> np.ndarray:
    """Physical LPS point (mm) of the centre of the image's voxel grid."""
    centre_index = [(n - 1) / 2.0 for n in image.GetSize()]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index))


def _axis_aligned(image: sitk.Image) -> sitk.Image:
    """The image with its voxel axes permuted/flipped to the closest LPS order (no interpolation), so that
    axial, sagittal and coronal storage of the same scan give the same coarse image and alignment."""
    closest = np.round(np.array(image.GetDirection()).reshape(3, 3))
    return image if np.array_equal(closest, np.eye(3)) else sitk.DICOMOrient(image, "LPS")


@functools.lru_cache(maxsize=1)
def _template_coarse() -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """(coarse template HU float32, its head mask, head-mask centroid LPS mm) in the head frame."""
    template = coarse_image(clamp_hu(load_head_template()))
    mask = head_mask(template)
    centroid, _ = mask_centroid_mm(mask)
    return template, mask, centroid


def template_head_centroid_mm() -> np.ndarray:
    """Head-mask centroid of the template, head-frame LPS mm (where 'center' alignment puts the head)."""
    return _template_coarse()[2].copy()


def _correlation_method(fixed_mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()  # normalised: template bone (~700 HU, averaged) vs real bone (~1500 HU)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _descend(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image,
             transform: sitk.Similarity3DTransform, learning_rate: float, relaxation: float, iterations: int,
             min_step: float) -> float:
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=min_step, numberOfIterations=iterations,
        relaxationFactor=relaxation, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return float(method.GetMetricValue())


def _shrink_to(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    return sitk.BinShrink(image, [max(1, min(int(round(spacing_mm / s)), n))
                                  for s, n in zip(image.GetSpacing(), image.GetSize())])


def _register(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image,
              start: sitk.Similarity3DTransform) -> tuple[sitk.Similarity3DTransform, float]:
    """Similarity registration of clipped-HU images at 4 mm (fixed = the scan, moving = the template); returns
    (fixed -> moving transform, final normalised correlation metric, -1 is perfect).

    1. Grid search at 8 mm over head pitch (chin up/down, the rotation the head outline constrains least)
       and superior-inferior shift (partial scans bias the centroid start), by correlation.
    2. Gradient descent at 8 mm from the best grid point, then refinement at 4 mm (30% of the fixed
       voxels, fixed seed: deterministic)."""
    fixed_8, mask_8, moving_8 = _shrink_to(fixed, 8.0), _shrink_to(fixed_mask, 8.0), _shrink_to(moving, 8.0)
    coarse = _correlation_method(mask_8)
    best_value, transform = math.inf, None
    for pitch_deg in PITCH_GRID_DEG:
        for z_shift_mm in Z_SHIFT_GRID_MM:
            candidate = sitk.Similarity3DTransform(start)
            candidate.SetRotation((1.0, 0.0, 0.0), math.radians(pitch_deg))
            candidate.SetTranslation([a + b for a, b in zip(start.GetTranslation(), (0.0, 0.0, z_shift_mm))])
            coarse.SetInitialTransform(candidate)
            try:
                value = coarse.MetricEvaluate(fixed_8, moving_8)
            except RuntimeError:  # this start leaves too little of the template inside the input
                continue
            if value < best_value:
                best_value, transform = value, candidate
    if transform is None:
        raise RuntimeError("no start position puts the template inside the input image")
    _descend(coarse, fixed_8, moving_8, transform, learning_rate=4.0, relaxation=0.8, iterations=200, min_step=0.2)
    fine = _correlation_method(fixed_mask)
    fine.SetMetricSamplingStrategy(fine.RANDOM)
    fine.SetMetricSamplingPercentage(0.3, 1)
    metric = _descend(fine, fixed, moving, transform, learning_rate=2.0, relaxation=0.7, iterations=120,
                      min_step=0.05)
    return transform, metric


def _clip(hu: sitk.Image) -> sitk.Image:
    low, high = REGISTRATION_CLIP_HU
    return sitk.Clamp(hu, sitk.sitkFloat32, low, high)


def _fit_quality(transform: sitk.Transform, template_mask: sitk.Image, scan_mask: sitk.Image) -> dict:
    """Dice of template head mask and the warped input head mask, counted only where the template maps
    inside the scanned input (partial scans are not penalised for what was not scanned)."""
    warped = sitk.Resample(scan_mask, template_mask, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside_image = sitk.Image(scan_mask.GetSize(), sitk.sitkUInt8) + 1
    inside_image.CopyInformation(scan_mask)
    inside = sitk.GetArrayViewFromImage(
        sitk.Resample(inside_image, template_mask, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    template_head = sitk.GetArrayViewFromImage(template_mask) > 0
    input_head = sitk.GetArrayViewFromImage(warped) > 0
    a, b = template_head & inside, input_head & inside
    denominator = a.sum() + b.sum()
    dice = float(2.0 * (a & b).sum() / denominator) if denominator else 0.0
    coverage = float(a.sum() / max(1, template_head.sum()))
    return {"head_dice": round(dice, 4), "template_head_coverage": round(coverage, 4)}


def _transform_to_matrix(transform: sitk.Euler3DTransform) -> np.ndarray:
    rotation = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    translation = np.array(transform.GetTranslation())
    return rigid_matrix(rotation, centre + translation - rotation @ centre)


def _center_alignment(head_centroid_mm: np.ndarray) -> np.ndarray:
    return rigid_matrix(np.eye(3), head_centroid_mm - template_head_centroid_mm())


def _none_alignment(hu: sitk.Image) -> np.ndarray:
    return rigid_matrix(np.eye(3), image_center_mm(hu) - np.array(HEAD_FRAME_CENTER_MM))


def _template_alignment(scan: sitk.Image, scan_mask: sitk.Image,
                        scan_centroid: np.ndarray) -> tuple[np.ndarray, dict, str | None]:
    """Try template registration; return (matrix, info, reason it was rejected or None)."""
    template, template_mask, template_centroid = _template_coarse()
    # The scan is the fixed image: every scanned head voxel must find its match in the (complete) template,
    # so a partial scan cannot improve its score by sliding anatomy out of the overlap.
    fixed, fixed_mask = _clip(scan), sitk.BinaryDilate(scan_mask, [2, 2, 2])
    start = sitk.Similarity3DTransform()
    start.SetCenter([float(v) for v in scan_centroid])
    start.SetTranslation([float(v) for v in template_centroid - scan_centroid])
    try:
        patient_to_template, metric = _register(fixed, fixed_mask, _clip(template), start)
    except RuntimeError as error:  # ITK: too few samples inside the template, etc.
        detail = str(error).strip().splitlines()[-1][:200]
        return np.eye(4), {"error": detail}, f"registration failed ({detail})"
    # Registration allows an isotropic scale (heads are smaller than the MNI-sized template; without it the
    # rotation optimum is flat). The head frame keeps only the rotation, anchored at the stack centre.
    scale = patient_to_template.GetScale()
    similarity = np.array(patient_to_template.GetMatrix()).reshape(3, 3)
    head_to_patient_rotation = (similarity / scale).T
    stack_centre = patient_to_template.GetInverse().TransformPoint(HEAD_FRAME_CENTER_MM)
    matrix = rigid_matrix(head_to_patient_rotation,
                          np.array(stack_centre) - head_to_patient_rotation @ np.array(HEAD_FRAME_CENTER_MM))
    head_to_patient = sitk.Euler3DTransform()
    head_to_patient.SetMatrix(matrix[:3, :3].ravel().tolist())
    head_to_patient.SetTranslation(matrix[:3, 3].tolist())
    quality = _fit_quality(head_to_patient, template_mask, scan_mask)
    quality["correlation"] = round(-metric, 4)
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


def align_to_head_frame(hu: sitk.Image, method: str = "template") -> Alignment:
    """Find the rigid head-frame -> patient mapping of a CT.

    hu: 3D SimpleITK image in HU (any pixel type, any direction; LPS mm geometry).
    method: "template", "center" or "none" (see module docstring). "template" falls back to "center",
    and "center" to "none", with a warning, when they cannot be trusted.
    Returns an Alignment (4 x 4 head_to_patient, JSON-able info, warnings).
    """
    if method not in ("template", "center", "none"):
        raise ValueError(f"Unknown alignment method {method!r}: use 'template', 'center' or 'none'.")
    info: dict = {"requested": method, "method": method, "fell_back": False}
    warnings: list[str] = []
    if method == "none":
        return Alignment(_none_alignment(hu), info, warnings)

    scan = coarse_image(clamp_hu(_axis_aligned(hu)))
    scan_mask = head_mask(scan)
    centroid, volume_ml = mask_centroid_mm(scan_mask)
    info["head_volume_ml"] = round(volume_ml, 1)
    if volume_ml < MIN_HEAD_VOLUME_ML:
        info.update(method="none", fell_back=True)
        warnings.append(f"Alignment: no head found in the image (body above {HEAD_THRESHOLD_HU:.0f} HU: "
                        f"{volume_ml:.0f} ml); using the image centre and patient axes. Check that the input "
                        "is a head CT in HU.")
        return Alignment(_none_alignment(hu), info, warnings)

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
