"""Model bundles: a self-describing folder that a user can trust.

Layout of a bundle folder::

    manifest.json                    everything needed to rebuild and honour the model (see below)
    weights/adapters.safetensors     trainable tensors: LoRA A/B, MoLRE, attention pooling, head
    weights/backbone.safetensors     frozen backbone weights, when the backbone is bundled
                                     (random/tiny backbones, or --bundle-backbone); otherwise the
                                     manifest points at a local Hugging Face folder and its hashes
    model_card.md                    optional, generated after training
    signature.json                   optional publisher signature (model/signing.py)

``manifest.json`` holds: format name and version; the finding catalog (its rows and their hash over
every field); preprocessing parameters; the model config (backbone family/size/image size, LoRA and MoLRE
hyper-parameters, use_molre); the backbone's transformers config and where its weights come from
(with sha256 per file); parameter counts; training provenance and metrics; decision thresholds and
calibration temperature; the sha256 of every file of the bundle; and ``integrity``: the sha256 of the
canonical JSON of everything else in the manifest, plus one digest per top-level section so that an
edit can be named.

What loading guarantees (docs/bundles.md): the manifest is exactly as written by HeadCTMoLRE (any edit
fails, naming the edited sections); every value is inside the schema (model/manifest_schema.py) before
anything is built; every listed file is a plain file inside the bundle with its recorded sha256; no
symlink, pickle-based file (.bin, .pt, .pkl ... in any letter case) or unlisted weight file is present;
an external backbone folder holds exactly the hashed files. Only JSON and safetensors are ever read;
nothing is downloaded. A signature (optional) additionally says WHO wrote the bundle.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import manifest_schema as schema
from .manifest_schema import PICKLE_SUFFIXES, has_pickle_suffix, stored_patch_stem
from ..atomic_files import atomic_write_bytes, atomic_write_text, recover_folder, replace_folder, staging_folder

FORMAT_NAME = "headct-molre-bundle"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (2,)
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
ADAPTERS_FILE = "weights/adapters.safetensors"
BACKBONE_FILE = "weights/backbone.safetensors"
INTEGRITY_ALGORITHM = "sha256 of canonical JSON (sorted keys, no whitespace, UTF-8), without 'integrity'"
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
MAX_FILE_BYTES = 64 * 1024 ** 3
INTENDED_USE = (
    "Research use only. Not a medical device; not for clinical decisions. Outputs must be reviewed "
    "by a qualified reader."
)
#: What an edit of each manifest section puts at risk (for the "was edited" message).
SECTION_MEANING = {
    "findings": "finding names and order", "thresholds": "decision thresholds", "temperature": "calibration",
    "preprocessing": "preprocessing", "model": "architecture", "backbone": "backbone and its weights",
    "files": "file hashes", "training": "training record", "metrics": "reported metrics",
}

__all__ = ["ADAPTERS_FILE", "BACKBONE_FILE", "Bundle", "BundleError", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST",
           "PICKLE_SUFFIXES", "backbone_folder_hashes", "build_model", "canonical_json", "describe",
           "load_bundle", "manifest_digest", "read_manifest", "resolve_backbone_folder", "save_bundle",
           "seal_manifest", "sha256_file", "update_bundle", "verify_files"]


class BundleError(ValueError):
    """A bundle cannot be used; the message names the bundle, the problem and what to do."""


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_folder_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of the files that define a Hugging Face backbone folder (config + safetensors weights).

    Refuses folders whose weights exist only in pickle form (pytorch_model.bin and the like), and
    symlinked or non-regular files among them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"backbone folder {folder} does not exist or is not a folder")
    entries = list(folder.iterdir())
    weights = sorted(p for p in entries if p.name.lower().endswith(".safetensors"))
    pickled = [p.name for p in entries if has_pickle_suffix(p.name)]
    if not weights:
        hint = f" (it holds only pickle-based weights: {', '.join(pickled)})" if pickled else ""
        raise BundleError(
            f"backbone folder {folder} has no .safetensors weights{hint}. HeadCTMoLRE never loads pickle "
            f"files; convert the checkpoint to safetensors (e.g. save_pretrained(..., "
            f"safe_serialization=True)) on a machine you trust."
        )
    files = [p for p in [folder / "config.json", *weights, folder / "model.safetensors.index.json"]
             if p.exists() or p.is_symlink()]
    for path in files:
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"backbone file {path} is a symbolic link or not a plain file; copy the real "
                              "files into the backbone folder")
    return {p.name: sha256_file(p) for p in files}


# ------------------------------------------------------------------------------------------- integrity
def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that digests are taken of (sorted keys, no spaces, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def manifest_digest(manifest: Mapping) -> str:
    """sha256 of the canonical JSON of the whole manifest except its ``integrity`` entry."""
    return _digest({k: v for k, v in manifest.items() if k != "integrity"})


def seal_manifest(manifest: dict) -> dict:
    """Set ``manifest["integrity"]`` (whole-manifest digest + one digest per section); returns it."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    manifest["integrity"] = {"algorithm": INTEGRITY_ALGORITHM, "manifest_sha256": _digest(body),
                             "sections": {key: _digest(value) for key, value in body.items()}}
    return manifest


