"""Locate the extension's ``Resources/`` folder (finding catalog, head CT template, model manifest,
demo model, UI) in every layout the code runs from.

Layouts, tried in order:
1. ``$HEADCT_MOLRE_RESOURCES`` when set (an explicit override, e.g. for a packaged install).
2. The source tree: ``<repo>/HeadCTMoLRE/HeadCTMoLRELib/`` -> ``<repo>/Resources``.
3. A CMake install of the Slicer extension: ``<qt-scripted-modules>/HeadCTMoLRELib/`` ->
   ``<qt-scripted-modules>/Resources`` (where ``slicerMacroBuildScriptedModule`` copies resources).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "HEADCT_MOLRE_RESOURCES"
_MARKER = "findings.csv"  # every valid Resources folder holds the finding catalog


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = []
    if os.environ.get(ENV_VAR):
        found.append(Path(os.environ[ENV_VAR]).expanduser())
    found.append(here.parent.parent / "Resources")  # source tree
    found.append(here.parent / "Resources")  # CMake-installed Slicer extension
    return found


def resources_dir() -> Path:
    """Return the Resources folder; raise FileNotFoundError naming every place looked in."""
    candidates = _candidates()
    for folder in candidates:
        if (folder / _MARKER).is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"HeadCTMoLRE resources not found (looked for {_MARKER} in: {looked}). "
        f"Run from the source tree, install the Slicer extension, or set {ENV_VAR} to the Resources folder."
    )


def resource_path(*parts: str) -> Path:
    """Path of a file inside Resources, e.g. ``resource_path("findings.csv")`` (need not exist)."""
    return resources_dir().joinpath(*parts)


def default_sample_path() -> Path:
    """The bundled real head CT that ``headct-molre demo`` and the benchmark run on (Resources/Samples)."""
    return resource_path("Samples", "GE_head_axial_1x1x5mm.nii.gz")


def demo_phantom_paths() -> tuple[Path, Path]:
    """(image, truth JSON) of the bundled synthetic phantom with known findings (Resources/Samples, made by
    scripts/make_demo_phantom.py) on which ``headct-molre demo`` shows truth next to prediction."""
    return resource_path("Samples", "phantom_demo.nii.gz"), resource_path("Samples", "phantom_demo_truth.json")
