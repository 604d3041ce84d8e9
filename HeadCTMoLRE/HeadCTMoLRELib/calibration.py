"""How a bundle turns raw logits into probabilities: prior correction of the focal loss, temperature.

    probability_c = sigmoid((logit_c - logit_offset_c) / temperature)

The focal loss weighs the positive term of finding c by alpha_c = clip(1 - prevalence_c) (training.train),
which moves the loss's optimum logit by log(alpha_c / (1 - alpha_c)): a rare finding (alpha 0.9) is
pushed up by 2.2 logits, so raw probabilities sit far above the prevalence. Subtracting that offset (the
*prior correction*; no fitting, it only undoes the weighting) gives calibrated probabilities by default;
a temperature fitted on held-out cases (evaluation.evaluate) can sharpen or soften them further.

A bundle's manifest records both under ``calibration`` (the top-level ``temperature`` holds the same
temperature, which model.bundle.Bundle reads)::

    "calibration": {
      "method": "prior_correction+temperature",       # or prior_correction, temperature, none
      "temperature": 1.0,
      "prior_correction": {"kind": "focal_alpha", "rule": "...", "alpha_source": "...",
                           "focal_alpha": {finding id: alpha}, "logit_offset": {finding id: offset}},
      "fitted_on": null | {"cases_csv": NAME, "cases_csv_sha256": ..., "split": ..., "n_cases": N, ...},
      "probability": "sigmoid((logit - logit_offset) / temperature)"
    }

Arrays here are float64 (N cases, C findings) or (C,) in catalog order; numpy only.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

PRIOR_RULE = "logit_offset = log(alpha / (1 - alpha)) of the focal loss's per-finding alpha; no fitting"
PROBABILITY_RULE = "sigmoid((logit - logit_offset) / temperature)"
METHODS = ("none", "temperature", "prior_correction", "prior_correction+temperature")
#: The focal loss's alpha = clip(1 - prevalence, *ALPHA_CLIP) (training.train uses this constant).
ALPHA_CLIP = (0.05, 0.95)


class CalibrationError(ValueError):
    """A calibration that cannot be made (e.g. no focal alpha recorded); says what to do."""


def prior_offsets(alpha) -> np.ndarray:
    """(C,) logit offsets log(alpha / (1 - alpha)) for focal alphas (C,) in (0, 1)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    if np.any(~np.isfinite(alpha)) or np.any((alpha <= 0) | (alpha >= 1)):
        raise CalibrationError("focal alpha must lie strictly between 0 and 1 for every finding")
    return np.log(alpha / (1.0 - alpha))


def alpha_from_training(training: Mapping | None, ids: Sequence[str]) -> tuple[np.ndarray | None, str]:
    """The focal alpha (C,) a bundle was trained with, and where it was read from.

    ``training.focal_alpha`` (recorded by training.train since this version) is exact. Older bundles
    record only ``counts.train`` and ``counts.train_positives``: alpha is then recomputed as the loss did,
    clip(1 - positives / train cases) (exact when every training label was known). (None, reason)
    when neither is there.
    """
    training = training or {}
    recorded = training.get("focal_alpha")
    if isinstance(recorded, Mapping) and all(fid in recorded for fid in ids):
        return np.array([float(recorded[fid]) for fid in ids]), "training.focal_alpha"
    counts = training.get("counts") or {}
    positives, n_train = counts.get("train_positives"), counts.get("train")
    if isinstance(positives, Mapping) and n_train:
        prevalence = np.array([float(positives.get(fid, 0)) / float(n_train) for fid in ids])
        return (np.clip(1.0 - prevalence, *ALPHA_CLIP),
                "recomputed from training.counts (train_positives / train; assumes every training label was known)")
    return None, "the bundle records neither training.focal_alpha nor training.counts.train_positives"


def prior_correction_record(ids: Sequence[str], alpha, alpha_source: str) -> dict:
    """The manifest's ``calibration.prior_correction`` for focal alphas (C,) in catalog order."""
    alpha = np.asarray(alpha, dtype=np.float64)
    offsets = prior_offsets(alpha)
    return {"kind": "focal_alpha", "rule": PRIOR_RULE, "alpha_source": alpha_source,
            "focal_alpha": {fid: round(float(a), 6) for fid, a in zip(ids, alpha)},
            "logit_offset": {fid: round(float(o), 6) for fid, o in zip(ids, offsets)}}


def calibration_record(*, temperature: float = 1.0, prior_correction: Mapping | None = None,
                       fitted_on: Mapping | None = None, fitted_temperature: bool = False) -> dict:
    """The manifest's ``calibration`` block (see the module docstring)."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise CalibrationError(f"temperature must be a positive number, got {temperature}")
    parts = (["prior_correction"] if prior_correction else []) + (["temperature"] if fitted_temperature else [])
    return {"method": "+".join(parts) or "none", "temperature": float(temperature),
            "prior_correction": dict(prior_correction) if prior_correction else None,
            "fitted_on": dict(fitted_on) if fitted_on else None, "probability": PROBABILITY_RULE}


def logit_offsets(manifest: Mapping, ids: Sequence[str]) -> np.ndarray:
    """(C,) offsets a bundle subtracts from its raw logits (zeros without a prior correction)."""
    prior = ((manifest or {}).get("calibration") or {}).get("prior_correction") or {}
    offsets = prior.get("logit_offset") or {}
    return np.array([float(offsets.get(fid, 0.0)) for fid in ids], dtype=np.float64)


def calibrated_logits(logits, offsets, temperature: float) -> np.ndarray:
    """(logits - offsets) / temperature for raw logits (N, C) or (C,) and offsets (C,)."""
    return (np.asarray(logits, dtype=np.float64) - np.asarray(offsets, dtype=np.float64)) / max(float(temperature), 1e-6)
