"""Load and validate a non-contrast head CT from NIfTI, NRRD, MetaImage or DICOM; no torch, no Qt.

``load_ct(source)`` returns a ``CTVolume``: a 3-D float32 SimpleITK image in Hounsfield units with its
true physical geometry (ITK/LPS mm, a regular orthogonal grid; *not* reoriented, so a sagittal input
keeps its direction matrix), plus warnings the user must see, informational notes and JSON-able
provenance without patient identifiers. Anything that cannot be trusted raises ``CTInputError`` with
the file, the problem and what to do.

Order of checks for volume files: the header is parsed and the payload length compared with what the
header promises (truncated / corrupt files and absurd sizes are refused *before* anything is
allocated; SimpleITK would zero-fill), then grid plausibility (``ct_checks.check_grid``), then the
pixels are read and checked for finite values and HU plausibility. DICOM sources go through
``dicom_series`` (find/qualify/choose a series) and ``dicom_volume`` (geometry from IPP/IOP, HU).
Every output voxel below -1024 HU (outside-field-of-view padding) is set to -1024 (air).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import checks as ct_checks
from .checks import CTInputError
from .dicom_series import choose_series, scan_dicom
from .dicom_volume import build_volume
from .series_manifest import is_series_manifest, read_series_files

__all__ = ["CTInputError", "CTVolume", "load_ct", "list_dicom_series", "validation_report"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
META_SUFFIXES = (".mha", ".mhd")
MAX_PAYLOAD_BYTES = 16 * 1024 ** 3  # a header promising more than this is corrupt, never allocated
_CHUNK = 1 << 20


@dataclass
class CTVolume:
    """A head CT ready for preprocessing.

    image: 3-D float32 SimpleITK image in HU (padding -> -1024), LPS physical geometry (mm), regular
        orthogonal grid; numpy views of it are (z, y, x).
    warnings: what the user must see (tilt corrected, gap interpolated, unknown orientation, ...).
    notes: informational (localizer dropped, duplicate removed, series chosen by rule, ...).
    provenance: JSON-able facts about the source, no patient identifiers.
    """

    image: sitk.Image
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int, int]:
        """Voxels along x, y, z."""
        return tuple(int(s) for s in self.image.GetSize())

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along x, y, z."""
        return tuple(float(s) for s in self.image.GetSpacing())

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        """LPS position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(s) for s in self.image.GetOrigin())

    @property
    def direction(self) -> tuple[float, ...]:
        """Direction cosines, 9 values row-major; column k is the LPS unit vector of voxel axis k."""
        return tuple(float(s) for s in self.image.GetDirection())


# ---------------------------------------------------------------- volume file headers and payload length

@dataclass
class _Payload:
    """Where a volume file's voxel bytes are and how many the header promises."""

    path: Path
    offset: int
    expected_bytes: int
    compression: str | None  # None; "gzip-file": the whole file is gzip, offset counts in the decompressed
    #                          stream (NIfTI .gz); "zlib": a zlib/gzip stream starts at byte offset (NRRD, MHA)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES + NRRD_SUFFIXES + META_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as handle:
        magic = handle.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _nifti_header(path: Path) -> tuple[_Payload, list[str]]:
    """Parse a NIfTI-1/2 header; refuse zero/absurd dims and zero spacing; return payload and warnings."""
    try:
        with _open_maybe_gzip(path) as handle:
            raw = handle.read(540)
    except (OSError, EOFError, zlib.error) as error:
        raise CTInputError(f"{path}: file is truncated or corrupt (cannot read the NIfTI header: {error}).") from error
    if len(raw) < 348:
        raise CTInputError(f"{path}: file is truncated or corrupt (NIfTI header is {len(raw)} of 348 bytes).")
    for endian in "<>":
        size_of_header = struct.unpack(endian + "i", raw[:4])[0]
        if size_of_header in (348, 540):
            break
    else:
        raise CTInputError(f"{path}: not a NIfTI file (header size field {size_of_header}); the file is corrupt.")
    if size_of_header == 348:
        dims = struct.unpack(endian + "8h", raw[40:56])
        bitpix = struct.unpack(endian + "h", raw[72:74])[0]
        pixdim = struct.unpack(endian + "8f", raw[76:108])
        vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
        qform, sform = struct.unpack(endian + "2h", raw[252:256])
        compressed_header_end = 348
    else:
        if len(raw) < 540:
            raise CTInputError(f"{path}: file is truncated or corrupt (NIfTI-2 header is {len(raw)} of 540 bytes).")
        bitpix = struct.unpack(endian + "h", raw[14:16])[0]
        dims = struct.unpack(endian + "8q", raw[16:80])
        pixdim = struct.unpack(endian + "8d", raw[104:168])
        vox_offset = int(struct.unpack(endian + "q", raw[168:176])[0])
        qform, sform = struct.unpack(endian + "2i", raw[344:352])
        compressed_header_end = 540
    n_dims = dims[0]
    if not 1 <= n_dims <= 7:
        raise CTInputError(f"{path}: NIfTI header has {n_dims} dimensions; the file is corrupt.")
    sizes = [int(d) for d in dims[1:n_dims + 1]]
    if any(s <= 0 for s in sizes):
        raise CTInputError(f"{path}: empty image (a dimension is 0: dim = {sizes}); the file holds no volume.")
    if n_dims >= 3 and any(not np.isfinite(p) or p <= 0 for p in pixdim[1:4]):
        raise CTInputError(f"{path}: zero or negative voxel spacing in the header (pixdim {list(pixdim[1:4])}); "
                           "fix the spacing or re-export the volume.")
    expected = int(np.prod(sizes, dtype=np.float64)) * max(bitpix, 8) // 8
    warnings = []
    if qform == 0 and sform == 0:
        warnings.append(f"{path.name}: NIfTI qform_code and sform_code are both 0: the orientation is unknown "
                        "(Analyze-style); left/right cannot be trusted.")
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    payload = _Payload(path, max(vox_offset, compressed_header_end), expected, "gzip-file" if gzipped else None)
    return payload, warnings


