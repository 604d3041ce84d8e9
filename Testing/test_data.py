"""Cases CSV reading, splits, the preprocessing cache and batch prediction."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from HeadCTMoLRELib.training import cases as data
from HeadCTMoLRELib import findings, phantoms as phantom
from HeadCTMoLRELib.ct import preprocess
from HeadCTMoLRELib.ct.alignment import HEAD_FRAME_CENTER_MM

FINDINGS = ("epidural_hematoma", "hydrocephalus")
PRE = preprocess.PreprocessConfig(image_size=32, in_plane_fov_mm=192.0, num_slices=8, slice_spacing_mm=16.0,
                                  alignment="none")


def small_catalog(ids=FINDINGS) -> findings.FindingCatalog:
    full = findings.default_catalog()
    return findings.FindingCatalog([full[fid] for fid in ids])


def write_toy_case(path: Path, positive: bool, seed: int) -> Path:
    """A 48 x 48 x 20 voxel 'head' (4 x 4 x 8 mm) centred on the head frame; positives get a bright blob."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:20, 0:48, 0:48].astype(np.float32)
    hu = np.full(z.shape, -1024.0, np.float32)
    head = ((x - 23.5) / 20) ** 2 + ((y - 23.5) / 22) ** 2 + ((z - 9.5) / 9) ** 2 <= 1
    hu[head] = 35 + rng.normal(0, 4, int(head.sum()))
    if positive:
        cz, cy, cx = rng.uniform([6, 16, 16], [13, 31, 31])
        blob = ((x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) * 2) ** 2) <= 49
        hu[blob & head] = 75
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((4.0, 4.0, 8.0))
    image.SetOrigin(tuple(c - (n - 1) / 2 * s for c, n, s in zip(HEAD_FRAME_CENTER_MM, (48, 48, 20), (4.0, 4.0, 8.0))))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_toy_dataset(folder: Path, n: int, seed: int = 0, splits: tuple[str, ...] | None = None) -> Path:
    """n toy cases (every other one positive for epidural_hematoma, hydrocephalus unknown on some) + cases.csv."""
    lines = ["path," + ("split," if splits else "") + ",".join(FINDINGS)]
    for i in range(n):
        positive = i % 2 == 0
        write_toy_case(folder / f"case_{i:02d}.nii.gz", positive, seed * 1000 + i)
        split = (splits[i % len(splits)] + ",") if splits else ""
        lines.append(f"case_{i:02d}.nii.gz,{split}{int(positive)},{'' if i % 3 == 0 else 0}")
    csv_path = folder / "cases.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


# ------------------------------------------------------------------------------------------ read_cases
def test_phantom_dataset_reads_directly_and_is_flagged_synthetic(tmp_path):
    labels_csv = phantom.write_phantom_dataset(tmp_path / "ph", 2, 3, findings=["hydrocephalus"], prevalence=1.0)
    table = data.read_cases(labels_csv, findings.default_catalog())
    assert len(table) == 2 and table.synthetic and not table.has_split
    column = findings.default_catalog().index_of("hydrocephalus")
    assert np.all(table.labels()[:, column] == 1)
    assert not np.isnan(table.labels()).any()  # the phantom writes every catalog column


def test_missing_scans_are_reported_and_skipped_but_the_rest_is_read(tmp_path):
    write_toy_case(tmp_path / "a.nii.gz", True, 0)
    write_toy_case(tmp_path / "sub" / "b.nii.gz", False, 1)
    (tmp_path / "cases.csv").write_text(
        "path,split,patient,series,epidural_hematoma\n"
        "a.nii.gz,train,P1,,1\n"
        "sub/b.nii.gz,validation,P2,1.2.3,\n"
        "missing.nii.gz,train,P3,,0\n"
        ",train,P4,,0\n")
    table = data.read_cases(tmp_path / "cases.csv", small_catalog())
    assert [c.row for c in table.cases] == [2, 3]
    assert table.cases[1].path == (tmp_path / "sub" / "b.nii.gz").resolve()  # relative to the CSV's folder
    assert [c.split for c in table.cases] == ["train", "val"]
    assert [c.patient for c in table.cases] == ["P1", "P2"] and table.cases[1].series == "1.2.3"
    assert table.has_patient
    assert table.cases[0].labels[0] == 1 and np.isnan(table.cases[1].labels[0])  # blank = unknown
    assert np.isnan(table.labels()[:, 1]).all()  # hydrocephalus has no column: unknown everywhere
    text = "\n".join(table.problems)
    for expected in ("row 4", "does not exist", "row 5", "empty path", "hydrocephalus"):
        assert expected in text


def test_every_csv_mistake_is_reported_at_once_before_any_work(tmp_path):
    write_toy_case(tmp_path / "a.nii.gz", True, 0)
    (tmp_path / "cases.csv").write_text(
        "path,split,epidural_hematom,notes,hydrocephalus\n"
        "a.nii.gz,train,1,x,0\n"
        "a.nii.gz,train,1,x,maybe\n"
        "a.nii.gz,holdout,1,v,0\n")
    with pytest.raises(data.CaseTableError) as error:
        data.read_cases(tmp_path / "cases.csv", small_catalog())
    text = str(error.value)
    for expected in ("cases.csv", "4 mistake(s)", "'epidural_hematom': did you mean 'epidural_hematoma'?", "'notes'",
                     "row 3", "'maybe'", "row 4", "holdout"):
        assert expected in text, expected


