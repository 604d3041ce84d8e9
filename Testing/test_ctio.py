"""CT input loader: every case of the shared bad-input set behaves as its manifest category says, accepted
geometric variants reproduce the control anatomy in physical (LPS) space, and problems of the same kinds
that the set does not hold (built here from the control) are handled too. Messages are checked for the
file name and the problem, not only the exception type."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, generate_uid

from HeadCTMoLRELib.ct import loader as ctio
from HeadCTMoLRELib.ct.checks import check_grid, orientation_code
from HeadCTMoLRELib.ct.loader import CTInputError, list_dicom_series, load_ct, validation_report

BAD = Path(__file__).resolve().parent / "Data" / "bad"
MANIFEST = json.loads((BAD / "manifest.json").read_text())["cases"]
CONTROL = BAD / "00_good_control_series"
PHILIPS_LOCALIZER = BAD.parent / "real" / "dcm_qa_ct_Philips_scout" / "localizer_I10.dcm"

# What this loader does with each case: ("accept", max clipped mean |HU difference| to the control inside
# the head, phrase that must appear in warnings+notes or None), ("warn", ...), or ("refuse", phrase).
# hu_offset cases are loaded a second time with hu_offset=-1024 and must then match the control.
BEHAVIOUR = {
    "00_good_control_series": ("accept", 1e-6, None),
    "01_nifti_truncated.nii.gz": ("refuse", "file is truncated or corrupt"),
    "02_nifti_truncated_uncompressed.nii": ("refuse", "data shorter than header dims"),
    "04_nifti_zero_dim.nii.gz": ("refuse", "empty image (a dimension is 0"),
    "05_nifti_2d.nii.gz": ("refuse", "2D image; a 3D head CT volume is required"),
    "05b_nifti_single_slice_3d.nii.gz": ("refuse", "only 1 slice"),
    "06_nifti_4d.nii.gz": ("refuse", "4D image (3 volumes); select one volume"),
    "07_nifti_huge_spacing.nii.gz": ("refuse", "implausible voxel spacing 100x100x500 mm (head would be 6.4 m wide"),
    "08_nifti_sagittal.nii.gz": ("accept", 10.0, None),
    "08b_dicom_sagittal_series": ("accept", 10.0, None),
    "09_dicom_gantry_tilt_iop": ("warn", 25.0, "gantry tilt 18.5 deg"),
    "10_dicom_missing_slice": ("warn", 6.0, "gap of 10.0 mm between IM0009.dcm and IM0011.dcm"),
    "11b_dicom_duplicate_file_copy": ("accept", 5.0, "IM0007_copy.dcm"),
    "12_dicom_mixed_series": ("warn", 5.0, "chose"),
    "13_dicom_mr_series": ("refuse", "Modality is MR; this tool expects non-contrast head CT"),
    "14_dicom_ct_no_rescale": ("refuse", "without RescaleSlope/RescaleIntercept"),
    "16_dicomdir": ("accept", 5.0, "DICOMDIR"),
    "17_junk_dcm": ("refuse", "no DICOM images found in"),
    "18_dicom_wrong_units": ("refuse", "raw CT numbers"),
    "18b_nifti_wrong_units.nii.gz": ("refuse", "raw CT numbers"),
    "20_dicom_reversed_order": ("accept", 5.0, None),
    "22_dicom_inconsistent_dims": ("refuse", "slices have different Rows/Columns"),
    "23_dicom_no_pixel_data": ("refuse", "DICOM files contain no pixel data"),
    "24_dicom_rle_series": ("accept", 5.0, None),
    "25_dicom_too_few_slices": ("refuse", "insufficient z coverage (15 mm"),
    "27_nifti_no_orientation.nii.gz": ("warn", None, "left/right cannot be trusted"),
    "29_dicom_pixel_padding": ("accept", 5.0, "padding"),
}
ALLOWED = {"accept": {"accept"}, "accept-with-filter": {"accept"}, "accept-with-correction": {"warn", "refuse"},
           "ask-or-pick": {"accept", "warn"}, "warn": {"warn", "refuse"}, "reject-or-warn": {"warn", "refuse"},
           "reject": {"refuse"}}
HU_OFFSET_CASES = ["14_dicom_ct_no_rescale", "18_dicom_wrong_units", "18b_nifti_wrong_units.nii.gz"]


@pytest.fixture(scope="module")
def control() -> sitk.Image:
    return load_ct(CONTROL).image


def clipped_difference_in_head(image: sitk.Image, reference: sitk.Image) -> tuple[float, float]:
    """Sample ``image`` at the voxel centres (LPS) of ``reference``; return the mean |difference| of HU clipped
    to [-100, 200] over the reference's head (> -500 HU) and the fraction of the head that ``image`` covers."""
    sampled = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, np.nan))
    ref = sitk.GetArrayFromImage(reference)
    head = (ref > -500) & np.isfinite(sampled)
    diff = np.abs(np.clip(sampled[head], -100, 200) - np.clip(ref[head], -100, 200))
    return float(diff.mean()), float(head.sum() / (ref > -500).sum())


