"""NIfTI-1 / NIfTI-2 (.nii, .nii.gz, .hdr/.img pairs) read by the standard, not by a reader's habits.

Header (numpy/struct, either byte order): compression is detected from the gzip magic bytes, never from
the file name. Geometry follows the standard's precedence:

* ``sform_code > 0``: the affine rows srow_x/y/z;
* else ``qform_code > 0``: the quaternion (quatern_b/c/d, qoffset, pixdim, qfac = pixdim[0]);
* else (Analyze style): pixdim spacing with identity orientation and a warning that orientation is unknown.

When both codes are set and the two affines disagree beyond ``QFORM_SFORM_TOLERANCE`` (direction
cosines) or ``QFORM_SFORM_OFFSET_MM``, a warning says that the sform was used. ``xyzt_units`` (metres,
millimetres, micrometres; 0 = unknown, taken as mm) scales spacing and origin to mm. The NIfTI world
is RAS; it is returned as ITK/LPS (x and y negated).

Values: ``scl_slope = 0`` means no scaling, and so do a slope and an intercept that are *both* NaN (how
nibabel marks "unset"; nifti_clib reads it the same); any other NaN or infinite slope or intercept is
refused. The payload is
read with numpy from the file itself (x fastest), so NaN/inf voxels are seen as stored (SimpleITK 2.5
turns them into 0) and handled by ``checks.replace_non_finite``. A sheared sform (non-orthogonal axes)
goes through ``dicom_volume.orthogonal_image``.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checks import MAX_PAYLOAD_BYTES, CTInputError, orientation_code

QFORM_SFORM_TOLERANCE = 1e-3  # max |difference| of direction cosines treated as agreement
QFORM_SFORM_OFFSET_MM = 0.5  # max distance of the two origins treated as agreement
UNIT_TO_MM = {0: 1.0, 1: 1000.0, 2: 1.0, 3: 0.001}  # xyzt_units & 7: unknown, metre, mm, micrometre
UNIT_NAMES = {0: "unknown (taken as mm)", 1: "metres", 2: "mm", 3: "micrometres"}
DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
NON_SCALAR_TYPES = {1: "1-bit binary", 32: "complex64", 128: "RGB", 1536: "float128", 1792: "complex128",
                    2048: "complex256", 2304: "RGBA"}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class NiftiHeader:
    """What the reader needs from a NIfTI-1/2 header. sizes: voxels per axis (x, y, z, ...)."""

    path: Path
    data_path: Path  # the .img of a pair, else the file itself
    version: int
    endian: str
    sizes: list[int]
    dtype: str  # numpy type code without byte order, e.g. "i2"
    datatype: int
    vox_offset: int
    pixdim: tuple[float, ...]
    scl_slope: float
    scl_inter: float
    units_code: int
    qform_code: int
    sform_code: int
    quatern: tuple[float, float, float]
    qoffset: tuple[float, float, float]
    srow: np.ndarray  # (3, 4)

    @property
    def expected_bytes(self) -> int:
        return int(np.prod(self.sizes, dtype=np.float64)) * np.dtype(self.dtype).itemsize


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _open(path: Path):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def looks_like_nifti(path: Path) -> bool:
    """True when the file (gzip or not) starts with a NIfTI-1/2 or Analyze header (sizeof_hdr 348/540)."""
    try:
        with _open(path) as handle:
            raw = handle.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return len(raw) == 4 and any(struct.unpack(e + "i", raw)[0] in (348, 540) for e in "<>")


def _data_path(path: Path) -> Path:
    name = path.name
    lower = name.lower()
    for header_suffix, image_suffixes in ((".hdr.gz", (".img.gz", ".img")), (".hdr", (".img", ".img.gz"))):
        if lower.endswith(header_suffix):
            stem = name[: -len(header_suffix)]
            for suffix in image_suffixes:
                for candidate in (path.with_name(stem + suffix), path.with_name(stem + suffix.upper())):
                    if candidate.is_file():
                        return candidate
            raise CTInputError(f"{path}: the image file of this .hdr/.img pair ({stem}.img) is missing; copy both "
                               "files of the pair.")
    return path


def read_header(path: Path) -> NiftiHeader:
    """Parse a NIfTI-1/2 (or Analyze 7.5) header; refuse what cannot be a valid header."""
    if path.name.lower().endswith((".img", ".img.gz")):
        for suffix in (".hdr", ".hdr.gz", ".HDR"):
            header = path.with_name(path.name[: -len(".img.gz" if path.name.lower().endswith(".gz") else ".img")]
                                    + suffix)
            if header.is_file():
                return read_header(header)
        raise CTInputError(f"{path}: the header file of this .hdr/.img pair is missing; copy both files of the pair.")
    try:
        with _open(path) as handle:
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

    def get(fmt: str, offset: int):
        return struct.unpack_from(endian + fmt, raw, offset)

    if size_of_header == 348:
        version = 1
        dims = get("8h", 40)
        datatype, bitpix = get("2h", 70)
        pixdim = get("8f", 76)
        vox_offset = get("f", 108)[0]
        scl_slope, scl_inter = get("2f", 112)
        units = raw[123]
        qform_code, sform_code = get("2h", 252)
        quatern, qoffset = get("3f", 256), get("3f", 268)
        srow = np.array(get("12f", 280), dtype=np.float64).reshape(3, 4)
        magic = raw[344:348]
    else:
        if len(raw) < 540:
            raise CTInputError(f"{path}: file is truncated or corrupt (NIfTI-2 header is {len(raw)} of 540 bytes).")
        version = 2
        datatype, bitpix = get("2h", 12)
        dims = get("8q", 16)
        pixdim = get("8d", 104)
        vox_offset = get("q", 168)[0]
        scl_slope, scl_inter = get("2d", 176)
        qform_code, sform_code = get("2i", 344)
        quatern, qoffset = get("3d", 352), get("3d", 376)
        srow = np.array(get("12d", 400), dtype=np.float64).reshape(3, 4)
        units = get("i", 500)[0]
        magic = raw[4:8]
    n_dims = dims[0]
    if not 1 <= n_dims <= 7:
        raise CTInputError(f"{path}: NIfTI header has {n_dims} dimensions; the file is corrupt.")
    sizes = [int(d) for d in dims[1:n_dims + 1]]
    if any(s <= 0 for s in sizes):
        raise CTInputError(f"{path}: empty image (a dimension is 0: dim = {sizes}); the file holds no volume.")
    if datatype in NON_SCALAR_TYPES:
        raise CTInputError(f"{path}: {NON_SCALAR_TYPES[datatype]} voxels; a grey-scale CT volume in HU is required.")
    if datatype not in DTYPES:
        raise CTInputError(f"{path}: NIfTI datatype {datatype} is not a known voxel type; the header is corrupt.")
    if n_dims >= 3 and any(not math.isfinite(p) or p <= 0 for p in pixdim[1:4]):
        raise CTInputError(f"{path}: zero or negative voxel spacing in the header (pixdim {list(pixdim[1:4])}); "
                           "fix the spacing or re-export the volume.")
    if math.isnan(scl_slope) and math.isnan(scl_inter):
        scl_slope, scl_inter = 0.0, 0.0  # both NaN: "no scaling" as nibabel writes it (nifti_clib reads it so)
    if not (math.isfinite(scl_slope) and math.isfinite(scl_inter)):
        raise CTInputError(f"{path}: the value scaling is not a number (scl_slope {scl_slope}, scl_inter "
                           f"{scl_inter}); the voxel values cannot be converted. Fix the header or re-export.")
    pair = magic[:3] in (b"ni1", b"ni2") or path.name.lower().endswith((".hdr", ".hdr.gz"))
    data_path = _data_path(path) if pair else path
    if pair and data_path == path:
        pair = False
    minimum_offset = 0 if pair else size_of_header
    return NiftiHeader(path=path, data_path=data_path, version=version, endian=endian, sizes=sizes,
                       dtype=DTYPES[datatype], datatype=datatype,
                       vox_offset=max(int(vox_offset), minimum_offset), pixdim=tuple(float(p) for p in pixdim),
                       scl_slope=float(scl_slope), scl_inter=float(scl_inter), units_code=int(units) & 7,
                       qform_code=int(qform_code), sform_code=int(sform_code),
                       quatern=tuple(float(q) for q in quatern), qoffset=tuple(float(q) for q in qoffset),
                       srow=srow)


def quaternion_affine(header: NiftiHeader) -> np.ndarray:
    """(4, 4) voxel -> RAS affine of the qform, in the file's units (NIfTI-1 standard, method 2)."""
    b, c, d = header.quatern
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if header.pixdim[0] < 0 else 1.0
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([header.pixdim[1], header.pixdim[2], qfac * header.pixdim[3]])
    affine[:3, 3] = header.qoffset
    return affine