def _check_integrity(manifest_path: Path, manifest: dict) -> None:
    integrity = manifest.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("manifest_sha256"), str):
        raise BundleError(f"{manifest_path} has no integrity record (manifest digest), so edits to it cannot be "
                          "detected; it was not written by this HeadCTMoLRE. Get a bundle exported by HeadCTMoLRE.")
    if manifest_digest(manifest) == integrity["manifest_sha256"]:
        return
    sections = integrity.get("sections") if isinstance(integrity.get("sections"), dict) else {}
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    changed = [k for k in body if k in sections and sections[k] != _digest(body[k])]
    added = [k for k in body if k not in sections]
    removed = [k for k in sections if k not in body]
    parts = ([f"changed {', '.join(changed)}"] if changed else []) + ([f"added {', '.join(added)}"] if added else []) \
        + ([f"removed {', '.join(removed)}"] if removed else [])
    what = "; ".join(parts) if parts else "its integrity record itself was altered"
    meaning = sorted({SECTION_MEANING[k] for k in changed + added + removed if k in SECTION_MEANING})
    at_risk = f" ({', '.join(meaning)} cannot be trusted)" if meaning else ""
    raise BundleError(f"{manifest_path} was edited after it was written: {what}{at_risk}. Do not use a modified "
                      "bundle; get a fresh copy from its publisher.")


