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

import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import checks as ct_checks
from .checks import MAX_PAYLOAD_BYTES, CTInputError
from . import nifti
from .dicom_series import choose_series, scan_dicom, series_warnings
from .dicom_volume import build_volume, orthogonal_image
from .series_manifest import is_series_manifest, read_series_files

__all__ = ["CTInputError", "CTVolume", "load_ct", "list_dicom_series", "validation_report"]

NRRD_SUFFIXES = (".nrrd", ".nhdr")
META_SUFFIXES = (".mha", ".mhd")
_CHUNK = 1 << 20
_UNKNOWN_ORIENTATION = "no orientation in the header: the orientation is unknown; left/right cannot be trusted"


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
    compression: str | None  # None, or "zlib": a zlib/gzip stream starts at byte offset (NRRD, MHA)


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
    warnings = []
    if "space" not in fields and "space dimension" not in fields or "space directions" not in fields:
        warnings.append(f"{path.name}: {_UNKNOWN_ORIENTATION} (NRRD without 'space' / 'space directions')")
    encoding = fields.get("encoding", "raw").lower()
    element = _NRRD_BYTES.get(fields.get("type", "").lower())
    data_file = fields.get("data file") or fields.get("datafile")
    if element is None or encoding not in ("raw", "gzip", "gz") or (data_file and data_file.startswith("LIST")):
        return None, warnings  # ascii/bzip2/lists: SimpleITK validates those itself
    target = (path.parent / data_file) if data_file else path
    start = 0 if data_file else offset
    return _Payload(target, start, int(np.prod(sizes, dtype=np.float64)) * element,
                    None if encoding == "raw" else "zlib"), warnings


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
    warnings = []
    if not any(key in fields for key in ("TransformMatrix", "Rotation", "Orientation")):
        warnings.append(f"{path.name}: {_UNKNOWN_ORIENTATION} (MetaImage without TransformMatrix)")
    element = _META_BYTES.get(fields["ElementType"])
    data_file = fields.get("ElementDataFile", "LOCAL")
    if element is None or int(fields.get("HeaderSize", "0")) != 0 or data_file.startswith("LIST") or "%" in data_file:
        return None, warnings
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    compressed = fields.get("CompressedData", "False").lower() == "true"
    target = path if data_file == "LOCAL" else path.parent / data_file
    return _Payload(target, offset if data_file == "LOCAL" else 0,
                    int(np.prod(sizes, dtype=np.float64)) * element * channels,
                    "zlib" if compressed else None), warnings


def _payload_length(payload: _Payload) -> int:
    """Bytes of voxel data actually present (decompressing in chunks, nothing kept in memory)."""
    if not payload.path.is_file():
        raise CTInputError(f"{payload.path}: the data file named in the header does not exist.")
    if payload.compression is None:
        return payload.path.stat().st_size - payload.offset
    total = 0
    try:
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
    """Header and payload-length checks for NRRD / MetaImage files; returns warnings."""
    parser = {"nrrd": _nrrd_header, "mha": _meta_header}[_file_kind(path)]
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


# ---------------------------------------------------------------- what a file is, by its content

_PICTURES = {b"\x89PNG": "a PNG picture", b"\xff\xd8\xff": "a JPEG picture", b"GIF8": "a GIF picture",
             b"BM": "a BMP picture", b"II*\x00": "a TIFF picture", b"MM\x00*": "a TIFF picture",
             b"%PDF": "a PDF document"}


def _file_kind(path: Path) -> str:
    """What a single file is, from its content (the name only breaks ties): "nifti" (NIfTI-1/2, Analyze,
    gzip or not, .hdr/.img pairs), "nrrd", "mha", "picture: <what>", or "dicom" (everything else, which
    the DICOM header scan then accepts or explains)."""
    with open(path, "rb") as handle:
        start = handle.read(512)
    name = path.name.lower()
    if start[128:132] == b"DICM":
        return "dicom"
    if start.startswith(b"NRRD"):
        return "nrrd"
    if re.match(rb"\s*(ObjectType|NDims|ObjectSubType|Comment)\s*=", start) and name.endswith(META_SUFFIXES):
        return "mha"
    if name.endswith(META_SUFFIXES) and b"ElementDataFile" in start:
        return "mha"
    if name.endswith((".img", ".img.gz")) or nifti.looks_like_nifti(path):
        return "nifti"
    for magic, what in _PICTURES.items():
        if start.startswith(magic):
            return f"picture: {what}"
    return "dicom"


