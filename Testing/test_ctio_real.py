"""CT input loader on real scanner data: the GE gantry-tilted head CT with uneven spacing lands within
1.5 mm of the dcm2niix reference (a naive SimpleITK series read is shown to be off by far more),
raw CT numbers are flagged, JPEG 2000 / JPEG-LS / RLE decode to the same values, and screenshots,
perfusion maps, MR and DICOMDIR trees are handled with messages that say what they are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from HeadCTMoLRELib.ct.loader import CTInputError, list_dicom_series, load_ct, validation_report
from HeadCTMoLRELib.ct.dicom_series import read_header
from HeadCTMoLRELib.ct.dicom_volume import read_slice_hu

REAL = Path(__file__).resolve().parent / "Data" / "real"
GE_TILT = REAL / "dcm_qa_ct_GE_tilt"
GE_REFERENCE = REAL / "derived" / "GE_head_axial_1x1x5mm.nii.gz"
SLAB_EDGES = (0, 10, 20, 30, 42)  # reference slices grouped into 4 slabs of 5 cm along z


def bone_centroids_mm(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Sample ``image`` on the reference grid; LPS centroid (mm) of skull (> 400 HU) in each z slab, restricted
    to voxels inside both fields of view. Returns (slabs, 3)."""
    sampled = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -3000.0))
    ref = sitk.GetArrayFromImage(reference)
    inside = (ref > -1400) & (sampled > -2500)  # the reference keeps the scanner's -1500 padding
    centroids = []
    for low, high in zip(SLAB_EDGES[:-1], SLAB_EDGES[1:]):
        z, y, x = np.nonzero((sampled > 400) & inside & (np.arange(ref.shape[0]) >= low)[:, None, None]
                             & (np.arange(ref.shape[0]) < high)[:, None, None])
        index = [float(x.mean()), float(y.mean()), float(z.mean())]
        centroids.append(reference.TransformContinuousIndexToPhysicalPoint(index))
    return np.array(centroids)


@pytest.fixture(scope="module")
def ge_reference() -> sitk.Image:
    return sitk.ReadImage(str(GE_REFERENCE), sitk.sitkFloat32)


@pytest.fixture(scope="module")
def ge_volume():
    return load_ct(GE_TILT)


def test_ge_tilted_uneven_series_matches_dcm2niix_reference_within_1_5_mm(ge_volume, ge_reference):
    ours = bone_centroids_mm(ge_volume.image, ge_reference)
    reference = bone_centroids_mm(ge_reference, ge_reference)
    displacement = np.linalg.norm(ours - reference, axis=1)
    assert displacement.max() < 1.5, f"skull centroid displacement per slab (mm): {displacement.round(2)}"


def test_naive_simpleitk_series_read_of_the_ge_series_is_displaced_far_more(ge_reference):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(GE_TILT)))
    reader.GlobalWarningDisplayOff()
    naive = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    displacement = np.linalg.norm(bone_centroids_mm(naive, ge_reference)
                                  - bone_centroids_mm(ge_reference, ge_reference), axis=1)
    assert displacement.max() > 10.0  # so the 1.5 mm criterion above can fail


def test_ge_series_reports_tilt_uneven_spacing_and_padding(ge_volume):
    warnings = " | ".join(ge_volume.warnings)
    assert "gantry tilt 18.5 deg" in warnings
    assert "uneven slice spacing" in warnings and "missing slice" not in warnings  # a deliberate 4/7 mm change
    assert any("PixelPaddingValue" in n for n in ge_volume.notes)
    hu = sitk.GetArrayViewFromImage(ge_volume.image)
    assert hu.min() == -1024.0 and hu.max() > 1500
    assert ge_volume.provenance["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert ge_volume.provenance["convolution_kernel"] == "STD+"
    assert ge_volume.provenance["geometry"]["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.1)
    # orthogonal grid on the image planes: x = IOP row, y = IOP column, z = their normal (not reoriented)
    row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.9483237, -0.3173047])
    expected = np.column_stack([row, column, np.cross(row, column)])
    np.testing.assert_allclose(np.array(ge_volume.direction).reshape(3, 3), expected, atol=1e-5)
    json.dumps(validation_report(GE_TILT))


def test_slicer_head_with_raw_ct_numbers_is_flagged_and_loads_with_an_explicit_offset():
    with pytest.raises(CTInputError, match="slicer_CTHeadAxialDicom: values look like raw CT numbers") as caught:
        load_ct(REAL / "slicer_CTHeadAxialDicom")
    assert "hu_offset=-1024" in str(caught.value)
    volume = load_ct(REAL / "slicer_CTHeadAxialDicom", hu_offset=-1024)
    assert volume.size == (64, 64, 93)
    assert any("hu_offset -1024" in w for w in volume.warnings)


