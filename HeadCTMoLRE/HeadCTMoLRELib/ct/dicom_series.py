"""Find the DICOM volumes in a folder (or file list), check which of them can be a head CT, pick one.

Only headers are read here (pydicom, pixel data deferred). A multi-frame Enhanced CT file (Enhanced /
Legacy Converted Enhanced CT Image Storage) contributes one ``DicomSlice`` per frame, its position,
orientation, pixel spacing and rescale taken from the per-frame functional groups, else the shared ones
(``enhanced_frames``); after that single- and multi-frame images follow the same rules.

Splitting (``split_volumes``): what one SeriesInstanceUID holds is divided into *candidate volumes* by
frame of reference, image type (its first three values), Enhanced CT stack / temporal position,
image orientation (directions within ``ORIENTATION_TOLERANCE_DEG`` = 1.5 deg are one orientation; the
geometry is then rebuilt from the true slice positions) and acquisition number when acquisitions cover
the same stretch of the head (sequential "step-and-shoot" scans that number each rotation as its own
acquisition tile the head without overlap and stay one volume). Copies of one image (same
SOPInstanceUID and frame) are removed and localizers (ImageType LOCALIZER, or a single image whose
orientation differs from the rest) dropped, each with a note.

A candidate *qualifies* when it is CT Image Storage or Enhanced CT from modality CT with grey-scale
pixels, is not a derived map (perfusion, iodine, ...), holds pixel data, has values in HU (RescaleType
HU, US or absent) and at least 2 images of one size and pixel spacing (spacings equal within
``SPACING_TOLERANCE_MM``).

Choice among qualifying candidates (``choose_series``), first criterion that separates them wins:
1. non-contrast over contrast-enhanced / angiography (``contrast_evidence``: ContrastBolus* attributes,
   Enhanced CT contrast usage, series/protocol description words);
2. axial (slice normal within 30 deg of head-feet) over sagittal/coronal/oblique;
3. head (BodyPartExamined HEAD/BRAIN/SKULL or absent) over other body parts;
4. soft-tissue reconstruction kernel over a sharp (bone/lung) kernel (``is_sharp_kernel``);
5. slice spacing in the preferred band 2-5.5 mm over thinner or thicker series;
6. within the band, the thinner slice spacing; outside it, the spacing closest to the band;
7. more images; 8. candidate id (deterministic).
The choice and every skipped candidate are warnings with the reason. Qualifying candidates of more than
one patient or study are refused unless the user names one (``series``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .checks import CTInputError, orientation_code

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_STORAGE_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_STORAGE, LEGACY_ENHANCED_CT_STORAGE)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
DERIVED_MAP_WORDS = ("PERFUSION", "RCBF", "RCBV", "CBF", "CBV", "MTT", "TTP", "TMAX", "IODINE", "MONOENERGETIC",
                     "VNC", "ZEFF", "DENSITY", "SUBTRACTION", "MIP", "MINIP", "PROJECTION")
SHARP_KERNEL_WORDS = ("BONE", "BONEPLUS", "LUNG", "EDGE", "SHARP", "DETAIL")
PREFERRED_SPACING_MM = (2.0, 5.5)
ORIENTATION_TOLERANCE_DEG = 1.5  # image directions within this angle are one orientation (scanner jitter)
SPACING_TOLERANCE_MM = 1e-3  # PixelSpacing values closer than this are equal (float32 rounding of 3.6)
AXIAL_MAX_DEG = 30.0  # a slice normal within this angle of head-feet counts as axial
HEAD_BODY_PARTS = ("", "HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD NECK", "CEREBRAL")
HU_RESCALE_TYPES = ("", "HU")
# transfer syntaxes whose pixels are (or may be) lossy: JPEG baseline/extended (and retired lossy JPEG),
# JPEG-LS near-lossless, JPEG 2000 (lossy allowed), HTJ2K, JPEG XL, MPEG/HEVC video
LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG baseline (lossy)", "1.2.840.10008.1.2.4.51": "JPEG extended (lossy)",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless", "1.2.840.10008.1.2.4.91": "JPEG 2000 (lossy allowed)",
    "1.2.840.10008.1.2.4.93": "JPEG 2000 multi-component (lossy allowed)",
    "1.2.840.10008.1.2.4.203": "HTJ2K (lossy allowed)", "1.2.840.10008.1.2.4.112": "JPEG XL (lossy allowed)",
}
LOSSY_PREFIXES = ("1.2.840.10008.1.2.4.10",)  # MPEG-2/MPEG-4/HEVC video transfer syntaxes
_NO_CONTRAST_VALUES = ("", "NONE", "NO", "N", "0", "NIL", "NONE GIVEN", "NO CONTRAST", "WITHOUT")
_CONTRAST_WORDS = (r"\bCTA\b", r"ANGIO", r"\bC\+", r"\bW/\s*C\b", r"\bW/?\s*CONTRAST", r"\bWITH\s+CONTRAST",
                   r"\bPOST[-\s_]?CONTRAST", r"\bCONTRAST\b", r"\bARTERIAL\b", r"\bVENOUS\b", r"\bCTV\b",
                   r"VENOGRA", r"\bMIT\s+KM\b", r"\bKM\b", r"\bENHANCED\b", r"\bCE[-_\s]?CT\b", r"\bCECT\b")
_NON_CONTRAST_WORDS = (r"\bW/?O\b", r"\bWITHOUT\b", r"\bNON[-\s_]?CON", r"\bNCCT\b", r"\bOHNE\b", r"\bNATIV",
                       r"\bPLAIN\b", r"\bSANS\b", r"\bUN[-\s]?ENHANCED\b", r"\bNON[-\s_]?ENHANCED\b", r"\bNC\b")


@dataclass
class DicomSlice:
    """Header facts of one DICOM image (or one frame of a multi-frame file); no pixel data. LPS mm."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    image_type: tuple[str, ...]
    orientation: np.ndarray | None  # ImageOrientationPatient: row direction (3), column direction (3)
    position_mm: np.ndarray | None  # ImagePositionPatient of the first transmitted pixel
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float] | None  # (between rows, between columns) as in DICOM
    rescale_slope: float | None
    rescale_intercept: float | None
    photometric: str
    samples_per_pixel: int
    frames: int
    has_pixel_data: bool
    description: str
    kernel: str
    manufacturer: str
    instance_number: int | None
    frame_index: int | None = None  # 0-based frame of a multi-frame file; None for single-frame files
    forced: bool = False  # read without the DICM preamble (pydicom force=True); pixels are read the same way
    rescale_type: str = ""
    acquisition: str = ""
    frame_of_reference: str = ""
    stack: str = ""  # Enhanced CT StackID / TemporalPositionIndex
    patient: str = ""  # comparison key only (never reported)
    study_uid: str = ""
    body_part: str = ""
    contrast: str | None = None  # why this image looks contrast-enhanced, or None
    lossy: str | None = None  # why its pixels may be lossy, or None

    @property
    def label(self) -> str:
        """File name, with the frame number for a frame of a multi-frame file."""
        return self.path.name if self.frame_index is None else f"{self.path.name} frame {self.frame_index + 1}"