def test_behaviour_table_covers_every_manifest_case_and_respects_its_category():
    assert set(BEHAVIOUR) == {case["id"] for case in MANIFEST}
    for case in MANIFEST:
        assert BEHAVIOUR[case["id"]][0] in ALLOWED[case["category"]], case["id"]


@pytest.mark.parametrize("case", MANIFEST, ids=[c["id"] for c in MANIFEST])
def test_bad_input_case_behaves_as_its_category_says(case, control):
    source = BAD / case["id"]
    expected = BEHAVIOUR[case["id"]]
    if expected[0] == "refuse":
        with pytest.raises(CTInputError) as caught:
            load_ct(source)
        message = str(caught.value)
        assert expected[1] in message
        assert case["id"] in message  # names the file or folder
        report = validation_report(source)
        assert report["accepted"] is False and expected[1] in report["error"]
        json.dumps(report)
        return
    kind, tolerance, phrase = expected
    volume = load_ct(source)
    assert volume.image.GetDimension() == 3
    assert volume.image.GetPixelID() == sitk.sitkFloat32
    assert float(sitk.GetArrayViewFromImage(volume.image).min()) >= -1024.0
    messages = " | ".join(volume.warnings + volume.notes)
    assert "partial head coverage" not in messages  # every variant covers the control's 100 mm
    if phrase:
        assert phrase in messages
    if kind == "warn":
        assert phrase in " | ".join(volume.warnings)
    else:
        assert not volume.warnings, volume.warnings
    if tolerance is not None:
        difference, coverage = clipped_difference_in_head(volume.image, control)
        assert coverage > 0.6
        assert difference <= tolerance, f"{case['id']}: mean |dHU| {difference:.2f} in the head"


@pytest.mark.parametrize("case_id", HU_OFFSET_CASES)
def test_explicit_hu_offset_fixes_raw_ct_numbers_and_is_reported(case_id, control):
    volume = load_ct(BAD / case_id, hu_offset=-1024)
    assert any("hu_offset -1024" in w for w in volume.warnings)
    difference, _ = clipped_difference_in_head(volume.image, control)
    assert difference < 5.0


def test_raw_ct_number_refusal_says_how_to_fix_it():
    with pytest.raises(CTInputError, match=r"hu_offset=-1024 \(command line: --hu-offset -1024\)"):
        load_ct(BAD / "18_dicom_wrong_units")


def test_control_series_geometry_and_hu_are_exact():
    volume = load_ct(CONTROL)
    assert volume.size == (64, 64, 20)
    np.testing.assert_allclose(volume.spacing_mm, (3.6, 3.6, 5.0), atol=1e-6)
    np.testing.assert_allclose(volume.direction, np.eye(3).ravel(), atol=1e-9)
    first = pydicom.dcmread(CONTROL / "IM0001.dcm")
    positions = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in CONTROL.glob("*.dcm"))
    np.testing.assert_allclose(volume.origin_mm, [float(x) for x in first.ImagePositionPatient[:2]] + [positions[0]])
    index_slice = int(np.argmin(np.abs(np.array(positions) - float(first.ImagePositionPatient[2]))))
    hu = sitk.GetArrayViewFromImage(volume.image)[index_slice]
    expected = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(hu, np.maximum(expected, -1024).astype(np.float32))
    brain = hu[(hu > 15) & (hu < 50)]
    assert 25 <= np.median(brain) <= 40


