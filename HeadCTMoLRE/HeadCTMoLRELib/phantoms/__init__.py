"""Synthetic non-contrast head CT phantoms with known findings, for tests, the demo model and benchmarks.

No shareable labelled head CT exists, so the phantom is drawn procedurally: nested analytic surfaces
(scalp, subcutaneous fat, skull with outer/inner tables and diploe, extra-axial CSF, a folded cortical
ribbon with sulci, white matter, deep grey nuclei, ventricles, cisterns, posterior fossa, skull base
with orbits, sinuses and mastoid air cells, physiological calcifications), then findings on top, then
in-plane blur and correlated Gaussian noise. Every number is sampled per case from a published range (HU
of air, fat, CSF, grey/white matter, blood, calcification and bone), and the head has a random size,
position and a few degrees of rotation.

Conventions: the image is a ``SimpleITK.Image`` of int16 HU in LPS with identity direction (axial);
``sitk.GetArrayFromImage`` gives a ``(z, y, x)`` array. The *head frame* used to draw anatomy is in mm
with x to the patient's left, y posterior and z superior, origin near the centre of the brain.

This module is the public entry point; the work is done in:

- :mod:`.phantom_geometry`: the voxel grid seen in the head frame, analytic shapes;
- :mod:`.phantom_anatomy`: the normal head (tissues, CT numbers, tissue codes);
- :mod:`.phantom_findings`: which findings can be drawn, implied labels, sampling with co-occurrence;
- :mod:`.phantom_pathology`: how each finding is drawn on the anatomy (masks, parameters);
- :mod:`.phantom_generator`: one case (geometry, pose, image formation, labels, metadata);
- :mod:`.phantom_io`: datasets (NIfTI or DICOM, ``labels.csv``, ``metadata.json``) and DICOM series.
"""

from __future__ import annotations

from .findings import IMPLIED_LABELS, RENDERABLE_FINDINGS, sample_findings
from .generator import Phantom, generate_phantom
from .io import write_dicom_series, write_phantom_dataset

__all__ = ["IMPLIED_LABELS", "RENDERABLE_FINDINGS", "Phantom", "generate_phantom", "sample_findings",
           "write_dicom_series", "write_phantom_dataset"]
