"""Hostile inputs: what a stranger's bundle, zip, cache or a crash must never do (issue 16).

One test per class of attack: bundle integrity (hand edits), manifest values (schema), paths (files
outside the bundle, links, letter case, network), clear refusals (a fuzz of hostile manifests, and a
malformed bundle among good ones), imports (zip bombs, duplicates, links), the preprocessing cache
(truncated, empty, swapped entries) and training outputs (atomic replacement, checkpoint before the
best bundle, --resume checked first). All on tiny CPU models; about half a minute in all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import zipfile
from pathlib import Path

import pytest
import torch

from bundle_fixtures import edit_manifest, make_classifier
from test_bundle import bundle_copy, tiny_bundle  # noqa: F401  (pytest fixtures: a tiny bundle and a fresh copy)
from HeadCTMoLRELib import cli
from HeadCTMoLRELib.model import backbones, bundle, classifier as model
from HeadCTMoLRELib.ct import preprocess


def _write_raw(folder: Path, manifest, *, reseal: bool) -> None:
    """Write a manifest as a hostile publisher would: re-sealed when its values allow (NaN cannot be)."""
    if reseal and isinstance(manifest, dict):
        try:
            bundle.seal_manifest(manifest)
        except (ValueError, TypeError):
            pass
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -------------------------------------------------------------------------------------- 1. integrity
@pytest.mark.parametrize("edit, section", [
    (lambda m: m.update(temperature=0.05), "temperature"),
    (lambda m: m["thresholds"].update(subdural_hematoma=0.01), "thresholds"),
    (lambda m: m["preprocessing"].update(windows_hu=[[0, 40], [-20, 180], [-800, 2000]]), "preprocessing"),
    (lambda m: m["findings"]["findings"][0].update(name="Normal scan"), "findings"),
    (lambda m: m["findings"].pop("version"), "findings"),
])
def test_a_hand_edited_manifest_is_refused_naming_what_changed(bundle_copy, edit, section, capsys):
    edit_manifest(bundle_copy, edit, reseal=False)
    with pytest.raises(bundle.BundleError, match=f"was edited after it was written: changed {section}"):
        bundle.load_bundle(bundle_copy)
    code, out, err = _run_cli(["info", str(bundle_copy), "--verify"], capsys)
    assert code == cli.EXIT_REFUSED and "was edited" in err and "verified" not in out


def test_the_catalog_hash_covers_every_field_and_is_required(bundle_copy):
    # a publisher-side relabel with a correct manifest digest but the old catalog hash
    edit_manifest(bundle_copy, lambda m: m["findings"]["findings"][0].update(name="Normal scan"))
    with pytest.raises(bundle.BundleError, match="catalog"):
        bundle.load_bundle(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m["findings"].pop("version"))
    with pytest.raises(bundle.BundleError, match="findings: required key"):
        bundle.load_bundle(bundle_copy)


# ----------------------------------------------------------------------------------------- 2. values
def test_out_of_range_values_are_refused_before_anything_is_built(bundle_copy, monkeypatch, capsys):
    built = []
    original = backbones._random_model
    monkeypatch.setattr(backbones, "_random_model", lambda *a, **k: built.append(a) or original(*a, **k))
    hostile = {
        "temperature NaN": lambda m: m.update(temperature=math.nan),
        "temperature 0": lambda m: m.update(temperature=0.0),
        "negative temperature": lambda m: m.update(temperature=-1.0),
        "threshold above 1": lambda m: m["thresholds"].update(epidural_hematoma=1.5),
        "threshold 0": lambda m: m["thresholds"].update(epidural_hematoma=0.0),
        "NaN window": lambda m: m["preprocessing"].update(windows_hu=[[math.nan, 80], [-20, 180]]),
        "NaN field of view": lambda m: m["preprocessing"].update(in_plane_fov_mm=math.nan),
        "a billion slices": lambda m: m["preprocessing"].update(num_slices=10 ** 9),
        "huge images": lambda m: m["preprocessing"].update(image_size=10 ** 6),
        "51 GB backbone": lambda m: m["backbone"]["transformers_config"].update(hidden_size=110_000),
        "endless layers": lambda m: m["backbone"]["transformers_config"].update(num_hidden_layers=100_000),
        "huge MLP": lambda m: m["backbone"]["transformers_config"].update(intermediate_size=10 ** 9),
    }
    for name, edit in hostile.items():
        manifest = json.loads((bundle_copy / "manifest.json").read_text())
        original_text = (bundle_copy / "manifest.json").read_text()
        edit(manifest)
        _write_raw(bundle_copy, manifest, reseal=True)
        with pytest.raises(bundle.BundleError) as error:
            bundle.build_model(bundle.load_bundle(bundle_copy))
        assert str(error.value), name
        code, _, err = _run_cli(["info", str(bundle_copy), "--verify"], capsys)
        assert code == cli.EXIT_REFUSED and err.startswith("error:") and "Traceback" not in err, name
        (bundle_copy / "manifest.json").write_text(original_text)
    assert built == [], "a backbone was built from a hostile manifest"
    bundle.build_model(bundle.load_bundle(bundle_copy))  # the untouched bundle still builds
    assert len(built) == 1


# ------------------------------------------------------------------------------------------ 3. paths
def test_paths_links_letter_case_and_the_network_cannot_reach_outside(bundle_copy, tmp_path, monkeypatch, capsys):
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of any bundle")
    secret_hash = bundle.sha256_file(outside)
    original_text = (bundle_copy / "manifest.json").read_text()
    for entry in ("../secret.txt", str(outside), "weights/../../secret.txt"):
        edit_manifest(bundle_copy, lambda m: m["files"].update({entry: secret_hash}))
        with pytest.raises(bundle.BundleError, match="not a plain relative path") as error:
            bundle.load_bundle(bundle_copy)
        assert secret_hash[:12] not in str(error.value)
        (bundle_copy / "manifest.json").write_text(original_text)

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "payload.pkl").write_bytes(b"\x80\x04")
    (bundle_copy / "more").symlink_to(evil, target_is_directory=True)
    with pytest.raises(bundle.BundleError, match="symbolic link"):
        bundle.load_bundle(bundle_copy)
    (bundle_copy / "more").unlink()
    for name, problem in (("extra.PT", "pickle"), ("weights/Model.Bin", "pickle"),
                          ("weights/other.SafeTensors", "not listed")):
        (bundle_copy / name).write_bytes(b"x")
        with pytest.raises(bundle.BundleError, match=problem):
            bundle.load_bundle(bundle_copy)
        (bundle_copy / name).unlink()

    # external backbones: hashes required and checked by `info --verify`; missing weights are never random
    classifier, catalog = make_classifier()
    hf = backbones.save_backbone_pretrained(classifier.encoder, tmp_path / "hf")
    spec = backbones.BackboneSpec("dinov3", "tiny", 32, source=str(hf))
    external = model.build_classifier(model.ModelConfig(backbone=spec, num_findings=len(catalog)),
                                      backbone_weights_dir=hf)
    ext = bundle.save_bundle(external, tmp_path / "ext", catalog=catalog,
                             preprocessing=preprocess.PreprocessConfig(image_size=32), backbone_weights_dir=hf)
    assert _run_cli(["info", str(ext), "--verify"], capsys)[0] == cli.EXIT_OK
    shutil.copytree(hf, tmp_path / "ext-hf")
    (hf / "config.json").write_text((hf / "config.json").read_text().replace("}", ', "note": 1}', 1))
    code, _, err = _run_cli(["info", str(ext), "--verify"], capsys)
    assert code == cli.EXIT_REFUSED and "does not match the bundle" in err
    empty = tmp_path / "ext-empty"
    shutil.copytree(ext, empty)
    edit_manifest(empty, lambda m: m["backbone"]["weights"].update(sha256={}))
    with pytest.raises(bundle.BundleError, match="sha256"):
        bundle.load_bundle(empty)
    partial = tmp_path / "hf-partial"
    backbones.save_backbone_pretrained(classifier.encoder, partial)
    from safetensors.torch import load_file, save_file

    weights = next(partial.glob("*.safetensors"))
    state = load_file(str(weights))
    state.pop(sorted(state)[0])
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights"):
        backbones.build_backbone(backbones.BackboneSpec("dinov3", "tiny", 32), weights_dir=partial)

    # no network, ever: a hub id as backbone source, and ordinary loading and inference
    attempts = []

    def refuse_connect(self, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def hub_source(m):
        m["model"]["backbone"]["source"] = "facebook/dinov3-vitb16-pretrain-lvd1689m"
        m["backbone"].pop("transformers_config")

    edit_manifest(bundle_copy, hub_source)
    with pytest.raises(bundle.BundleError):
        bundle.build_model(bundle.load_bundle(bundle_copy))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        backbones.build_backbone(backbones.BackboneSpec("dinov3", "tiny", 32, source="facebook/dinov3-vitb16"))
    (bundle_copy / "manifest.json").write_text(original_text)
    rebuilt = bundle.build_model(bundle.load_bundle(bundle_copy))
    with torch.no_grad():
        rebuilt(torch.rand(1, 4, 3, 32, 32), torch.ones(1, 4, dtype=torch.bool))
    backbones.build_backbone(backbones.BackboneSpec("dinov3", "tiny", 32), weights_dir=tmp_path / "ext-hf")
    assert attempts == [], f"something tried to connect to {attempts}"


# ------------------------------------------------------------------------------------- 4. refusals
def _hostile_variants():
    """(name, edit of the manifest dict or raw text, reseal): values, types, keys, paths, sizes."""
    big = 10 ** 12
    v = [
        ("temperature NaN", lambda m: m.update(temperature=math.nan), True),
        ("temperature Infinity", lambda m: m.update(temperature=math.inf), True),
        ("temperature tiny", lambda m: m.update(temperature=1e-9), True),
        ("temperature huge", lambda m: m.update(temperature=1e9), True),
        ("temperature text", lambda m: m.update(temperature="1.0"), True),
        ("temperature bool", lambda m: m.update(temperature=True), True),
        ("temperature null", lambda m: m.update(temperature=None), True),
        ("temperature missing", lambda m: m.pop("temperature"), True),
        ("threshold negative", lambda m: m["thresholds"].update(epidural_hematoma=-0.1), True),
        ("threshold 1", lambda m: m["thresholds"].update(epidural_hematoma=1.0), True),
        ("threshold text", lambda m: m["thresholds"].update(epidural_hematoma="0.5"), True),
        ("thresholds list", lambda m: m.update(thresholds=[0.5] * 75), True),
        ("threshold unknown finding", lambda m: m["thresholds"].update(not_a_finding=0.3), True),
        ("image size 0", lambda m: m["preprocessing"].update(image_size=0), True),
        ("image size text", lambda m: m["preprocessing"].update(image_size="64"), True),
        ("slice spacing negative", lambda m: m["preprocessing"].update(slice_spacing_mm=-4.0), True),
        ("window reversed", lambda m: m["preprocessing"].update(windows_hu=[[80, 0]]), True),
        ("no windows", lambda m: m["preprocessing"].update(windows_hu=[]), True),
        ("window of text", lambda m: m["preprocessing"].update(windows_hu=[["a", 1]]), True),
        ("window nested", lambda m: m["preprocessing"].update(windows_hu=[[[0, 1], [2, 3]]]), True),
        ("alignment number", lambda m: m["preprocessing"].update(alignment=5), True),
        ("preprocessing list", lambda m: m.update(preprocessing=[1, 2]), True),
        ("unknown preprocessing", lambda m: m["preprocessing"].update(spline_magic=True), True),
        ("stack too big", lambda m: m["preprocessing"].update(num_slices=512, image_size=1024), True),
        ("num_findings huge", lambda m: m["model"].update(num_findings=big), True),
        ("num_findings negative", lambda m: m["model"].update(num_findings=-1), True),
        ("experts huge", lambda m: m["model"]["molre"].update(num_experts=10 ** 6), True),
        ("rank 0", lambda m: m["model"]["molre"].update(rank=0), True),
        ("lora rank huge", lambda m: m["model"]["backbone"]["lora"].update(r=10 ** 9), True),
        ("unknown family", lambda m: m["model"]["backbone"].update(family="resnet"), True),
        ("unknown size", lambda m: m["model"]["backbone"].update(size="gigantic"), True),
        ("use_molre text", lambda m: m["model"].update(use_molre="yes"), True),
        ("model without backbone", lambda m: m["model"].pop("backbone"), True),
        ("hidden size", lambda m: m["backbone"]["transformers_config"].update(hidden_size=110_000), True),
        ("patch 0", lambda m: m["backbone"]["transformers_config"].update(patch_size=0), True),
        ("image size 1e7", lambda m: m["backbone"]["transformers_config"].update(image_size=10 ** 7), True),
        ("model type bert", lambda m: m["backbone"]["transformers_config"].update(model_type="bert"), True),
        ("config list", lambda m: m["backbone"].update(transformers_config=[1]), True),
        ("weights kind remote", lambda m: m["backbone"]["weights"].update(kind="remote"), True),
        ("external without hashes", lambda m: m["backbone"]["weights"].update(kind="external", folder="/x", sha256={}),
         True),
        ("backbone family mismatch", lambda m: m["backbone"].update(family="dinov2"), True),
        ("file ../", lambda m: m["files"].update({"../x.txt": "0" * 64}), True),
        ("file absolute", lambda m: m["files"].update({"/etc/passwd": "0" * 64}), True),
        ("file backslash", lambda m: m["files"].update({"..\\x": "0" * 64}), True),
        ("file drive", lambda m: m["files"].update({"C:/x": "0" * 64}), True),
        ("file upper-case pickle", lambda m: m["files"].update({"weights/x.PT": "0" * 64}), True),
        ("file hash not hex", lambda m: m["files"].update({"weights/adapters.safetensors": "zz"}), True),
        ("no files", lambda m: m.update(files={}), True),
        ("adapters unlisted", lambda m: m["files"].pop("weights/adapters.safetensors"), True),
        ("catalog version bad", lambda m: m["findings"].update(version="abc"), True),
        ("catalog empty", lambda m: m["findings"].update(findings=[]), True),
        ("finding id number", lambda m: m["findings"]["findings"][0].update(id=5), True),
        ("finding unknown category", lambda m: m["findings"]["findings"][0].update(category="Magic"), True),
        ("unknown top-level key", lambda m: m.update(exec="rm -rf /"), True),
        ("missing model", lambda m: m.pop("model"), True),
        ("format version text", lambda m: m.update(format_version="2"), True),
        ("format version bool", lambda m: m.update(format_version=True), True),
        ("format version old", lambda m: m.update(format_version=1), True),
        ("integrity removed", lambda m: m.pop("integrity"), False),
        ("training nested 100 deep", lambda m: m.update(training=json.loads("[" * 100 + "]" * 100)), True),
        ("description huge", lambda m: m.update(description="x" * 30_000), True),
        ("name empty", lambda m: m.update(name=""), True),
        ("manifest a list", lambda m: "[1, 2, 3]", False),
        ("manifest not JSON", lambda m: "{not json", False),
        ("manifest nested 100000 deep", lambda m: "[" * 100_000 + "]" * 100_000, False),
        ("number 1e400", lambda m: json.dumps(m).replace('"temperature": 1.0', '"temperature": 1e400'), False),
        ("integer of 5000 digits", lambda m: json.dumps(m).replace('"temperature": 1.0', '"temperature": ' + "9" * 5000),
         False),
        ("manifest binary", lambda m: b"\xff\xfe\x00garbage", False),
    ]
    return v


def test_every_hostile_manifest_is_a_clear_bundle_error_never_a_traceback(bundle_copy, tmp_path, monkeypatch):
    original_text = (bundle_copy / "manifest.json").read_text()
    variants = _hostile_variants()
    assert len(variants) >= 60
    for name, edit, reseal in variants:
        manifest = json.loads(original_text)
        result = edit(manifest)
        if isinstance(result, bytes):
            (bundle_copy / "manifest.json").write_bytes(result)
        elif isinstance(result, str):
            (bundle_copy / "manifest.json").write_text(result)
        else:
            _write_raw(bundle_copy, manifest, reseal=reseal)
        try:
            bundle.build_model(bundle.load_bundle(bundle_copy))
        except bundle.BundleError as error:
            assert str(bundle_copy) in str(error) and len(str(error)) > 30, name
        else:
            pytest.fail(f"hostile variant {name!r} was accepted")
        (bundle_copy / "manifest.json").write_text(original_text)

    # one malformed bundle in the user model folder never hides the good ones
    from HeadCTMoLRELib.slicer import logic

    models = tmp_path / "models"
    shutil.copytree(bundle_copy, models / "good")
    shutil.copytree(bundle_copy, models / "bad")
    manifest = json.loads(original_text)
    manifest["thresholds"] = [0.5] * 75
    _write_raw(models / "bad", manifest, reseal=True)
    monkeypatch.setenv(logic.MODELS_ENV, str(models))
    entries = {Path(e["path"]).name: e for e in logic.list_models() if e["source"] == "user"}
    assert entries["good"]["sha256_ok"] and entries["good"]["error"] is None
    assert not entries["bad"]["sha256_ok"] and "thresholds" in entries["bad"]["error"]


# ---------------------------------------------------------------------------------------- 5. imports
def _zip_of(folder: Path, path: Path, extra: dict | None = None, duplicate: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, f"model/{file.relative_to(folder).as_posix()}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
        if duplicate:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                archive.writestr(f"model/{duplicate}", (folder / duplicate).read_bytes())
    return path


def test_imports_refuse_bombs_duplicates_and_links_and_leave_nothing_behind(tiny_bundle, tmp_path, monkeypatch):
    from HeadCTMoLRELib.slicer import logic

    models = tmp_path / "models"
    monkeypatch.setenv(logic.MODELS_ENV, str(models))
    core = logic.HeadCTMoLRECore(scene=object())

    def left_behind():
        return sorted(p.name for p in models.iterdir()) if models.exists() else []

    bomb = _zip_of(tiny_bundle, tmp_path / "bomb.zip", extra={"model/padding.txt": b"\0" * (64 * 1024 * 1024)})
    with pytest.raises(bundle.BundleError, match="zip bomb"):
        core.import_model(bomb)
    duplicated = _zip_of(tiny_bundle, tmp_path / "dup.zip", duplicate="manifest.json")
    with pytest.raises(bundle.BundleError, match="twice"):
        core.import_model(duplicated)
    assert left_behind() == []

    linked = tmp_path / "linked"
    shutil.copytree(tiny_bundle, linked)
    (linked / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(bundle.BundleError, match="symbolic link"):
        core.import_model(linked)
    (linked / "passwd").unlink()
    (linked / "weights" / "loop").symlink_to(linked, target_is_directory=True)
    with pytest.raises(bundle.BundleError, match="symbolic link"):
        core.import_model(linked)
    assert left_behind() == []

    from HeadCTMoLRELib.model.bundle_import import import_bundle

    with pytest.raises(bundle.BundleError, match="import limit"):
        import_bundle(_zip_of(tiny_bundle, tmp_path / "ok.zip"), models, max_bytes=10_000)
    assert left_behind() == []
    entry = core.import_model(tmp_path / "ok.zip")  # a good zip still imports, verified
    assert entry["sha256_ok"] and left_behind() == [Path(entry["path"]).name]


# ------------------------------------------------------------------------------------------ 6. cache
def test_damaged_cache_entries_are_detected_reported_and_rebuilt(tmp_path):
    from HeadCTMoLRELib.training import cases as data
    from test_data import PRE, small_catalog, write_toy_dataset

    csv_path = write_toy_dataset(tmp_path / "cases", 3)
    sources = [c.path for c in data.read_cases(csv_path, small_catalog()).cases]
    cache_dir = tmp_path / "cache"
    first = data.build_cache(sources, PRE, cache_dir=cache_dir, workers=0)
    a, b, c = (first.files[str(s)] for s in sources)
    reference = {k: data.read_cached_stack(v).pixels.copy() for k, v in first.files.items()}
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])  # truncated
    b.write_bytes(b"")  # empty
    shutil.copy(a.parent / c.name, tmp_path / "c-copy")
    for damaged in (a, b):
        with pytest.raises(data.CacheEntryError):
            data.read_cached_stack(damaged)
    second = data.build_cache(sources, PRE, cache_dir=cache_dir, workers=0)
    assert sorted(Path(s).name for s, _ in second.rebuilt) == sorted([Path(sources[0]).name, Path(sources[1]).name])
    assert all("rebuilt" in note for _, note in second.rebuilt) and second.reused == 1
    shutil.copy(c, a)  # swapped: a valid entry of another case under a's name
    with pytest.raises(data.CacheEntryError, match="swapped"):
        data.read_cached_stack(a)
    third = data.build_cache(sources, PRE, cache_dir=cache_dir, workers=0)
    assert [Path(s).name for s, _ in third.rebuilt] == [Path(sources[0]).name]
    pixels, _ = data.stack_batch([third.files[str(s)] for s in sources])
    for index, source in enumerate(sources):
        assert torch.equal(pixels[index], torch.from_numpy(reference[str(source)]))


# ------------------------------------------------------------------------------------- 7. training outputs
def test_training_outputs_survive_crashes_and_resume_is_checked_first(tmp_path, monkeypatch):
    from HeadCTMoLRELib import atomic_files
    from HeadCTMoLRELib.training import cases as data, train
    from test_train import make_start_bundle, tiny_config
    from test_data import write_toy_dataset

    csv_path = write_toy_dataset(tmp_path / "cases", 6, splits=("train", "val", "train"))
    start = make_start_bundle(tmp_path / "start")
    out = tmp_path / "run"

    # --resume without a checkpoint: refused before any case is preprocessed
    def no_preprocessing(*args, **kwargs):
        raise AssertionError("cases were preprocessed before the checkpoint was checked")

    with monkeypatch.context() as patch:
        patch.setattr(data, "build_cache", no_preprocessing)
        with pytest.raises(train.TrainError, match="no checkpoint"):
            train.fit(csv_path, start, out, tiny_config(max_epochs=1), cache_dir=tmp_path / "cache", resume=True)

    # a crash while the best bundle is written: the epoch's checkpoint is already there, resume writes the bundle
    with monkeypatch.context() as patch:
        def crash(*args, **kwargs):
            raise RuntimeError("power cut while writing the best bundle")

        patch.setattr(train, "_save_best", crash)
        with pytest.raises(RuntimeError, match="power cut"):
            train.fit(csv_path, start, out, tiny_config(max_epochs=1), cache_dir=tmp_path / "cache")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["history"][-1]["best"]
    assert not (out / "model").exists()
    resumed = train.fit(csv_path, start, out, tiny_config(max_epochs=1), cache_dir=tmp_path / "cache", resume=True)
    written = bundle.load_bundle(out / "model")
    assert resumed.bundle_path == out / "model" and written.manifest["metrics"]["best_epoch"] == 1

    # replacing a bundle: a crash between "old aside" and "new in" never loses OUT/model for good
    before = bundle.load_bundle(out / "model").manifest["integrity"]["manifest_sha256"]
    real_replace = os.replace

    def crash_on_second(src, dst):
        if Path(src).is_dir() and ".staging-" in Path(src).name:  # the old bundle is aside by now
            raise OSError("killed between the renames")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(atomic_files.os, "replace", crash_on_second)
        with pytest.raises(OSError, match="killed"):
            bundle.save_bundle(bundle.build_model(written), out / "model", catalog=written.catalog,
                               preprocessing=written.preprocessing, overwrite=True)
    assert not (out / "model").exists() and list(out.glob(".model.*"))
    (out / ".model.staging-stale").mkdir()  # a staging folder from an older crash
    removed = train.clean_stale_outputs(out)
    assert removed and not list(out.glob(".model.*"))
    assert bundle.load_bundle(out / "model").manifest["integrity"]["manifest_sha256"] == before
