"""Find the DICOM series in a folder (or file list), check which of them can be a head CT, pick one.

Only headers are read here (pydicom, pixel data deferred). Files are grouped by SeriesInstanceUID;
inside a series, copies of one image (same SOPInstanceUID) are removed and localizer/scout images
(ImageType LOCALIZER, or an orientation different from the bulk of the series) are dropped, each
with a note.

A series *qualifies* when it is CT Image Storage from modality CT with grey-scale pixels, is not a
derived map (perfusion, iodine, ...), is single-frame, holds pixel data and has at least 2 images.

Choice among qualifying series (``choose_series``), first criterion that separates them wins:
1. soft-tissue reconstruction kernel over a sharp (bone/lung) kernel (``is_sharp_kernel``);
2. slice spacing in the preferred band 2-5.5 mm over thinner or thicker series;
3. within the band, the thinner slice spacing; outside it, the spacing closest to the band;
4. more images; 5. SeriesInstanceUID (deterministic).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .checks import CTInputError

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
DERIVED_MAP_WORDS = ("PERFUSION", "RCBF", "RCBV", "CBF", "CBV", "MTT", "TTP", "TMAX", "IODINE", "MONOENERGETIC",
                     "VNC", "ZEFF", "DENSITY", "SUBTRACTION", "MIP", "MINIP", "PROJECTION")
SHARP_KERNEL_WORDS = ("BONE", "BONEPLUS", "LUNG", "EDGE", "SHARP", "DETAIL")
PREFERRED_SPACING_MM = (2.0, 5.5)
ORIENTATION_TOLERANCE = 1e-3  # |difference| of IOP direction cosines treated as the same orientation


@dataclass
class DicomSlice:
    """Header facts of one DICOM image file (no pixel data). Positions/orientations in LPS mm."""

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


@dataclass
class DicomSeries:
    """One SeriesInstanceUID: its usable images, what was dropped, and why it cannot be used (if so)."""

    uid: str
    slices: list[DicomSlice]
    notes: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def first(self) -> DicomSlice:
        return self.slices[0]

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
            "description": self.first.description,
            "modality": self.first.modality,
            "n_images": len(self.slices),
            "slice_spacing_mm": None if spacing is None else round(spacing, 3),
            "kernel": self.first.kernel,
            "manufacturer": self.first.manufacturer,
            "qualifies": self.problem is None,
            "why_not": self.problem,
        }


@dataclass
class DicomScan:
    """Everything found under a DICOM source: series, files that are not DICOM images, notes."""

    source: str
    series: list[DicomSeries]
    not_dicom: list[tuple[Path, str]]
    notes: list[str]


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _float_or_none(ds, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _vector(ds, keyword: str, length: int) -> np.ndarray | None:
    value = ds.get(keyword)
    try:
        vector = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (length,) and np.all(np.isfinite(vector)) else None


def _slice_from_dataset(path: Path, ds) -> DicomSlice:
    meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    spacing = _vector(ds, "PixelSpacing", 2)
    number = ds.get("InstanceNumber")
    return DicomSlice(
        path=path,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID") or "(no SeriesInstanceUID)",
        sop_class_uid=_text(ds, "SOPClassUID") or meta_class,
        modality=_text(ds, "Modality").upper(),
        image_type=tuple(v.strip().upper() for v in _text(ds, "ImageType").split("\\") if v.strip()),
        orientation=_vector(ds, "ImageOrientationPatient", 6),
        position_mm=_vector(ds, "ImagePositionPatient", 3),
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        pixel_spacing_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        rescale_slope=_float_or_none(ds, "RescaleSlope"),
        rescale_intercept=_float_or_none(ds, "RescaleIntercept"),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
        frames=int(_float_or_none(ds, "NumberOfFrames") or 1),
        has_pixel_data=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        description=_text(ds, "SeriesDescription"),
        kernel=_text(ds, "ConvolutionKernel"),
        manufacturer=_text(ds, "Manufacturer"),
        instance_number=None if number in (None, "") else int(number),
    )


def read_header(path: Path) -> DicomSlice | str:
    """Header of one file as a DicomSlice, "DICOMDIR" for a media index, or the reason it is not DICOM."""
    try:
        ds = pydicom.dcmread(path, defer_size=4096)
    except InvalidDicomError:
        try:  # old files without the 128-byte preamble / "DICM" prefix
            ds = pydicom.dcmread(path, defer_size=4096, force=True)
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
    return _slice_from_dataset(path, ds)


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
            slices.append(header)
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
    series = [_build_series(uid, members) for uid, members in groups.items()]
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


def _remove_duplicates(slices: list[DicomSlice], notes: list[str]) -> list[DicomSlice]:
    seen: dict[str, DicomSlice] = {}
    copies = []
    for header in slices:
        if header.sop_instance_uid in seen:
            copies.append(header.path.name)
        else:
            seen[header.sop_instance_uid] = header
    if copies:
        notes.append(f"removed {len(copies)} duplicate file(s) of images already present (same SOPInstanceUID): "
                     + ", ".join(copies[:5]))
    return list(seen.values())


def _drop_localizers(slices: list[DicomSlice], notes: list[str]) -> list[DicomSlice]:
    """Drop scout images: ImageType LOCALIZER, or an orientation that differs from the bulk."""
    scouts = [s for s in slices if "LOCALIZER" in s.image_type]
    kept = [s for s in slices if "LOCALIZER" not in s.image_type]
    oriented = [s for s in kept if s.orientation is not None]
    if oriented:
        keys = [tuple(np.round(s.orientation / ORIENTATION_TOLERANCE).astype(int)) for s in oriented]
        bulk_key = max(set(keys), key=keys.count)
        bulk = np.array(bulk_key) * ORIENTATION_TOLERANCE
        odd = [s for s in oriented if np.max(np.abs(s.orientation - bulk)) > 10 * ORIENTATION_TOLERANCE]
        if odd and len(odd) < len(oriented) / 2:
            scouts += odd
            kept = [s for s in kept if not any(s is o for o in odd)]
    if scouts:
        notes.append(f"dropped {len(scouts)} localizer/scout image(s) (ImageType LOCALIZER or orientation "
                     "different from the series): " + ", ".join(s.path.name for s in scouts[:5]))
    return kept


def is_sharp_kernel(kernel: str, description: str = "") -> bool:
    """True for bone/lung (sharp) reconstruction kernels: GE BONE/LUNG/EDGE/DETAIL, Siemens H/B/J/Hr/Br
    kernels numbered 50 and above (e.g. H70h, Br64), or a description saying BONE."""
    words = set(re.findall(r"[A-Z]+", f"{kernel} {description}".upper()))
    if words & set(SHARP_KERNEL_WORDS):
        return True
    siemens = re.search(r"\b[A-Z][A-Z]?(\d{2})[A-Z]?\b", kernel.upper())
    return bool(siemens and int(siemens.group(1)) >= 50)


def _series_problem(series: DicomSeries) -> str | None:
    """Why this series cannot be a non-contrast head CT volume, or None."""
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
    if first.frames > 1 or first.sop_class_uid == ENHANCED_CT_STORAGE:
        return (f"multi-frame Enhanced CT ({first.frames} frames) is not supported; export the series as "
                "single-frame CT images")
    if first.sop_class_uid and first.sop_class_uid != CT_IMAGE_STORAGE:
        return f"SOP class {first.sop_class_uid} is not CT Image Storage"
    if not all(s.has_pixel_data for s in series.slices):
        return "DICOM files contain no pixel data (header-only or stripped instances)"
    if any(s.orientation is None or s.position_mm is None for s in series.slices):
        return "images lack ImagePositionPatient/ImageOrientationPatient; the geometry cannot be built"
    orientations = np.array([s.orientation for s in series.slices])
    if np.max(np.abs(orientations - orientations[0])) > 10 * ORIENTATION_TOLERANCE:
        return ("images have different orientations (ImageOrientationPatient), e.g. "
                f"{series.slices[0].path.name} and "
                f"{series.slices[int(np.argmax(np.abs(orientations - orientations[0]).max(axis=1)))].path.name}; "
                "the series mixes reconstructions: export one of them")
    if len(series.slices) < 2:
        return "only 1 image; insufficient coverage for a head CT volume"
    groups: dict[tuple, list[DicomSlice]] = {}
    for s in series.slices:
        groups.setdefault((s.rows, s.columns, s.pixel_spacing_mm), []).append(s)
    if len(groups) > 1:
        listing = ", ".join(
            f"{r}x{c} @ {p[0]:g}x{p[1]:g} mm in {len(members)} file(s) e.g. {members[0].path.name}"
            if p else f"{r}x{c} in {len(members)} file(s) e.g. {members[0].path.name}"
            for (r, c, p), members in sorted(groups.items(), key=lambda item: -len(item[1])))
        return (f"slices have different Rows/Columns/PixelSpacing ({listing}); the series is inconsistent: "
                "re-export it or remove the odd files")
    if first.pixel_spacing_mm is None:
        return "PixelSpacing missing; the geometry cannot be built"
    return None


def _build_series(uid: str, members: list[DicomSlice]) -> DicomSeries:
    notes: list[str] = []
    slices = _remove_duplicates(members, notes)
    kept = _drop_localizers(slices, notes)
    if not kept:
        return DicomSeries(uid=uid, slices=slices, notes=notes,
                           problem="only localizer/scout images; no axial CT slices")
    series = DicomSeries(uid=uid, slices=kept, notes=notes)
    series.problem = _series_problem(series)
    return series


def _preference(series: DicomSeries) -> tuple:
    spacing = series.slice_spacing_mm() or 0.0
    low, high = PREFERRED_SPACING_MM
    in_band = low <= spacing <= high
    distance = spacing if in_band else min(abs(spacing - low), abs(spacing - high)) + high
    return (is_sharp_kernel(series.first.kernel, series.first.description), not in_band, distance,
            -len(series.slices), series.uid)


def choose_series(scan: DicomScan, series_uid: str | None = None) -> tuple[DicomSeries, list[str]]:
    """Pick the series to load (see module docstring for the rule); return it and notes.

    series_uid: an explicit SeriesInstanceUID (or unique prefix / SeriesDescription) chosen by the user.
    Raises CTInputError, naming every series and why it does not qualify, when none can be used.
    """
    if series_uid is not None:
        matches = [s for s in scan.series if s.uid == series_uid] or \
                  [s for s in scan.series if s.uid.startswith(series_uid) or s.first.description == series_uid]
        if len(matches) != 1:
            available = "; ".join(f"{s.uid} ({s.first.description or 'no description'})" for s in scan.series)
            raise CTInputError(f"{scan.source}: series {series_uid!r} "
                               f"{'is ambiguous' if matches else 'not found'}; available: {available}")
        chosen = matches[0]
        if chosen.problem:
            raise CTInputError(f"{scan.source}: series {chosen.uid} cannot be used: {chosen.problem}.")
        return chosen, [f"series {chosen.uid} chosen explicitly"]
    usable = [s for s in scan.series if s.problem is None]
    if not usable:
        reasons = "; ".join(
            f"series {s.uid} ({s.first.description or 'no description'}, {len(s.slices)} images): {s.problem}"
            for s in scan.series)
        if len(scan.series) == 1:
            only = scan.series[0]
            reasons = f"{only.problem} (series {only.uid}, {len(only.slices)} image{'s' * (len(only.slices) != 1)})"
        raise CTInputError(f"{scan.source}: {reasons}.")
    ranked = sorted(usable, key=_preference)
    chosen = ranked[0]
    notes = []
    if len(scan.series) > 1:
        notes.append(
            f"{len(scan.series)} series found; chose {chosen.uid} ({chosen.first.description or 'no description'}, "
            f"kernel {chosen.first.kernel or '?'}, {chosen.slice_spacing_mm() or 0:.2f} mm spacing) by the rule: "
            "soft-tissue kernel, then slice spacing 2-5.5 mm (thinnest), then most images. "
            "Pass series=<SeriesInstanceUID> to choose another.")
    return chosen, notes