def test_validation_report_is_json_and_describes_geometry():
    report = validation_report(BAD / "08b_dicom_sagittal_series")
    json.dumps(report)
    assert report["accepted"] is True and report["error"] is None
    assert report["orientation"] == "PIR"
    assert report["provenance"]["format"] == "dicom" and report["provenance"]["n_files"] == 40
    assert report["coverage_mm"]["SI"] >= 90
    assert set(report["hu_percentiles"]) == {"p1", "p5", "p25", "p50", "p75", "p95", "p99"}
    assert validation_report(CONTROL)["orientation"] == "LPS"
    assert "PatientName" not in json.dumps(report) and "PatientID" not in json.dumps(report)


def test_thin_tilted_stack_is_refused_for_coverage_despite_a_wide_tilted_plane():
    tilt = np.deg2rad(20)
    row, column = np.array([1.0, 0, 0]), np.array([0, np.cos(tilt), -np.sin(tilt)])
    direction = np.column_stack([row, column, np.cross(row, column)]).ravel()
    with pytest.raises(CTInputError, match="insufficient z coverage \\(16 mm"):
        check_grid("tilted", (512, 512, 3), (0.5, 0.5, 5.0), direction)


def test_orientation_code_names_the_direction_each_axis_points_to():
    assert orientation_code(np.eye(3).ravel()) == "LPS"
    assert orientation_code(np.diag([-1.0, -1.0, 1.0]).ravel()) == "RAS"


def test_mixed_series_are_listed_and_an_explicit_series_is_honoured():
    listing = list_dicom_series(BAD / "12_dicom_mixed_series")
    assert len(listing) == 2 and all(item["qualifies"] for item in listing)
    bone = next(item for item in listing if item["kernel"] == "H70h")
    assert bone["n_images"] == 40 and bone["slice_spacing_mm"] == pytest.approx(2.5)
    default = load_ct(BAD / "12_dicom_mixed_series")
    assert default.provenance["convolution_kernel"] == "H31s" and default.size[2] == 20
    assert [s["uid"] for s in default.provenance["other_series"]] == [bone["uid"]]
    chosen = load_ct(BAD / "12_dicom_mixed_series", series=bone["uid"])
    assert chosen.size[2] == 40 and chosen.provenance["series_instance_uid"] == bone["uid"]
    with pytest.raises(CTInputError, match="series '1.2.3.4' not found"):
        load_ct(BAD / "12_dicom_mixed_series", series="1.2.3.4")


def test_list_of_dicom_files_loads_like_the_folder(control):
    files = sorted(CONTROL.glob("*.dcm"), reverse=True)
    volume = load_ct(files)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(control))


# ---------------------------------------------------------------- problems built here from the control