def _text_header(path: Path, stop) -> tuple[list[str], int]:
    """Lines of a text header up to the line where ``stop(line)`` is true; also the byte offset after it."""
    lines, offset = [], 0
    with open(path, "rb") as handle:
        while True:
            line = handle.readline(65536)
            if not line:
                break
            offset += len(line)
            text = line.decode("latin-1").rstrip("\r\n")
            lines.append(text)
            if stop(text):
                break
    return lines, offset


_NRRD_BYTES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "signed char": 1, "unsigned char": 1,
               "short": 2, "ushort": 2, "int16": 2, "uint16": 2, "short int": 2, "unsigned short": 2,
               "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "double": 8, "longlong": 8,
               "ulonglong": 8, "int64": 8, "uint64": 8}
_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}


def _nrrd_header(path: Path) -> tuple[_Payload | None, list[str]]:
    lines, offset = _text_header(path, lambda text: text == "")
    if not lines or not lines[0].startswith("NRRD"):
        raise CTInputError(f"{path}: not a NRRD file (missing the NRRD magic line).")
    fields = {}
    for text in lines[1:]:
        if ":" in text and not text.startswith("#"):
            key, _, value = text.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
    sizes = [int(s) for s in fields.get("sizes", "").split()]
    if not sizes or any(s <= 0 for s in sizes):
        raise CTInputError(f"{path}: empty image (a dimension is 0: sizes {sizes}); the file holds no volume.")
    for vector in re.findall(r"\(([^)]*)\)", fields.get("space directions", "")):
        if not np.any(np.abs([float(x) for x in vector.split(",")]) > 0):
            raise CTInputError(f"{path}: zero voxel spacing (space direction ({vector})); fix the header.")
    encoding = fields.get("encoding", "raw").lower()
    element = _NRRD_BYTES.get(fields.get("type", "").lower())
    data_file = fields.get("data file") or fields.get("datafile")
    if element is None or encoding not in ("raw", "gzip", "gz") or (data_file and data_file.startswith("LIST")):
        return None, []  # ascii/bzip2/lists: SimpleITK validates those itself
    target = (path.parent / data_file) if data_file else path
    start = 0 if data_file else offset
    return _Payload(target, start, int(np.prod(sizes, dtype=np.float64)) * element,
                    None if encoding == "raw" else "zlib"), []


