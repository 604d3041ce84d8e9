"""Importing a model bundle (a folder or a .zip) from a stranger into the user model folder.

The source is copied into a hidden staging folder inside the destination, the COPY is verified
(bundle.read_manifest + bundle.verify_files: manifest digest and schema, paths, every hash; JSON and
hashing only, no torch, so the GUI process can import), and only then renamed into place under a
unique name; any failure removes the staging folder, so nothing partial is ever left behind.

Zip archives: every entry must be a plain file or folder with a relative path inside the archive (no
absolute paths, '..', drive letters, backslashes, symbolic links or special files), no two entries may
have the same name (in any letter case), and the archive is bounded: at most ``MAX_ENTRIES`` entries,
``max_bytes`` uncompressed in all, and each entry larger than 1 MiB at most ``MAX_RATIO`` times its
compressed size (zip bombs). The bytes actually extracted are counted, not the sizes the archive
claims. Folders: symbolic links are never followed (a link anywhere in the folder is refused), special
files are refused, and the same size limit applies.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from .bundle import MANIFEST, BundleError, plain_entries, read_manifest, verify_files

MAX_IMPORT_BYTES = 16 * 1024 ** 3
MAX_ENTRIES = 10_000
MAX_RATIO = 200
_RATIO_FLOOR_BYTES = 1024 * 1024
_CHUNK = 1 << 20


def import_bundle(source: str | os.PathLike, models_folder: str | os.PathLike, *,
                  max_bytes: int = MAX_IMPORT_BYTES) -> Path:
    """Copy the bundle folder or .zip ``source`` into ``models_folder`` after verifying the copy;
    returns the new bundle folder (named after the bundle, made unique with -2, -3 ...)."""
    source = Path(source).expanduser()
    folder = Path(models_folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        source = source.resolve()  # the path the user gave may be a link; nothing inside it may be
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".import-"))
    try:
        if source.is_file() and zipfile.is_zipfile(source):
            extract_zip(source, staging / "unzipped", max_bytes=max_bytes)
            root = _find_bundle_root(staging / "unzipped", source)
        elif source.is_dir():
            root = staging / "copy"
            copy_folder(source, root, max_bytes=max_bytes)
        else:
            raise BundleError(f"{source}: not a model bundle folder or .zip archive.")
        manifest = read_manifest(root)
        verify_files(root, manifest)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(manifest["name"])).lstrip(".") or "model"
        target, index = folder / name, 2
        while target.exists() or target.is_symlink():
            target, index = folder / f"{name}-{index}", index + 1
        os.chmod(root, 0o755)
        os.rename(root, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _find_bundle_root(folder: Path, source: Path) -> Path:
    candidates = sorted(p.parent for p in folder.rglob(MANIFEST))
    if len(candidates) != 1:
        raise BundleError(f"{source}: expected exactly one model bundle (a folder with {MANIFEST}), "
                          f"found {len(candidates)}.")
    return candidates[0]


def _safe_member_name(name: str, archive: Path) -> str:
    clean = name.rstrip("/")
    parts = clean.split("/")
    if (not clean or name.startswith(("/", "\\")) or "\\" in name or ":" in name
            or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in name)):
        raise BundleError(f"{archive}: refusing unsafe path {name[:100]!r} in the archive; the zip must hold only "
                          "plain relative paths inside one bundle folder.")
    return clean


def extract_zip(archive: Path, target: Path, *, max_bytes: int = MAX_IMPORT_BYTES) -> None:
    """Extract ``archive`` into ``target`` (created) within the limits of the module docstring."""
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise BundleError(f"{archive}: not a readable zip archive ({error})") from None
    with handle:
        members = handle.infolist()
        if len(members) > MAX_ENTRIES:
            raise BundleError(f"{archive}: {len(members)} entries, more than a bundle can hold ({MAX_ENTRIES})")
        seen: dict[str, str] = {}
        declared = 0
        for member in members:
            name = _safe_member_name(member.filename, archive)
            mode = member.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise BundleError(f"{archive}: refusing symbolic link {name!r} in the archive.")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise BundleError(f"{archive}: refusing {name!r}: not a plain file or folder.")
            key = name.lower()
            if key in seen:
                raise BundleError(f"{archive}: the archive holds {name!r} twice (or differing only in letter case "
                                  f"from {seen[key]!r}); refusing an ambiguous archive.")
            seen[key] = name
            declared += member.file_size
            if member.file_size > _RATIO_FLOOR_BYTES and member.file_size > MAX_RATIO * max(1, member.compress_size):
                raise BundleError(f"{archive}: {name!r} expands {member.file_size / max(1, member.compress_size):.0f}"
                                  f" times (more than {MAX_RATIO}); refusing a zip bomb.")
        if declared > max_bytes:
            raise BundleError(f"{archive}: {declared:,} bytes uncompressed, more than the import limit "
                              f"({max_bytes:,} bytes).")
        target.mkdir(parents=True)
        written = 0
        for member in members:
            name = _safe_member_name(member.filename, archive)
            path = target / name
            if member.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with handle.open(member) as reader, open(path, "xb") as writer:
                    for block in iter(lambda: reader.read(_CHUNK), b""):
                        written += len(block)
                        if written > max_bytes or written > declared:
                            raise BundleError(f"{archive}: extracts to more bytes than it declares or than the "
                                              f"import limit ({max_bytes:,}); refused.")
                        writer.write(block)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as error:
                raise BundleError(f"{archive}: entry {name!r} cannot be extracted ({error}); the archive is "
                                  "damaged or encrypted.") from None
            except FileExistsError:
                raise BundleError(f"{archive}: the archive holds {name!r} twice; refused.") from None


def copy_folder(source: Path, target: Path, *, max_bytes: int = MAX_IMPORT_BYTES) -> None:
    """Copy the plain files and folders of ``source`` to ``target`` (created), never following a link:
    a symbolic link or special file anywhere is refused before anything is copied."""
    source = source.resolve()
    entries, total = [], 0
    advice = "links are never followed on import (copy the real files into the bundle folder)"
    for _, rel, info in plain_entries(source, advice):
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
            if total > max_bytes:
                raise BundleError(f"{source}: more than the import limit of {max_bytes:,} bytes; refused.")
        entries.append((rel, stat.S_ISDIR(info.st_mode)))
        if len(entries) > MAX_ENTRIES:
            raise BundleError(f"{source}: more than {MAX_ENTRIES} entries; not a model bundle.")
    target.mkdir(parents=True)
    for rel, is_dir in entries:
        destination = target / rel
        if is_dir:
            destination.mkdir(exist_ok=True)
            continue
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
        try:
            descriptor = os.open(source / rel, flags)  # a file swapped for a link meanwhile fails here
            with os.fdopen(descriptor, "rb") as reader, open(destination, "xb") as writer:
                shutil.copyfileobj(reader, writer, _CHUNK)
        except OSError as error:
            raise BundleError(f"{source}: {rel} cannot be copied ({error.strerror or error}); refused.") from None
        os.chmod(destination, 0o644)
