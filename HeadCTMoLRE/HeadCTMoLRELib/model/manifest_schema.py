"""The schema of a bundle's manifest.json: every key, its type and its range, in one table.

A manifest comes from a stranger, so it is checked against this schema BEFORE anything is built or
allocated from it (no torch here: ``headct-molre info`` uses it too). A value outside its range, a
missing required key, a wrong type or an unknown key is a :class:`SchemaError` naming the key's path
(e.g. ``preprocessing.num_slices``) and what is allowed.

Adding a key is one line: a ``Field`` in the table of the section it belongs to (``MANIFEST_FIELDS`` for
a top-level key). Keys of the settings sections (``model``, ``model.backbone``, ``model.molre``,
``preprocessing``) that are not in this table pass the schema and are refused or honoured by the
settings dataclasses themselves (their ``from_dict`` refuses unknown settings). Unknown TOP-LEVEL keys
are refused; tools that want to store their own data in a bundle put it under ``extensions`` (any JSON,
size-bounded, never interpreted by HeadCTMoLRE, still covered by the manifest digest).

Numbers: JSON has no NaN or Infinity; the reader refuses them (and numbers too big for a float), so every
number here is finite. Booleans are not accepted where numbers are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_FILES = 10_000
MAX_PATH_CHARS = 512
MAX_DOCUMENT_DEPTH = 16
MAX_DOCUMENT_ITEMS = 200_000
#: slices x pixels x channels of one preprocessed stack (float32); 2**28 is 1 GiB, 100x the default.
MAX_STACK_VALUES = 2 ** 28

Check = Callable[[Any, str], None]


class SchemaError(ValueError):
    """A manifest value that breaks the schema; ``path`` is the dotted key path."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path or 'manifest'}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = True


