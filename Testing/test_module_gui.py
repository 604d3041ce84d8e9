"""HeadCTMoLRE/HeadCTMoLRE.py driven the way Slicer drives it: module, widget, parameter node and logic.

Testing/module_gui_walk.py walks the panel in its own process (the Qt stand-ins of
Testing/slicer_gui_standins.py go into that process's ``sys.modules``, never into pytest's), with a real worker
process. This file prepares its data (tiny bundles, a DICOM series, a cases CSV: made here, where torch may
be imported) and checks that each walk passes.

Slicer's own ``parameterNodeWrapper``, ``ScriptedLoadableModule`` and ``i18n`` sources are used when
``HEADCT_SLICER_PYTHON`` names a Slicer source tree's ``Base/Python`` folder (e.g. a checkout of v5.8.1 or
v5.10.0); otherwise the stand-ins of the same API. Run time: about 25-40 s on 2 cores (two worker starts,
one inference, one epoch of fine-tuning): the price of the only test that clicks through the real module.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_fixtures import edit_manifest
from HeadCTMoLRELib import phantoms
from HeadCTMoLRELib.phantoms import io as phantom_io
from HeadCTMoLRELib.slicer.selftest import make_tiny_bundle

WALK = Path(__file__).resolve().parent / "module_gui_walk.py"
SLICER_PYTHON_ENV = "HEADCT_SLICER_PYTHON"


@pytest.fixture(scope="module")
def walk_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("module-gui")
    models = root / "models"
    make_tiny_bundle(models / "tiny-random")
    trained = make_tiny_bundle(models / "tiny-trained", seed=1)

    def mark_trained(manifest):
        manifest["training"] = {"kind": "train", "epochs_run": 1, "synthetic_training_data": True}

    edit_manifest(trained, mark_trained)
    series = phantom_io.write_dicom_series(phantoms.generate_phantom([], seed=5, spacing_mm=(2.0, 2.0, 8.0)), root / "dicom",
                                           series_seed=11)
    cases = with_splits(phantom_io.write_phantom_dataset(root / "cases", 4, 7, findings=["hydrocephalus"],
                                                         prevalence=0.5, spacing_mm=(2.0, 2.0, 8.0)), "hydrocephalus")
    return {"root": root, "models": models, "trained": trained, "dicom": series, "cases": cases}


def with_splits(labels_csv: Path, finding: str) -> Path:
    """Add a split column: one positive and one negative case of ``finding`` for validation (so that an epoch
    has a validation AUC and fine-tuning keeps a best model), the rest for training."""
    with labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    positives = [r for r in rows if r[finding] == "1"]
    negatives = [r for r in rows if r[finding] == "0"]
    assert positives and negatives, f"{labels_csv}: the phantom seed gave no mix of {finding} cases"
    for row in rows:
        row["split"] = "val" if row is positives[0] or row is negatives[0] else "train"
    out = labels_csv.with_name("cases.csv")
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "split", *[k for k in rows[0] if k not in ("path", "split")]])
        writer.writeheader()
        writer.writerows(rows)
    return out


def run_walk(mode: str, data: dict, work: Path, *extra: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, HEADCT_MOLRE_MODELS=str(data["models"]), TMPDIR=str(work / "tmp"),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
                   [str(Path(__file__).resolve().parents[1] / "HeadCTMoLRE"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, str(WALK), mode, "--work", str(work), *extra]
    if os.environ.get(SLICER_PYTHON_ENV):
        command += ["--slicer-python", os.environ[SLICER_PYTHON_ENV]]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"the {mode} walk failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    # A VTK observer's exception (scene close) is printed, not raised: it must not happen either.
    assert "Traceback" not in result.stderr, f"the {mode} walk printed an exception:\n{result.stderr[-6000:]}"
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{mode} walk ({facts.get('sources')}): {facts}")
    return facts


def test_fresh_install_lists_models_enables_run_and_run_asks_to_install_torch(walk_data, tmp_path):
    facts = run_walk("fresh", walk_data, tmp_path / "fresh")
    assert facts["sources"] in ("slicer", "stand-ins")
    kinds = [kind for kind, _ in facts["dialogs"]]
    assert "errorDisplay" not in kinds, facts["dialogs"]


@pytest.mark.slow  # ~30 s on 2 busy cores: a worker start with torch, one inference, one fine-tuning epoch
def test_run_finding_export_detect_fine_tune_and_scene_close_with_a_real_worker(walk_data, tmp_path):
    facts = run_walk("full", walk_data, tmp_path / "full", "--trained", str(walk_data["trained"]),
                     "--dicom", str(walk_data["dicom"]), "--cases", str(walk_data["cases"]))
    assert [kind for kind, _ in facts["dialogs"]] == ["getExistingDirectory"], facts["dialogs"]
    assert (walk_data["models"] / "my ward model" / "manifest.json").is_file()



def test_thread_job_reports_its_result_or_its_failure_once_through_the_callbacks():
    """The DICOM export's job: poll() never blocks, and calls exactly one callback once the work ended."""
    import threading

    from HeadCTMoLRELib.slicer.logic import ThreadJob

    release = threading.Event()
    seen = []
    job = ThreadJob(lambda: release.wait(10) and {"files": {"dicom_sr": "x.dcm"}}, "dicom")
    job.on_result, job.on_error = seen.append, lambda message, kind: seen.append((message, kind))
    assert job.poll() == [] and job.state == "running" and not seen
    release.set()
    job.wait(10)
    assert job.poll()[0]["files"] == {"dicom_sr": "x.dcm"} and job.state == "done"
    assert job.poll() == [] and len(seen) == 1

    def fail():
        raise ValueError("the source series has no FrameOfReferenceUID")

    failing = ThreadJob(fail, "dicom")
    failing.on_error = lambda message, kind: seen.append((message, kind))
    failing.wait(10)
    failing.poll()
    assert failing.state == "failed" and seen[-1] == ("the source series has no FrameOfReferenceUID", "ValueError")
