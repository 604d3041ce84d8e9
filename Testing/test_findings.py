"""The finding catalog: paper counts, required ids, a version that tracks only ids/order/categories,
and validation errors that name the file, the row and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from HeadCTMoLRELib.findings import (
    CATEGORIES,
    PAPER_CATEGORY_COUNTS,
    CatalogError,
    Finding,
    FindingCatalog,
    default_catalog,
    load_catalog,
)

PAPER_EXAMPLES = {
    "Hemorrhage": ["basal_ganglia_hemorrhage", "subdural_hematoma", "subarachnoid_hemorrhage", "epidural_hematoma"],
    "Vascular": ["acute_infarct", "chronic_infarct", "vessel_occlusion", "venous_sinus_thrombosis",
                 "loss_of_insular_ribbon", "hypodense_acute_infarct"],
    "Trauma": ["skull_fracture", "contusion", "pneumocephalus", "scalp_hematoma", "mastoid_trauma"],
    "Mass/Lesion": ["meningioma", "cystic_lesion", "tumor", "focal_lesion", "lipoma", "occult_bone_lesion"],
    "Structural": ["hydrocephalus", "herniation", "midline_shift", "ventricular_enlargement"],
    "Chronic/Other": ["pathological_calcification", "atrophy", "sinusitis", "chronic_changes",
                      "sinus_related_intracranial_complication"],
}

PHANTOM_IDS = {
    "epidural_hematoma": "Hemorrhage", "subdural_hematoma": "Hemorrhage",
    "chronic_subdural_hematoma": "Hemorrhage", "subarachnoid_hemorrhage": "Hemorrhage",
    "intraparenchymal_hemorrhage": "Hemorrhage", "intraventricular_hemorrhage": "Hemorrhage",
    "basal_ganglia_hemorrhage": "Hemorrhage", "acute_infarct": "Vascular", "chronic_infarct": "Vascular",
    "hyperdense_vessel": "Vascular", "skull_fracture": "Trauma", "pneumocephalus": "Trauma",
    "scalp_hematoma": "Trauma", "meningioma": "Mass/Lesion", "cystic_lesion": "Mass/Lesion",
    "hydrocephalus": "Structural", "midline_shift": "Structural", "atrophy": "Chronic/Other",
    "pathological_calcification": "Chronic/Other", "sinusitis": "Chronic/Other",
    "mastoid_opacification": "Chronic/Other",
}

HEADER = "id,name,category,description,code\n"


def write_csv(tmp_path: Path, body: str, header: str = HEADER, name: str = "catalog.csv", newline="\n") -> Path:
    path = tmp_path / name
    path.write_bytes((header + body).replace("\n", newline).encode("utf-8"))
    return path


def test_default_catalog_has_paper_counts_per_category():
    catalog = default_catalog()
    assert len(catalog) == 75
    assert catalog.category_counts() == PAPER_CATEGORY_COUNTS
    assert list(catalog.by_category()) == list(CATEGORIES)


@pytest.mark.parametrize("category", list(PAPER_EXAMPLES))
def test_every_paper_example_is_in_its_category(category):
    by_category = {c: {f.id for f in fs} for c, fs in default_catalog().by_category().items()}
    for finding_id in PAPER_EXAMPLES[category]:
        assert finding_id in by_category[category], f"{finding_id} not in {category}"


def test_phantom_ids_are_in_the_catalog_in_the_right_category():
    catalog = default_catalog()
    for finding_id, category in PHANTOM_IDS.items():
        assert catalog[finding_id].category == category


def test_every_finding_has_a_name_and_a_one_sentence_description_and_no_invented_code():
    for finding in default_catalog():
        assert finding.name and finding.description.endswith(".")
        assert finding.description.replace("e.g. ", "").count(". ") == 0, finding.id
        assert finding.code == ""  # codes are left empty until verified against an ontology


def test_names_are_unique():
    names = [f.name.lower() for f in default_catalog()]
    assert len(set(names)) == len(names)


def test_version_is_stable_across_reloads_and_cached_catalog_is_the_same_object():
    assert load_catalog().version == load_catalog().version == default_catalog().version
    assert default_catalog() is default_catalog()
    assert len(default_catalog().version) == 64


def _rows(catalog: FindingCatalog) -> list[Finding]:
    return list(catalog.findings)


def test_version_covers_names_descriptions_and_codes_too():
    """A relabelled finding (its name shown to the reader) must not pass as the same catalog."""
    rows = _rows(default_catalog())
    base = default_catalog().version
    assert FindingCatalog(list(rows)).version == base
    for field in ("name", "description", "code"):
        edited = [Finding(**{**rows[0].__dict__, field: getattr(rows[0], field) + " (x)"})] + rows[1:]
        assert FindingCatalog(edited).version != base, field


def test_version_changes_when_ids_are_reordered_renamed_or_recategorised():
    rows = _rows(default_catalog())
    base = default_catalog().version
    assert FindingCatalog(rows[1:2] + rows[:1] + rows[2:]).version != base
    renamed = [Finding("epidural_haematoma", *[getattr(rows[0], a) for a in ("name", "category")])] + rows[1:]
    assert FindingCatalog(renamed).version != base
    moved = [Finding(rows[0].id, rows[0].name, "Trauma")] + rows[1:]
    assert FindingCatalog(moved).version != base


def test_index_of_and_getitem_follow_row_order_and_unknown_id_raises_keyerror():
    catalog = default_catalog()
    for i, finding_id in enumerate(catalog.ids):
        assert catalog.index_of(finding_id) == i and catalog[finding_id].id == finding_id
    with pytest.raises(KeyError, match="not_a_finding"):
        catalog.index_of("not_a_finding")


def test_to_dict_from_dict_round_trip_through_json():
    catalog = default_catalog()
    restored = FindingCatalog.from_dict(json.loads(json.dumps(catalog.to_dict())))
    assert restored == catalog and restored.version == catalog.version and restored.ids == catalog.ids


def test_from_dict_rejects_an_edited_embedded_catalog():
    data = default_catalog().to_dict()
    data["findings"][0]["id"] = "something_else"
    with pytest.raises(CatalogError, match="does not match"):
        FindingCatalog.from_dict(data)


def test_catalog_is_immutable():
    catalog = default_catalog()
    with pytest.raises(AttributeError):
        catalog.findings[0].id = "x"
    with pytest.raises(AttributeError):
        catalog.version = "x"


def test_custom_catalog_loads_without_paper_counts_and_tolerates_bom_and_crlf(tmp_path):
    body = "aa_bb,A B,Hemorrhage,desc,\nc1,C one,Chronic/Other,\"quoted, with comma\",\n"
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + body).replace("\n", "\r\n").encode("utf-8"))
    catalog = load_catalog(path)
    assert catalog.ids == ("aa_bb", "c1") and catalog.source == path
    assert catalog["c1"].description == "quoted, with comma"


def test_paper_counts_enforced_on_request(tmp_path):
    path = write_csv(tmp_path, "aa,A,Hemorrhage,,\n")
    with pytest.raises(CatalogError, match=r"Hemorrhage: 1 \(expected 12\)"):
        load_catalog(path, require_paper_counts=True)


@pytest.mark.parametrize(
    "header, body, message",
    [
        ("id,name,description\n", "aa,A,d\n", r"row 1 \(header\): missing column\(s\) category"),
        (HEADER, "aa,A,Hemorrhage,,\n,B,Trauma,,\n", r"row 3: empty id"),
        (HEADER, "aa,A,Hemorrhage,,\naa,B,Trauma,,\n", r"row 3: duplicate id 'aa' \(first used on row 2\)"),
        (HEADER, "Subdural Hematoma,A,Hemorrhage,,\n", r"row 2: id 'Subdural Hematoma' is not snake_case"),
        (HEADER, "aa,A,Bleeding,,\n", r"row 2: unknown category 'Bleeding'.*Hemorrhage, Vascular, Trauma"),
        (HEADER, "aa,,Hemorrhage,,\n", r"row 2: empty name"),
        (HEADER, "", r"no findings"),
    ],
)
def test_invalid_catalog_errors_name_file_row_and_problem(tmp_path, header, body, message):
    path = write_csv(tmp_path, body, header=header)
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_blank_lines_do_not_shift_reported_row_numbers(tmp_path):
    path = write_csv(tmp_path, "aa,A,Hemorrhage,,\n\nbb,B,Nope,,\n")
    with pytest.raises(CatalogError, match="row 4: unknown category"):
        load_catalog(path)


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(CatalogError, match="not found.*nothing.csv"):
        load_catalog(tmp_path / "nothing.csv")
