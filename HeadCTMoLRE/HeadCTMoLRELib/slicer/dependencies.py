"""The Python packages HeadCTMoLRE needs inside 3D Slicer, kept in one place.

Slicer's Python already holds numpy, SimpleITK, VTK, requests, pydicom and packaging; the module must
never replace them (other modules depend on those exact builds). torch comes through the PyTorch
extension (``PyTorchUtils``), which picks the CUDA build that matches the NVIDIA driver; everything
else is installed by Slicer's pip helpers at the first Run, with a constraints file that pins Slicer's
own packages so that pip fails loudly instead of replacing them.

This module uses only the standard library (and ``packaging`` when comparing versions), never
imports torch, and is safe to import when Slicer starts.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

#: torch version specifier, passed to the PyTorch extension (``PyTorchUtilsLogic().installTorch``), which
#: installs torch itself (not pip here).
TORCH_VERSION_SPEC = ">=2.4"
TORCH_REQUIREMENT = "torch" + TORCH_VERSION_SPEC

#: Packages installed with Slicer's pip helpers at the first Run (pip requirement strings).
REQUIREMENTS: tuple[str, ...] = (
    "transformers>=5.0,<6",
    "peft>=0.21,<0.30",
    "safetensors>=0.4",
    "psutil>=5.9",  # the background worker: Cancel ends the whole process tree
    "matplotlib>=3.7",  # plots of fine-tuning reports
    "highdicom>=0.28,<0.29",  # DICOM results (SR, Parametric Map, Segmentation) exported from the panel
    "cryptography>=42,<47",  # ed25519 signatures of model bundles (model/signing.py)
)

#: Packages Slicer ships (or builds) itself: never installed, upgraded or replaced by this module.
SLICER_PROVIDED: tuple[str, ...] = ("numpy", "SimpleITK", "vtk", "requests", "pydicom", "packaging")

#: Dependencies of the pip package (pyproject.toml) that Slicer does not need, with the reason.
NOT_NEEDED_IN_SLICER: dict[str, str] = {
    "pylibjpeg": "compressed DICOM is decoded by Slicer's own DICOM readers (DCMTK/GDCM)",
    "pylibjpeg-libjpeg": "compressed DICOM is decoded by Slicer's own DICOM readers (DCMTK/GDCM)",
    "pylibjpeg-openjpeg": "compressed DICOM is decoded by Slicer's own DICOM readers (DCMTK/GDCM)",
    "pylibjpeg-rle": "compressed DICOM is decoded by Slicer's own DICOM readers (DCMTK/GDCM)",
}

#: Oldest Python the library runs on (transformers 5.x); Slicer 5.10 and newer ship Python 3.12.
MINIMUM_PYTHON = (3, 10)


def requirement_name(requirement: str) -> str:
    """Distribution name of a pip requirement string: ``"peft>=0.21,<0.30"`` -> ``"peft"``."""
    name = requirement.strip()
    for stop in "<>=!~[;( ":
        name = name.split(stop, 1)[0]
    return name


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: str) -> bool:
    """True when ``requirement`` (a pip requirement string) is installed in a matching version."""
    version = installed_version(requirement_name(requirement))
    if version is None:
        return False
    from packaging.requirements import Requirement  # Slicer ships packaging; imported on use only

    specifier = Requirement(requirement).specifier
    return specifier.contains(version, prereleases=True)


def missing_requirements(requirements: tuple[str, ...] | list[str] = REQUIREMENTS) -> list[str]:
    """The requirement strings from ``requirements`` that are absent or installed in a wrong version."""
    return [r for r in requirements if not is_satisfied(r)]


def torch_missing() -> bool:
    """True when torch is absent or older than :data:`TORCH_REQUIREMENT` (checked without importing it)."""
    return not is_satisfied(TORCH_REQUIREMENT)


def python_too_old(version_info: tuple[int, ...] | None = None) -> bool:
    """True when this Python is older than :data:`MINIMUM_PYTHON` (Slicer 5.8 ships Python 3.9)."""
    import sys

    current = tuple(version_info or sys.version_info[:2])
    return current[:2] < MINIMUM_PYTHON


def protected_constraints() -> list[str]:
    """pip constraint lines ``name==version`` pinning the installed :data:`SLICER_PROVIDED` packages."""
    lines = []
    for name in SLICER_PROVIDED:
        version = installed_version(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return lines


def write_constraints_file(path: str | Path) -> Path:
    """Write :func:`protected_constraints` to ``path`` (a pip ``-c`` file) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by HeadCTMoLRE: keep Slicer's own packages exactly as they are.\n"
    path.write_text(header + "".join(line + "\n" for line in protected_constraints()), encoding="utf-8")
    return path


def is_slicer_provided(requirement: str) -> bool:
    """True when ``requirement`` names one of Slicer's own packages (which must never be installed)."""
    return _normalized(requirement_name(requirement)) in {_normalized(n) for n in SLICER_PROVIDED}
