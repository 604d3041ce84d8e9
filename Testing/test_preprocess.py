"""Preprocessing: head-frame alignment, anti-aliased resampling, windows, and the mapping between the slice
stack and the original patient space (LPS mm). Uses the real GE head CT (partial coverage, 1 x 1 x 5 mm)
and synthetic volumes built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from HeadCTMoLRELib.ct.alignment import align_to_head_frame, load_head_template, rotation_angle_deg
from HeadCTMoLRELib.ct.preprocess import PreprocessConfig, apply_windows, preprocess, stack_to_image

GE_HEAD = ("real", "derived", "GE_head_axial_1x1x5mm.nii.gz")
BONE_WINDOW = 2  # channel of the [-800, 2000] HU window


@pytest.fixture(scope="module")
def ge_head(test_data) -> sitk.Image:
    return sitk.ReadImage(str(test_data.joinpath(*GE_HEAD)))


@pytest.fixture(scope="module")
def ge_stack(ge_head):
    return preprocess(ge_head)


def rotation_about(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(angle_deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def rotated_copy(image: sitk.Image, rotation: np.ndarray, centre_mm: np.ndarray) -> sitk.Image:
    """Same voxels, geometry rotated about ``centre_mm``: the anatomy physically rotates (no interpolation)."""
    copy = sitk.Image(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    copy.SetDirection((rotation @ direction).ravel().tolist())
    copy.SetOrigin((centre_mm + rotation @ (np.array(image.GetOrigin()) - centre_mm)).tolist())
    return copy


def uniform_volume(size, spacing, hu, direction=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    array = np.full(size[::-1], hu, np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(np.asarray(direction).ravel().tolist())
    return image


def weighted_centroid(weights: np.ndarray) -> np.ndarray:
    index = np.indices(weights.shape).reshape(weights.ndim, -1)
    w = weights.ravel()
    return (index * w).sum(axis=1) / w.sum()


# --- configuration and windows ---------------------------------------------------------------------------


def test_config_round_trips_through_json():
    config = PreprocessConfig(image_size=160, in_plane_fov_mm=240.0, num_slices=32,
                              windows_hu=((0, 80), (-1000, 1000)), alignment="center")
    restored = PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.pixel_spacing_mm == pytest.approx(1.5)
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()) == PreprocessConfig()


def test_config_rejects_unknown_keys_bad_windows_and_methods():
    with pytest.raises(ValueError, match="Unknown preprocessing parameters"):
        PreprocessConfig.from_dict({**PreprocessConfig().to_dict(), "gamma": 2})
    with pytest.raises(ValueError, match="high > low"):
        PreprocessConfig(windows_hu=((80, 0),))
    with pytest.raises(ValueError, match="alignment"):
        PreprocessConfig(alignment="affine")


def test_windows_are_exact_on_known_hu():
    hu = np.array([-1024.0, -800.0, -20.0, 0.0, 40.0, 80.0, 180.0, 600.0, 2000.0, 3000.0])
    channels = apply_windows(hu, PreprocessConfig().windows_hu)
    assert channels.dtype == np.float32 and channels.shape == (3, hu.size)
    np.testing.assert_allclose(channels[0], [0, 0, 0, 0, 0.5, 1, 1, 1, 1, 1], atol=1e-7)
    np.testing.assert_allclose(channels[1], [0, 0, 0, 0.1, 0.3, 0.5, 1, 1, 1, 1], atol=1e-7)
    np.testing.assert_allclose(channels[2], np.array([0, 0, 780, 800, 840, 880, 980, 1400, 2800, 2800]) / 2800,
                               atol=1e-7)


def test_pillar0_windows_and_minmax_follow_the_reference_formula():
    """Pillar-0's 11 channels on a small random volume: clamp((v - (c - w/2)) / (w + 1e-8), 0, 1) per
    anatomical window, then clamp((v - min) / (max - min + 1e-8), 0, 1) over the whole volume; numpy and
    torch paths agree."""
    import torch

    from HeadCTMoLRELib.model.backbones import PILLAR0_CT_WINDOWS, PILLAR0_WINDOWS_HU

    rng = np.random.default_rng(7)
    hu = rng.uniform(-1100.0, 2500.0, size=(3, 4, 5)).astype(np.float32)
    expected = [np.clip((hu.astype(np.float64) - (c - w / 2)) / (w + 1e-8), 0, 1) for _, c, w in PILLAR0_CT_WINDOWS]
    expected.append(np.clip((hu - hu.min()) / (float(hu.max()) - float(hu.min()) + 1e-8), 0, 1))
    channels = apply_windows(hu, PILLAR0_WINDOWS_HU)
    assert channels.shape == (11, 3, 4, 5) and channels.dtype == np.float32
    np.testing.assert_allclose(channels, np.stack(expected), atol=2e-6)
    assert channels[-1].min() == 0.0 and channels[-1].max() == pytest.approx(1.0, abs=1e-6)
    on_torch = apply_windows(torch.from_numpy(hu), PILLAR0_WINDOWS_HU)
    np.testing.assert_allclose(on_torch.numpy(), channels, atol=2e-6)
    # a constant volume: minmax is 0 (the 1e-8 keeps it finite), never NaN
    assert np.all(apply_windows(np.full((2, 2), 40.0), ("minmax",)) == 0.0)


def test_minmax_and_outside_hu_round_trip_and_are_checked():
    config = PreprocessConfig(windows_hu=((0, 80), "minmax"), outside_hu=-1)
    restored = PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and restored.windows_hu == ((0.0, 80.0), "minmax") and restored.outside_hu == -1.0
    assert "outside_hu" not in PreprocessConfig().to_dict()  # as before it existed: same manifests, cache keys
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()).outside_hu == -1024.0
    with pytest.raises(ValueError, match="not a \\(low, high\\) HU pair or 'minmax'"):
        PreprocessConfig(windows_hu=("max",))
    with pytest.raises(ValueError, match="outside_hu"):
        PreprocessConfig(outside_hu=float("nan"))


def test_outside_hu_fills_what_the_scan_does_not_cover(ge_head):
    """The partial-coverage GE head: slices beyond the scan carry outside_hu through the windows (Pillar-0
    pads with -1 HU: 1349 / 1500 in its lung window), the head mask still sees air there."""
    base = dict(image_size=32, in_plane_fov_mm=256.0, num_slices=24, slice_spacing_mm=8.0, alignment="center")
    air = preprocess(ge_head, PreprocessConfig(windows_hu=((-1350, 150), "minmax"), **base))
    water = preprocess(ge_head, PreprocessConfig(windows_hu=((-1350, 150), "minmax"), outside_hu=-1.0, **base))
    outside = ~water.slice_valid
    assert outside.any() and water.slice_valid.any()
    np.testing.assert_allclose(water.pixels[outside, 0], 1349.0 / 1500.0, atol=1e-6)
    np.testing.assert_allclose(air.pixels[outside, 0], (1350.0 - 1024.0) / 1500.0, atol=1e-6)  # air by default
    np.testing.assert_array_equal(water.head_mask, air.head_mask)
    assert 0.0 < water.pixels[outside, 1].min() and water.pixels[:, 1].max() == pytest.approx(1.0, abs=1e-6)


def test_config_sets_stack_shape_spacing_and_slice_distance(ge_head):
    config = PreprocessConfig(image_size=64, in_plane_fov_mm=256.0, num_slices=20, slice_spacing_mm=8.0,
                              windows_hu=((0, 80), (-800, 2000)), alignment="center")
    stack = preprocess(ge_head, config)
    assert stack.pixels.shape == (20, 2, 64, 64) and stack.pixels.dtype == np.float32
    assert stack.head_mask.shape == (20, 64, 64) and stack.slice_valid.shape == (20,)
    np.testing.assert_allclose(stack.spacing_mm, [4.0, 4.0, 8.0])
    np.testing.assert_allclose(np.linalg.norm(np.diff(stack.slice_positions_mm, axis=0), axis=1), 8.0)
    assert stack.alignment["method"] == "center" and stack.config == config


# --- geometry: stack <-> patient space ---------------------------------------------------------------------


def test_marker_in_oblique_anisotropic_volume_maps_back_to_its_lps_point():
    direction = rotation_about([1, 2, 0.5], 20.0)
    image = uniform_volume((200, 200, 120), (0.6, 0.7, 1.5), 30, direction, origin=(-60.0, -70.0, -90.0))
    marker_index = (123, 77, 64)
    array = sitk.GetArrayFromImage(image)
    array[marker_index[2] - 1:marker_index[2] + 2, marker_index[1] - 1:marker_index[1] + 2,
          marker_index[0] - 1:marker_index[0] + 2] = 1800
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(image)
    marker_lps = np.array(marked.TransformIndexToPhysicalPoint(marker_index))

    stack = preprocess(marked, PreprocessConfig(alignment="none"))
    background = apply_windows(np.array([30.0]), stack.config.windows_hu)[BONE_WINDOW, 0]
    excess = np.clip(stack.pixels[:, BONE_WINDOW] - background, 0, None)
    peak = np.array(np.unravel_index(np.argmax(excess), excess.shape))
    box = tuple(slice(max(p - 4, 0), p + 5) for p in peak)
    found_kji = weighted_centroid(excess[box]) + [b.start for b in box]

    expected_kji = stack.patient_to_stack_index(marker_lps)
    assert np.all(np.abs(found_kji - expected_kji) < 0.5), (found_kji, expected_kji)
    error_mm = np.abs(stack.stack_index_to_patient(found_kji) - marker_lps)
    assert np.linalg.norm(error_mm) < 0.5 * np.linalg.norm(stack.spacing_mm)
    np.testing.assert_allclose(stack.patient_to_stack_index(stack.stack_index_to_patient(found_kji)), found_kji)


def test_stack_is_radiological_anterior_up_patient_left_on_the_right():
    image = uniform_volume((160, 160, 60), (1.0, 1.0, 3.0), -1024, origin=(-80.0, -80.0, -90.0))
    array = sitk.GetArrayFromImage(image)
    # patient-left (+x), anterior (-y) block at z = 0 mm
    array[28:33, 35:45, 110:120] = 1000
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(image)
    stack = preprocess(marked, PreprocessConfig(alignment="none"))
    k, j, i = weighted_centroid(stack.pixels[:, BONE_WINDOW])
    assert i > 112 + 20, "patient left must be on the right of the image (larger column)"
    assert j < 112 - 20, "anterior must be at the top of the image (smaller row)"
    assert stack.slice_positions_mm[int(round(k)), 2] == pytest.approx(array_z_mm := -90.0 + 30 * 3.0, abs=2.0)
    assert np.all(np.diff(stack.slice_positions_mm[:, 2]) > 0), "slices must run inferior -> superior"
    assert array_z_mm == 0.0


def test_marker_in_real_head_maps_back_through_template_alignment(ge_head, ge_stack):
    array = sitk.GetArrayFromImage(ge_head)
    marker_index = (118, 110, 24)  # x, y, z: deep in the brain
    array[marker_index[2] - 1:marker_index[2] + 2, marker_index[1] - 1:marker_index[1] + 2,
          marker_index[0] - 1:marker_index[0] + 2] = 1900
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(ge_head)
    marker_lps = np.array(marked.TransformIndexToPhysicalPoint(marker_index))

    stack = preprocess(marked)
    assert stack.alignment["method"] == "template"
    excess = np.clip(stack.pixels[:, BONE_WINDOW] - ge_stack.pixels[:, BONE_WINDOW], 0, None)
    peak = np.array(np.unravel_index(np.argmax(excess), excess.shape))
    box = tuple(slice(max(p - 5, 0), p + 6) for p in peak)
    found_kji = weighted_centroid(np.where(excess[box] > 0.02, excess[box], 0)) + [b.start for b in box]
    expected_kji = stack.patient_to_stack_index(marker_lps)
    assert np.all(np.abs(found_kji - expected_kji) < 0.5), (found_kji, expected_kji)


def test_stack_to_image_puts_slice_values_back_at_their_z(ge_head, ge_stack):
    s = ge_stack.pixels.shape[0]
    back = stack_to_image(np.arange(s, dtype=np.float32), ge_stack, ge_head, default_value=-1.0)
    assert back.GetSize() == ge_head.GetSize() and back.GetDirection() == ge_head.GetDirection()
    assert back.GetOrigin() == ge_head.GetOrigin() and back.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayFromImage(back)
    assert values[:, :5, :5].max() == -1.0, "air outside the head keeps the default value"
    kji = np.argwhere(values >= 0)
    assert len(kji) > 100_000, "the head must receive values"
    sample = kji[np.random.default_rng(0).choice(len(kji), 3000, replace=False)]
    lps = np.array([ge_head.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]) for k, j, i in sample])
    stack_kji = ge_stack.patient_to_stack_index(lps)

    def deep_in_head(k, j, i):  # both neighbouring slices in the head around this point: no edge blending
        k0, j0, i0 = int(np.floor(k)), int(round(j)), int(round(i))
        return 0 <= k0 < s - 1 and ge_stack.head_mask[k0:k0 + 2, j0 - 2:j0 + 3, i0 - 2:i0 + 3].all()

    inner = np.array([deep_in_head(*p) for p in stack_kji])
    assert inner.sum() > 1000
    # linear interpolation between slice centres gives back the continuous slice coordinate
    np.testing.assert_allclose(values[tuple(sample[inner].T)], stack_kji[inner, 0], atol=0.02)


def test_stack_to_image_nearest_keeps_label_values_and_rejects_bad_shapes(ge_head, ge_stack):
    labels = np.zeros(ge_stack.head_mask.shape, np.float32)
    labels[:, :112, :] = 3.0  # anterior half of every slice
    labels[:, 112:, :] = 5.0
    back = sitk.GetArrayFromImage(stack_to_image(labels, ge_stack, ge_head, interpolation="nearest"))
    assert set(np.unique(back)) <= {0.0, 3.0, 5.0}
    anterior = back[:, :60, :]  # small LPS y = anterior rows of the original grid
    assert (anterior == 3.0).sum() > 10 * (anterior == 5.0).sum()
    with pytest.raises(ValueError, match="shape"):
        stack_to_image(np.zeros(7), ge_stack, ge_head)


# --- alignment ---------------------------------------------------------------------------------------------


def test_real_partial_head_aligns_to_template_with_good_overlap(ge_stack):
    info = ge_stack.alignment
    assert info["method"] == "template" and not info["fell_back"], info
    assert info["quality"]["head_dice"] > 0.8
    assert info["quality"]["rotation_deg"] < 20
    assert ge_stack.slice_valid.all()
    json.dumps(info)  # stored in predictions and bundles
    centre = weighted_centroid(ge_stack.head_mask[10:30].astype(float))[1:]
    assert np.all(np.abs(centre - 111.5) < 15), f"head not centred in-plane: {centre}"


def test_template_aligns_to_itself_and_stack_spans_skull_base_to_vertex():
    template = load_head_template()
    stack = preprocess(template)
    matrix = stack.head_to_patient
    assert rotation_angle_deg(matrix[:3, :3]) < 1.0
    assert np.linalg.norm(matrix[:3, 3]) < 1.0
    area = stack.head_mask.sum(axis=(1, 2))
    assert area[-1] < 0.05 * area.max(), "the stack must reach above the vertex"
    assert area[0] > 0.3 * area.max(), "the lowest slice must still be in the head (skull base / posterior fossa)"
    skull = stack.pixels[:, BONE_WINDOW] > (300 + 800) / 2800
    assert skull[0].sum() > 100, "skull base bone must be inside the stack"


def test_rotated_head_aligns_to_nearly_the_same_stack(ge_head, ge_stack):
    rotation = rotation_about([1.0, 0.3, 0.2], 15.0)
    centre = np.array(ge_head.TransformContinuousIndexToPhysicalPoint([114, 113, 20]))
    rotated = rotated_copy(ge_head, rotation, centre)
    stack = preprocess(rotated)
    assert stack.alignment["method"] == "template", stack.alignment
    physical = np.eye(4)
    physical[:3, :3], physical[:3, 3] = rotation, centre - rotation @ centre
    expected = physical @ ge_stack.head_to_patient
    assert rotation_angle_deg(stack.head_to_patient[:3, :3].T @ expected[:3, :3]) < 6.0
    probes = np.array([[10, 112, 112], [20, 60, 112], [30, 112, 60]])  # (slice, row, col) in the brain
    expected_points = ge_stack.stack_index_to_patient(probes) @ rotation.T + (centre - rotation @ centre)
    assert np.abs(stack.stack_index_to_patient(probes) - expected_points).max() < 6.0
    brain = ge_stack.head_mask[8:32]
    same = np.abs(stack.pixels[8:32, 1] - ge_stack.pixels[8:32, 1])[brain].mean()
    unaligned = preprocess(rotated, PreprocessConfig(alignment="none"))
    different = np.abs(unaligned.pixels[8:32, 1] - ge_stack.pixels[8:32, 1])[brain].mean()
    assert same < 0.35 * different, (same, different)


def test_sagittally_stored_copy_gives_the_same_stack(ge_head, ge_stack):
    sagittal = sitk.Flip(sitk.PermuteAxes(ge_head, [2, 0, 1]), [False, True, False])  # same physical voxels
    assert sagittal.GetSize() == (42, 229, 228)
    stack = preprocess(sagittal)
    np.testing.assert_allclose(stack.head_to_patient, ge_stack.head_to_patient, atol=0.05)
    assert np.abs(stack.pixels - ge_stack.pixels).mean() < 0.002
    assert np.abs(stack.pixels - ge_stack.pixels).max() < 0.1
    np.testing.assert_array_equal(stack.slice_valid, ge_stack.slice_valid)


def test_slices_outside_a_partial_scan_are_invalid_air(ge_head, ge_stack):
    upper = ge_head[:, :, 14:]  # keep z >= -3.3 mm: skull base and posterior fossa cut off
    bottom_mm = upper.GetOrigin()[2]
    stack = preprocess(upper)
    assert stack.alignment["method"] == "template", stack.alignment
    z = stack.slice_positions_mm[:, 2]
    assert not stack.slice_valid[z < bottom_mm - 6].any()
    assert stack.slice_valid[z > bottom_mm + 6].all()
    invalid = ~stack.slice_valid
    assert invalid.sum() >= 5
    assert np.all(stack.pixels[invalid] == 0.0) and not stack.head_mask[invalid].any()
    shift = stack.stack_index_to_patient(np.array([30, 112, 112])) - ge_stack.stack_index_to_patient(
        np.array([30, 112, 112]))
    assert np.linalg.norm(shift) < 6.0, f"partial scan aligned {shift} mm away from the full scan"


def test_fine_z_stripes_average_out_instead_of_aliasing():
    spacing_z = 0.5
    z = np.arange(400)
    stripes = np.where((z // 3) % 2 == 0, 80, 0).astype(np.int16)  # period 3 mm along z
    array = np.broadcast_to(stripes[:, None, None], (400, 48, 48)).copy()
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, spacing_z))
    image.SetOrigin((-24.0, -24.0 + 18.0, -100.0 + 18.0))
    config = PreprocessConfig(image_size=32, in_plane_fov_mm=32.0, alignment="none")
    brain_window = preprocess(image, config).pixels[:, 0, 16, 16]  # no head needed with alignment="none"
    assert brain_window.mean() == pytest.approx(0.5, abs=0.05)
    assert brain_window.std() < 0.03, brain_window

    # the same slice centres sampled without the low-pass filter alias: the test can tell the difference
    stack = preprocess(image, config)
    naive = np.array([image.EvaluateAtPhysicalPoint(p.tolist(), sitk.sitkLinear)
                      for p in stack.slice_positions_mm]) / 80.0
    assert naive.std() > 0.2


# --- bad inputs ---------------------------------------------------------------------------------------------


def test_empty_air_volume_falls_back_to_image_centre_with_warning():
    stack = preprocess(uniform_volume((64, 64, 40), (3.0, 3.0, 5.0), -1024))
    assert stack.alignment["method"] == "none" and stack.alignment["fell_back"]
    assert any("no head" in w for w in stack.warnings)
    assert stack.pixels.shape == (40, 3, 224, 224) and stack.pixels.max() == 0.0


def test_noise_volume_is_not_trusted_as_a_head():
    rng = np.random.default_rng(1)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1500, size=(40, 96, 96)).astype(np.int16))
    image.SetSpacing((2.5, 2.5, 5.0))
    stack = preprocess(image)
    assert stack.alignment["fell_back"], stack.alignment
    assert stack.warnings


def test_single_slice_volume_and_ctvolume_like_input_are_handled(ge_head):
    class Volume:  # what ctio.CTVolume looks like to preprocess
        image = ge_head[:, :, 20:21]
        warnings = ["loader: single slice"]

    stack = preprocess(Volume())
    assert stack.warnings[0] == "loader: single slice"
    assert stack.slice_valid.sum() <= 2  # one 5 mm slab holds at most two 4 mm slice centres
    assert stack.alignment["fell_back"]
    with pytest.raises(ValueError, match="3D scalar"):
        preprocess(sitk.Image([64, 64], sitk.sitkInt16))


# --- torch implementation: agreement with ITK morphology, determinism -------------------------------------


def test_stack_head_mask_matches_itk_opening_components_and_hole_filling(ge_stack):
    from HeadCTMoLRELib.ct.preprocess import head_mask_slices
    import torch

    window = ge_stack.pixels[:, BONE_WINDOW] * 2800.0 - 800.0  # back to HU (clipped at -800 / 2000)
    hu_stack = np.where(ge_stack.slice_valid[:, None, None], window, -1024.0).astype(np.float32)
    body = sitk.GetImageFromArray((hu_stack > -300).astype(np.uint8))
    opened = sitk.BinaryMorphologicalOpening(body, [2, 2, 0], sitk.sitkBox)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(opened), sortByObjectSize=True) == 1
    reference = np.stack([sitk.GetArrayFromImage(sitk.BinaryFillhole(largest[:, :, k])) > 0
                          for k in range(hu_stack.shape[0])])
    mask = head_mask_slices(torch.from_numpy(hu_stack))
    assert reference.sum() > 100_000
    assert (mask != reference).sum() <= 0.001 * reference.sum(), (mask != reference).sum()


def test_alignment_on_cpu_is_deterministic(ge_head):
    first = align_to_head_frame(ge_head, "template")
    second = align_to_head_frame(ge_head, "template")
    np.testing.assert_array_equal(first.head_to_patient, second.head_to_patient)
    assert first.info == second.info