@dataclass
class DicomSeries:
    """One candidate volume: a SeriesInstanceUID, or one part of it (``part`` says which), its images,
    what was dropped, and why it cannot be used (if so)."""

    uid: str
    slices: list[DicomSlice]
    notes: list[str] = field(default_factory=list)
    problem: str | None = None
    part: str = ""  # e.g. "acquisition 2"; "" when the series is one volume
    index: int = 0  # 1-based number of the part within its series; 0 when the series is one volume

    @property
    def first(self) -> DicomSlice:
        return self.slices[0]

    @property
    def key(self) -> str:
        """Candidate id: the SeriesInstanceUID, with ``#N`` for part N of a series split in several."""
        return self.uid if not self.index else f"{self.uid}#{self.index}"

    @property
    def name(self) -> str:
        """How messages name this candidate: id, description, part."""
        part = f", {self.part}" if self.part else ""
        return f"{self.key} ({self.first.description or 'no description'}{part})"

    def slice_spacing_mm(self) -> float | None:
        """Median distance (mm) between neighbouring image positions along the slice normal."""
        positions = slice_positions_mm(self.slices)
        if positions is None or len(positions) < 2:
            return None
        return float(np.median(np.diff(np.sort(positions))))

    def summary(self) -> dict:
        """JSON-able description for listings (no patient identifiers)."""
        spacing = self.slice_spacing_mm()
        return {
            "uid": self.uid,
            "candidate": self.key,
            "part": self.part,
            "description": self.first.description,
            "modality": self.first.modality,
            "n_images": len(self.slices),
            "slice_spacing_mm": None if spacing is None else round(spacing, 3),
            "kernel": self.first.kernel,
            "manufacturer": self.first.manufacturer,
            "contrast": self.first.contrast,
            "qualifies": self.problem is None,
            "why_not": self.problem,
        }


@dataclass
class DicomScan:
    """Everything found under a DICOM source: candidate volumes, files that are not DICOM images, notes."""

    source: str
    series: list[DicomSeries]
    not_dicom: list[tuple[Path, str]]
    notes: list[str]


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword) if ds is not None else None
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _float_or_none(ds, keyword: str) -> float | None:
    value = ds.get(keyword) if ds is not None else None
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _vector(ds, keyword: str, length: int) -> np.ndarray | None:
    value = ds.get(keyword) if ds is not None else None
    try:
        vector = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (length,) and np.all(np.isfinite(vector)) else None