def sform_affine(header: NiftiHeader) -> np.ndarray:
    """(4, 4) voxel -> RAS affine of the sform rows, in the file's units (method 3)."""
    affine = np.eye(4)
    affine[:3, :] = header.srow
    return affine


def _describe(affine: np.ndarray) -> str:
    lps = RAS_TO_LPS @ affine[:3, :3]
    return orientation_code((lps / np.linalg.norm(lps, axis=0)).ravel())


def geometry(header: NiftiHeader) -> tuple[np.ndarray, list[str]]:
    """The voxel -> RAS (mm) affine by the standard's precedence, and warnings (orientation unknown,
    qform/sform disagreement, unknown units)."""
    name = header.path.name
    warnings = []
    scale = UNIT_TO_MM.get(header.units_code, 1.0)
    qform = quaternion_affine(header) if header.qform_code > 0 else None
    sform = sform_affine(header) if header.sform_code > 0 else None
    if sform is not None and np.any(np.linalg.norm(sform[:3, :3], axis=0) == 0):
        raise CTInputError(f"{header.path}: the sform has a zero axis (srow columns); the header is corrupt.")
    if sform is not None:
        affine = sform
        if qform is not None:
            directions = [a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0) for a in (qform, sform)]
            offset = float(np.linalg.norm(qform[:3, 3] - sform[:3, 3])) * scale
            if np.max(np.abs(directions[0] - directions[1])) > QFORM_SFORM_TOLERANCE or offset > QFORM_SFORM_OFFSET_MM:
                flipped = " (they differ left-right)" if np.sign(directions[0][0, 0]) != np.sign(directions[1][0, 0]) \
                    or np.linalg.det(directions[0]) * np.linalg.det(directions[1]) < 0 else ""
                warnings.append(
                    f"{name}: NIfTI qform and sform disagree{flipped}: qform axes point {_describe(qform)}, sform axes "
                    f"{_describe(sform)}, origins {offset:.1f} mm apart; used the sform (sform_code "
                    f"{header.sform_code} takes precedence by the NIfTI standard). Check left/right against a "
                    "known landmark.")
    elif qform is not None:
        affine = qform
    else:
        affine = np.diag([-header.pixdim[1], -header.pixdim[2], header.pixdim[3], 1.0])  # LPS identity in RAS
        warnings.append(f"{name}: NIfTI qform_code and sform_code are both 0: the orientation is unknown "
                        "(Analyze-style); left/right cannot be trusted.")
    scaled = affine.copy()
    scaled[:3, :] *= scale
    return scaled, warnings