def test_jpeg2000_variants_of_one_head_slice_decode_to_the_same_hu():
    """693_UNCI (uncompressed) and 693_J2KI (JPEG 2000) hold the same pixels; 693_J2KR is a JPEG 2000
    lossless export of the same slice from another instance (values differ by scanner noise only)."""
    hu = {name: read_slice_hu(read_header(REAL / "pydicom" / f"693_{name}.dcm")[0], None)
          for name in ("UNCI", "J2KR", "J2KI")}
    plain = np.maximum(hu["UNCI"][0], -1024)  # as load_ct clamps outside-FOV values to air
    np.testing.assert_array_equal(np.maximum(hu["J2KI"][0], -1024), plain)
    lossless, padded = hu["J2KR"]
    assert padded > 50000 and lossless.min() == -1024.0  # PixelPaddingValue -2000 became air
    brain = (plain > 15) & (plain < 50)
    assert 25 <= np.median(plain[brain]) <= 40
    assert 25 <= np.median(lossless[(lossless > 15) & (lossless < 50)]) <= 40
    assert np.corrcoef(lossless[plain > -500], plain[plain > -500])[0, 1] > 0.9


def test_jpeg_ls_rle_and_jpeg2000_lossless_decode_identically():
    plain, _ = read_slice_hu(read_header(REAL / "pydicom" / "MR_small.dcm")[0], None)
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(read_slice_hu(read_header(REAL / "pydicom" / name)[0], None)[0], plain, name)


def test_j2k_slice_whose_codestream_sign_disagrees_with_the_header_decodes_to_plausible_hu():
    hu, _ = read_slice_hu(read_header(REAL / "pydicom" / "J2K_pixelrep_mismatch.dcm")[0], None)
    assert hu.min() >= -2100 and 1000 < hu.max() < 4000
    assert np.mean((hu > -100) & (hu < 100)) > 0.1  # soft tissue present, not wrapped-around values


@pytest.mark.parametrize("name", ["ctbrain1.dcm", "ctbrain2.dcm"])
def test_header_says_ct_brain_but_pixels_are_an_rgb_secondary_capture_refused(name):
    with pytest.raises(CTInputError, match=f"{name}: Secondary Capture .*colour pixels.*not CT image data"):
        load_ct(REAL / "deid_data" / name)


def test_enhanced_ct_perfusion_map_is_refused_as_derived():
    with pytest.raises(CTInputError, match="eCT_Supplemental.dcm: derived perfusion/rcbf map"):
        load_ct(REAL / "pydicom" / "eCT_Supplemental.dcm")


@pytest.mark.parametrize("name", ["MR_small.dcm", "emri_small.dcm"])
def test_mr_files_are_refused_by_modality(name):
    with pytest.raises(CTInputError, match=f"{name}: Modality is MR; this tool expects non-contrast head CT"):
        load_ct(REAL / "pydicom" / name)


def test_single_ct_slice_is_refused_as_insufficient_coverage():
    with pytest.raises(CTInputError, match="693_UNCI.dcm: only 1 image; insufficient coverage"):
        load_ct(REAL / "pydicom" / "693_UNCI.dcm")


def test_dicomdir_tree_lists_every_series_and_never_treats_the_index_as_an_image():
    tree = REAL / "pydicom" / "dicomdirtests"
    listing = list_dicom_series(tree)
    by_description = {item["description"]: item for item in listing}
    assert by_description["Routine Brain"]["qualifies"] and by_description["Routine Brain"]["n_images"] == 4
    assert by_description["Scout"]["why_not"].startswith("only localizer")
    assert all(not item["qualifies"] for item in listing if item["modality"] in ("MR", "CR"))
    assert sum(item["n_images"] for item in listing) < 60  # DICOMDIR variants are not counted as images
    assert list_dicom_series(tree / "DICOMDIR") == listing
    report = validation_report(tree)  # CT of two patients (77654033, 98890234): listed and refused
    assert report["accepted"] is False and "CT series of 2 different patients" in report["error"]
    assert "Routine Brain" in report["error"] and "--series" in report["error"]
    assert "77654033" not in report["error"]  # patients are numbered, never identified
    chosen = validation_report(tree, series="Routine Brain")  # the user's choice is honoured
    assert chosen["accepted"] is False and "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2" in chosen["error"]
    assert "slices are missing" in chosen["error"]  # 4 slices, 200 mm apart: not a volume
