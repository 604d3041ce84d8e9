"""Which findings the synthetic head CT phantom can draw, which labels they imply, and how cases get them.

:data:`RENDERABLE_FINDINGS` lists every finding id (from the finding catalog, ``Resources/findings.csv``)
that :mod:`~HeadCTMoLRELib.phantoms.pathology` knows how to draw, with a short description of how it looks
(CT numbers in HU, sizes in mm). :data:`IMPLIED_LABELS` names the catalog labels that are also true
whenever a finding is drawn. :func:`sample_findings` draws one case's set of findings with realistic
co-occurrence (a fracture under an epidural hematoma, a midline shift with a cause, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

#: How each renderable finding is drawn (finding id -> short description).
RENDERABLE_FINDINGS: dict[str, str] = {
    "epidural_hematoma": "biconvex 55-75 HU collection under the inner table, 6-22 mm thick",
    "subdural_hematoma": "crescentic 50-72 HU collection along a convexity, 3-14 mm thick",
    "chronic_subdural_hematoma": "crescentic 10-32 HU collection along a convexity, 5-18 mm thick",
    "subarachnoid_hemorrhage": "50-70 HU blood replacing CSF in convexity sulci, sylvian fissure or basal cisterns",
    "intraparenchymal_hemorrhage": "irregular 55-75 HU hematoma with an edema rim (lobar, basal ganglia, thalamus or cerebellum)",
    "lobar_hemorrhage": "irregular 55-75 HU hematoma 10-25 mm under the cortex of a lobe",
    "basal_ganglia_hemorrhage": "irregular 55-75 HU hematoma centred on the lentiform nucleus",
    "thalamic_hemorrhage": "irregular 55-75 HU hematoma centred on a thalamus",
    "cerebellar_hemorrhage": "irregular 55-75 HU hematoma in a cerebellar hemisphere",
    "intraventricular_hemorrhage": "50-70 HU blood layering in the dependent (posterior) lateral ventricles",
    "acute_infarct": "cone-shaped arterial territory 6-9 HU darker than parenchyma, grey-white contrast lost",
    "hypodense_acute_infarct": "arterial territory 11-18 HU darker with effaced sulci (also labels acute_infarct)",
    "chronic_infarct": "sharply marginated CSF-density (2-12 HU) wedge reaching the cortex",
    "lacunar_infarct": "1-3 round CSF-density foci of 2.5-6 mm in basal ganglia, thalamus or internal capsule",
    "small_vessel_ischemic_disease": "bilateral patchy periventricular white matter 6-12 HU darker",
    "hyperdense_vessel": "65-90 HU middle cerebral artery (M1) or basilar segment instead of 38-45 HU",
    "venous_sinus_thrombosis": "superior sagittal or transverse sinus at 70-88 HU instead of 40-50 HU",
    "skull_fracture": "1-2.5 mm lucent line through the calvarium, sometimes a depressed fragment",
    "pneumocephalus": "air locules (or a frontal air collection) in the non-dependent extra-axial space",
    "scalp_hematoma": "lentiform 40-70 HU swelling of the scalp, 6-22 mm thick",
    "meningioma": "round 45-62 HU dural-based mass, sometimes calcified or with surrounding edema",
    "cystic_lesion": "well-defined round 0-12 HU lesion, 6-22 mm radius",
    "lipoma": "small -100 to -60 HU midline lesion (pericallosal or quadrigeminal)",
    "hydrocephalus": "lateral, third and temporal horns enlarged (Evans index > 0.3), sulci effaced",
    "midline_shift": "deep midline structures displaced 5-14 mm away from a mass, ipsilateral ventricle compressed",
    "atrophy": "wide sulci, 3-6 mm extra-axial CSF, mildly enlarged ventricles",
    "pathological_calcification": "basal ganglia, dentate or scattered parenchymal foci of 120-600 HU",
    "sinusitis": "mucosal thickening or opacification (15-40 HU) of a maxillary, sphenoid or frontal sinus",
    "mastoid_opacification": "mastoid air cells filled with 15-45 HU fluid, one or both sides",
}

#: Labels that are also true whenever a finding is drawn (a basal ganglia hematoma is an IPH...).
IMPLIED_LABELS: dict[str, tuple[str, ...]] = {
    "lobar_hemorrhage": ("intraparenchymal_hemorrhage",),
    "basal_ganglia_hemorrhage": ("intraparenchymal_hemorrhage",),
    "thalamic_hemorrhage": ("intraparenchymal_hemorrhage",),
    "cerebellar_hemorrhage": ("intraparenchymal_hemorrhage",),
    "hypodense_acute_infarct": ("acute_infarct",),
    "hyperdense_vessel": ("vessel_occlusion",),
    "chronic_infarct": ("encephalomalacia",),
    "hydrocephalus": ("ventricular_enlargement",),
    "midline_shift": ("mass_effect",),
}

#: Sites of an intraparenchymal hematoma; an unspecified ``intraparenchymal_hemorrhage`` is drawn at one.
IPH_SITES = ("lobar_hemorrhage", "basal_ganglia_hemorrhage", "thalamic_hemorrhage", "cerebellar_hemorrhage")
#: Findings that can push the midline away from their side, in order of preference.
MASS_EFFECT_CAUSES = ("subdural_hematoma", "epidural_hematoma", "chronic_subdural_hematoma",
                      "lobar_hemorrhage", "meningioma")
#: (cause, consequence, probability) applied once, in order, by :func:`sample_findings`.
_CO_OCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("subdural_hematoma", "midline_shift", 0.35),
    ("epidural_hematoma", "skull_fracture", 0.6),
    ("pneumocephalus", "skull_fracture", 0.5),
    ("skull_fracture", "scalp_hematoma", 0.6),
    ("hyperdense_vessel", "acute_infarct", 0.5),
    ("thalamic_hemorrhage", "intraventricular_hemorrhage", 0.3),
    ("subarachnoid_hemorrhage", "intraventricular_hemorrhage", 0.15),
)


def sample_findings(rng: np.random.Generator | int, prevalence: float | Mapping[str, float] = 0.1,
                    allowed: Iterable[str] | None = None) -> tuple[str, ...]:
    """Draw a random set of renderable findings with realistic co-occurrence.

    Each allowed finding is drawn independently with ``prevalence`` (a probability, or id -> probability);
    then rules add consequences (fracture under an epidural hematoma, midline shift with a large subdural
    hematoma, ...), a midline shift always gets a cause, and hydrocephalus excludes atrophy. The marginal
    prevalence of consequences is therefore somewhat higher than asked. ``rng``: a generator or a seed.
    Returns the drawn ids in :data:`RENDERABLE_FINDINGS` order; raises ``ValueError`` for an ``allowed``
    id that cannot be drawn.
    """
    rng = np.random.default_rng(rng)
    allowed_ids = tuple(RENDERABLE_FINDINGS) if allowed is None else tuple(allowed)
    check_renderable(allowed_ids)
    chosen = []
    for finding_id in allowed_ids:
        p = prevalence.get(finding_id, 0.0) if isinstance(prevalence, Mapping) else float(prevalence)
        if rng.random() < p:
            chosen.append(finding_id)
    for cause, consequence, p in _CO_OCCURRENCE:
        if cause in chosen and consequence in allowed_ids and consequence not in chosen and rng.random() < p:
            chosen.append(consequence)
    if "midline_shift" in chosen and not any(c in chosen for c in MASS_EFFECT_CAUSES):
        causes = [c for c in MASS_EFFECT_CAUSES if c in allowed_ids] or ["subdural_hematoma"]
        chosen.append(str(rng.choice(causes)))
    if "hydrocephalus" in chosen and "atrophy" in chosen:
        chosen.remove("atrophy")
    return tuple(f for f in RENDERABLE_FINDINGS if f in chosen)


def check_renderable(finding_ids: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the ids the phantom cannot draw, and listing those it can."""
    unknown = [f for f in finding_ids if f not in RENDERABLE_FINDINGS]
    if unknown:
        raise ValueError(f"Cannot draw finding(s) {unknown}: the phantom renders only {sorted(RENDERABLE_FINDINGS)}.")

