"""Exports hospitals really make (issue 11): NIfTI by the standard (qform/sform precedence with a known
lateral marker, scl_slope 0, units, NaN payload, .hdr/.img), NRRD/MHA without space or with a sheared
grid, and DICOM folders that are not one volume (two acquisitions in one series, NCCT + CTA, two
patients), valid variants (no preamble, float-rounded spacing, orientation jitter, Enhanced CT
multi-frame), contrast / lossy / RescaleType. Every case is generated here (32 x 32 pixels, 20 slices)
and checked against geometry computed by hand from the headers (pydicom + numpy)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from HeadCTMoLRELib.ct.loader import CTInputError, list_dicom_series, load_ct

N, SLICES, PIXEL_MM, STEP_MM = 32, 20, 7.0, 5.0
ORIGIN = np.array([-108.5, -108.5, 0.0])  # LPS of the first pixel of the first slice


def head_hu(z: int) -> np.ndarray:
    """(rows, columns) HU of slice z: air, skull ring, brain, and a bright blob on the patient's LEFT
    (high column index: the rows of an axial LPS image run toward +x = left)."""
    y, x = np.mgrid[:N, :N]
    r = np.hypot((x - 15.5) / 13, (y - 15.5) / 14)
    hu = np.where(r < 1.0, 1000.0, -1000.0)
    hu[r < 0.85] = 30.0 + z  # brain, varying with z so slices can be told apart
    hu[20:24, 21:25] = 600.0  # the LEFT marker
    return hu


def volume_hu() -> np.ndarray:
    return np.stack([head_hu(z) for z in range(SLICES)]).astype(np.float32)  # (z, y, x)


def ct_dataset(sop_class: str, patient: str) -> Dataset:
    """An empty CT instance of ``sop_class`` with file meta (explicit VR little endian) and a patient."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "CT", patient, patient
    return ds


def ct_slice(z: int, *, series_uid: str, study_uid: str, frame_uid: str, patient: str = "P1",
             orientation=(1, 0, 0, 0, 1, 0), position=None, acquisition: int = 1, description: str = "HEAD NCCT",
             spacing=(PIXEL_MM, PIXEL_MM), hu: np.ndarray | None = None) -> Dataset:
    ds = ct_dataset("1.2.840.10008.5.1.4.1.1.2", patient)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.SeriesDescription, ds.ConvolutionKernel, ds.ImageType = description, "H31s", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber, ds.InstanceNumber = acquisition, z + 1
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in (ORIGIN + [0, 0, STEP_MM * z] if position is None else position)]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.Rows = ds.Columns = N
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = ((head_hu(z) if hu is None else hu) + 1024).astype(np.uint16).tobytes()
    return ds


def write_series(folder: Path, **kwargs) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"series_uid": generate_uid(), "study_uid": generate_uid(), "frame_uid": generate_uid()}
    uids.update(kwargs.pop("uids", {}))
    paths = []
    for z in range(SLICES):
        path = folder / f"{kwargs.get('description', 'NCCT').split()[0]}_{uids['series_uid'][-6:]}_{z:03d}.dcm"
        ct_slice(z, **uids, **kwargs).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def marker_lps(volume) -> np.ndarray:
    """LPS centroid (mm) of the marker (HU 500..700)."""
    hu = sitk.GetArrayViewFromImage(volume.image)
    z, y, x = np.nonzero((hu > 500) & (hu < 700))
    return np.array(volume.image.TransformContinuousIndexToPhysicalPoint([x.mean(), y.mean(), z.mean()]))