def _reject_constant(name: str):
    raise BundleError(f"holds {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BundleError(f"holds the number {text[:40]}, too large for a float")
    return value


def parse_manifest_text(text: str, manifest_path: Path) -> Any:
    """Strict JSON: no NaN/Infinity, no number that overflows a float, bounded nesting."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except BundleError as error:
        raise BundleError(f"{manifest_path} {error}; the bundle is damaged or was edited") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, int too long, nesting
        raise BundleError(f"{manifest_path} is not valid JSON ({str(error)[:200]}); the bundle is damaged") from None


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Seal, validate and atomically write (fsync + rename) ``folder/manifest.json``."""
    seal_manifest(manifest)
    try:
        schema.validate_manifest(manifest)
    except schema.SchemaError as error:
        raise BundleError(f"refusing to write a manifest that breaks the schema: {error}") from None
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------- manifest
@dataclass
class Bundle:
    """A loaded (verified) bundle: its folder, its manifest, and typed views of the manifest.

    ``signature``: a signing.SignatureStatus (signed or not, by which key)."""

    path: Path
    manifest: dict
    catalog: Any  # findings.FindingCatalog
    preprocessing: Any  # preprocess.PreprocessConfig
    model_config: Any  # model.ModelConfig
    thresholds: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    signature: Any = None

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    @property
    def fingerprint(self) -> str:
        """A short id of exactly these weights and this manifest (for caches and provenance)."""
        files = json.dumps(self.manifest.get("files", {}), sort_keys=True)
        return hashlib.sha256(files.encode()).hexdigest()[:16]

    def threshold_vector(self) -> list[float]:
        return [float(self.thresholds.get(fid, 0.5)) for fid in self.catalog.ids]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# -------------------------------------------------------------------------------------------------- save
def save_bundle(
    model,
    out_dir: str | os.PathLike,
    *,
    catalog,
    preprocessing,
    name: str | None = None,
    description: str = "",
    backbone_weights_dir: str | os.PathLike | None = None,
    bundle_backbone: bool | None = None,
    training: Mapping | None = None,
    metrics: Mapping | None = None,
    thresholds: Mapping[str, float] | None = None,
    temperature: float = 1.0,
    calibration: Mapping | None = None,
    synthetic_training_data: bool | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a model.HeadCTClassifier) as a bundle folder, atomically.

    The bundle is written (and fsync'ed) in a hidden staging sibling folder, then put in place by
    atomic_files.replace_folder (old bundle aside, new one in, old one deleted), so ``out_dir`` is at
    every moment a complete bundle (old or new) and a crash leaves at most a staging folder that
    atomic_files.recover_folder cleans up. ``backbone_weights_dir`` is the local Hugging Face folder
    the backbone was built from (None for a randomly initialised backbone, which is then always
    bundled). ``bundle_backbone`` copies the frozen backbone weights into the bundle (default: only
    when there is no backbone folder). ``extra_files`` maps a relative path (e.g. ``model_card.md``)
    to text or bytes to include (hashed like the weights).
    ``calibration``: the record of calibration.calibration_record (prior correction, temperature, where it
    was fitted); its temperature replaces ``temperature``.
    """
    from safetensors.torch import save_file

    from . import backbones
    from . import classifier as model_lib

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir} already exists; choose another --out or remove it first")
    if bundle_backbone is None:
        bundle_backbone = backbone_weights_dir is None
    if not bundle_backbone and backbone_weights_dir is None:
        raise BundleError("a randomly initialised backbone must be bundled (bundle_backbone=True)")

    config = model.config
    if len(catalog) != config.num_findings:
        raise BundleError(
            f"catalog has {len(catalog)} findings but the model's head has {config.num_findings} outputs"
        )
    for rel in extra_files or {}:
        _check_document_path(rel)
    staging = staging_folder(out_dir)
    try:
        (staging / "weights").mkdir()
        trainable = {k: v.detach().cpu().contiguous() for k, v in model_lib.trainable_state_dict(model).items()}
        save_file(trainable, str(staging / ADAPTERS_FILE), metadata={"format": FORMAT_NAME, "part": "adapters"})
        backbone_entry: dict[str, Any] = {
            "family": config.backbone.family,
            "size": config.backbone.size,
            "transformers_config": backbones.transformers_config_dict(model.encoder),
        }
        if bundle_backbone:
            full = model_lib.full_state_dict(model)
            frozen = {k: v.detach().cpu().contiguous() for k, v in full.items() if k not in trainable}
            save_file(frozen, str(staging / BACKBONE_FILE), metadata={"format": FORMAT_NAME, "part": "backbone"})
            backbone_entry["weights"] = {
                "kind": "bundled",
                "file": BACKBONE_FILE,
                "origin": str(config.backbone.source or "random initialisation"),
            }
            if backbone_weights_dir is not None:
                backbone_entry["weights"]["origin_sha256"] = backbone_folder_hashes(backbone_weights_dir)
        else:
            folder = Path(backbone_weights_dir).resolve()
            backbone_entry["weights"] = {
                "kind": "external",
                "folder": str(folder),
                "sha256": backbone_folder_hashes(folder),
                "origin": str(config.backbone.source or folder),
            }
        for rel, content in (extra_files or {}).items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

        files = {
            p.relative_to(staging).as_posix(): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": name or out_dir.name,
            "description": description,
            "created": _now(),
            "created_by": _software_versions(),
            "intended_use": INTENDED_USE,
            "synthetic_training_data": synthetic_training_data,
            "findings": catalog.to_dict(),
            "preprocessing": preprocessing.to_dict(),
            "model": config.to_dict(),
            "backbone": backbone_entry,
            "parameters": model_lib.count_parameters(model),
            "training": dict(training) if training else None,
            "metrics": dict(metrics) if metrics else None,
            "thresholds": {fid: float((thresholds or {}).get(fid, 0.5)) for fid in catalog.ids},
            "temperature": float(calibration["temperature"] if calibration else temperature),
            "calibration": dict(calibration) if calibration else None,
            "files": files,
        }
        _write_manifest(staging, manifest)
        _make_readable(staging)  # mkdtemp makes 0700; bundles are shared between users and machines
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def recover_interrupted_save(out_dir: str | os.PathLike) -> list[Path]:
    """Clean up after a save_bundle that a crash interrupted (see atomic_files.recover_folder)."""
    return recover_folder(out_dir)


def _make_readable(folder: Path) -> None:
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _software_versions() -> dict:
    from .. import __version__

    versions = {"headct_molre": __version__}
    for module_name in ("torch", "transformers", "peft", "safetensors"):
        try:
            module = __import__(module_name)
            versions[module_name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return versions


def _check_document_path(rel: str) -> None:
    try:
        schema.bundle_path(rel, "extra file")
    except schema.SchemaError as error:
        raise BundleError(f"cannot write {rel} into a bundle: {error.problem}") from None
    if rel.lower().endswith(".safetensors"):
        raise BundleError(f"cannot write {rel}: weights and the manifest are not documents")


def update_bundle(
    path: str | os.PathLike,
    *,
    thresholds: Mapping[str, float] | None = None,
    temperature: float | None = None,
    calibration: Mapping | None = None,
    metrics: Mapping | None = None,
    training: Mapping | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write calibration, metrics, provenance or documents (e.g. model_card.md) back into a bundle.

    The bundle is verified first; the weights are never touched. Extra files are (re)written
    atomically and hashed into the manifest; the manifest is re-sealed, checked against the schema and
    replaced atomically. Thresholds may name a subset of findings (others keep theirs) but no finding
    outside the catalog. A publisher signature no longer matches the changed manifest, so it is removed
    (sign the bundle again).
    """
    folder = Path(path).expanduser().resolve()
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    ids = [row["id"] for row in manifest["findings"]["findings"]]
    if thresholds:
        unknown = sorted(set(thresholds) - set(ids))
        if unknown:
            raise BundleError(f"{folder}: thresholds for findings not in its catalog: {', '.join(unknown[:5])}")
        merged = dict(manifest.get("thresholds") or {})
        merged.update({fid: float(value) for fid, value in thresholds.items()})
        manifest["thresholds"] = {fid: float(merged.get(fid, 0.5)) for fid in ids}
    if temperature is not None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise BundleError(f"temperature must be a finite positive number, got {temperature}")
        manifest["temperature"] = float(temperature)
    if calibration is not None:  # calibration.calibration_record(...): its temperature is the bundle's
        manifest["calibration"] = dict(calibration)
        manifest["temperature"] = float(calibration["temperature"])
    if metrics is not None:
        manifest["metrics"] = {**(manifest.get("metrics") or {}), **dict(metrics)}
    if training is not None:
        manifest["training"] = {**(manifest.get("training") or {}), **dict(training)}
    for rel in extra_files or {}:
        _check_document_path(rel)
    manifest["updated"] = _now()
    documents = {rel: content if isinstance(content, bytes) else content.encode("utf-8")
                 for rel, content in (extra_files or {}).items()}
    for rel, data in documents.items():
        manifest["files"][rel] = hashlib.sha256(data).hexdigest()
    seal_manifest(manifest)
    try:
        schema.validate_manifest(manifest)  # before anything is written
    except schema.SchemaError as error:
        raise BundleError(f"{folder}: refusing the update, it would break the manifest schema: {error}") from None
    for rel, data in documents.items():
        target = folder / rel
        _refuse_link_on_the_way(folder, target)
        atomic_write_bytes(target, data)
    (folder / SIGNATURE).unlink(missing_ok=True)
    _write_manifest(folder, manifest)
    return folder


def _refuse_link_on_the_way(folder: Path, target: Path) -> None:
    current = target
    while current != folder:
        if current.is_symlink():
            raise BundleError(f"{folder}: {current.relative_to(folder)} is a symbolic link; refusing to write through it")
        current = current.parent


# -------------------------------------------------------------------------------------------------- load
def read_manifest(path: str | os.PathLike) -> dict:
    """Read a bundle's manifest and check it fully without torch or hashing weights (for `info` and
    model lists): strict JSON, format and version, the manifest digest (any edit is refused, naming
    the edited sections) and the schema (types, ranges, known keys, file paths inside the bundle)."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"model bundle {folder} does not exist or is not a folder")
    if manifest_path.is_symlink() or (manifest_path.exists() and not manifest_path.is_file()):
        raise BundleError(f"{manifest_path} is a symbolic link or not a plain file; the bundle was altered")
    if not manifest_path.is_file():
        raise BundleError(
            f"{folder} is not a HeadCTMoLRE model bundle: it has no {MANIFEST}. Create one with "
            f"`headct-molre new-model` or `headct-molre train`."
        )
    size = manifest_path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path} is {size:,} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES:,}); the bundle is damaged")
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BundleError(f"{manifest_path} is not UTF-8 text ({error}); the bundle is damaged") from None
    manifest = parse_manifest_text(text, manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{manifest_path} is not a {FORMAT_NAME} manifest (format = {str(found)[:60]!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        older = isinstance(version, int) and not isinstance(version, bool) and version < min(SUPPORTED_FORMAT_VERSIONS)
        raise BundleError(
            f"{folder}: bundle format version {str(version)[:20]} is not supported by this HeadCTMoLRE "
            f"(supported: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); "
            + ("it predates manifest integrity checks: re-export the model with this HeadCTMoLRE"
               if older else "update HeadCTMoLRE or re-export the model")
        )
    _check_integrity(manifest_path, manifest)
    try:
        schema.validate_manifest(manifest)
    except schema.SchemaError as error:
        raise BundleError(f"{manifest_path}: {error}. The bundle cannot be used; get one exported by "
                          "HeadCTMoLRE") from None
    return manifest


def plain_entries(folder: Path, link_advice: str = "a bundle holds plain files only (copy the files themselves, "
                                                   "or get a fresh copy)"):
    """Every entry below ``folder``, never following links: (path, relative posix name, lstat), folders
    and plain files only; a symbolic link (``link_advice`` says what to do) or special file is a BundleError."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            entry = Path(root) / name
            info = entry.lstat()
            rel = entry.relative_to(folder).as_posix()
            if stat.S_ISLNK(info.st_mode):
                raise BundleError(f"{folder}: {rel} is a symbolic link; {link_advice}")
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise BundleError(f"{folder}: {rel} is not a plain file or folder; refused")
            yield entry, rel, info


def verify_files(folder: Path, manifest: dict) -> None:
    """Check the bundle's files: no symlink or special file anywhere, no pickle-based file (any letter
    case), no unlisted weight file, and every listed file a plain file inside the bundle whose sha256
    matches. Cheap checks come first; files are hashed last."""
    folder = Path(folder).resolve()
    listed = manifest["files"]
    for entry, rel, info in plain_entries(folder):
        if stat.S_ISDIR(info.st_mode):
            continue
        if has_pickle_suffix(rel):
            raise BundleError(
                f"{folder}: {rel} is a pickle-based file; HeadCTMoLRE never loads pickle files (they can run "
                f"code). Remove it or use a bundle that holds safetensors only."
            )
        if rel.lower().endswith(".safetensors") and rel not in listed:
            raise BundleError(f"{folder}: weight file {rel} is not listed in the manifest; the bundle was altered")
    sizes = {}
    for rel in listed:
        try:
            schema.bundle_path(rel, "files")
        except schema.SchemaError as error:
            raise BundleError(f"{folder}: manifest file entry {rel[:100]!r}: {error.problem}") from None
        path = folder / rel
        resolved = path.resolve()
        if folder not in resolved.parents:
            raise BundleError(f"{folder}: file {rel} resolves outside the bundle; refused")
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{folder}: file {rel} listed in the manifest is missing; the bundle is incomplete")
        sizes[rel] = path.stat().st_size
        if sizes[rel] > MAX_FILE_BYTES:
            raise BundleError(f"{folder}: file {rel} is {sizes[rel]:,} bytes, more than any bundle file may be")
    for rel, expected in listed.items():
        actual = sha256_file(folder / rel)
        if actual != expected:
            raise BundleError(
                f"{folder}: file {rel} has changed (sha256 {actual[:12]}... but the manifest says "
                f"{expected[:12]}...). Do not use a modified bundle; get a fresh copy."
            )


def _typed_views(folder: Path, manifest: dict):
    from ..findings import CatalogError, FindingCatalog
    from .backbones import check_transformers_config
    from .classifier import ModelConfig
    from ..ct.slice_stack import PreprocessConfig

    try:
        catalog = FindingCatalog.from_dict(manifest["findings"])
    except (CatalogError, KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{folder}: its finding catalog cannot be used: {error}") from None
    if manifest["findings"].get("version") != catalog.version:
        raise BundleError(
            f"{folder}: its finding catalog does not match its recorded version hash "
            f"({catalog.version[:12]} != {str(manifest['findings'].get('version'))[:12]}); the manifest was edited"
        )
    try:
        preprocessing = PreprocessConfig.from_dict(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(
            f"{folder}: its preprocessing cannot be honoured by this HeadCTMoLRE ({error}); "
            f"update HeadCTMoLRE or retrain the model"
        ) from None
    try:
        model_config = ModelConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{folder}: its model configuration cannot be used ({error})") from None
    if model_config.num_findings != len(catalog):
        raise BundleError(
            f"{folder}: the model predicts {model_config.num_findings} findings but the catalog lists {len(catalog)}"
        )
    try:
        check_transformers_config(model_config.backbone, manifest["backbone"]["transformers_config"])
    except ValueError as error:
        raise BundleError(f"{folder}: its backbone configuration cannot be built: {error}") from None
    thresholds = {fid: float(v) for fid, v in (manifest.get("thresholds") or {}).items()}
    unknown = sorted(set(thresholds) - set(catalog.ids))
    if unknown:
        raise BundleError(f"{folder}: thresholds given for findings not in its catalog: {', '.join(unknown[:5])}")
    return catalog, preprocessing, model_config, thresholds


def load_bundle(path: str | os.PathLike, *, verify: bool = True, trusted_keys: Mapping | None = None,
                rehash: bool = False) -> Bundle:
    """Read, verify (manifest digest and schema, file hashes, paths, catalog, preprocessing, backbone
    config, signature when present) and describe a bundle; loads no weights. Every refusal is a
    BundleError with a message. ``trusted_keys`` (signing.read_trusted_keys) marks the signer trusted.

    The file hashes are checked once per change of the bundle's files in this process
    (``verification_cache``: every file's size, times and inode, plus the manifest digest), so a second
    `predict(path)` does not re-read the weights; ``rehash=True`` always re-reads them (`headct-molre verify`)."""
    from . import verification_cache

    folder = Path(path).expanduser().resolve()
    try:
        manifest = read_manifest(folder)
        if verify and rehash:
            verify_files(folder, manifest)
            verification_cache.remember_verified(folder, manifest)
        elif verify:
            verification_cache.verify_bundle_files(folder, manifest)
        catalog, preprocessing, model_config, thresholds = _typed_views(folder, manifest)
        signature = _signature_status(folder, manifest, trusted_keys)
    except BundleError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, MemoryError) as error:
        raise BundleError(f"{folder}: the bundle cannot be read ({type(error).__name__}: {str(error)[:300]})") from None
    return Bundle(
        path=folder,
        manifest=manifest,
        catalog=catalog,
        preprocessing=preprocessing,
        model_config=model_config,
        thresholds=thresholds,
        temperature=float(manifest["temperature"]),
        signature=signature,
    )


def _signature_status(folder: Path, manifest: dict, trusted_keys: Mapping | None):
    from .signing import SignatureError, SignatureStatus, check_signature

    if not (folder / SIGNATURE).exists() and not (folder / SIGNATURE).is_symlink():
        return SignatureStatus(signed=False, trusted=False if trusted_keys is not None else None)
    try:
        return check_signature(folder, manifest["integrity"]["manifest_sha256"], trusted_keys)
    except SignatureError as error:
        raise BundleError(f"{folder}: {error}") from None


def resolve_backbone_folder(bundle: Bundle, override: str | os.PathLike | None = None) -> Path | None:
    """The local folder of an external backbone, checked against the manifest's hashes (None if bundled):
    the folder must hold exactly the hashed files (config.json, safetensors weights, index), each with
    its recorded sha256; an empty hash list is refused."""
    weights = bundle.manifest["backbone"].get("weights", {})
    if weights.get("kind") == "bundled":
        return None
    expected = weights.get("sha256") or {}
    if weights.get("kind") != "external" or not expected:
        raise BundleError(f"{bundle.path}: its external backbone has no recorded file hashes, so its weights cannot "
                          "be checked; refused (re-export the model with this HeadCTMoLRE)")
    recorded = str(weights.get("folder") or "")
    folder = Path(override or recorded).expanduser()
    if not (override or recorded) or not folder.is_dir():
        raise BundleError(
            f"{bundle.path}: its backbone weights live in {recorded or '(no folder recorded)'}, which does not "
            f"exist on this machine. Pass the folder holding the same backbone (e.g. --backbone-path DIR)."
        )
    actual = backbone_folder_hashes(folder)
    for name, digest in expected.items():
        if actual.get(name) != digest:
            raise BundleError(
                f"{bundle.path}: backbone file {folder / name} does not match the bundle "
                f"({'missing' if name not in actual else 'different sha256'}); this is not the backbone the "
                f"model was trained on"
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise BundleError(f"{bundle.path}: backbone folder {folder} holds files the bundle does not list "
                          f"({', '.join(extra[:5])}); this is not exactly the backbone the model was trained on")
    return folder.resolve()


def build_model(bundle: Bundle, *, backbone_folder: str | os.PathLike | None = None):
    """Rebuild the classifier of a verified bundle with its weights loaded (on the CPU, eval mode).

    The architecture comes only from the checked manifest (never from a hub id); an external backbone
    is loaded from its hash-checked folder with every weight present (none silently random)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import classifier as model_lib
    from .meta_init import parameters_on_meta

    folder = resolve_backbone_folder(bundle, backbone_folder)
    try:
        adapters = load_file(str(bundle.path / ADAPTERS_FILE))
        if folder is None:
            # rebuild the exact architecture from the stored transformers config (never from spec.source),
            # with its parameters on the meta device: the file's tensors become them (no random
            # initialisation to throw away, no second copy)
            with parameters_on_meta():
                classifier = model_lib.build_classifier(
                    bundle.model_config,
                    backbone_transformers_config=bundle.manifest["backbone"]["transformers_config"],
                )
            state = load_file(str(bundle.path / BACKBONE_FILE))
            state.update(adapters)
            model_lib.load_full_state_dict(classifier, state, assign=True)
            del state
        else:
            classifier = model_lib.build_classifier(bundle.model_config, backbone_weights_dir=folder)
            model_lib.load_trainable_state_dict(classifier, adapters)
    except BundleError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, OSError, SafetensorError) as error:
        raise BundleError(f"{bundle.path}: weights do not fit the model described by its manifest: "
                          f"{str(error)[:500]}") from None
    classifier.eval()
    return classifier


def describe(manifest: Mapping, signature=None) -> str:
    """A human description of a manifest for `headct-molre info` (``signature``: a signing.SignatureStatus)."""
    model_cfg = manifest["model"]
    backbone = model_cfg.get("backbone", {})
    lora = backbone.get("lora", {})
    molre = model_cfg.get("molre", {})
    params = manifest.get("parameters") or {}
    weights = manifest["backbone"].get("weights", {})
    findings = manifest["findings"]
    rows = findings.get("findings") or []
    categories: dict[str, int] = {}
    for row in rows:
        categories[row["category"]] = categories.get(row["category"], 0) + 1
    pre = manifest["preprocessing"]
    lines = [
        f"Model bundle: {manifest.get('name')}  (format {manifest.get('format_version')}, created {manifest.get('created')})",
        f"  {manifest.get('description')}" if manifest.get("description") else None,
        f"  Intended use: {manifest.get('intended_use')}",
        "  Trained on SYNTHETIC data only" if manifest.get("synthetic_training_data") else None,
        f"Backbone: {backbone.get('family')} {backbone.get('size')} at {backbone.get('image_size')} px"
        + (f", {stem} patch stem" if (stem := stored_patch_stem(manifest)) != "linear" else "") + "; weights "
        + (
            f"bundled (origin: {weights.get('origin')})"
            if weights.get("kind") == "bundled"
            else f"from {weights.get('folder')}"
        ),
        f"Adaptation: LoRA r={lora.get('r')} alpha={lora.get('alpha')} on {lora.get('targets')}; "
        + (
            f"MoLRE K={molre.get('num_experts')} experts of rank {molre.get('rank')}, router hidden {molre.get('router_hidden')}"
            if model_cfg.get("use_molre", True)
            else "no MoLRE (LoRA-only baseline)"
        ),
        ("Slice pooling: per finding (each finding's smooth maximum over slices)"
         if model_cfg.get("pooling") == "per_finding" else None),
        "Parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()) if params else None,
        f"Findings: {len(rows)} (" + ", ".join(f"{c} {n}" for c, n in categories.items())
        + f"), catalog version {str(findings.get('version', ''))[:12]}",
        f"Preprocessing: {pre.get('num_slices')} slices of {pre.get('slice_spacing_mm')} mm, "
        f"{pre.get('image_size')} px over {pre.get('in_plane_fov_mm')} mm, windows {pre.get('windows_hu')}, "
        f"alignment {pre.get('alignment')}",
    ]
    training = manifest.get("training")
    if training:
        lines.append("Training: " + ", ".join(f"{k}={v}" for k, v in training.items() if not isinstance(v, (dict, list))))
    metrics = manifest.get("metrics")
    if metrics:
        lines.append("Metrics: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if not isinstance(v, (dict, list))))
    lines.append("Files: " + ", ".join(f"{rel} ({digest[:10]})" for rel, digest in manifest["files"].items()))
    integrity = manifest.get("integrity") or {}
    lines.append(f"Integrity: manifest digest {str(integrity.get('manifest_sha256', ''))[:16]} (covers every entry "
                 "above and every file's sha256)")
    if signature is not None:
        lines.append(f"Signature: {signature.describe()}")
    return "\n".join(line for line in lines if line)