# ---------------------------------------------------------------- loaders

def _read_nifti(path: Path, hu_offset: float | None) -> tuple[sitk.Image, list[str], list[str], dict]:
    header = nifti.read_header(path)
    affine, warnings = nifti.geometry(header)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = (nifti.RAS_TO_LPS @ linear / spacing).ravel()
    warnings += ct_checks.check_grid(str(path), header.sizes, list(spacing) + [1.0] * (len(header.sizes) - 3),
                                     direction)
    stored = nifti.read_payload(header)
    # an orthogonal grid without offset needs no arithmetic here: integer voxels stay integers until the
    # value checks convert them (one float32 copy at a time, see ct_checks.checked_values)
    square = direction.reshape(3, 3)
    orthogonal = bool(np.allclose(square @ square.T, np.eye(3), atol=1e-9, rtol=0))
    image = nifti.to_image(header, stored, affine, keep_integers=orthogonal and not hu_offset)
    del stored
    image, sheared = orthogonal_image(image, path.name)
    if hu_offset:
        image = image + float(hu_offset)
    provenance = {"format": "nifti", "source_paths": [str(path)], "n_files": 1 + (header.data_path != path),
                  "stored_pixel_type": header.dtype, "nifti": {
                      "version": header.version, "qform_code": header.qform_code, "sform_code": header.sform_code,
                      "geometry_from": "sform" if header.sform_code > 0 else "qform" if header.qform_code > 0
                      else "none", "units": nifti.UNIT_NAMES.get(header.units_code, "unknown"),
                      "scl_slope": header.scl_slope, "scl_inter": header.scl_inter}}
    return image, warnings + sheared, [], provenance