def _meta_header(path: Path) -> tuple[_Payload | None, list[str]]:
    lines, offset = _text_header(path, lambda text: text.replace(" ", "").startswith("ElementDataFile="))
    fields = {}
    for text in lines:
        key, _, value = text.partition("=")
        fields[key.strip()] = value.strip()
    if "DimSize" not in fields or "ElementType" not in fields:
        raise CTInputError(f"{path}: not a MetaImage file (DimSize/ElementType missing).")
    sizes = [int(s) for s in fields["DimSize"].split()]
    if any(s <= 0 for s in sizes):
        raise CTInputError(f"{path}: empty image (a dimension is 0: DimSize {sizes}); the file holds no volume.")
    spacing = fields.get("ElementSpacing") or fields.get("ElementSize")
    if spacing and any(float(s) <= 0 for s in spacing.split()):
        raise CTInputError(f"{path}: zero or negative voxel spacing ({spacing}); fix the header.")
    element = _META_BYTES.get(fields["ElementType"])
    data_file = fields.get("ElementDataFile", "LOCAL")
    if element is None or int(fields.get("HeaderSize", "0")) != 0 or data_file.startswith("LIST") or "%" in data_file:
        return None, []
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    compressed = fields.get("CompressedData", "False").lower() == "true"
    target = path if data_file == "LOCAL" else path.parent / data_file
    return _Payload(target, offset if data_file == "LOCAL" else 0,
                    int(np.prod(sizes, dtype=np.float64)) * element * channels,
                    "zlib" if compressed else None), []


def _gzip_trailer_matches(path: Path, decompressed_bytes: int) -> bool:
    """True when the gzip file ends with a trailer whose ISIZE (uncompressed length mod 2**32, last 4 bytes)
    equals ``decompressed_bytes``: a complete single-stream file of exactly that length, checked without
    decompressing. A truncated file has lost its trailer (its last bytes are compressed data, matching by
    chance with probability 2**-32). False (the caller decompresses to count) for anything ambiguous:
    sizes of 4 GiB or more, concatenated gzip members, trailing data."""
    if decompressed_bytes >= 2 ** 32:
        return False
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < 18 + 8:  # gzip header (10) + empty deflate block + trailer (8)
            return False
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0] == decompressed_bytes


def _payload_length(payload: _Payload) -> int:
    """Bytes of voxel data actually present (decompressing in chunks, nothing kept in memory; a .nii.gz
    whose gzip trailer states the expected length is taken at its word, see ``_gzip_trailer_matches``)."""
    if not payload.path.is_file():
        raise CTInputError(f"{payload.path}: the data file named in the header does not exist.")
    if payload.compression is None:
        return payload.path.stat().st_size - payload.offset
    if payload.compression == "gzip-file" and _gzip_trailer_matches(payload.path, payload.offset + payload.expected_bytes):
        return payload.expected_bytes
    total = 0
    try:
        if payload.compression == "gzip-file":
            with gzip.open(payload.path, "rb") as stream:
                while chunk := stream.read(_CHUNK):
                    total += len(chunk)
                    if total > payload.offset + payload.expected_bytes:
                        break
            return total - payload.offset
        decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip stream after a text header
        with open(payload.path, "rb") as handle:
            handle.seek(payload.offset)
            while chunk := handle.read(_CHUNK):
                total += len(decompressor.decompress(chunk))
                if total > payload.expected_bytes:
                    break
            if total <= payload.expected_bytes and not decompressor.eof:
                raise EOFError("compressed stream ends before its end marker")
        return total
    except (OSError, EOFError, zlib.error) as error:
        raise CTInputError(f"{payload.path}: file is truncated or corrupt ({error}); re-export or copy it again."
                           ) from error


