"""Resources/Models.json, the list of model bundles HeadCTMoLRE offers, against its schema and the disk.

jsonschema is not a dependency, so the subset of JSON Schema (draft-07) that Models-schema.json uses is
checked by a small validator here; a test makes sure the schema uses nothing else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
MANIFEST = RESOURCES / "Models.json"
SCHEMA = RESOURCES / "Models-schema.json"

SUPPORTED_KEYWORDS = {
    "$schema", "$id", "$ref", "title", "description", "type", "required", "additionalProperties", "properties",
    "items", "enum", "pattern", "minimum", "minLength", "minItems", "anyOf", "definitions",
}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}


def validate(instance, schema: dict, root: dict | None = None, where: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` ('<json path>: <what is wrong>'); empty when valid."""
    root = root or schema
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return validate(instance, target, root, where)
    expected = schema.get("type")
    if expected:
        python_type = _TYPES[expected]
        if not isinstance(instance, python_type) or (expected in ("integer", "number") and isinstance(instance, bool)):
            return [f"{where}: expected {expected}, got {type(instance).__name__}"]
    errors = []
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{where}: {instance!r} not one of {schema['enum']}")
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{where}: {instance!r} does not match {schema['pattern']}")
    if isinstance(instance, (int, float)) and "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{where}: {instance} < {schema['minimum']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        for index, item in enumerate(instance):
            errors += validate(item, schema.get("items", {}), root, f"{where}[{index}]")
    if isinstance(instance, dict):
        errors += [f"{where}: missing '{key}'" for key in schema.get("required", []) if key not in instance]
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            errors += [f"{where}: unexpected '{key}'" for key in instance if key not in properties]
        for key, value in instance.items():
            if key in properties:
                errors += validate(value, properties[key], root, f"{where}.{key}")
    if "anyOf" in schema and all(validate(instance, option, root, where) for option in schema["anyOf"]):
        errors.append(f"{where}: matches none of {schema['anyOf']}")
    return errors


def _keywords(schema, found=None, in_properties=False) -> set[str]:
    found = set() if found is None else found
    if isinstance(schema, dict):
        for key, value in schema.items():
            if not in_properties:
                found.add(key)
            _keywords(value, found, in_properties=(key in ("properties", "definitions") and not in_properties))
    elif isinstance(schema, list):
        for item in schema:
            _keywords(item, found)
    return found


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def _valid_entry(**changes) -> dict:
    entry = {
        "id": "demo", "title": "Demo (synthetic)", "description": "Tiny model trained on phantoms.",
        "version": "1.0", "path": "Models/demo", "license": "Apache-2.0", "backbone": "DINOv3 ViT tiny",
        "inputs": [{"title": "Non-contrast head CT", "modality": "CT", "units": "HU"}],
        "timings": {"cpu_seconds": 2.5, "gpu_seconds": 0.2, "cpu": "2 cores", "gpu": "H100"},
        "synthetic": True, "intended_use": "Research use only - not for clinical use.",
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def test_schema_uses_only_keywords_this_validator_checks(schema):
    unknown = _keywords(schema) - SUPPORTED_KEYWORDS
    assert not unknown, f"Models-schema.json uses keywords the test validator ignores: {sorted(unknown)}"


def test_manifest_matches_its_schema(manifest, schema):
    assert validate(manifest, schema) == []


def test_model_ids_are_unique(manifest):
    ids = [entry["id"] for entry in manifest["models"]]
    assert len(ids) == len(set(ids)), f"duplicate model ids: {ids}"


def test_every_local_model_is_a_bundle_folder_inside_resources(manifest):
    for entry in manifest["models"]:
        if "path" not in entry:
            continue
        folder = (RESOURCES / entry["path"]).resolve()
        assert RESOURCES.resolve() in folder.parents, f"{entry['id']}: path {entry['path']} leaves Resources/"
        assert (folder / "manifest.json").is_file(), (
            f"{entry['id']}: {folder} is not a model bundle (no manifest.json); train it or drop the entry")


def test_synthetic_models_say_so_in_their_title(manifest):
    for entry in manifest["models"]:
        if entry["synthetic"]:
            assert "synthetic" in (entry["title"] + entry["description"]).lower(), entry["id"]


def test_validator_accepts_a_complete_entry(schema):
    assert validate({"schema_version": 1, "models": [_valid_entry()]}, schema) == []
    url_entry = _valid_entry(path=None, url="https://example.org/m.zip", sha256="a" * 64)
    assert validate({"schema_version": 1, "models": [url_entry]}, schema) == []


@pytest.mark.parametrize("changes, complaint", [
    ({"intended_use": "Research use"}, "intended_use: 'Research use' does not match"),
    ({"path": None}, "matches none"),
    ({"path": None, "url": "https://example.org/m.zip", "sha256": "XYZ"}, "does not match"),
    ({"path": "/abs/path"}, "does not match"),
    ({"id": "Has Spaces"}, "does not match"),
    ({"inputs": [{"title": "MR", "modality": "MR", "units": "HU"}]}, "not one of"),
    ({"timings": {"cpu_seconds": -1}}, "< 0"),
    ({"synthetic": "yes"}, "expected boolean"),
    ({"unknown_field": 1}, "unexpected 'unknown_field'"),
])
def test_validator_rejects_bad_entries(schema, changes, complaint):
    errors = validate({"schema_version": 1, "models": [_valid_entry(**changes)]}, schema)
    assert any(complaint in error for error in errors), errors


def test_validator_rejects_a_wrong_schema_version(schema):
    assert validate({"schema_version": 2, "models": []}, schema)
