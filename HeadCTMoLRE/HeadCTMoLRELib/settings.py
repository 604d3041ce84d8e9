"""Shared check for the JSON-able settings dataclasses (model, MoLRE, LoRA, backbone, augmentation,
training) that bundles and checkpoints store: a stored key this version does not know is refused, not
silently dropped, so a bundle is never run with settings it cannot honour."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def reject_unknown_settings(cls: type, data: dict[str, Any], what: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the unknown keys of ``data`` for dataclass ``cls`` and listing the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"Unknown {what} settings {unknown}; known settings are {sorted(known)}.")
