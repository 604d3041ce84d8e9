"""import-dataset: look-alike RSNA, CQ500 and CT-ICH folders built from phantoms at test time, with the
real sets' quirks, imported and checked against what was generated (rows, labels, patients, paths)."""

from __future__ import annotations

import csv
import json
import shutil
import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from HeadCTMoLRELib import cli
from HeadCTMoLRELib.ct.checks import CTInputError
from HeadCTMoLRELib.ct.loader import load_ct
from HeadCTMoLRELib.ct.series_manifest import read_series_manifest
from HeadCTMoLRELib.datasets import dicom_index
from HeadCTMoLRELib.datasets.importer import import_dataset, patient_split, read_dataset_sidecar
from HeadCTMoLRELib.datasets.labels import LabelTableError, load_label_table, majority
from HeadCTMoLRELib.findings import default_catalog
from HeadCTMoLRELib.phantoms import generate_phantom, write_dicom_series
from HeadCTMoLRELib.training.cases import read_cases

SPACING = (2.0, 2.0, 8.0)  # 256 x 256 x 19 voxels: small, still a head


@pytest.fixture(scope="module")
def phantoms():
    return {"sdh": generate_phantom(("subdural_hematoma",), 11, spacing_mm=SPACING),
            "normal": generate_phantom((), 12, spacing_mm=SPACING)}


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ RSNA
RSNA_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def _rsna_copy(source, flat, number, *, intercept=None, wrap=False):
    """Copy one phantom slice into the flat folder as RSNA does (random-looking ID_<hex> name, the ID as
    SOPInstanceUID). ``intercept``: store with another RescaleIntercept (same HU); ``wrap``: the bad
    PixelRepresentation quirk (signed 12-bit values written as unsigned, intercept 0)."""
    ds = pydicom.dcmread(source)
    sop = f"ID_{(number * 2654435761) % 16 ** 9:09x}"
    hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
    if intercept is not None:
        ds.RescaleIntercept = intercept
        ds.PixelData = (hu - intercept).astype(np.uint16).tobytes()
    if wrap:
        ds.RescaleIntercept = 0
        ds.PixelData = np.mod(hu, 4096).astype(np.uint16).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RSNA's IDs are not valid UIDs, as in the real set
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.save_as(flat / f"{sop}.dcm", enforce_file_format=True)
    return sop


@pytest.fixture(scope="module")
def rsna(tmp_path_factory, phantoms):
    """Three series in one flat folder: A (patient PA, subdural on slices 8-11, a duplicate and a
    contradicting label row), B (patient PA, mixed intercepts, no hemorrhage), C (patient PB, the bad
    PixelRepresentation quirk, no hemorrhage); a corrupt file, a non-DICOM file, a label row without image."""
    root = tmp_path_factory.mktemp("rsna")
    flat = root / "stage_2_train"
    flat.mkdir()
    plan = {"A": ("sdh", "PA", {}), "B": ("normal", "PA", {"mixed": True}), "C": ("normal", "PB", {"wrap": True})}
    labels, number, series_sops = [], 0, {}
    for key, (phantom, patient, quirk) in plan.items():
        folder = write_dicom_series(phantoms[phantom], root / f"tmp_{key}", series_seed=ord(key), patient_id=patient)
        sops = []
        for k, source in enumerate(sorted(folder.iterdir())):
            number += 1
            intercept = -1100 if quirk.get("mixed") and k % 2 else None
            sops.append(_rsna_copy(source, flat, number, intercept=intercept, wrap=quirk.get("wrap", False)))
        shutil.rmtree(folder)
        series_sops[key] = sops
        for k, sop in enumerate(sops):
            positive = key == "A" and 8 <= k <= 11
            for subtype in RSNA_SUBTYPES:
                labels.append((f"{sop}_{subtype}", int(positive and subtype in ("subdural", "any"))))
    labels.insert(3, labels[2])  # an identical duplicate row
    first_b = series_sops["B"][0]
    labels.append((f"{first_b}_epidural", 1))  # contradicts the 0 given before: unknown for that slice
    labels.append(("ID_0000dead1_any", 0))  # a label without an image
    with open(root / "stage_2_train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Label"])
        writer.writerows(labels)
    source = flat / f"{series_sops['A'][0]}.dcm"
    (flat / "ID_00000bad1.dcm").write_bytes(source.read_bytes()[:5000])  # truncated copy
    (flat / "ID_00000bad2.dcm").write_bytes(b"not a dicom file at all" * 10)
    out = root / "out" / "rsna.csv"
    result = import_dataset("rsna-ich", root, out, workers=0, splits=(0.5, 0.25, 0.25), seed=3)
    return {"root": root, "out": out, "result": result, "sops": series_sops}


