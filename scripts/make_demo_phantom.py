"""Write the bundled demo phantom (Resources/Samples/phantom_demo.nii.gz) and its truth (phantom_demo_truth.json).

A small synthetic head CT with known findings, so that ``headct-molre demo`` (``scripts/demo.sh``) can show
the demo model where it can be judged: truth next to prediction. The phantom is drawn by
``HeadCTMoLRELib.phantoms.generate_phantom`` with the seed, findings, spacing and matrix below (all recorded
in the truth file), at 1.8 mm pixels on a 128 x 128 matrix so the file stays well under 1 MB; the demo
model resamples to 3.5 mm pixels anyway. Rerun after a change of the generator::

    .venv/bin/python scripts/make_demo_phantom.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HeadCTMoLRE"))

#: Chosen before the demo model was evaluated on it (not picked for what the model gets right): one finding
#: from each of trauma, hemorrhage, ischaemia and structure.
FINDINGS = ("subdural_hematoma", "skull_fracture", "intraventricular_hemorrhage", "acute_infarct", "hydrocephalus")
SEED = 17_2026
SPACING_MM = (1.8, 1.8, 5.0)
SIZE_PX = 128


def main(argv=None) -> int:
    import SimpleITK as sitk

    from HeadCTMoLRELib.phantoms import generate_phantom

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "Resources" / "Samples"),
                        help="folder for phantom_demo.nii.gz and phantom_demo_truth.json (default Resources/Samples)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phantom = generate_phantom(FINDINGS, SEED, spacing_mm=SPACING_MM, size_px=SIZE_PX)
    image_path = out / "phantom_demo.nii.gz"
    sitk.WriteImage(phantom.image, str(image_path), useCompression=True)
    truth = {
        "what": "synthetic head CT phantom with known findings (not a patient)",
        "image": image_path.name,
        "made_by": "scripts/make_demo_phantom.py",
        "generator": "HeadCTMoLRELib.phantoms.generate_phantom",
        "seed": SEED, "findings_drawn": list(FINDINGS), "spacing_mm": list(SPACING_MM), "size_px": SIZE_PX,
        "positive_labels": list(phantom.metadata["positive_labels"]),
        "labels_dropped": phantom.metadata["labels_dropped"],
        "catalog_version": phantom.metadata["catalog_version"],
    }
    (out / "phantom_demo_truth.json").write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {image_path} ({image_path.stat().st_size / 1e3:.0f} kB) and its truth: {truth['positive_labels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