def test_yes_no_true_false_are_documented_labels(tmp_path):
    write_toy_case(tmp_path / "a.nii.gz", True, 0)
    (tmp_path / "cases.csv").write_text("path,epidural_hematoma,hydrocephalus\na.nii.gz,Yes,false\n")
    table = data.read_cases(tmp_path / "cases.csv", small_catalog())
    assert list(table.cases[0].labels) == [1.0, 0.0]
    assert "yes" in data.__doc__ and "true" in data.__doc__


def test_a_patient_in_two_splits_is_refused(tmp_path):
    write_toy_case(tmp_path / "a.nii.gz", True, 0)
    write_toy_case(tmp_path / "b.nii.gz", False, 1)
    (tmp_path / "cases.csv").write_text("path,split,patient,epidural_hematoma\na.nii.gz,train,P1,1\n"
                                        "b.nii.gz,test,P1,0\n")
    with pytest.raises(data.CaseTableError, match="patient 'P1' is in splits train \\(row 2\\) and test \\(row 3\\)"):
        data.read_cases(tmp_path / "cases.csv", small_catalog())


def test_assign_splits_keeps_a_patients_scans_together(tmp_path):
    rows = ["path,split,patient,epidural_hematoma"]
    for i in range(12):
        write_toy_case(tmp_path / f"c{i}.nii.gz", i % 3 == 0, i)
        split = "val" if i == 1 else ""  # patient P0 has one scan marked val: its other scans follow
        rows.append(f"c{i}.nii.gz,{split},P{i // 3},{int(i % 3 == 0)}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    table = data.read_cases(tmp_path / "cases.csv", small_catalog())
    for seed in range(5):
        assigned = data.assign_splits(table, 0.3, seed=seed)
        by_patient = {}
        for case in assigned.cases:
            by_patient.setdefault(case.patient, set()).add(case.split)
        assert all(len(splits) == 1 for splits in by_patient.values()), by_patient
        assert by_patient["P0"] == {"val"}
        assert {"train", "val"} <= set().union(*by_patient.values())


def test_unusable_csvs_raise_with_the_file_name(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,epidural_hematoma\nx,1\n")
    with pytest.raises(data.CaseTableError, match="nopath.csv.*'path'"):
        data.read_cases(tmp_path / "nopath.csv", small_catalog())
    (tmp_path / "nofinding.csv").write_text("path,bleed\nx,1\n")
    with pytest.raises(data.CaseTableError, match="no column names a finding"):
        data.read_cases(tmp_path / "nofinding.csv", small_catalog())
    with pytest.raises(data.CaseTableError, match="no such cases CSV"):
        data.read_cases(tmp_path / "absent.csv", small_catalog())


def test_assign_splits_is_seeded_and_puts_each_group_in_validation(tmp_path):
    csv_path = write_toy_dataset(tmp_path, 10)
    table = data.read_cases(csv_path, small_catalog())
    first = data.assign_splits(table, 0.3, seed=4)
    again = data.assign_splits(table, 0.3, seed=4)
    assert [c.split for c in first.cases] == [c.split for c in again.cases]
    val = first.split("val")
    assert 2 <= len(val) <= 4
    assert np.nansum(val.labels()[:, 0] == 1) >= 1 and np.nansum(val.labels()[:, 0] == 0) >= 1


# ----------------------------------------------------------------------------------------------- cache
def test_cache_is_reused_and_bad_cases_are_skipped(tmp_path):
    csv_path = write_toy_dataset(tmp_path / "cases", 3)
    (tmp_path / "cases" / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    table = data.read_cases(csv_path, small_catalog())
    sources = [c.path for c in table.cases] + [tmp_path / "cases" / "broken.nii.gz"]
    cache_dir = tmp_path / "cache"
    first = data.build_cache(sources, PRE, cache_dir=cache_dir, workers=0)
    assert len(first.files) == 3 and first.reused == 0
    assert len(first.failures) == 1 and "broken.nii.gz" in first.failures[0][1]
    start = time.perf_counter()
    second = data.build_cache(sources, PRE, cache_dir=cache_dir, workers=0)
    assert second.reused == 3 and second.files == first.files
    assert time.perf_counter() - start < max(0.5, first.seconds / 3)
    assert all(p.suffix == ".safetensors" for p in cache_dir.iterdir())
    stack = data.read_cached_stack(next(iter(first.files.values())))
    assert stack.pixels.dtype == np.uint8 and stack.pixels.shape == (8, 3, 32, 32)
    assert stack.slice_valid.dtype == bool and stack.slice_valid.any()
    other = data.build_cache(sources[:1], preprocess.PreprocessConfig(**{**PRE.to_dict(), "num_slices": 6}),
                             cache_dir=cache_dir, workers=0)
    assert set(other.files.values()).isdisjoint(first.files.values())  # preprocessing is part of the key


def test_cached_pixels_match_preprocess_within_quantisation(tmp_path):
    path = write_toy_case(tmp_path / "a.nii.gz", True, 0)
    result = data.build_cache([path], PRE, cache_dir=tmp_path / "cache", workers=0)
    cached = data.read_cached_stack(result.files[str(path)])
    from HeadCTMoLRELib.ct import loader as ctio

    direct = preprocess.preprocess(ctio.load_ct(path), PRE)
    assert np.abs(cached.pixels / 255.0 - direct.pixels).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(cached.slice_valid, direct.slice_valid)


def test_parallel_build_matches_serial_build(tmp_path):
    csv_path = write_toy_dataset(tmp_path / "cases", 3)
    sources = [c.path for c in data.read_cases(csv_path, small_catalog()).cases]
    serial = data.build_cache(sources, PRE, cache_dir=tmp_path / "serial", workers=0)
    parallel = data.build_cache(sources, PRE, cache_dir=tmp_path / "parallel", workers=2)
    assert {k: v.name for k, v in serial.files.items()} == {k: v.name for k, v in parallel.files.items()}
    for key in serial.files:
        a, b = data.read_cached_stack(serial.files[key]), data.read_cached_stack(parallel.files[key])
        assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.slice_valid, b.slice_valid)


def test_cached_cases_start_no_worker_processes(tmp_path, monkeypatch):
    """A pool of spawned workers costs seconds per start (each imports the library): only uncached cases use it."""
    csv_path = write_toy_dataset(tmp_path / "cases", 3)
    sources = [c.path for c in data.read_cases(csv_path, small_catalog()).cases]
    first = data.build_cache(sources[:2], PRE, cache_dir=tmp_path / "cache", workers=0)
    pooled = []
    monkeypatch.setattr(data, "_build_in_pool", lambda pending, *a: pooled.append(list(pending)) or list(pending))
    again = data.build_cache(sources, PRE, cache_dir=tmp_path / "cache", workers=4)
    assert pooled == []  # one uncached case runs in this process, the two cached ones are only read
    assert again.reused == 2 and len(again.files) == 3 and set(first.files.items()) <= set(again.files.items())
    (tmp_path / "more").mkdir()
    extra = [write_toy_case(tmp_path / "more" / f"{i}.nii.gz", bool(i % 2), i) for i in range(2)]
    data.build_cache(sources + extra, PRE, cache_dir=tmp_path / "cache", workers=4)
    assert pooled == [[str(e) for e in extra]]  # only the two new cases go to the pool (here: run serially)


def test_folder_hash_follows_content_not_location(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        (folder / f"slice_{i}.dcm").write_bytes(bytes([i]) * 10)
    copy = tmp_path / "elsewhere" / "series"
    shutil.copytree(folder, copy)
    assert data.input_sha256(folder) == data.input_sha256(copy)
    (copy / "slice_1.dcm").write_bytes(b"changed")
    assert data.input_sha256(folder) != data.input_sha256(copy)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "mine"))
    assert data.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.default_cache_dir() == Path.home() / ".cache" / "headct-molre" / "stacks"


# --------------------------------------------------------------------------------------------- predict
def test_predict_cases_applies_temperature_and_reports_failures(tmp_path):
    import torch

    from HeadCTMoLRELib.model import backbones, bundle, classifier as model

    torch.manual_seed(0)
    catalog = small_catalog()
    config = model.ModelConfig(backbone=backbones.BackboneSpec("dinov3", "tiny", image_size=32),
                               num_findings=len(catalog))
    classifier = model.build_classifier(config)
    with torch.no_grad():
        classifier.classifier.weight.normal_(0, 1.0)
    folder = bundle.save_bundle(classifier, tmp_path / "bundle", catalog=catalog, preprocessing=PRE, temperature=2.0)
    csv_path = write_toy_dataset(tmp_path / "cases", 3)
    (tmp_path / "cases" / "cases.csv").write_text(csv_path.read_text() + "broken.nii.gz,1,0\n")
    (tmp_path / "cases" / "broken.nii.gz").write_bytes(b"garbage")
    result = data.predict_cases(folder, csv_path, cache_dir=tmp_path / "cache", device="cpu", precision="fp32",
                                batch_size=2, workers=0)
    assert result.probabilities.shape == result.logits.shape == result.labels.shape == (3, 2)
    assert np.allclose(result.probabilities, 1 / (1 + np.exp(-result.logits / 2.0)))
    assert len(result.failures) == 1 and "broken" in result.failures[0][0]
    assert result.temperature == 2.0 and len(result.paths) == 3
    single = data.predict_cases(folder, [result.paths[0]], cache_dir=tmp_path / "cache", device="cpu",
                                precision="fp32", workers=0)
    assert np.allclose(single.logits[0], result.logits[0], atol=1e-5)
    assert np.isnan(single.labels).all()