def contrast_evidence(ds) -> str | None:
    """Why the image ``ds`` (a pydicom dataset) looks contrast-enhanced or angiographic, or None.

    Evidence: ContrastBolusAgent / Route / Ingredient / Volume / StartTime / AgentSequence, Enhanced CT
    Contrast/Bolus Usage (administered YES), and SeriesDescription / ProtocolName words (CTA, angio, C+,
    contrast, arterial, venous, ...), the words ignored when the description says non-contrast (W/O,
    without, non-con, NCCT, nativ, ...)."""
    for keyword in ("ContrastBolusAgent", "ContrastBolusIngredient", "ContrastBolusRoute"):
        value = _text(ds, keyword)
        if value.upper() not in _NO_CONTRAST_VALUES:
            return f"{keyword} '{value}'"
    volume = _float_or_none(ds, "ContrastBolusVolume")
    if volume:
        return f"ContrastBolusVolume {volume:g} ml"
    if _text(ds, "ContrastBolusStartTime"):
        return f"ContrastBolusStartTime {_text(ds, 'ContrastBolusStartTime')}"
    agents = ds.get("ContrastBolusAgentSequence")
    if agents:
        meaning = _text(agents[0], "CodeMeaning") or "present"
        return f"ContrastBolusAgentSequence ({meaning})"
    for group in _functional_groups(ds, None):
        for usage in group.get("ContrastBolusUsageSequence") or []:
            if _text(usage, "ContrastBolusAgentAdministered").upper() == "YES":
                return "Contrast/Bolus Usage: agent administered"
    words = " ".join(_text(ds, k) for k in ("SeriesDescription", "ProtocolName")).upper()
    if words and not any(re.search(p, words) for p in _NON_CONTRAST_WORDS):
        for pattern in _CONTRAST_WORDS:
            found = re.search(pattern, words)
            if found:
                return f"description says '{found.group(0).strip()}' ({words.strip()})"
    return None


def lossy_evidence(ds) -> str | None:
    """Why the pixels of ``ds`` may have lost information, or None: LossyImageCompression 01, a lossy
    transfer syntax, or 8-bit stored data."""
    if _text(ds, "LossyImageCompression") == "01":
        method = _text(ds, "LossyImageCompressionMethod")
        ratio = _text(ds, "LossyImageCompressionRatio")
        return ("LossyImageCompression 01" + (f" ({method}" + (f", ratio {ratio}" if ratio else "") + ")"
                                              if method else ""))
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    if syntax in LOSSY_TRANSFER_SYNTAXES and _text(ds, "LossyImageCompression") != "00":
        return f"transfer syntax {LOSSY_TRANSFER_SYNTAXES[syntax]}"
    if syntax.startswith(LOSSY_PREFIXES):
        return f"video transfer syntax {syntax}"
    bits = int(ds.get("BitsStored") or 16)
    if bits <= 8:
        return f"only {bits} bits stored per pixel (HU resolution lost)"
    return None