def test_rsna_import_groups_the_flat_folder_into_one_row_per_series(rsna):
    rows = _rows(rsna["out"])
    assert len(rows) == 3
    assert sorted(r["patient"] for r in rows) == ["PA", "PA", "PB"]
    splits = {r["patient"]: r["split"] for r in rows}
    assert all(r["split"] == splits[r["patient"]] for r in rows)  # patient-level
    assert splits == {p: patient_split(p, (0.5, 0.25, 0.25), 3) for p in ("PA", "PB")}
    for row in rows:
        manifest = read_series_manifest(rsna["out"].parent / row["path"])
        assert len(manifest.files) == 19
    by_files = {}
    for row in rows:
        names = {f.stem for f in read_series_manifest(rsna["out"].parent / row["path"]).files}
        key = next(k for k, sops in rsna["sops"].items() if len(names & set(sops)) > 10)  # C's files are fixed copies
        by_files[key] = row
    a, b, c = by_files["A"], by_files["B"], by_files["C"]
    assert (a["subdural_hematoma"], a["epidural_hematoma"], a["chronic_subdural_hematoma"]) == ("1", "0", "")
    assert (b["subdural_hematoma"], b["chronic_subdural_hematoma"], b["basal_ganglia_hemorrhage"]) == ("0", "0", "0")
    assert b["epidural_hematoma"] == ""  # the contradicting rows made one slice unknown
    assert c["intraventricular_hemorrhage"] == "0" and c["meningioma"] == "" and c["hydrocephalus"] == ""


def test_rsna_quirks_are_each_reported(rsna):
    problems = rsna["result"].problems
    assert problems["duplicate label row"] == 2  # the identical row and the contradicting one further down
    assert problems["contradicting label rows"] == 1
    assert problems["mixed rescale intercepts"] == 1
    assert problems["bad PixelRepresentation (fixed)"] == 19
    assert problems["corrupt or unreadable file"] == 2
    assert problems["labelled image without a readable file"] == 1
    log = rsna["result"].log_path.read_text()
    assert "ID_00000bad1.dcm" in log and "truncated" in log


def test_rsna_manifest_loads_with_the_quirk_fixed(rsna, phantoms):
    rows = _rows(rsna["out"])
    expected = sitk.GetArrayFromImage(phantoms["normal"].image)
    fixed = [r for r in rows if r["patient"] == "PB"][0]
    volume = load_ct(rsna["out"].parent / fixed["path"])
    hu = sitk.GetArrayFromImage(volume.image)
    assert hu.shape == expected.shape
    assert np.abs(hu - np.clip(np.round(expected), -1024, 3071)).max() <= 1.0  # air is -1024, not 3072
    mixed = [r for r in rows if r["patient"] == "PA" and r["subdural_hematoma"] == "0"][0]
    hu_mixed = sitk.GetArrayFromImage(load_ct(rsna["out"].parent / mixed["path"]).image)
    assert np.abs(hu_mixed - np.clip(np.round(expected), -1024, 3071)).max() <= 1.0