def _read_itk_file(path: Path, hu_offset: float | None) -> tuple[sitk.Image, list[str], list[str], dict]:
    """NRRD / MetaImage through SimpleITK after our own header and payload checks."""
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
    image, sheared = orthogonal_image(sitk.Cast(image, sitk.sitkFloat32), path.name)
    if hu_offset:
        image = image + float(hu_offset)
    return image, warnings + sheared, [], {"format": _file_kind(path), "source_paths": [str(path)], "n_files": 1,
                                           "stored_pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID())}


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _read_dicom(source, series: str | None, hu_offset: float | None):
    scan = scan_dicom(source)
    chosen, choice_warnings = choose_series(scan, series)
    try:
        image, warnings, notes, geometry = build_volume(chosen, hu_offset)
    except CTInputError as error:
        raise CTInputError(f"{scan.source} (series {chosen.key}): {error}") from None
    first = chosen.first
    provenance = {
        "format": "dicom",
        "source_paths": [str(source)] if isinstance(source, (str, os.PathLike)) else [str(p) for p in source],
        "n_files": len({s.path for s in chosen.slices}),
        "n_images": len(chosen.slices),
        "series_instance_uid": chosen.uid,
        "candidate": chosen.key,
        "part": chosen.part,
        "sop_class_uid": first.sop_class_uid,
        "series_description": first.description,
        "modality": first.modality,
        "manufacturer": first.manufacturer,
        "convolution_kernel": first.kernel,
        "contrast": first.contrast,
        "lossy": first.lossy,
        "geometry": geometry,
        "other_series": [s.summary() for s in scan.series if s is not chosen],
    }
    warnings = choice_warnings + series_warnings(chosen) + warnings
    return image, warnings, scan.notes + notes, provenance


_VOLUME_READERS = {"nifti": _read_nifti, "nrrd": _read_itk_file, "mha": _read_itk_file}


def _read_source(source, series: str | None, hu_offset: float | None):
    """The one place that decides how a source is read: a list of files or a folder -> DICOM; a file ->
    by its content (``_file_kind``). Returns (image, warnings, notes, provenance)."""
    if not isinstance(source, (str, os.PathLike)):
        return _read_dicom([Path(p) for p in source], series, hu_offset)
    path = Path(source)
    if not path.exists():
        raise CTInputError(f"{path}: no such file or folder.")
    kind = _file_kind(path) if path.is_file() else "dicom"
    if kind.startswith("picture: "):
        raise CTInputError(f"{path}: this is {kind.split(': ', 1)[1]}, not a CT volume. Load the original CT: a "
                           "DICOM series folder, NIfTI (.nii, .nii.gz, .hdr/.img), NRRD or MetaImage file.")
    if kind in _VOLUME_READERS:
        return _VOLUME_READERS[kind](path, hu_offset)
    return _read_dicom(path, series, hu_offset)


def load_ct(source: str | os.PathLike | Sequence[os.PathLike], series: str | None = None, *,
            hu_offset: float | None = None) -> CTVolume:
    """Load a head CT and check that it can be trusted.

    source: a NIfTI-1/2 (.nii, .nii.gz, .hdr/.img pair), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file
        (recognised by content), a DICOM folder (searched recursively; a DICOMDIR is recognised and the tree
        scanned), a DICOMDIR file, a single DICOM file (Enhanced CT multi-frame included), or a list of
        DICOM files.
    series: candidate id (SeriesInstanceUID, ``UID#N`` for one part of a split series, a unique prefix or
        SeriesDescription) to load when a folder holds several; otherwise the documented rule in
        ``dicom_series`` picks one (with warnings).
    hu_offset: explicit correction added to every value (e.g. -1024 for raw CT numbers); recorded as
        a warning.

    Returns a CTVolume whose image is 3-D float32 HU in LPS mm (x, y, z; numpy z, y, x) on an orthogonal
    grid. Raises CTInputError naming the file, the problem and the remedy.
    """
    if isinstance(source, (str, os.PathLike)) and is_series_manifest(source):
        source = read_series_files(source)  # one series named by a *.series.json (ct/series_manifest.py)
    image, warnings, notes, provenance = _read_source(source, series, hu_offset)
    name = str(source) if isinstance(source, (str, os.PathLike)) else provenance["source_paths"][0]
    if provenance["format"] == "dicom":
        warnings = warnings + ct_checks.check_grid(name, image.GetSize(), image.GetSpacing(), image.GetDirection())
    image, value_warnings, value_notes = ct_checks.checked_values(name, image, hu_offset)
    if hu_offset:
        value_warnings.append(f"values shifted by hu_offset {hu_offset:+g} as requested; check that air is about "
                              "-1000 HU and brain 20-45 HU")
    provenance["hu_offset"] = hu_offset
    return CTVolume(image=image, warnings=warnings + value_warnings, notes=notes + value_notes,
                    provenance=provenance)


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
    return load_with_report(source, series, hu_offset=hu_offset)[1]


def load_with_report(source, series: str | None = None, *, hu_offset: float | None = None):
    """(CTVolume or None when refused, ``validation_report``'s dict): one read for a caller that shows the
    checks and then uses the volume (`headct-molre demo`)."""
    report = {"source": str(source) if isinstance(source, (str, os.PathLike)) else [str(p) for p in source],
              "accepted": False, "error": None, "warnings": [], "notes": [], "size": None, "spacing_mm": None,
              "origin_mm": None, "direction": None, "orientation": None, "hu_percentiles": None,
              "coverage_mm": None, "provenance": None}
    try:
        volume = load_ct(source, series, hu_offset=hu_offset)
    except CTInputError as error:
        report["error"] = str(error)
        return None, report
    lr, ap, si = ct_checks.patient_extent_mm(volume.size, volume.spacing_mm, volume.direction)
    report.update(
        accepted=True, warnings=volume.warnings, notes=volume.notes, size=list(volume.size),
        spacing_mm=[round(s, 4) for s in volume.spacing_mm], origin_mm=[round(o, 3) for o in volume.origin_mm],
        direction=[round(d, 6) for d in volume.direction], orientation=ct_checks.orientation_code(volume.direction),
        hu_percentiles=ct_checks.hu_percentiles(sitk.GetArrayViewFromImage(volume.image)),
        coverage_mm={"LR": round(lr, 1), "AP": round(ap, 1), "SI": round(si, 1)}, provenance=volume.provenance)
    return volume, report
