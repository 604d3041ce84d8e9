"""Crash-safe writes: a reader sees the old content or the new one, never a half-written file or folder.

Files: the new content goes to a hidden temporary sibling, is fsync'ed, then renamed over the target
(``os.replace`` is atomic on one file system) and the folder entry is fsync'ed. Folders: the new folder
is written completely as a hidden staging sibling by the caller, then :func:`replace_folder` moves the old
one aside, renames the new one in and deletes the old one; :func:`recover_folder` undoes what a crash
between those steps left (the next run calls it), and removes stale staging folders.
Staging names: ``.<name>.staging-<random>`` (new, being written) and ``.<name>.old-<random>`` (old, aside).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, mode: int = 0o644) -> Path:
    """Call ``write(temporary_path)`` to produce the new file, then fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(data), mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder below ``folder`` (before it is renamed into place)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_folder(root)


def staging_folder(target: str | os.PathLike) -> Path:
    """A new, empty hidden sibling folder of ``target`` to write its next version into."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete folder ``staging`` at ``target``: old aside, new in, old deleted.

    At every instant ``target`` is the old or the new folder, except between the two renames, where
    the old one waits as ``.<name>.old-*`` and :func:`recover_folder` puts it back after a crash.
    """
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    aside = None
    if target.exists() or target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        aside.rmdir()
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_folder(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def recover_folder(target: str | os.PathLike) -> list[Path]:
    """After a crash: put an old folder set aside back when ``target`` is missing, then remove stale
    staging and old folders of ``target``. Returns what was removed or restored."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    touched: list[Path] = []
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not target.exists() and olds:
        os.replace(olds[0], target)
        touched.append(olds.pop(0))
    for stale in [*olds, *target.parent.glob(f".{target.name}.staging-*")]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        touched.append(stale)
    return touched