def _functional_groups(ds, frame: int | None) -> list:
    """The functional group items that apply to ``frame``: its per-frame item first, then the shared one
    (frame None: the shared item and the first per-frame item)."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    index = 0 if frame is None else frame
    if index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    if shared:
        groups.append(shared[0])
    return groups


def _macro(groups: list, keyword: str):
    """First item of the functional group sequence ``keyword`` in ``groups`` (per-frame before shared)."""
    for group in groups:
        sequence = group.get(keyword)
        if sequence:
            return sequence[0]
    return None


def _patient_key(ds) -> str:
    return "|".join(_text(ds, k) for k in ("PatientID", "PatientName", "PatientBirthDate"))


def _slice_from_dataset(path: Path, ds, forced: bool, frame: int | None = None) -> DicomSlice:
    """One DicomSlice from a single-frame dataset (frame None) or from frame ``frame`` of a multi-frame one."""
    meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    number = ds.get("InstanceNumber")
    sources = {"position": ds, "orientation": ds, "measures": ds, "rescale": ds, "content": None}
    image_type = _text(ds, "ImageType")
    if frame is not None:
        groups = _functional_groups(ds, frame)
        sources = {"position": _macro(groups, "PlanePositionSequence"),
                   "orientation": _macro(groups, "PlaneOrientationSequence"),
                   "measures": _macro(groups, "PixelMeasuresSequence"),
                   "rescale": _macro(groups, "PixelValueTransformationSequence") or ds,
                   "content": _macro(groups, "FrameContentSequence")}
        frame_type = _macro(groups, "CTImageFrameTypeSequence")
        image_type = _text(frame_type, "FrameType") or image_type
    spacing = _vector(sources["measures"], "PixelSpacing", 2)
    content = sources["content"]
    acquisition = _text(content, "FrameAcquisitionNumber") if content is not None else _text(ds, "AcquisitionNumber")
    stack = "" if content is None else "/".join(filter(None, (_text(content, "StackID"),
                                                               _text(content, "TemporalPositionIndex"))))
    return DicomSlice(
        path=path,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID") or "(no SeriesInstanceUID)",
        sop_class_uid=_text(ds, "SOPClassUID") or meta_class,
        modality=_text(ds, "Modality").upper(),
        image_type=tuple(v.strip().upper() for v in image_type.split("\\") if v.strip()),
        orientation=_vector(sources["orientation"], "ImageOrientationPatient", 6),
        position_mm=_vector(sources["position"], "ImagePositionPatient", 3),
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        pixel_spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        rescale_slope=_float_or_none(sources["rescale"], "RescaleSlope"),
        rescale_intercept=_float_or_none(sources["rescale"], "RescaleIntercept"),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
        frames=int(_float_or_none(ds, "NumberOfFrames") or 1),
        has_pixel_data=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        description=_text(ds, "SeriesDescription"),
        kernel=_text(ds, "ConvolutionKernel"),
        manufacturer=_text(ds, "Manufacturer"),
        instance_number=None if number in (None, "") else int(number),
        frame_index=frame,
        forced=forced,
        rescale_type=(_text(sources["rescale"], "RescaleType") or _text(ds, "RescaleType")).upper(),
        acquisition=acquisition,
        frame_of_reference=_text(ds, "FrameOfReferenceUID"),
        stack=stack,
        patient=_patient_key(ds),
        study_uid=_text(ds, "StudyInstanceUID"),
        body_part=_text(ds, "BodyPartExamined").upper(),
        contrast=contrast_evidence(ds),
        lossy=lossy_evidence(ds),
    )


def is_multi_frame(ds) -> bool:
    """True for a multi-frame image with functional groups (Enhanced / Legacy Converted Enhanced CT)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def read_dataset(path: Path, forced: bool, header_only: bool):
    """pydicom dataset of ``path``: with or without the preamble (``forced``), pixel data deferred when
    ``header_only``. A file without file meta gets the transfer syntax its encoding was read with, so its
    pixels decode exactly as the header scan found them."""
    ds = pydicom.dcmread(path, defer_size=4096 if header_only else None, force=forced)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta and not header_only:
        implicit = getattr(ds, "is_implicit_VR", None)
        little = getattr(ds, "is_little_endian", True)
        ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit or implicit is None
                                          else pydicom.uid.ExplicitVRLittleEndian if little
                                          else pydicom.uid.ExplicitVRBigEndian)
    return ds


def read_header(path: Path) -> list[DicomSlice] | str:
    """Headers of one file: one DicomSlice per image (per frame for Enhanced CT), "DICOMDIR" for a media
    index, or the reason it is not a DICOM image."""
    forced = False
    try:
        ds = read_dataset(path, False, True)
    except InvalidDicomError:
        try:  # old files without the 128-byte preamble / "DICM" prefix
            ds, forced = read_dataset(path, True, True), True
            if "SOPInstanceUID" not in ds or "Rows" not in ds:
                return "not a DICOM file (no DICM prefix and no image header)"
        except Exception:  # noqa: BLE001 - any parser failure means "not DICOM"
            return "not a DICOM file (no DICM prefix)"
    except Exception as error:  # noqa: BLE001 - truncated/garbled files raise assorted errors
        return f"not a DICOM file (unreadable: {type(error).__name__})"
    meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if meta_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    if not _text(ds, "SOPInstanceUID") or not _text(ds, "SOPClassUID") and not meta_class:
        return "not a DICOM file (truncated or no SOP Instance UID)"
    if "Rows" not in ds and not any(k in ds for k in ("PixelData", "FloatPixelData")):
        return "DICOM object without an image (e.g. report or presentation state)"
    frames = int(_float_or_none(ds, "NumberOfFrames") or 1)
    if is_multi_frame(ds):
        return [_slice_from_dataset(path, ds, forced, frame) for frame in range(frames)]
    return [_slice_from_dataset(path, ds, forced)]