def test_rsna_cases_csv_reads_and_validate_accepts_a_manifest(rsna, capsys):
    table = read_cases(rsna["out"], default_catalog())
    assert len(table) == 3 and not [p for p in table.problems if "does not exist" in p]
    manifest = rsna["out"].parent / _rows(rsna["out"])[0]["path"]
    assert cli.main(["validate", str(manifest), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] is True


def test_rsna_second_import_reuses_the_index(rsna):
    again = import_dataset("rsna-ich", rsna["root"], rsna["out"], workers=0, splits=(0.5, 0.25, 0.25), seed=3)
    assert again.scan["scanned"] == 0 and again.scan["reused"] == again.scan["total"] == 19 * 3 + 2
    assert again.problems["duplicate label row"] == 2  # the label file's problems are still reported
    assert _rows(again.csv_path) == _rows(rsna["out"])


def test_sidecar_records_dataset_and_licence(rsna):
    sidecar = read_dataset_sidecar(rsna["out"])
    assert sidecar["dataset"] == "rsna-ich" and "non-commercial" in sidecar["license"]
    assert sidecar["cases"] == 3 and sidecar["patients"] == 2 and "inherits" in sidecar["terms"]
    full = json.loads(rsna["result"].sidecar_path.read_text())
    assert full["counts"]["positives"]["subdural_hematoma"] == 1
    assert "meningioma" not in full["findings_labelled"]


def test_manifest_refuses_a_changed_file_and_follows_a_moved_dataset(rsna, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(rsna["root"] / "stage_2_train", moved / "stage_2_train")
    shutil.copytree(rsna["out"].parent, moved / "out")
    manifest = moved / "out" / _rows(rsna["out"])[0]["path"]
    assert all(str(f).startswith(str(moved)) for f in read_series_manifest(manifest).files)
    victim = next(f for f in read_series_manifest(manifest).files if "fixed" not in str(f))
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CTInputError, match="changed size"):
        load_ct(manifest)


def test_index_scan_resumes_only_changed_files(tmp_path, phantoms):
    folder = write_dicom_series(phantoms["normal"], tmp_path / "series")
    index = tmp_path / "index.sqlite"
    first = dicom_index.scan_folder(folder, index, workers=0)
    assert (first.total, first.scanned, first.reused) == (19, 19, 0)
    (folder / "slice_000.dcm").unlink()
    (folder / "slice_001.dcm").write_bytes((folder / "slice_001.dcm").read_bytes() + b"\0\0")
    second = dicom_index.scan_folder(folder, index, workers=0)
    assert (second.total, second.scanned, second.reused, second.removed) == (18, 1, 17, 1)


# ------------------------------------------------------------------------------------------------ CQ500
READ_LABELS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
               "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift")


def _describe(folder, description, prefix=""):
    """Set SeriesDescription as CQ500's scanners did (its folders are named "CT <description>")."""
    for file in sorted(folder.glob(f"{prefix}*.dcm")):
        ds = pydicom.dcmread(file)
        ds.SeriesDescription = description
        ds.save_as(file, enforce_file_format=True)