PAYLOAD_CHUNK_BYTES = 16 << 20


def read_payload(header: NiftiHeader) -> np.ndarray:
    """The stored voxels as a numpy array (..., z, y, x) in the file's type, read from the file itself.
    Refuses truncated files and absurd sizes before allocating."""
    expected = header.expected_bytes
    if expected > MAX_PAYLOAD_BYTES:
        raise CTInputError(f"{header.path}: header claims {expected / 1024 ** 3:.0f} GiB of voxel data; "
                           "the header is corrupt or this is not a head CT.")
    path = header.data_path
    try:
        with _open(path) as handle:
            if is_gzip(path):
                remaining = header.vox_offset
                while remaining > 0:
                    skipped = handle.read(min(remaining, 1 << 20))
                    if not skipped:
                        break
                    remaining -= len(skipped)
            else:
                handle.seek(header.vox_offset)
            # filled in place, 16 MiB at a time: gzip's own read/readinto of the whole payload would hold a
            # second full-size buffer while inflating
            data, filled = bytearray(expected), 0
            while filled < expected:
                chunk = handle.read(min(PAYLOAD_CHUNK_BYTES, expected - filled))
                if not chunk:
                    break
                data[filled:filled + len(chunk)] = chunk
                filled += len(chunk)
                del chunk
    except (OSError, EOFError, zlib.error) as error:
        raise CTInputError(f"{path}: file is truncated or corrupt ({error}); re-export or copy it again.") from error
    if filled < expected:
        raise CTInputError(f"{path}: file is truncated or corrupt: data shorter than header dims "
                           f"({filled} of {expected} bytes); re-export or copy it again.")
    values = np.frombuffer(data, dtype=np.dtype(header.endian + header.dtype))
    return values.reshape(tuple(reversed(header.sizes)))


def to_image(header: NiftiHeader, stored: np.ndarray, affine: np.ndarray, *,
             keep_integers: bool = False) -> sitk.Image:
    """A 3-D float32 SimpleITK image (LPS) of the first volume: values scaled by scl_slope/scl_inter
    (slope 0: unscaled), geometry from ``affine`` (voxel -> RAS mm; a sheared affine keeps its shear).
    ``keep_integers``: unscaled integer voxels stay in their stored type (half the memory of float32 for
    int16); the caller converts them (ct.checks.checked_values does)."""
    volume = stored.reshape(stored.shape[-3:]) if stored.ndim > 3 else stored
    scaled = header.scl_slope != 0 and (header.scl_slope != 1 or header.scl_inter != 0)
    if keep_integers and not scaled and volume.dtype.kind in "iu" and volume.dtype.itemsize <= 2:
        # SimpleITK takes native byte order only: a big-endian file's integers are swapped (one copy, same size)
        values = volume.astype(volume.dtype.newbyteorder("="), copy=False)
    else:
        values = volume.astype(np.float32)
        if scaled:
            values *= np.float32(header.scl_slope)
            values += np.float32(header.scl_inter)
    image = sitk.GetImageFromArray(values)
    del values
    linear = RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(x) for x in RAS_TO_LPS @ affine[:3, 3]))
    image.SetDirection(tuple(float(x) for x in (linear / spacing).ravel()))
    return image