def _copy_control(tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    shutil.copytree(CONTROL, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def test_two_different_images_at_one_position_are_refused_with_both_file_names(tmp_path):
    folder = _copy_control(tmp_path)
    ds = pydicom.dcmread(folder / "IM0005.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(folder / "IM0005_other.dcm")
    with pytest.raises(CTInputError, match="two different images at the same position") as caught:
        load_ct(folder)
    assert "IM0005.dcm" in str(caught.value) and "IM0005_other.dcm" in str(caught.value)


def test_dicom_with_truncated_pixel_data_is_refused_naming_the_file(tmp_path):
    folder = _copy_control(tmp_path)
    data = (folder / "IM0005.dcm").read_bytes()
    (folder / "IM0005.dcm").write_bytes(data[:-3000])
    with pytest.raises(CTInputError, match="IM0005.dcm: cannot decode the pixel data"):
        load_ct(folder)


def test_series_mixing_orientations_is_split_and_the_axial_part_chosen_with_warnings(tmp_path):
    folder = _copy_control(tmp_path)
    tilted = ("IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm", "IM0005.dcm", "IM0006.dcm",
              "IM0007.dcm", "IM0008.dcm", "IM0009.dcm", "IM0010.dcm")
    for name in tilted:
        ds = pydicom.dcmread(folder / name)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
        ds.save_as(folder / name)
    listing = list_dicom_series(folder)
    assert len(listing) == 2 and {item["n_images"] for item in listing} == {10}
    assert all("orientation" in item["part"] for item in listing)
    volume = load_ct(folder)
    assert volume.size[2] == 10
    np.testing.assert_allclose(volume.direction, np.eye(3).ravel(), atol=1e-9)  # the axial half
    warnings = " | ".join(volume.warnings)
    assert "2 candidate volumes found; chose" in warnings and "not axial" in warnings


def test_gap_beyond_threshold_is_refused_naming_the_neighbouring_files(tmp_path):
    folder = _copy_control(tmp_path)
    (folder / "IM0010.dcm").unlink()
    (folder / "IM0011.dcm").unlink()
    with pytest.raises(CTInputError, match=r"gap of 15.0 mm between IM0009.dcm and IM0012.dcm"):
        load_ct(folder)


def test_localizer_inside_the_series_is_dropped_with_a_note(tmp_path, control):
    folder = _copy_control(tmp_path)
    scout = pydicom.dcmread(PHILIPS_LOCALIZER)
    scout.SeriesInstanceUID = pydicom.dcmread(folder / "IM0001.dcm").SeriesInstanceUID
    scout.save_as(folder / "scout.dcm")
    volume = load_ct(folder)
    assert volume.size == (64, 64, 20)
    assert any("localizer" in n and "scout.dcm" in n for n in volume.notes)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(control))


def test_localizer_series_and_junk_next_to_a_good_series_are_skipped(tmp_path):
    folder = _copy_control(tmp_path)
    shutil.copy(PHILIPS_LOCALIZER, folder / "scout.dcm")
    (folder / "notes.txt").write_text("not an image")
    volume = load_ct(folder)
    assert volume.size == (64, 64, 20)
    assert any("not DICOM" in n and "notes.txt" in n for n in volume.notes)
    others = volume.provenance["other_series"]
    assert len(others) == 1 and "localizer" in others[0]["why_not"]


def test_empty_folder_says_no_dicom_images_found(tmp_path):
    with pytest.raises(CTInputError, match=f"no DICOM images found in {tmp_path}"):
        load_ct(tmp_path)


def test_jpeg2000_compressed_series_decodes_to_the_control_hu(tmp_path, control):
    folder = _copy_control(tmp_path)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path)
    volume = load_ct(folder)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(control))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_volume_file_formats_round_trip_the_control(tmp_path, control, suffix):
    path = tmp_path / f"control{suffix}"
    sitk.WriteImage(sitk.Cast(control, sitk.sitkInt16), str(path), useCompression=suffix != ".mha")
    volume = load_ct(path)
    assert volume.provenance["format"] == {".nrrd": "nrrd", ".mha": "mha", ".nii.gz": "nifti"}[suffix]
    np.testing.assert_allclose(volume.origin_mm, control.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(control))


@pytest.mark.parametrize("suffix,compress", [(".mha", False), (".mha", True), (".nrrd", True), (".nrrd", False)])
def test_truncated_nrrd_and_metaimage_are_refused_not_zero_filled(tmp_path, control, suffix, compress):
    path = tmp_path / f"control{suffix}"
    sitk.WriteImage(sitk.Cast(control, sitk.sitkInt16), str(path), useCompression=compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CTInputError, match="truncated or corrupt") as caught:
        load_ct(path)
    assert path.name in str(caught.value)


def _nifti_bytes(control: sitk.Image, tmp_path: Path) -> bytearray:
    path = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.Cast(control, sitk.sitkInt16), str(path))
    return bytearray(path.read_bytes())


def test_nifti_header_claiming_terabytes_is_refused_before_allocating(tmp_path, control):
    data = _nifti_bytes(control, tmp_path)
    data[42:48] = np.array([32000, 32000, 32000], dtype="<i2").tobytes()  # dim[1..3]
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    started = time.perf_counter()
    with pytest.raises(CTInputError, match="huge.nii.gz: header claims 32000x32000x32000 voxels"):
        load_ct(path)
    assert time.perf_counter() - started < 2.0