@pytest.fixture(scope="module")
def cq500(tmp_path_factory, phantoms):
    """Patients 0 (thin + bone series in their own folders) and 1 (one folder holding two series), and
    patient 2 listed in reads.csv without images. Reads: patient 0 SDH by R1, R2 (not R3), MassEffect by R1."""
    root = tmp_path_factory.mktemp("cq500")
    study0 = root / "CQ500-CT-0" / "CQ500CT0 CQ500CT0" / "Unknown Study"
    _describe(write_dicom_series(phantoms["sdh"], study0 / "CT PLAIN THIN", series_seed=1, patient_id="CQ500-CT-0"),
              "PLAIN THIN")
    write_dicom_series(phantoms["sdh"], study0 / "CT BONE", series_seed=2, patient_id="CQ500-CT-0")
    _describe(study0 / "CT BONE", "")  # no SeriesDescription: the folder name stands in
    mixed = root / "CQ500CT1 CQ500CT1" / "Unknown Study" / "CT 5mm"
    write_dicom_series(phantoms["normal"], mixed, series_seed=3, patient_id="CQ500-CT-1")
    other = write_dicom_series(phantoms["normal"], root / "tmp", series_seed=4, patient_id="CQ500-CT-1")
    for f in other.iterdir():
        f.rename(mixed / f"b_{f.name}")
    other.rmdir()
    _describe(mixed, "5mm")
    header = ["name", "Category"] + [f"R{r}:{label}" for r in (1, 2, 3) for label in READ_LABELS]
    reads = {0: {1: {"ICH", "SDH", "MassEffect"}, 2: {"ICH", "SDH"}, 3: {"ICH"}}, 1: {1: set(), 2: set(), 3: set()},
             2: {1: {"ICH"}, 2: {"ICH"}, 3: {"ICH"}}}
    with open(root / "reads.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for n, per_reader in reads.items():
            writer.writerow([f"CQ500-CT-{n}", "B1"] + [int(label in per_reader[r]) for r in (1, 2, 3)
                                                       for label in READ_LABELS])
    out = root / "out" / "cq500.csv"
    return {"root": root, "out": out, "result": import_dataset("cq500", root, out, workers=0)}


def test_cq500_one_row_per_series_with_majority_reads(cq500):
    rows = _rows(cq500["out"])
    assert len(rows) == 4
    assert sorted(r["series"] for r in rows) == ["5mm", "5mm", "BONE", "PLAIN THIN"]
    thin = next(r for r in rows if r["series"] == "PLAIN THIN")
    assert thin["patient"] == "CQ500-CT-0" and thin["path"].endswith("Unknown Study/CT PLAIN THIN")
    assert (thin["subdural_hematoma"], thin["mass_effect"], thin["epidural_hematoma"]) == ("1", "0", "0")
    assert thin["basal_ganglia_hemorrhage"] == ""  # ICH positive says nothing about the location
    one = [r for r in rows if r["patient"] == "CQ500-CT-1"]
    assert len(one) == 2 and all(r["path"].endswith(".series.json") for r in one)  # shared folder -> manifests
    assert {len(read_series_manifest(cq500["out"].parent / r["path"]).files) for r in one} == {19}
    assert one[0]["basal_ganglia_hemorrhage"] == "0" and one[0]["skull_fracture"] == "0"


def test_cq500_reader_files_and_missing_patient(cq500):
    result = cq500["result"]
    assert result.problems["patient in reads.csv without images"] == 1
    assert "CQ500-CT-2" in result.log_path.read_text()
    readers = {p.name: _rows(p) for p in result.reader_paths}
    assert sorted(readers) == ["cq500.reader1.csv", "cq500.reader2.csv", "cq500.reader3.csv"]
    thin = {name: next(r for r in rows if r["series"] == "PLAIN THIN") for name, rows in readers.items()}
    assert [thin[f"cq500.reader{i}.csv"]["subdural_hematoma"] for i in (1, 2, 3)] == ["1", "1", "0"]
    assert thin["cq500.reader1.csv"]["mass_effect"] == "1"
    table = read_cases(cq500["out"], default_catalog())
    assert len(table) == 4


def test_majority_of_readers():
    assert majority([1, 1, 0]) == 1 and majority([0, 0, 1]) == 0 and majority([1, None, 0]) is None
    assert majority([1, 1, None]) == 1


# ------------------------------------------------------------------------------------------------ CT-ICH
@pytest.fixture(scope="module")
def ct_ich(tmp_path_factory, phantoms):
    """Scans 049 (subdural on slices 5-7, a mask) and 050 (no hemorrhage, no mask); patient 051 has rows but
    no scan."""
    root = tmp_path_factory.mktemp("ctich") / "ct-ich-1.3.1"
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    sitk.WriteImage(phantoms["sdh"].image, str(root / "ct_scans" / "049.nii"))
    sitk.WriteImage(phantoms["normal"].image, str(root / "ct_scans" / "050.nii"))
    sitk.WriteImage(sitk.Image(8, 8, 19, sitk.sitkUInt8), str(root / "masks" / "049.nii"))
    columns = ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid", "Epidural",
               "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]
    with open(root / "hemorrhage_diagnosis_raw_ct.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for patient in (49, 50, 51):
            for k in range(1, 20):
                sdh = int(patient == 49 and 5 <= k <= 7)
                writer.writerow([patient, k, 0, 0, 0, 0, sdh, 1 - sdh, 0])
    out = root.parent / "out" / "ctich.csv"
    return {"root": root, "out": out, "result": import_dataset("ct-ich", root.parent, out)}


def test_ct_ich_one_row_per_scan(ct_ich):
    rows = {r["patient"]: r for r in _rows(ct_ich["out"])}
    assert sorted(rows) == ["049", "050"]
    assert rows["049"]["path"] == str(ct_ich["root"] / "ct_scans" / "049.nii")
    assert (rows["049"]["subdural_hematoma"], rows["049"]["skull_fracture"], rows["049"]["basal_ganglia_hemorrhage"]) \
        == ("1", "0", "")
    assert (rows["050"]["subdural_hematoma"], rows["050"]["basal_ganglia_hemorrhage"]) == ("0", "0")
    problems = ct_ich["result"].problems
    assert problems["patient without a scan"] == 1 and problems["scan without a mask"] == 1
    assert len(read_cases(ct_ich["out"], default_catalog())) == 2


# ------------------------------------------------------------------------------------------------ tables
def test_label_table_is_replaceable_and_checked(tmp_path, ct_ich):
    table = tmp_path / "mine.csv"
    table.write_text("dataset_label,finding_id,if_positive,if_negative,note\nSubdural,chronic_subdural_hematoma,1,0,\n")
    result = import_dataset("ct-ich", ct_ich["root"], tmp_path / "out.csv", labels=table)
    rows = {r["patient"]: r for r in _rows(result.csv_path)}
    assert rows["049"]["chronic_subdural_hematoma"] == "1" and rows["049"]["subdural_hematoma"] == ""
    table.write_text("dataset_label,finding_id,if_positive,if_negative,note\nSubdural,not_a_finding,1,0,\n")
    with pytest.raises(LabelTableError, match="not_a_finding"):
        load_label_table(table, default_catalog(), ("Subdural",))


def test_cli_import_dataset_prints_the_summary(ct_ich, tmp_path, capsys):
    assert cli.main(["import-dataset", "ct-ich", "--src", str(ct_ich["root"]), "--out", str(tmp_path / "c.csv")]) == 0
    text = capsys.readouterr().out
    assert "2 case(s) of 2 patient(s)" in text and "patient without a scan: 1" in text
    assert cli.main(["import-dataset", "cq500", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.csv")]) == 2


def test_training_on_an_import_records_the_dataset_in_the_bundle_and_card(ct_ich, tmp_path):
    """One epoch of a tiny model on the imported CT-ICH look-alike (both cases train; no validation split, so
    the last epoch is kept): the bundle's training
    provenance carries the dataset sidecar, and the model card shows the dataset and its licence."""
    from test_train import make_start_bundle, tiny_config

    from HeadCTMoLRELib.evaluation.model_card import model_card
    from HeadCTMoLRELib.model import bundle
    from HeadCTMoLRELib.training import train

    catalog = default_catalog()
    cases = tmp_path / "cases.csv"
    rows = _rows(ct_ich["out"])
    for row, split in zip(rows, ("train", "train")):
        row["split"] = split
        row["path"] = str((ct_ich["out"].parent / row["path"]).resolve())
    with open(cases, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "patient", "series", "split", *catalog.ids])
        writer.writeheader()
        writer.writerows(rows)
    shutil.copy(ct_ich["result"].sidecar_path, tmp_path / "cases.dataset.json")
    start = make_start_bundle(tmp_path / "start", catalog=catalog)
    result = train.fit(cases, start, tmp_path / "run", tiny_config(max_epochs=1, grad_accum_steps=1),
                       cache_dir=tmp_path / "cache")
    assert result.bundle_path is not None, (result.status, result.problems, result.history)
    manifest = bundle.load_bundle(result.bundle_path).manifest
    dataset = manifest["training"]["dataset"]
    assert dataset["dataset"] == "ct-ich" and "PhysioNet" in dataset["license"] and "inherits" in dataset["terms"]
    card = model_card(manifest)
    assert "PhysioNet" in card and "dataset.terms" in card
