"""Model bundles: a self-describing folder that a user can trust.

Layout of a bundle folder::

    manifest.json                    everything needed to rebuild and honour the model (see below)
    weights/adapters.safetensors     trainable tensors: LoRA A/B, MoLRE, attention pooling, head
    weights/backbone.safetensors     frozen backbone weights, when the backbone is bundled
                                     (random/tiny backbones, or --bundle-backbone); otherwise the
                                     manifest points at a local Hugging Face folder and its hashes
    model_card.md                    optional, generated after training

``manifest.json`` holds: format name and version; the finding catalog (its rows and version hash);
preprocessing parameters; the model config (backbone family/size/image size, LoRA and MoLRE
hyper-parameters, use_molre); the backbone's transformers config and where its weights come from
(with sha256 per file); parameter counts; training provenance and metrics; decision thresholds and
calibration temperature; and the sha256 of every file of the bundle, checked on load.

Only JSON and safetensors are ever read. A bundle that holds pickle-based weight files (.bin, .pt,
.pth, .pkl, .ckpt) is refused, as is any changed, missing or extra weight file, an unknown format
version, a catalog whose rows do not match its hash, or preprocessing this code cannot honour.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

FORMAT_NAME = "headct-molre-bundle"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
ADAPTERS_FILE = "weights/adapters.safetensors"
BACKBONE_FILE = "weights/backbone.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
INTENDED_USE = (
    "Research use only. Not a medical device; not for clinical decisions. Outputs must be reviewed "
    "by a qualified reader."
)


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

    Refuses folders whose weights exist only in pickle form (pytorch_model.bin and the like).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"backbone folder {folder} does not exist or is not a folder")
    weights = sorted(folder.glob("*.safetensors"))
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not weights:
        hint = f" (it holds only pickle-based weights: {', '.join(pickled)})" if pickled else ""
        raise BundleError(
            f"backbone folder {folder} has no .safetensors weights{hint}. HeadCTMoLRE never loads pickle "
            f"files; convert the checkpoint to safetensors (e.g. save_pretrained(..., "
            f"safe_serialization=True)) on a machine you trust."
        )
    files = [p for p in [folder / "config.json", *weights, folder / "model.safetensors.index.json"] if p.is_file()]
    return {p.name: sha256_file(p) for p in files}


# ---------------------------------------------------------------------------------------------- manifest
@dataclass
class Bundle:
    """A loaded (verified) bundle: its folder, its manifest, and typed views of the manifest."""

    path: Path
    manifest: dict
    catalog: Any  # findings.FindingCatalog
    preprocessing: Any  # preprocess.PreprocessConfig
    model_config: Any  # model.ModelConfig
    thresholds: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0

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


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


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

    The bundle is first written to a temporary sibling folder and renamed into place, so a crash
    never leaves a half-written bundle at ``out_dir``. ``backbone_weights_dir`` is the local Hugging
    Face folder the backbone was built from (None for a randomly initialised backbone, which is then
    always bundled). ``bundle_backbone`` copies the frozen backbone weights into the bundle
    (default: only when there is no backbone folder). ``extra_files`` maps a relative path (e.g.
    ``model_card.md``) to text or bytes to include (hashed like the weights). ``calibration``: the
    record of calibration.calibration_record (prior correction, temperature, where it was fitted); its
    temperature replaces ``temperature``.
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
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
        _write_json(staging / MANIFEST, manifest)
        _make_readable(staging)  # mkdtemp makes 0700; bundles are shared between users and machines
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


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

    The bundle is verified first; the weights are never touched. Extra files are (re)written and
    hashed into the manifest; the manifest is replaced atomically. Thresholds may name a subset of
    findings (others keep theirs) but no finding outside the catalog.
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
        if not temperature > 0:
            raise BundleError(f"temperature must be positive, got {temperature}")
        manifest["temperature"] = float(temperature)
    if calibration is not None:  # calibration.calibration_record(...): its temperature is the bundle's
        manifest["calibration"] = dict(calibration)
        manifest["temperature"] = float(calibration["temperature"])
    if metrics is not None:
        manifest["metrics"] = {**(manifest.get("metrics") or {}), **dict(metrics)}
    if training is not None:
        manifest["training"] = {**(manifest.get("training") or {}), **dict(training)}
    for rel, content in (extra_files or {}).items():
        if rel == MANIFEST or rel.endswith(".safetensors") or Path(rel).suffix in PICKLE_SUFFIXES:
            raise BundleError(f"update_bundle cannot write {rel}; weights and the manifest are not documents")
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        os.chmod(target, 0o644)
        manifest["files"][rel] = sha256_file(target)
    manifest["updated"] = _now()
    staging = folder / f".{MANIFEST}.tmp"
    _write_json(staging, manifest)
    os.chmod(staging, 0o644)
    os.replace(staging, folder / MANIFEST)
    return folder


# -------------------------------------------------------------------------------------------------- load
def read_manifest(path: str | os.PathLike) -> dict:
    """Read and structurally check a bundle's manifest (no hashing, no torch): for `info` and lists."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"model bundle {folder} does not exist or is not a folder")
    if not manifest_path.is_file():
        raise BundleError(
            f"{folder} is not a HeadCTMoLRE model bundle: it has no {MANIFEST}. Create one with "
            f"`headct-molre new-model` or `headct-molre train`."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON ({error}); the bundle is damaged") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{manifest_path} is not a {FORMAT_NAME} manifest (format = {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"{folder}: bundle format version {version!r} is not supported by this HeadCTMoLRE "
            f"(supported: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); update HeadCTMoLRE or re-export the model"
        )
    for key in ("findings", "preprocessing", "model", "backbone", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_path} lacks the required entry '{key}'; the bundle is damaged")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Check every listed file's sha256, and that no unlisted weight or pickle file is present."""
    listed = manifest["files"]
    for rel, expected in listed.items():
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"{folder}: file {rel} listed in the manifest is missing; the bundle is incomplete")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{folder}: file {rel} has changed (sha256 {actual[:12]}... but the manifest says "
                f"{expected[:12]}...). Do not use a modified bundle; get a fresh copy."
            )
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if path.suffix in PICKLE_SUFFIXES:
            raise BundleError(
                f"{folder}: {rel} is a pickle-based file; HeadCTMoLRE never loads pickle files (they can run "
                f"code). Remove it or use a bundle that holds safetensors only."
            )
        if path.suffix == ".safetensors" and rel not in listed:
            raise BundleError(f"{folder}: weight file {rel} is not listed in the manifest; the bundle was altered")