def _files_under(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return files


def scan_dicom(source) -> DicomScan:
    """Read the headers of every file in a folder (recursively) or in a list of files.

    A DICOMDIR is recognised and skipped (the folder tree it indexes is scanned directly).
    Raises CTInputError when no DICOM image is found at all.
    """
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if folder.is_file() and folder.name.upper() == "DICOMDIR":
            folder = folder.parent
        paths = _files_under(folder) if folder.is_dir() else [folder]
        label = str(folder)
    else:
        paths = [Path(p) for p in source]
        label = f"{len(paths)} files" + (f" in {paths[0].parent}" if paths else "")
    slices, not_dicom, notes = [], [], []
    for path in paths:
        header = read_header(path)
        if header == "DICOMDIR":
            notes.append(f"DICOMDIR index {path.name} ignored; the folder tree was scanned directly")
        elif isinstance(header, str):
            not_dicom.append((path, header))
        else:
            slices.extend(header)
    if not slices:
        listing = "; ".join(f"{p.name}: {why}" for p, why in not_dicom[:8])
        more = f" (+{len(not_dicom) - 8} more)" if len(not_dicom) > 8 else ""
        detail = f" ({len(not_dicom)} files skipped: {listing}{more})" if not_dicom else ""
        raise CTInputError(f"no DICOM images found in {label}{detail}. Point to the folder of the CT series.")
    if not_dicom:
        names = ", ".join(p.name for p, _ in not_dicom[:5]) + (" ..." if len(not_dicom) > 5 else "")
        notes.append(f"ignored {len(not_dicom)} file(s) that are not DICOM images: {names}")
    groups: dict[str, list[DicomSlice]] = {}
    for header in slices:
        groups.setdefault(header.series_instance_uid, []).append(header)
    series = [part for uid, members in groups.items() for part in _build_series(uid, members)]
    return DicomScan(source=label, series=series, not_dicom=not_dicom, notes=notes)


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal (LPS) of the image plane: row direction x column direction."""
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def slice_positions_mm(slices: list[DicomSlice]) -> np.ndarray | None:
    """Position of each slice along the normal of the first slice's plane (IPP . normal), in mm."""
    if not slices or slices[0].orientation is None or any(s.position_mm is None for s in slices):
        return None
    normal = slice_normal(slices[0].orientation)
    return np.array([float(np.dot(s.position_mm, normal)) for s in slices])


def orientation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Largest angle (deg) between the row directions and between the column directions of two IOPs."""
    angles = []
    for part in (slice(0, 3), slice(3, 6)):
        u, v = a[part] / np.linalg.norm(a[part]), b[part] / np.linalg.norm(b[part])
        angles.append(math.degrees(math.acos(float(np.clip(np.dot(u, v), -1.0, 1.0)))))
    return max(angles)


def _remove_duplicates(slices: list[DicomSlice], notes: list[str]) -> list[DicomSlice]:
    seen: dict[tuple, DicomSlice] = {}
    copies = []
    for header in slices:
        key = (header.sop_instance_uid, header.frame_index)
        if key in seen:
            copies.append(header.label)
        else:
            seen[key] = header
    if copies:
        notes.append(f"removed {len(copies)} duplicate file(s) of images already present (same SOPInstanceUID): "
                     + ", ".join(copies[:5]))
    return list(seen.values())


def _orientation_clusters(slices: list[DicomSlice]) -> list[list[DicomSlice]]:
    """Group slices whose orientations lie within ORIENTATION_TOLERANCE_DEG of a group's first member;
    largest group first."""
    clusters: list[list[DicomSlice]] = []
    for header in slices:
        for cluster in clusters:
            if orientation_angle_deg(cluster[0].orientation, header.orientation) <= ORIENTATION_TOLERANCE_DEG:
                cluster.append(header)
                break
        else:
            clusters.append([header])
    return sorted(clusters, key=len, reverse=True)


def _acquisitions_overlap(groups: dict[str, list[DicomSlice]]) -> bool:
    """True when two acquisitions cover the same stretch along the slice normal (more than half a slice):
    they are separate volumes. Acquisitions that tile the head one after another (step-and-shoot) are not."""
    ranges = []
    for members in groups.values():
        positions = slice_positions_mm(members)
        if positions is None:
            return False
        ranges.append((positions.min(), positions.max()))
    every = slice_positions_mm([m for members in groups.values() for m in members])
    half_gap = 0.5 * float(np.median(np.diff(np.unique(np.round(every, 3))))) if len(np.unique(every)) > 1 else 0.0
    ranges.sort()
    return any(ranges[k + 1][0] < ranges[k][1] - half_gap or ranges[k + 1][0] <= ranges[k][0]
               for k in range(len(ranges) - 1))


def split_volumes(slices: list[DicomSlice], notes: list[str]) -> list[tuple[str, list[DicomSlice]]]:
    """Divide the images of one series into the volumes they really form (see module docstring).

    Returns (part description, images) pairs; one pair with description "" when nothing had to be split.
    Single images whose orientation differs from a larger group are dropped as scouts (with a note).
    """
    keyed: dict[tuple, list[DicomSlice]] = {}
    for header in slices:
        keyed.setdefault((header.frame_of_reference, header.image_type[:3], header.stack), []).append(header)
    parts: list[tuple[list[str], list[DicomSlice]]] = []
    scouts = []
    for (frame_of_reference, image_type, stack), members in keyed.items():
        label = []
        if len({k[0] for k in keyed}) > 1:
            label.append(f"frame of reference ...{frame_of_reference[-8:]}")
        if len({k[1] for k in keyed}) > 1:
            label.append(f"ImageType {'/'.join(image_type)}")
        if len({k[2] for k in keyed}) > 1:
            label.append(f"stack/temporal position {stack}")
        oriented = [s for s in members if s.orientation is not None]
        clusters = _orientation_clusters(oriented) if oriented else []
        if len(clusters) > 1:
            scouts += [c[0] for c in clusters[1:] if len(c) == 1 and len(clusters[0]) > 2]
            clusters = [c for c in clusters if len(c) > 1 or len(clusters[0]) <= 2] or clusters[:1]
        unoriented = [s for s in members if s.orientation is None]
        if unoriented:
            clusters = clusters + [unoriented]
        for number, cluster in enumerate(clusters):
            cluster_label = label + ([f"orientation {orientation_code(_plane_matrix(cluster[0]))}"
                                      f" #{number + 1}"] if len(clusters) > 1 and cluster[0].orientation is not None
                                     else [])
            acquisitions: dict[str, list[DicomSlice]] = {}
            for header in cluster:
                acquisitions.setdefault(header.acquisition, []).append(header)
            if len(acquisitions) > 1 and _acquisitions_overlap(acquisitions):
                for number_text, acquired in sorted(acquisitions.items(), key=lambda item: _natural(item[0])):
                    parts.append((cluster_label + [f"acquisition {number_text or '(none)'}"], acquired))
            else:
                parts.append((cluster_label, cluster))
    if scouts:
        notes.append(f"dropped {len(scouts)} localizer/scout image(s) (orientation different from the series): "
                     + ", ".join(s.label for s in scouts[:5]))
    if len(parts) > 1:
        notes.append(f"series holds {len(parts)} separate volumes (split by "
                     "frame of reference / image type / stack / orientation / acquisition): "
                     + "; ".join(", ".join(label) + f" ({len(members)} images)" for label, members in parts))
    return [(", ".join(label), members) for label, members in parts]


def _natural(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _plane_matrix(header: DicomSlice) -> np.ndarray:
    row, col = header.orientation[:3], header.orientation[3:]
    return np.column_stack([row, col, np.cross(row, col)]).ravel()


def _drop_localizers(slices: list[DicomSlice], notes: list[str]) -> list[DicomSlice]:
    """Drop scout images marked ImageType LOCALIZER."""
    scouts = [s for s in slices if "LOCALIZER" in s.image_type]
    if scouts:
        notes.append(f"dropped {len(scouts)} localizer/scout image(s) (ImageType LOCALIZER): "
                     + ", ".join(s.label for s in scouts[:5]))
    return [s for s in slices if "LOCALIZER" not in s.image_type]


def is_sharp_kernel(kernel: str, description: str = "") -> bool:
    """True for bone/lung (sharp) reconstruction kernels: GE BONE/LUNG/EDGE/DETAIL, Siemens H/B/J/Hr/Br
    kernels numbered 50 and above (e.g. H70h, Br64), or a description saying BONE."""
    words = set(re.findall(r"[A-Z]+", f"{kernel} {description}".upper()))
    if words & set(SHARP_KERNEL_WORDS):
        return True
    siemens = re.search(r"\b[A-Z][A-Z]?(\d{2})[A-Z]?\b", kernel.upper())
    return bool(siemens and int(siemens.group(1)) >= 50)


def _series_problem(series: DicomSeries) -> str | None:
    """Why this candidate cannot be a head CT volume, or None."""
    first = series.first
    if first.modality != "CT":
        return f"Modality is {first.modality or 'missing'}; this tool expects non-contrast head CT"
    if first.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX):
        return ("Secondary Capture (a screenshot/derived picture"
                + (f", {first.photometric} colour pixels" if first.samples_per_pixel != 1 else "")
                + "), not CT image data")
    if first.samples_per_pixel != 1 or not first.photometric.startswith("MONOCHROME"):
        return (f"{first.photometric or 'colour'} images with {first.samples_per_pixel} samples per pixel (RGB), "
                "not CT data")
    derived = [w for w in DERIVED_MAP_WORDS if w in first.image_type]
    if first.image_type[:1] == ("DERIVED",) and derived:
        return (f"derived {'/'.join(derived).lower()} map (ImageType {'/'.join(first.image_type)}), "
                "not a non-contrast CT; load the original axial series")
    if first.sop_class_uid and first.sop_class_uid not in CT_STORAGE_CLASSES:
        return f"SOP class {first.sop_class_uid} is not CT Image Storage"
    if first.frames > 1 and first.frame_index is None:
        return (f"multi-frame image ({first.frames} frames) without Enhanced CT functional groups: the frame "
                "positions are unknown; export the series as single-frame CT images")
    if not all(s.has_pixel_data for s in series.slices):
        return "DICOM files contain no pixel data (header-only or stripped instances)"
    odd_type = next((s for s in series.slices if s.rescale_type not in HU_RESCALE_TYPES + ("US",)), None)
    if odd_type is not None:
        return (f"RescaleType is {odd_type.rescale_type} in {odd_type.label}: the values are not Hounsfield units "
                "(e.g. an iodine or density map); load the original CT series")
    if any(s.orientation is None or s.position_mm is None for s in series.slices):
        return "images lack ImagePositionPatient/ImageOrientationPatient; the geometry cannot be built"
    if len(series.slices) < 2:
        return "only 1 image; insufficient coverage for a head CT volume"
    groups: dict[tuple, list[DicomSlice]] = {}
    for s in series.slices:
        key = (s.rows, s.columns, s.pixel_spacing_mm)
        match = next((k for k in groups if k[:2] == key[:2] and _same_spacing(k[2], key[2])), key)
        groups.setdefault(match, []).append(s)
    if len(groups) > 1:
        listing = ", ".join(
            f"{r}x{c} @ {p[0]:g}x{p[1]:g} mm in {len(members)} file(s) e.g. {members[0].label}"
            if p else f"{r}x{c} in {len(members)} file(s) e.g. {members[0].label}"
            for (r, c, p), members in sorted(groups.items(), key=lambda item: -len(item[1])))
        return (f"slices have different Rows/Columns/PixelSpacing ({listing}); the series is inconsistent: "
                "re-export it or remove the odd files")
    if first.pixel_spacing_mm is None:
        return "PixelSpacing missing; the geometry cannot be built"
    return None


def _same_spacing(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.allclose(a, b, rtol=0, atol=SPACING_TOLERANCE_MM))


def _build_series(uid: str, members: list[DicomSlice]) -> list[DicomSeries]:
    notes: list[str] = []
    slices = _remove_duplicates(members, notes)
    kept = _drop_localizers(slices, notes)
    if not kept:
        return [DicomSeries(uid=uid, slices=slices, notes=notes,
                            problem="only localizer/scout images; no axial CT slices")]
    parts = split_volumes(kept, notes)
    candidates = []
    for index, (part, images) in enumerate(parts, start=1):
        candidate = DicomSeries(uid=uid, slices=images, notes=list(notes), part=part,
                                index=index if len(parts) > 1 else 0)
        candidate.problem = _series_problem(candidate)
        candidates.append(candidate)
    return candidates


def _is_axial(series: DicomSeries) -> bool:
    normal = slice_normal(series.first.orientation)
    return abs(normal[2]) >= math.cos(math.radians(AXIAL_MAX_DEG))


def _preference(series: DicomSeries) -> tuple:
    spacing = series.slice_spacing_mm() or 0.0
    low, high = PREFERRED_SPACING_MM
    in_band = low <= spacing <= high
    distance = spacing if in_band else min(abs(spacing - low), abs(spacing - high)) + high
    return (series.first.contrast is not None, not _is_axial(series),
            series.first.body_part not in HEAD_BODY_PARTS,
            is_sharp_kernel(series.first.kernel, series.first.description), not in_band, distance,
            -len(series.slices), series.key)


def _why_lower(skipped: DicomSeries, chosen: DicomSeries) -> str:
    """The first preference criterion on which ``skipped`` loses to ``chosen``, in words."""
    a, b = _preference(skipped), _preference(chosen)
    first = skipped.first
    reasons = [
        f"contrast-enhanced or angiography ({first.contrast})",
        f"not axial (orientation {orientation_code(_plane_matrix(first))})",
        f"body part {first.body_part}, not head",
        f"sharp kernel {first.kernel or first.description}",
        f"slice spacing {skipped.slice_spacing_mm() or 0:.2f} mm outside "
        f"{PREFERRED_SPACING_MM[0]:g}-{PREFERRED_SPACING_MM[1]:g} mm",
        f"slice spacing {skipped.slice_spacing_mm() or 0:.2f} mm vs {chosen.slice_spacing_mm() or 0:.2f} mm",
        f"fewer images ({len(skipped.slices)} vs {len(chosen.slices)})",
        "same rank; the first candidate id was taken",
    ]
    return next((reason for x, y, reason in zip(a, b, reasons) if x != y), reasons[-1])


def series_warnings(series: DicomSeries) -> list[str]:
    """What the user must know about the images of a chosen candidate: contrast, lossy compression,
    RescaleType US, orientation jitter within the tolerance."""
    warnings = []
    contrast = next((s.contrast for s in series.slices if s.contrast), None)
    if contrast:
        warnings.append(f"contrast-enhanced or angiography series ({contrast}): the model expects non-contrast "
                        "head CT; findings (haemorrhage especially) may be wrong. Load the non-contrast series "
                        "if there is one.")
    lossy = next((s.lossy for s in series.slices if s.lossy), None)
    if lossy:
        warnings.append(f"lossy compressed pixel data ({lossy}): subtle findings may be lost or invented by "
                        "compression artefacts; use the original uncompressed or lossless export if possible.")
    unspecified = [s for s in series.slices if s.rescale_type == "US"]
    if unspecified:
        warnings.append(f"RescaleType US (unspecified) in {len(unspecified)} image(s): values taken as Hounsfield "
                        "units after the plausibility check; verify that air is about -1000 HU.")
    reference = series.first.orientation
    if reference is not None:
        jitter = max(orientation_angle_deg(reference, s.orientation) for s in series.slices)
        if jitter > 0.01:
            warnings.append(f"slice orientations differ by up to {jitter:.2f} deg (within the "
                            f"{ORIENTATION_TOLERANCE_DEG:g} deg tolerance): treated as one orientation and "
                            "resampled from the true slice positions")
    return warnings


def _refuse_mixed_subjects(scan: DicomScan, usable: list[DicomSeries]) -> None:
    """Refuse when the qualifying candidates belong to more than one patient or study."""
    for attribute, what in (("patient", "patients"), ("study_uid", "studies")):
        owners: dict[str, list[DicomSeries]] = {}
        for candidate in usable:
            owners.setdefault(getattr(candidate.first, attribute), []).append(candidate)
        if len(owners) > 1:
            listing = "; ".join(f"{what[:-1] if what != 'studies' else 'study'} {n}: "
                                + ", ".join(c.name for c in members)
                                for n, members in enumerate(owners.values(), start=1))
            raise CTInputError(
                f"{scan.source}: the folder holds CT series of {len(owners)} different {what} ({listing}). "
                "Refusing to guess which one is meant: choose one with --series <id> (series=...), or select "
                "it in the Slicer DICOM browser.")


def choose_series(scan: DicomScan, series_uid: str | None = None) -> tuple[DicomSeries, list[str]]:
    """Pick the candidate volume to load (see module docstring for the rule); return it and warnings.

    series_uid: a candidate id (SeriesInstanceUID, or ``UID#N`` for one part of a split series), a unique
    prefix, or a SeriesDescription, chosen by the user; a series split in several parts is then chosen
    among its parts by the rule. Raises CTInputError, naming every candidate and why it does not qualify,
    when none can be used, and when qualifying candidates belong to different patients or studies
    and no series was named.
    """
    pool = scan.series
    warnings = []
    if series_uid is not None:
        matches = ([s for s in scan.series if s.key == series_uid] or [s for s in scan.series if s.uid == series_uid]
                   or [s for s in scan.series if s.key.startswith(series_uid) or s.first.description == series_uid])
        if not matches or len({s.uid for s in matches}) > 1:
            available = "; ".join(s.name for s in scan.series)
            raise CTInputError(f"{scan.source}: series {series_uid!r} "
                               f"{'is ambiguous' if matches else 'not found'}; available: {available}")
        if len(matches) == 1 and matches[0].problem:
            raise CTInputError(f"{scan.source}: series {matches[0].key} cannot be used: {matches[0].problem}.")
        pool = matches
        warnings.append(f"series {matches[0].uid} chosen explicitly")
    usable = [s for s in pool if s.problem is None]
    if not usable:
        reasons = "; ".join(f"series {s.name}, {len(s.slices)} images: {s.problem}" for s in pool)
        if len(pool) == 1:
            only = pool[0]
            reasons = f"{only.problem} (series {only.key}, {len(only.slices)} image{'s' * (len(only.slices) != 1)})"
        raise CTInputError(f"{scan.source}: {reasons}.")
    if series_uid is None:
        _refuse_mixed_subjects(scan, usable)
    ranked = sorted(usable, key=_preference)
    chosen = ranked[0]
    if len(pool) > 1:
        warnings.append(
            f"{len(pool)} candidate volumes found; chose {chosen.name}: kernel {chosen.first.kernel or '?'}, "
            f"{chosen.slice_spacing_mm() or 0:.2f} mm spacing, {len(chosen.slices)} images, by the rule: "
            "non-contrast, axial, head, soft-tissue kernel, slice spacing 2-5.5 mm (thinnest), most images. "
            "Pass series=<id> (--series) to choose another.")
        for other in pool:
            if other is not chosen:
                why = other.problem or _why_lower(other, chosen)
                warnings.append(f"skipped series {other.name}: {why}")
    return chosen, warnings