def test_nifti_zero_spacing_is_refused(tmp_path, control):
    data = _nifti_bytes(control, tmp_path)
    data[88:92] = np.array([0.0], dtype="<f4").tobytes()  # pixdim[3]
    path = tmp_path / "zero_spacing.nii"
    path.write_bytes(bytes(data))
    with pytest.raises(CTInputError, match="zero_spacing.nii: zero or negative voxel spacing"):
        load_ct(path)


def _write_like(control: sitk.Image, array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(control)
    sitk.WriteImage(image, str(path))
    return path


def test_4d_file_holding_one_volume_loads_as_3d(tmp_path, control):
    array = sitk.GetArrayFromImage(control)[None]  # t, z, y, x with t = 1
    image = sitk.JoinSeries([control])
    path = tmp_path / "one_volume.nii.gz"
    sitk.WriteImage(image, str(path))
    volume = load_ct(path)
    assert volume.image.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), array[0])


def test_nan_voxels_in_a_nrrd_become_air_with_a_warning_giving_their_count(tmp_path, control):
    hu = sitk.GetArrayFromImage(control)
    hu[10, 30, 30] = np.nan
    hu[11, 30, 30] = np.inf
    volume = load_ct(_write_like(control, hu, tmp_path / "nan.nrrd"))
    assert any("nan.nrrd: 2 voxels are NaN or infinite" in w and "set to air" in w for w in volume.warnings)
    fixed = sitk.GetArrayViewFromImage(volume.image)
    assert fixed[10, 30, 30] == -1024.0 and fixed[11, 30, 30] == -1024.0 and np.isfinite(fixed).all()


def test_mostly_nan_volume_is_refused(tmp_path, control):
    hu = sitk.GetArrayFromImage(control)
    hu[:15] = np.nan
    with pytest.raises(CTInputError, match="mostly_nan.mha: .* voxels are NaN or infinite; the volume is corrupt"):
        load_ct(_write_like(control, hu, tmp_path / "mostly_nan.mha"))


def test_windowed_8bit_data_are_refused(tmp_path, control):
    hu = sitk.GetArrayFromImage(control)
    windowed = (np.clip((hu - 0) / 80, 0, 1) * 255).round().astype(np.uint8)
    with pytest.raises(CTInputError, match="windowed.nii.gz: values 0..255 look like windowed 8-bit display data"):
        load_ct(_write_like(control, windowed, tmp_path / "windowed.nii.gz"))


def test_mr_like_intensities_in_a_nifti_are_refused(tmp_path, control):
    hu = sitk.GetArrayFromImage(control)
    mr_like = np.clip((hu + 1000) * 0.3, 0, 900).astype(np.int16)  # T1-like 0..~750: no air, no soft tissue in HU
    with pytest.raises(CTInputError, match="mr.nii.gz: .*do not look like head CT Hounsfield units"):
        load_ct(_write_like(control, mr_like, tmp_path / "mr.nii.gz"))


def test_outside_fov_padding_in_a_volume_file_becomes_air(tmp_path, control):
    hu = sitk.GetArrayFromImage(control)
    hu[:, :4, :] = -3024
    volume = load_ct(_write_like(control, hu.astype(np.int16), tmp_path / "padded.nrrd"))
    assert float(sitk.GetArrayViewFromImage(volume.image).min()) == -1024.0
    assert any("set to air" in n for n in volume.notes)


def test_missing_file_is_reported_by_name(tmp_path):
    with pytest.raises(CTInputError, match="nothing.nii.gz: no such file or folder"):
        load_ct(tmp_path / "nothing.nii.gz")


def test_ctio_exports_the_contract_names():
    assert issubclass(ctio.CTInputError, ValueError)
    for name in ("CTVolume", "load_ct", "list_dicom_series", "validation_report"):
        assert hasattr(ctio, name)


def test_nifti_gz_of_two_gzip_members_falls_back_to_the_full_check(tmp_path, control):
    data = bytes(_nifti_bytes(control, tmp_path))
    complete, cut = tmp_path / "two_members.nii.gz", tmp_path / "two_members_cut.nii.gz"
    complete.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))  # trailer counts member 2 only
    assert load_ct(complete).size == control.GetSize()
    cut.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:-5000]))  # complete stream, short data
    with pytest.raises(CTInputError, match="two_members_cut.nii.gz: file is truncated or corrupt"):
        load_ct(cut)