def head_centre_lps(volume) -> np.ndarray:
    hu = sitk.GetArrayViewFromImage(volume.image)
    z, y, x = np.nonzero(hu > -500)
    return np.array(volume.image.TransformContinuousIndexToPhysicalPoint([x.mean(), y.mean(), z.mean()]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The plain single-frame series: the geometry every other export must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    write_series(folder)
    return load_ct(folder)


def test_reference_geometry_matches_the_headers_by_hand(reference):
    assert reference.size == (N, N, SLICES)
    np.testing.assert_allclose(reference.origin_mm, ORIGIN)
    np.testing.assert_allclose(reference.spacing_mm, (PIXEL_MM, PIXEL_MM, STEP_MM))
    assert marker_lps(reference)[0] > head_centre_lps(reference)[0] + 20  # LPS +x is the patient's left
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(reference.image), np.maximum(volume_hu(), -1024))


# ---------------------------------------------------------------- NIfTI by the standard

def nifti_bytes(data: np.ndarray, *, sform=None, qform=None, qfac=1.0, pixdim=(PIXEL_MM, PIXEL_MM, STEP_MM),
                slope=1.0, inter=0.0, units=2, datatype=4, magic=b"n+1\0", vox_offset=352) -> bytes:
    """A NIfTI-1 file written field by field. data: (z, y, x); sform: (3, 4) rows or None;
    qform: (b, c, d, qx, qy, qz) or None."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, data.shape[2], data.shape[1], data.shape[0], 1, 1, 1, 1)
    bitpix = {4: 16, 16: 32, 2: 8}[datatype]
    struct.pack_into("<2h", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, qfac, *pixdim, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, vox_offset)
    struct.pack_into("<2f", header, 112, slope, inter)
    header[123] = units
    struct.pack_into("<2h", header, 252, 1 if qform is not None else 0, 1 if sform is not None else 0)
    if qform is not None:
        struct.pack_into("<6f", header, 256, *qform)
    if sform is not None:
        struct.pack_into("<12f", header, 280, *np.asarray(sform, float).ravel())
    header[344:348] = magic
    dtype = {4: "<i2", 16: "<f4", 2: "u1"}[datatype]
    payload = np.ascontiguousarray(data).astype(dtype).tobytes()
    return bytes(header) + b"\0" * (vox_offset - 348) + payload if vox_offset else bytes(header) + payload


# voxel i runs toward the patient's LEFT (RAS -x), j toward posterior (RAS -y): RAS affine by hand
TRUE_SFORM = np.array([[-PIXEL_MM, 0, 0, 108.5], [0, -PIXEL_MM, 0, 108.5], [0, 0, STEP_MM, 0.0]])


def test_qform_sform_disagreement_uses_the_sform_and_keeps_the_left_marker_left(tmp_path):
    path = tmp_path / "disagree.nii"
    # qform: identity rotation, i toward RAS +x = the patient's RIGHT (a mirror of the truth)
    path.write_bytes(nifti_bytes(volume_hu(), sform=TRUE_SFORM, qform=(0, 0, 0, -108.5, -108.5, 0)))
    volume = load_ct(path)
    assert any("qform and sform disagree" in w and "used the sform" in w and "left-right" in w
               for w in volume.warnings)
    np.testing.assert_allclose(volume.origin_mm, ORIGIN, atol=1e-4)  # LPS = RAS with x, y negated
    np.testing.assert_allclose(volume.direction, np.eye(3).ravel(), atol=1e-6)
    assert marker_lps(volume)[0] > head_centre_lps(volume)[0] + 20  # on the LEFT
    assert volume.provenance["nifti"]["geometry_from"] == "sform"


def test_qform_alone_is_used_by_its_quaternion(tmp_path):
    path = tmp_path / "qform.nii"
    # quaternion (b, c, d) = (0, 0, 1): 180 deg about z, R = diag(-1, -1, 1) in RAS -> identity in LPS
    path.write_bytes(nifti_bytes(volume_hu(), qform=(0, 0, 1, 108.5, 108.5, 0)))
    volume = load_ct(path)
    assert not volume.warnings
    np.testing.assert_allclose(volume.direction, np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_allclose(volume.origin_mm, ORIGIN, atol=1e-4)
    assert marker_lps(volume)[0] > head_centre_lps(volume)[0] + 20


def test_qfac_minus_one_flips_the_slice_axis(tmp_path, reference):
    path = tmp_path / "qfac.nii"
    flipped = volume_hu()[::-1]
    path.write_bytes(nifti_bytes(flipped, qform=(0, 0, 1, 108.5, 108.5, STEP_MM * (SLICES - 1)), qfac=-1.0))
    volume = load_ct(path)
    resampled = sitk.Resample(volume.image, reference.image, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(resampled), sitk.GetArrayViewFromImage(reference.image))


def test_scl_slope_zero_means_no_scaling_and_units_in_metres_are_honoured(tmp_path, reference):
    path = tmp_path / "metres.nii"
    path.write_bytes(nifti_bytes(volume_hu(), sform=TRUE_SFORM / 1000.0, pixdim=(0.007, 0.007, 0.005),
                                 slope=0.0, inter=500.0, units=1))
    volume = load_ct(path)
    np.testing.assert_allclose(volume.spacing_mm, (PIXEL_MM, PIXEL_MM, STEP_MM), rtol=1e-5)
    np.testing.assert_allclose(volume.origin_mm, ORIGIN, atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image),
                                  sitk.GetArrayViewFromImage(reference.image))  # slope 0: intercept ignored


@pytest.mark.parametrize("slope,inter", [(float("nan"), 0.0), (float("inf"), 0.0), (1.0, float("nan"))])
def test_non_finite_scaling_is_refused(tmp_path, slope, inter):
    path = tmp_path / "bad_scaling.nii"
    path.write_bytes(nifti_bytes(volume_hu(), sform=TRUE_SFORM, slope=slope, inter=inter))
    with pytest.raises(CTInputError, match="bad_scaling.nii: the value scaling is not a number"):
        load_ct(path)


def test_nan_voxels_in_the_payload_become_air_with_their_count(tmp_path):
    data = volume_hu()
    data[5, 10, 10:13] = np.nan
    path = tmp_path / "nan.nii.gz"
    import gzip

    path.write_bytes(gzip.compress(nifti_bytes(data, sform=TRUE_SFORM, datatype=16)))
    volume = load_ct(path)
    assert any("nan.nii.gz: 3 voxels are NaN or infinite" in w for w in volume.warnings)
    assert sitk.GetArrayViewFromImage(volume.image)[5, 10, 11] == -1024.0


def test_compression_is_detected_by_content_and_hdr_img_pairs_load(tmp_path, reference):
    data = nifti_bytes(volume_hu(), sform=TRUE_SFORM)
    misnamed = tmp_path / "not_really.nii.gz"  # plain bytes under a .gz name
    misnamed.write_bytes(data)
    header = bytearray(nifti_bytes(volume_hu(), sform=TRUE_SFORM, magic=b"ni1\0", vox_offset=0)[:348])
    (tmp_path / "pair.hdr").write_bytes(bytes(header))
    (tmp_path / "pair.img").write_bytes(volume_hu().astype("<i2").tobytes())
    for source in (misnamed, tmp_path / "pair.hdr", tmp_path / "pair.img"):
        volume = load_ct(source)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image),
                                      sitk.GetArrayViewFromImage(reference.image))
    (tmp_path / "pair.img").unlink()
    with pytest.raises(CTInputError, match="pair.hdr: the image file of this .hdr/.img pair") as caught:
        load_ct(tmp_path / "pair.hdr")
    assert "no DICOM" not in str(caught.value)


def nifti2_bytes(data: np.ndarray, sform: np.ndarray, endian: str = "<") -> bytes:
    """A NIfTI-2 file written field by field (540-byte header, 64-bit dims and float64 geometry)."""
    header = bytearray(544)
    struct.pack_into(endian + "i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into(endian + "2h", header, 12, 4, 16)
    struct.pack_into(endian + "8q", header, 16, 3, data.shape[2], data.shape[1], data.shape[0], 1, 1, 1, 1)
    struct.pack_into(endian + "8d", header, 104, 1.0, PIXEL_MM, PIXEL_MM, STEP_MM, 1, 1, 1, 1)
    struct.pack_into(endian + "q", header, 168, 544)
    struct.pack_into(endian + "2d", header, 176, 1.0, 0.0)
    struct.pack_into(endian + "2i", header, 344, 0, 2)
    struct.pack_into(endian + "12d", header, 400, *np.asarray(sform, float).ravel())
    struct.pack_into(endian + "i", header, 500, 2)
    return bytes(header) + np.ascontiguousarray(data).astype(endian + "i2").tobytes()


@pytest.mark.parametrize("endian", ["<", ">"])
def test_nifti2_in_either_byte_order_reads_like_the_reference(tmp_path, reference, endian):
    path = tmp_path / "two.nii"
    path.write_bytes(nifti2_bytes(volume_hu(), TRUE_SFORM, endian))
    volume = load_ct(path)
    assert volume.provenance["nifti"]["version"] == 2 and not volume.warnings
    np.testing.assert_allclose(volume.origin_mm, ORIGIN, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(reference.image))


def test_a_picture_is_named_as_a_picture(tmp_path):
    path = tmp_path / "screenshot.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(CTInputError, match="screenshot.png: this is a PNG picture, not a CT volume"):
        load_ct(path)


# ---------------------------------------------------------------- NRRD / MHA

def _reference_file(reference, path: Path) -> Path:
    sitk.WriteImage(sitk.Cast(reference.image, sitk.sitkInt16), str(path))
    return path


def test_nrrd_and_mha_without_space_information_warn_orientation_unknown(tmp_path, reference):
    nrrd = _reference_file(reference, tmp_path / "spaced.nrrd")
    lines = [line for line in nrrd.read_bytes().split(b"\n\n", 1)[0].split(b"\n")
             if not line.startswith((b"space", b"space origin"))]
    body = nrrd.read_bytes().split(b"\n\n", 1)[1]
    spaceless = tmp_path / "spaceless.nrrd"
    spaceless.write_bytes(b"\n".join(lines + [b"spacings: 7 7 5"]) + b"\n\n" + body)
    mha = _reference_file(reference, tmp_path / "plain.mha")
    text = mha.read_bytes()
    bare = tmp_path / "bare.mha"
    bare.write_bytes(b"".join(line for line in text.splitlines(keepends=True)
                              if not line.startswith((b"TransformMatrix", b"Offset", b"CenterOfRotation",
                                                      b"AnatomicalOrientation")) or b"ElementDataFile" in line))
    for path in (spaceless, bare):
        volume = load_ct(path)
        assert any(f"{path.name}: no orientation in the header: the orientation is unknown" in w
                   for w in volume.warnings)
    assert not load_ct(nrrd).warnings


def test_sheared_nrrd_is_resampled_onto_an_orthogonal_grid(tmp_path, reference):
    tilt = np.deg2rad(15)
    image = sitk.Cast(reference.image, sitk.sitkInt16)
    # slices step along (0, sin, cos): a gantry tilt written into the direction matrix, not corrected
    image.SetDirection((1, 0, 0, 0, 1, float(np.sin(tilt)), 0, 0, float(np.cos(tilt))))
    path = tmp_path / "sheared.nrrd"
    sitk.WriteImage(image, str(path))
    volume = load_ct(path)
    assert any("sheared grid" in w and "15.0 deg" in w for w in volume.warnings)
    matrix = np.array(volume.direction).reshape(3, 3)
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(3), atol=1e-9)
    # the true physical position of the last slice's centre is kept: compare with the sheared grid by hand
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([15.5, 15.5, SLICES - 1]))
    index = volume.image.TransformPhysicalPointToContinuousIndex(centre.tolist())
    assert abs(index[2] - round(index[2])) < 1e-3 and -0.5 < index[2] < volume.size[2] - 0.5


# ---------------------------------------------------------------- DICOM: what is not one volume

def test_two_acquisitions_in_one_series_are_split_not_interleaved(tmp_path, reference):
    uids = {"series_uid": generate_uid(), "study_uid": generate_uid(), "frame_uid": generate_uid()}
    write_series(tmp_path, uids=uids, acquisition=1)
    for z in range(SLICES):  # acquisition 2: the same head 2.5 mm further, brighter brain
        ds = ct_slice(z, **uids, acquisition=2, position=ORIGIN + [0, 0, STEP_MM * z + 2.5], hu=head_hu(z) + 5)
        ds.save_as(tmp_path / f"acq2_{z:03d}.dcm", enforce_file_format=True)
    listing = list_dicom_series(tmp_path)
    assert sorted(item["part"] for item in listing) == ["acquisition 1", "acquisition 2"]
    volume = load_ct(tmp_path)
    assert volume.size[2] == SLICES  # not 40 interleaved slices
    warnings = " | ".join(volume.warnings)
    assert "skipped series" in warnings and "acquisition 2" in warnings
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(reference.image))
    second = load_ct(tmp_path, series=uids["series_uid"] + "#2")
    np.testing.assert_allclose(second.origin_mm, ORIGIN + [0, 0, 2.5])


def test_ncct_is_preferred_over_a_cta_of_the_same_study_and_a_used_cta_is_flagged(tmp_path):
    common = {"study_uid": generate_uid(), "frame_uid": generate_uid()}
    ncct_uid, cta_uid = generate_uid(), generate_uid()
    write_series(tmp_path, uids=dict(common, series_uid=ncct_uid), description="HEAD 5mm")
    cta = write_series(tmp_path, uids=dict(common, series_uid=cta_uid), description="CTA HEAD NECK")
    for path in cta:  # the CTA would win on every other rule: more images would not matter, same kernel
        ds = pydicom.dcmread(path)
        ds.ContrastBolusAgent = "Omnipaque 350"
        ds.save_as(path)
    volume = load_ct(tmp_path)
    assert volume.provenance["series_instance_uid"] == ncct_uid
    assert any(f"skipped series {cta_uid}" in w and "ContrastBolusAgent 'Omnipaque 350'" in w for w in volume.warnings)
    assert not any("contrast-enhanced or angiography series" in w for w in volume.warnings)
    forced = load_ct(tmp_path, series=cta_uid)
    assert any("contrast-enhanced or angiography series" in w and "expects non-contrast" in w
               for w in forced.warnings)


def test_description_alone_marks_angiography_but_not_a_without_contrast_head(tmp_path):
    write_series(tmp_path / "a", description="CT HEAD W/O CONTRAST")
    write_series(tmp_path / "b", description="CT ANGIO COW")
    assert not any("contrast" in w for w in load_ct(tmp_path / "a").warnings)
    assert any("contrast-enhanced" in w and "ANGIO" in w for w in load_ct(tmp_path / "b").warnings)


def test_two_patients_in_one_folder_are_listed_and_refused_unless_chosen(tmp_path):
    write_series(tmp_path, patient="ALICE")
    other = generate_uid()
    write_series(tmp_path, patient="BOB", uids={"series_uid": other})
    with pytest.raises(CTInputError, match="CT series of 2 different patients") as caught:
        load_ct(tmp_path)
    assert "ALICE" not in str(caught.value) and other in str(caught.value) and "--series" in str(caught.value)
    assert load_ct(tmp_path, series=other).provenance["series_instance_uid"] == other


# ---------------------------------------------------------------- DICOM: valid exports that must load

def test_files_without_preamble_or_extension_load(tmp_path, reference):
    for z in range(SLICES):
        ds = ct_slice(z, series_uid="1.2.3.4", study_uid="1.2.3", frame_uid="1.2.3.5")
        del ds.file_meta  # no preamble, no DICM, no file meta: implicit VR as old archives write
        ds.save_as(tmp_path / f"IMG{z:04d}", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "IMG0000").read_bytes()[128:132] != b"DICM"
    volume = load_ct(tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(reference.image))


def test_float_rounded_pixel_spacing_is_one_spacing(tmp_path, reference):
    paths = write_series(tmp_path)
    for path in paths[::2]:
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [float(np.float32(PIXEL_MM + 1e-6)), float(np.float32(PIXEL_MM - 1e-6))]
        ds.PixelSpacing = ["7.0000010", "6.9999990"]
        ds.save_as(path)
    volume = load_ct(tmp_path)
    np.testing.assert_allclose(volume.spacing_mm, reference.spacing_mm, atol=1e-5)


def _rotated_iop(angle_deg: float) -> list[float]:
    a = np.deg2rad(angle_deg)
    return [float(np.cos(a)), float(np.sin(a)), 0.0, float(-np.sin(a)), float(np.cos(a)), 0.0]


def test_orientation_jitter_within_tolerance_is_one_volume_beyond_it_two(tmp_path):
    paths = write_series(tmp_path / "jitter")
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = _rotated_iop(0.4 if k % 2 else -0.4)
        ds.save_as(path)
    volume = load_ct(tmp_path / "jitter")
    assert volume.size[2] == SLICES
    assert any("slice orientations differ by up to 0.80 deg" in w for w in volume.warnings)
    paths = write_series(tmp_path / "two")
    for path in paths[:10]:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = _rotated_iop(5.0)
        ds.save_as(path)
    assert len(list_dicom_series(tmp_path / "two")) == 2


def enhanced_ct(path: Path, *, per_frame_rescale: bool) -> None:
    """One Enhanced CT Image Storage file holding the reference series as frames, written in reverse
    order, geometry in the functional groups (orientation and pixel measures shared; position and, when
    asked, rescale per frame)."""
    ds = ct_dataset("1.2.840.10008.5.1.4.1.1.2.1", "P1")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SeriesDescription, ds.ConvolutionKernel = "HEAD enhanced", "Hr38"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows = ds.Columns = N
    ds.NumberOfFrames = SLICES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    measures.PixelSpacing, measures.SliceThickness = [PIXEL_MM, PIXEL_MM], STEP_MM
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orientation]), Sequence([measures])
    if not per_frame_rescale:
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
        shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, stored = [], []
    for z in reversed(range(SLICES)):
        item, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in ORIGIN + [0, 0, STEP_MM * z]]
        item.PlanePositionSequence = Sequence([position])
        content.StackID, content.FrameAcquisitionNumber = "1", 1
        item.FrameContentSequence = Sequence([content])
        intercept = -1024.0
        if per_frame_rescale:
            slope, intercept = (0.5, -1024.0) if z % 2 else (1.0, -1000.0)
            transform = Dataset()
            transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "HU"
            item.PixelValueTransformationSequence = Sequence([transform])
            stored.append(((head_hu(z) - intercept) / slope).astype(np.int16))
        else:
            stored.append((head_hu(z) - intercept).astype(np.int16))
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("per_frame_rescale", [False, True])
def test_enhanced_ct_multi_frame_reads_like_the_single_frame_series(tmp_path, reference, per_frame_rescale):
    path = tmp_path / "enhanced.dcm"
    enhanced_ct(path, per_frame_rescale=per_frame_rescale)
    volume = load_ct(path)
    assert volume.size == reference.size and volume.provenance["n_files"] == 1
    np.testing.assert_allclose(volume.origin_mm, ORIGIN)
    np.testing.assert_allclose(volume.spacing_mm, reference.spacing_mm)
    np.testing.assert_allclose(volume.direction, reference.direction)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(volume.image), sitk.GetArrayViewFromImage(reference.image))
    assert marker_lps(volume)[0] > head_centre_lps(volume)[0] + 20


def test_lossy_rescale_type_us_warn_and_a_non_hu_rescale_type_is_refused(tmp_path):
    paths = write_series(tmp_path / "lossy")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.RescaleType = "US"
        ds.save_as(path)
    warnings = " | ".join(load_ct(tmp_path / "lossy").warnings)
    assert "lossy compressed pixel data (LossyImageCompression 01 (ISO_10918_1))" in warnings
    assert "RescaleType US (unspecified)" in warnings
    paths = write_series(tmp_path / "iodine")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.RescaleType = "MGML"
        ds.save_as(path)
    with pytest.raises(CTInputError, match="RescaleType is MGML .*not Hounsfield units"):
        load_ct(tmp_path / "iodine")


def test_eight_bit_stored_pixels_warn_as_lossy(tmp_path):
    paths = write_series(tmp_path)
    for z, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.RescaleSlope = 8
        ds.PixelData = np.round((head_hu(z) + 1024) / 8).astype(np.uint8).tobytes()
        ds.save_as(path)
    assert any("only 8 bits stored per pixel" in w for w in load_ct(tmp_path).warnings)


# ---------------------------------------------------------------- the same checks on Slicer nodes

def test_slicer_node_gets_the_same_value_and_contrast_checks(tmp_path, reference, monkeypatch):
    slicer = pytest.importorskip("slicer")
    from HeadCTMoLRELib.slicer import mrml_geometry

    scene = slicer.vtkMRMLScene()
    hu = sitk.GetArrayFromImage(reference.image)
    hu[3, 5, 5:9] = np.nan
    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(reference.image)
    node = mrml_geometry.volume_node_from_image(scene, image, "dropped")
    paths = write_series(tmp_path, description="CTA HEAD")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(pydicom.dcmread(p).SOPInstanceUID for p in paths))
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: str(p) for p in paths}

    class Database:
        def fileForInstance(self, uid):
            return by_uid.get(uid, "")

    monkeypatch.setattr(slicer, "dicomDatabase", Database(), raising=False)
    volume = mrml_geometry.ct_volume_from_node(node)
    assert any("Slicer volume 'dropped': 4 voxels are NaN or infinite" in w for w in volume.warnings)
    assert any("contrast-enhanced or angiography series" in w for w in volume.warnings)
    assert np.isfinite(sitk.GetArrayViewFromImage(volume.image)).all()
