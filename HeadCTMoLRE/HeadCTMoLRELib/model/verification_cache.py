"""Verify a bundle's files once per change: ``bundle.verify_files`` behind a file-state cache.

Hashing a bundle reads every byte of its weights (about 0.3 s for the demo model, minutes for a bundled
ViT-L). The model list is rebuilt whenever the Slicer panel opens, a model is imported or fine-tuned or
packages are installed, so without a cache the GUI would hash every bundle each time. The cache key is the
bundle folder, the manifest's own digest, and the path, size, modification and status-change times (ns)
and inode of ``manifest.json`` and of every file in the folder (the manifest's listed files and any file ``verify_files`` would refuse, e.g. an added pickle
or unlisted weights); any change to any of them, or a file appearing or disappearing, means a fresh
verification. The status-change time (ctime) cannot be set back by a user, so a file rewritten with its
old size and modification time restored still counts as changed. The value is the outcome: verified, or the
``BundleError`` message. `load_bundle` (hence `predict`, `evaluate`, `batch`) and the Slicer model list use it.

Process-local (a dict), standard library only, no torch: safe on the GUI's main thread.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from . import bundle as bundle_lib

_LOCK = threading.Lock()
_OUTCOMES: dict[tuple, str | None] = {}  # key -> None (verified) or the error message
_MAX_ENTRIES = 256


def file_state_key(folder: str | os.PathLike, manifest: dict | None = None) -> tuple:
    """(resolved folder, manifest digest, ((relative path, size, mtime_ns, ctime_ns, inode), ...)) for
    every file under ``folder``."""
    root = Path(folder).expanduser().resolve()
    states = []
    for path in sorted(root.rglob("*")):
        try:
            stat = path.stat()
        except OSError:  # vanished while listing, or a dangling link: part of the state too
            states.append((path.relative_to(root).as_posix(), -1, -1, -1, -1))
            continue
        if path.is_file():
            states.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                           stat.st_ino))
    digest = str(((manifest or {}).get("integrity") or {}).get("manifest_sha256", ""))
    return str(root), digest, tuple(states)


def remember_verified(folder: str | os.PathLike, manifest: dict) -> None:
    """Record that ``folder`` was just verified in full (by ``bundle.verify_files``) in its present state."""
    _remember(file_state_key(folder, manifest), None)


def verify_bundle_files(folder: str | os.PathLike, manifest: dict) -> None:
    """``bundle.verify_files(folder, manifest)``, skipped when nothing changed since the last call.

    Raises ``bundle.BundleError`` (the cached message when the same state failed before)."""
    key = file_state_key(folder, manifest)
    with _LOCK:
        known = key in _OUTCOMES
        outcome = _OUTCOMES.get(key)
    if known:
        if outcome is not None:
            raise bundle_lib.BundleError(outcome)
        return
    try:
        bundle_lib.verify_files(Path(key[0]), manifest)
    except bundle_lib.BundleError as error:
        _remember(key, str(error))
        raise
    _remember(key, None)


def _remember(key: tuple, outcome: str | None) -> None:
    with _LOCK:
        if len(_OUTCOMES) >= _MAX_ENTRIES:
            _OUTCOMES.pop(next(iter(_OUTCOMES)))
        _OUTCOMES[key] = outcome


def clear() -> None:
    """Forget every outcome (tests; or after an in-place edit that kept sizes and times)."""
    with _LOCK:
        _OUTCOMES.clear()