def _check_volume_file(path: Path) -> list[str]:
    """Header and payload-length checks for NIfTI / NRRD / MetaImage files; returns warnings."""
    suffix = _suffix(path)
    parser = {".nii": _nifti_header, ".nii.gz": _nifti_header, ".nrrd": _nrrd_header, ".nhdr": _nrrd_header,
              ".mha": _meta_header, ".mhd": _meta_header}[suffix]
    payload, warnings = parser(path)
    if payload is None:
        return warnings
    if payload.expected_bytes > MAX_PAYLOAD_BYTES:
        raise CTInputError(f"{path}: header claims {payload.expected_bytes / 1024 ** 3:.0f} GiB of voxel data; "
                           "the header is corrupt or this is not a head CT.")
    present = _payload_length(payload)
    if present < payload.expected_bytes:
        raise CTInputError(f"{path}: file is truncated or corrupt: data shorter than header dims "
                           f"({max(present, 0)} of {payload.expected_bytes} bytes); re-export or copy it again.")
    return warnings


# ---------------------------------------------------------------- loaders

def _read_volume_file(path: Path, hu_offset: float | None) -> tuple[sitk.Image, list[str], list[str], dict]:
    warnings = _check_volume_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise CTInputError(f"{path}: cannot read the image header ({_first_line(error)}).") from error
    size = reader.GetSize()
    if reader.GetNumberOfComponents() > 1:
        raise CTInputError(f"{path}: {reader.GetNumberOfComponents()}-component (RGB/vector) image; "
                           "a grey-scale CT volume in HU is required.")
    dims = len(size)
    direction = np.asarray(reader.GetDirection()).reshape(dims, dims)[:3, :3].ravel() if dims >= 3 else np.eye(3)
    warnings += ct_checks.check_grid(str(path), size, reader.GetSpacing(), direction)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise CTInputError(
            f"{path}: cannot read the voxel data ({_first_line(error)}); the file is corrupt.") from error
    if image.GetDimension() == 4:  # a 4-D file with one volume
        image = image[:, :, :, 0]
    image = sitk.Cast(image, sitk.sitkFloat32)
    if hu_offset:
        image = image + float(hu_offset)
    fmt = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha",
           ".mhd": "mha"}[_suffix(path)]
    return image, warnings, [], {"format": fmt, "source_paths": [str(path)], "n_files": 1,
                                 "stored_pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID())}


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _read_dicom(source, series: str | None, hu_offset: float | None):
    scan = scan_dicom(source)
    chosen, choice_notes = choose_series(scan, series)
    try:
        image, warnings, notes, geometry = build_volume(chosen, hu_offset)
    except CTInputError as error:
        raise CTInputError(f"{scan.source} (series {chosen.uid}): {error}") from None
    first = chosen.first
    provenance = {
        "format": "dicom",
        "source_paths": [str(source)] if isinstance(source, (str, os.PathLike)) else [str(p) for p in source],
        "n_files": len(chosen.slices),
        "series_instance_uid": chosen.uid,
        "series_description": first.description,
        "modality": first.modality,
        "manufacturer": first.manufacturer,
        "convolution_kernel": first.kernel,
        "geometry": geometry,
        "other_series": [s.summary() for s in scan.series if s is not chosen],
    }
    return image, warnings, scan.notes + choice_notes + notes, provenance


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and _suffix(path) != ""


def load_ct(source: str | os.PathLike | Sequence[os.PathLike], series: str | None = None, *,
            hu_offset: float | None = None) -> CTVolume:
    """Load a head CT and check that it can be trusted.

    source: a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file, a DICOM folder
        (searched recursively; a DICOMDIR is recognised and the tree scanned), a DICOMDIR file, a single
        DICOM file, or a list of DICOM files.
    series: SeriesInstanceUID (or a unique prefix / SeriesDescription) to load when a folder holds
        several series; otherwise the documented rule in ``dicom_series`` picks one (see notes).
    hu_offset: explicit correction added to every value (e.g. -1024 for raw CT numbers); recorded as
        a warning.

    Returns a CTVolume whose image is 3-D float32 HU in LPS mm (x, y, z; numpy z, y, x). Raises
    CTInputError naming the file, the problem and the remedy.
    """
    if isinstance(source, (str, os.PathLike)) and is_series_manifest(source):
        source = read_series_files(source)  # one series named by a *.series.json (ct/series_manifest.py)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CTInputError(f"{path}: no such file or folder.")
        reader = _read_volume_file if _is_volume_file(path) else None
    else:
        path, reader = None, None
    if reader is not None:
        image, warnings, notes, provenance = reader(path, hu_offset)
    else:
        image, warnings, notes, provenance = _read_dicom(source, series, hu_offset)
    name = str(path) if path is not None else provenance["source_paths"][0]
    if provenance["format"] == "dicom":
        warnings = warnings + ct_checks.check_grid(name, image.GetSize(), image.GetSpacing(), image.GetDirection())
    hu = sitk.GetArrayViewFromImage(image)
    ct_checks.check_finite(name, hu)
    ct_checks.check_hu_plausible(name, hu, hu_offset)
    hu = sitk.GetArrayFromImage(image)
    clamped = ct_checks.clamp_to_air(hu)
    if clamped:
        fixed = sitk.GetImageFromArray(hu)
        fixed.CopyInformation(image)
        image = fixed
        notes = notes + [f"{clamped} voxels below {ct_checks.AIR_HU:g} HU (outside-field-of-view padding) set to air"]
    if hu_offset:
        warnings = warnings + [f"values shifted by hu_offset {hu_offset:+g} as requested; check that air is about "
                               "-1000 HU and brain 20-45 HU"]
    provenance["hu_offset"] = hu_offset
    return CTVolume(image=image, warnings=warnings, notes=notes, provenance=provenance)


def list_dicom_series(folder) -> list[dict]:
    """One dict per series found under ``folder`` (or in a list of files): uid, description, modality,
    n_images (after duplicates/localizers are removed), slice_spacing_mm (median, along the slice
    normal), kernel, manufacturer, qualifies (bool), why_not (str or None), notes."""
    scan = scan_dicom(folder)
    return [dict(s.summary(), notes=list(s.notes)) for s in scan.series]


def validation_report(source, series: str | None = None, *, hu_offset: float | None = None) -> dict:
    """Load ``source`` as ``load_ct`` does and describe the result as a JSON-able dict.

    Keys: accepted, error, warnings, notes, size (x,y,z), spacing_mm, origin_mm, direction (9, row-major),
    orientation (letters the x, y, z axes point to, e.g. "LPS"), hu_percentiles, coverage_mm
    (extent along L-R, A-P, S-I, see ``ct_checks.patient_extent_mm``), provenance. Refusals give accepted False and the error.
    """
    report = {"source": str(source) if isinstance(source, (str, os.PathLike)) else [str(p) for p in source],
              "accepted": False, "error": None, "warnings": [], "notes": [], "size": None, "spacing_mm": None,
              "origin_mm": None, "direction": None, "orientation": None, "hu_percentiles": None,
              "coverage_mm": None, "provenance": None}
    try:
        volume = load_ct(source, series, hu_offset=hu_offset)
    except CTInputError as error:
        report["error"] = str(error)
        return report
    lr, ap, si = ct_checks.patient_extent_mm(volume.size, volume.spacing_mm, volume.direction)
    report.update(
        accepted=True, warnings=volume.warnings, notes=volume.notes, size=list(volume.size),
        spacing_mm=[round(s, 4) for s in volume.spacing_mm], origin_mm=[round(o, 3) for o in volume.origin_mm],
        direction=[round(d, 6) for d in volume.direction], orientation=ct_checks.orientation_code(volume.direction),
        hu_percentiles=ct_checks.hu_percentiles(sitk.GetArrayViewFromImage(volume.image)),
        coverage_mm={"LR": round(lr, 1), "AP": round(ap, 1), "SI": round(si, 1)}, provenance=volume.provenance)
    return report