def _typed_views(folder: Path, manifest: dict):
    from ..findings import CatalogError, FindingCatalog
    from .classifier import ModelConfig
    from ..ct.preprocess import PreprocessConfig

    try:
        catalog = FindingCatalog.from_dict(manifest["findings"])
    except (CatalogError, KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{folder}: its finding catalog cannot be used: {error}") from error
    stated = manifest["findings"].get("version")
    if stated and stated != catalog.version:
        raise BundleError(
            f"{folder}: its finding catalog does not match its recorded version hash "
            f"({catalog.version[:12]} != {stated[:12]}); the manifest was edited"
        )
    try:
        preprocessing = PreprocessConfig.from_dict(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(
            f"{folder}: its preprocessing cannot be honoured by this HeadCTMoLRE ({error}); "
            f"update HeadCTMoLRE or retrain the model"
        ) from error
    try:
        model_config = ModelConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{folder}: its model configuration cannot be used ({error})") from error
    if model_config.num_findings != len(catalog):
        raise BundleError(
            f"{folder}: the model predicts {model_config.num_findings} findings but the catalog lists {len(catalog)}"
        )
    thresholds = {fid: float(v) for fid, v in (manifest.get("thresholds") or {}).items()}
    unknown = sorted(set(thresholds) - set(catalog.ids))
    if unknown:
        raise BundleError(f"{folder}: thresholds given for findings not in its catalog: {', '.join(unknown[:5])}")
    return catalog, preprocessing, model_config, thresholds


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read, verify (hashes, format, catalog, preprocessing) and describe a bundle; loads no weights."""
    folder = Path(path).expanduser().resolve()
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    catalog, preprocessing, model_config, thresholds = _typed_views(folder, manifest)
    return Bundle(
        path=folder,
        manifest=manifest,
        catalog=catalog,
        preprocessing=preprocessing,
        model_config=model_config,
        thresholds=thresholds,
        temperature=float(manifest.get("temperature", 1.0)),
    )


def resolve_backbone_folder(bundle: Bundle, override: str | os.PathLike | None = None) -> Path | None:
    """The local folder of an external backbone, checked against the manifest's hashes (None if bundled)."""
    weights = bundle.manifest["backbone"].get("weights", {})
    if weights.get("kind") == "bundled":
        return None
    folder = Path(override or weights.get("folder", "")).expanduser()
    if not folder.is_dir():
        raise BundleError(
            f"{bundle.path}: its backbone weights live in {weights.get('folder')}, which does not exist on this "
            f"machine. Pass the folder holding the same backbone (e.g. --backbone-path DIR)."
        )
    expected = weights.get("sha256") or {}
    actual = backbone_folder_hashes(folder)
    for name, digest in expected.items():
        if actual.get(name) != digest:
            raise BundleError(
                f"{bundle.path}: backbone file {folder / name} does not match the bundle "
                f"({'missing' if name not in actual else 'different sha256'}); this is not the backbone the "
                f"model was trained on"
            )
    return folder


def build_model(bundle: Bundle, *, backbone_folder: str | os.PathLike | None = None):
    """Rebuild the classifier of a verified bundle with its weights loaded (on the CPU, eval mode)."""
    from safetensors.torch import load_file

    from . import classifier as model_lib

    folder = resolve_backbone_folder(bundle, backbone_folder)
    adapters = load_file(str(bundle.path / ADAPTERS_FILE))
    if folder is None:
        # rebuild the exact architecture from the stored transformers config (never from spec.source)
        classifier = model_lib.build_classifier(
            bundle.model_config,
            backbone_transformers_config=bundle.manifest["backbone"].get("transformers_config"),
        )
        state = load_file(str(bundle.path / BACKBONE_FILE))
        state.update(adapters)
        try:
            model_lib.load_full_state_dict(classifier, state)
        except (RuntimeError, KeyError, ValueError) as error:
            raise BundleError(f"{bundle.path}: weights do not fit the model described by its manifest: {error}") from error
    else:
        classifier = model_lib.build_classifier(bundle.model_config, backbone_weights_dir=folder)
        try:
            model_lib.load_trainable_state_dict(classifier, adapters)
        except (RuntimeError, KeyError, ValueError) as error:
            raise BundleError(f"{bundle.path}: adapter weights do not fit its backbone: {error}") from error
    classifier.eval()
    return classifier


def describe(manifest: Mapping) -> str:
    """A human description of a manifest for `headct-molre info`."""
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
        f"Backbone: {backbone.get('family')} {backbone.get('size')} at {backbone.get('image_size')} px; weights "
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
    return "\n".join(line for line in lines if line)