# ------------------------------------------------------------------------------------------- checks
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def integer(low: int, high: int) -> Check:
    def check(value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(path, f"expected an integer in [{low}, {high}], got {_type_name(value)} {value!r:.40}")
        if not low <= value <= high:
            raise SchemaError(path, f"{value} is outside the allowed range [{low}, {high}]")
    return check


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    allowed = f"{left}{low}, {high}{right}"

    def check(value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(path, f"expected a number in {allowed}, got {_type_name(value)} {value!r:.40}")
        if not math.isfinite(value):
            raise SchemaError(path, f"{value} is not a finite number (allowed: {allowed})")
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            raise SchemaError(path, f"{value} is outside the allowed range {allowed}")
    return check


def text(max_chars: int = 1000, *, pattern: re.Pattern | None = None, non_empty: bool = False) -> Check:
    def check(value, path):
        if not isinstance(value, str):
            raise SchemaError(path, f"expected text, got {_type_name(value)}")
        if len(value) > max_chars:
            raise SchemaError(path, f"text of {len(value)} characters (at most {max_chars} allowed)")
        if non_empty and not value.strip():
            raise SchemaError(path, "must not be empty")
        if "\0" in value:
            raise SchemaError(path, "contains a NUL character")
        if pattern is not None and not pattern.match(value):
            raise SchemaError(path, f"{value!r:.80} is not of the form {pattern.pattern}")
    return check


def boolean(value, path) -> None:
    if not isinstance(value, bool):
        raise SchemaError(path, f"expected true or false, got {_type_name(value)}")


def choice(*allowed) -> Check:
    def check(value, path):
        if isinstance(value, bool) or value not in allowed:
            raise SchemaError(path, f"{value!r:.60} is not one of {', '.join(map(repr, allowed))}")
    return check


def optional(inner: Check) -> Check:
    def check(value, path):
        if value is not None:
            inner(value, path)
    return check


def list_of(item: Check, *, min_items: int = 0, max_items: int = 10_000) -> Check:
    def check(value, path):
        if not isinstance(value, list):
            raise SchemaError(path, f"expected a list, got {_type_name(value)}")
        if not min_items <= len(value) <= max_items:
            raise SchemaError(path, f"{len(value)} items (allowed: {min_items} to {max_items})")
        for index, entry in enumerate(value):
            item(entry, f"{path}[{index}]")
    return check


def mapping_of(key: Check, value_check: Check, *, min_items: int = 0, max_items: int = 10_000) -> Check:
    def check(value, path):
        if not isinstance(value, dict):
            raise SchemaError(path, f"expected an object, got {_type_name(value)}")
        if not min_items <= len(value) <= max_items:
            raise SchemaError(path, f"{len(value)} entries (allowed: {min_items} to {max_items})")
        for name, entry in value.items():
            key(name, f"{path} key")
            value_check(entry, f"{path}.{name}")
    return check


def record(fields: dict[str, Field], *, open_keys: bool = False, checks: tuple[Check, ...] = ()) -> Check:
    """An object with the given fields; ``open_keys`` lets unlisted keys through (their owner checks them);
    ``checks`` run on the whole object after its fields passed (cross-field rules)."""

    def check(value, path):
        if not isinstance(value, dict):
            raise SchemaError(path, f"expected an object, got {_type_name(value)}")
        prefix = f"{path}." if path else ""
        missing = [name for name, spec in fields.items() if spec.required and name not in value]
        if missing:
            raise SchemaError(path, f"required key(s) missing: {', '.join(missing)}")
        unknown = sorted(set(value) - set(fields))
        if unknown and not open_keys:
            raise SchemaError(path, f"unknown key(s) {', '.join(map(repr, unknown[:5]))}; known keys are "
                                    f"{', '.join(sorted(fields))}" + (" (store your own data under 'extensions')"
                                                                    if not path else ""))
        for name, spec in fields.items():
            if name in value:
                spec.check(value[name], f"{prefix}{name}")
        for rule in checks:
            rule(value, path)
    return check


def json_document(value, path, _depth: int = 0, _budget: list | None = None) -> None:
    """Any JSON value, bounded in depth and size (training records, metrics, extensions)."""
    budget = _budget if _budget is not None else [MAX_DOCUMENT_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        raise SchemaError(path, f"too large (more than {MAX_DOCUMENT_ITEMS} values)")
    if _depth > MAX_DOCUMENT_DEPTH:
        raise SchemaError(path, f"nested deeper than {MAX_DOCUMENT_DEPTH} levels")
    if isinstance(value, dict):
        for name, entry in value.items():
            json_document(entry, f"{path}.{name}", _depth + 1, budget)
    elif isinstance(value, list):
        for index, entry in enumerate(value):
            json_document(entry, f"{path}[{index}]", _depth + 1, budget)
    elif isinstance(value, float) and not math.isfinite(value):
        raise SchemaError(path, f"{value} is not a finite number")
    elif isinstance(value, str) and len(value) > 1_000_000:
        raise SchemaError(path, "text longer than 1,000,000 characters")


def sha256_hex(value, path) -> None:
    if not isinstance(value, str) or not SHA256_PATTERN.match(value):
        raise SchemaError(path, f"expected a sha256 (64 lower-case hex digits), got {value!r:.80}")


def has_pickle_suffix(name: str) -> bool:
    """True for file names that pickle-based formats use (case-insensitive: .PT, .Bin ...)."""
    return PurePosixPath(name.lower()).suffix in PICKLE_SUFFIXES


def bundle_path(value, path) -> None:
    """A file entry of the bundle: relative, forward slashes, no '..', no hidden trick, not a pickle."""
    text(MAX_PATH_CHARS, non_empty=True)(value, path)
    parts = value.split("/")
    if (value.startswith("/") or "\\" in value or ":" in value or any(p in ("", ".", "..") for p in parts)
            or any(ord(c) < 32 for c in value)):
        raise SchemaError(path, f"{value!r} is not a plain relative path inside the bundle (no '/' at the start, "
                                "no '..', '.', empty parts, backslashes, drive letters or control characters)")
    if value in ("manifest.json", "signature.json"):
        raise SchemaError(path, f"{value} cannot be listed as a file of itself")
    if has_pickle_suffix(value):
        raise SchemaError(path, f"{value} is a pickle-based file; HeadCTMoLRE never loads pickle files")


# ------------------------------------------------------------------------------------------- tables
FINDING_ROW = record({
    "id": Field(text(100, non_empty=True)),
    "name": Field(text(300, non_empty=True)),
    "category": Field(text(100, non_empty=True)),
    "description": Field(text(5000), required=False),
    "code": Field(text(200), required=False),
})

FINDINGS = record({
    "version": Field(sha256_hex),
    "columns": Field(list_of(text(50), max_items=20), required=False),
    "findings": Field(list_of(FINDING_ROW, min_items=1, max_items=2000)),
})


def _stack_budget(pre: dict, path: str) -> None:
    values = pre.get("num_slices", 40) * pre.get("image_size", 224) ** 2 * len(pre.get("windows_hu") or [0] * 3)
    if values > MAX_STACK_VALUES:
        raise SchemaError(path, f"num_slices x image_size^2 x windows = {values:,} values per scan is more than "
                                f"{MAX_STACK_VALUES:,}; this is not a head CT model this version can run")


HU_PAIR = list_of(number(-5000, 40000), min_items=2, max_items=2)
MINMAX_WINDOW = "minmax"  # ct.slice_stack.MINMAX_WINDOW: the scan's own min..max range


def HU_WINDOW(value, path):
    """A (low, high) HU pair, or the string "minmax"."""
    if isinstance(value, str):
        choice(MINMAX_WINDOW)(value, path)
    else:
        HU_PAIR(value, path)


def _windows_ordered(pre: dict, path: str) -> None:
    for index, window in enumerate(pre.get("windows_hu") or []):
        if window == MINMAX_WINDOW:
            continue
        low, high = window
        if not high > low:
            raise SchemaError(f"{path}.windows_hu[{index}]", f"window [{low}, {high}] needs high > low")


PREPROCESSING = record({
    "image_size": Field(integer(8, 1024), required=False),
    "in_plane_fov_mm": Field(number(50.0, 600.0), required=False),
    "slice_spacing_mm": Field(number(0.25, 20.0), required=False),
    "num_slices": Field(integer(1, 512), required=False),
    "windows_hu": Field(list_of(HU_WINDOW, min_items=1, max_items=16), required=False),
    "alignment": Field(text(50), required=False),
    "outside_hu": Field(number(-5000, 40000), required=False),
}, open_keys=True, checks=(_windows_ordered, _stack_budget))

LORA = record({
    "r": Field(integer(1, 512), required=False),
    "alpha": Field(number(0.0, 10_000.0, low_open=True), required=False),
    "dropout": Field(number(0.0, 1.0, high_open=True), required=False),
    "targets": Field(text(50), required=False),
}, open_keys=True)

MODEL_BACKBONE = record({
    "family": Field(text(50, non_empty=True)),
    "size": Field(text(50, non_empty=True)),
    "image_size": Field(integer(8, 1024), required=False),
    "source": Field(optional(text(4096)), required=False),
    "lora": Field(LORA, required=False),
    "num_frames": Field(optional(integer(1, 512)), required=False),
}, open_keys=True)

MOLRE = record({
    "num_experts": Field(integer(1, 64), required=False),
    "rank": Field(integer(1, 512), required=False),
    "router_hidden": Field(integer(1, 8192), required=False),
    "load_balance_weight": Field(number(0.0, 100.0), required=False),
}, open_keys=True)

#: ModelConfig.pooling's values (here, torch-free, so that the command line can offer them without importing torch).
POOLINGS = ("attention", "per_finding")

#: Patch stems of a ViT backbone (model/patch_stem.py): the transformers config key and its values; a config
#: without the key has the linear stem of every published checkpoint.
PATCH_STEM_KEY = "patch_stem"
PATCH_STEMS = ("linear", "conv")


def patch_stem_of(config: Any) -> str:
    """"linear" or "conv": the stem a transformers config (object or dict) asks for; absent = "linear"."""
    value = config.get(PATCH_STEM_KEY) if isinstance(config, dict) else getattr(config, PATCH_STEM_KEY, None)
    return "linear" if value is None else value


def stored_patch_stem(manifest: dict) -> str:
    """The patch stem of a bundle manifest's stored backbone configuration ("linear" when none is stored)."""
    backbone = manifest.get("backbone") if isinstance(manifest, dict) else None
    config = backbone.get("transformers_config") if isinstance(backbone, dict) else None
    return str(patch_stem_of(config)) if isinstance(config, dict) else "linear"


MODEL = record({
    "backbone": Field(MODEL_BACKBONE),
    "num_findings": Field(integer(1, 2000)),
    "use_molre": Field(boolean, required=False),
    "molre": Field(MOLRE, required=False),
    "pooling": Field(choice(*POOLINGS), required=False),
}, open_keys=True)


def _weights_entry(value, path) -> None:
    if not isinstance(value, dict):
        raise SchemaError(path, f"expected an object, got {_type_name(value)}")
    kind = value.get("kind")
    if kind == "bundled":
        record({"kind": Field(choice("bundled")), "file": Field(choice("weights/backbone.safetensors")),
                "origin": Field(text(4096), required=False),
                "origin_sha256": Field(mapping_of(text(255), sha256_hex), required=False)})(value, path)
    elif kind == "external":
        record({"kind": Field(choice("external")), "folder": Field(text(4096, non_empty=True)),
                "sha256": Field(mapping_of(text(255, non_empty=True), sha256_hex, min_items=1, max_items=1000)),
                "origin": Field(text(4096), required=False)})(value, path)
        names = list(value["sha256"])
        if "config.json" not in names or not any(n.lower().endswith(".safetensors") for n in names):
            raise SchemaError(f"{path}.sha256", "must list config.json and the backbone's .safetensors weights; "
                                                "an external backbone without hashes cannot be checked")
        for name in names:
            if "/" in name or "\\" in name or name in (".", ".."):
                raise SchemaError(f"{path}.sha256", f"{name!r} is not a file name of the backbone folder")
    else:
        raise SchemaError(f"{path}.kind", f"{kind!r:.40} is not 'bundled' or 'external'")


def _known_patch_stem(value, path) -> None:
    stem = value["transformers_config"].get(PATCH_STEM_KEY)
    if stem is not None:
        choice(*PATCH_STEMS)(stem, f"{path}.transformers_config.{PATCH_STEM_KEY}")


BACKBONE = record({
    "family": Field(text(50, non_empty=True)),
    "size": Field(text(50, non_empty=True)),
    "transformers_config": Field(mapping_of(text(200), json_document, max_items=500)),
    "weights": Field(_weights_entry),
}, checks=(_known_patch_stem,))

INTEGRITY = record({
    "algorithm": Field(text(100)),
    "manifest_sha256": Field(sha256_hex),
    "sections": Field(mapping_of(text(100), sha256_hex, max_items=200)),
})


PRIOR_CORRECTION = record({
    "kind": Field(text(100), required=False),
    "rule": Field(text(1000), required=False),
    "alpha_source": Field(text(1000), required=False),
    "focal_alpha": Field(mapping_of(text(100), number(0.0, 1.0, low_open=True, high_open=True), max_items=2000),
                         required=False),
    "logit_offset": Field(mapping_of(text(100), number(-50.0, 50.0), max_items=2000), required=False),
}, open_keys=True)

#: calibration.py's record (prior correction, temperature, where it was fitted).
CALIBRATION = record({
    "method": Field(choice("none", "temperature", "prior_correction", "prior_correction+temperature")),
    "temperature": Field(number(0.01, 100.0)),
    "prior_correction": Field(optional(PRIOR_CORRECTION), required=False),
    "fitted_on": Field(optional(json_document), required=False),
    "probability": Field(text(500), required=False),
}, open_keys=True)


def _cross_checks(manifest: dict, path: str) -> None:
    rows = manifest["findings"]["findings"]
    ids = [row["id"] for row in rows]
    if manifest["model"]["num_findings"] != len(ids):
        raise SchemaError("model.num_findings", f"the model predicts {manifest['model']['num_findings']} findings "
                                                f"but the catalog lists {len(ids)}")
    unknown = sorted(set(manifest["thresholds"]) - set(ids))
    if unknown:
        raise SchemaError("thresholds", f"thresholds given for findings not in its catalog: {', '.join(unknown[:5])}")
    for key in ("family", "size"):
        if manifest["backbone"][key] != manifest["model"]["backbone"][key]:
            raise SchemaError(f"backbone.{key}", f"{manifest['backbone'][key]!r} but model.backbone.{key} is "
                                                 f"{manifest['model']['backbone'][key]!r}")
    files = manifest["files"]
    if "weights/adapters.safetensors" not in files:
        raise SchemaError("files", "weights/adapters.safetensors is not listed")
    if manifest["backbone"]["weights"]["kind"] == "bundled" and "weights/backbone.safetensors" not in files:
        raise SchemaError("files", "the backbone is bundled but weights/backbone.safetensors is not listed")
    calibration = manifest.get("calibration")
    if calibration and calibration["temperature"] != manifest["temperature"]:
        raise SchemaError("calibration.temperature", f"{calibration['temperature']} but the bundle's temperature is "
                                                     f"{manifest['temperature']}")
    offsets = ((calibration or {}).get("prior_correction") or {}).get("logit_offset") or {}
    unknown = sorted(set(offsets) - set(ids))
    if unknown:
        raise SchemaError("calibration.prior_correction.logit_offset",
                          f"offsets for findings not in its catalog: {', '.join(unknown[:5])}")
    lowered = [name.lower() for name in files]
    if len(set(lowered)) != len(lowered):
        raise SchemaError("files", "two entries differ only in upper/lower case")


#: The manifest's top-level keys. One line per key: add new keys here.
MANIFEST_FIELDS: dict[str, Field] = {
    "format": Field(text(100)),
    "format_version": Field(integer(1, 1000)),
    "name": Field(text(200, non_empty=True)),
    "description": Field(text(20_000), required=False),
    "created": Field(text(64), required=False),
    "updated": Field(text(64), required=False),
    "created_by": Field(mapping_of(text(100), text(200), max_items=50), required=False),
    "intended_use": Field(text(5000), required=False),
    "synthetic_training_data": Field(optional(boolean), required=False),
    "findings": Field(FINDINGS),
    "preprocessing": Field(PREPROCESSING),
    "model": Field(MODEL),
    "backbone": Field(BACKBONE),
    "parameters": Field(optional(mapping_of(text(100), integer(0, 10 ** 13), max_items=50)), required=False),
    "training": Field(optional(json_document), required=False),
    "metrics": Field(optional(json_document), required=False),
    "thresholds": Field(mapping_of(text(100), number(0.0, 1.0, low_open=True, high_open=True), max_items=2000)),
    "temperature": Field(number(0.01, 100.0)),
    "calibration": Field(optional(CALIBRATION), required=False),
    "files": Field(mapping_of(bundle_path, sha256_hex, min_items=1, max_items=MAX_FILES)),
    "integrity": Field(INTEGRITY),
    "extensions": Field(mapping_of(text(100), json_document, max_items=100), required=False),
}

MANIFEST = record(MANIFEST_FIELDS, checks=(_cross_checks,))


def validate_manifest(manifest: Any) -> None:
    """Raise SchemaError for the first key of ``manifest`` that breaks the schema."""
    MANIFEST(manifest, "")
