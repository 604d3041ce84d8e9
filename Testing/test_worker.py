"""The background worker: a real subprocess round trip, protocol hygiene and cancel of the whole tree."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from HeadCTMoLRELib import phantoms as phantom
from HeadCTMoLRELib.slicer import worker
from HeadCTMoLRELib.slicer.selftest import make_tiny_bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture()
def client():
    client = worker.WorkerClient().start()
    yield client
    client.cancel()


def test_ping_answers_with_only_protocol_lines(client):
    request = client.send({"cmd": "ping"})
    final, seen = client.wait_for(request, timeout_s=60)
    assert final["type"] == "result" and final["pong"] is True
    assert all(m.get("stream") != "stdout" for m in seen)  # nothing but JSON reached stdout


def test_unknown_command_is_an_error_message_not_a_crash(client):
    request = client.send({"cmd": "explode"})
    final, _ = client.wait_for(request, timeout_s=60)
    assert final["type"] == "error" and "unknown command" in final["message"]
    assert client.running


def test_infer_round_trip_writes_a_result_that_rebuilds_the_prediction(client, tiny_bundle, tmp_path):
    from HeadCTMoLRELib import inference

    case = phantom.generate_phantom([], seed=7)
    ct_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(case.image, str(ct_path))
    request = client.send({"cmd": "infer", "input": str(ct_path), "model": str(tiny_bundle), "device": "cpu",
                           "output": str(tmp_path / "out")})
    final, seen = client.wait_for(request, timeout_s=120)
    assert final["type"] == "result", final
    stages = [m["stage"] for m in seen if m.get("type") == "progress"]
    assert stages[0] == "loading model" and stages[-1] == "done"
    rebuilt = worker.read_result(final["output"])
    direct = inference.predict(str(ct_path), tiny_bundle, "cpu")
    assert np.allclose(rebuilt.probabilities, direct.probabilities, atol=1e-5)
    assert rebuilt.model_status == direct.model_status and "UNTRAINED" in rebuilt.status_label  # the panel shows it
    finding = direct.catalog.ids[0]
    assert np.allclose(sitk.GetArrayFromImage(rebuilt.contribution_image(finding)),
                       sitk.GetArrayFromImage(direct.contribution_image(finding)), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(rebuilt.expert_image()), sitk.GetArrayFromImage(direct.expert_image()))


def test_model_stays_loaded_between_requests(client, tiny_bundle, tmp_path):
    case = phantom.generate_phantom([], seed=8)
    ct_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(case.image, str(ct_path))
    timings = []
    for run in range(2):
        request = client.send({"cmd": "infer", "input": str(ct_path), "model": str(tiny_bundle), "device": "cpu",
                               "output": str(tmp_path / f"out{run}")})
        final, _ = client.wait_for(request, timeout_s=120)
        timings.append(final["timings_s"]["model"])
    assert timings[1] < timings[0]


def test_cancel_ends_worker_and_children_within_two_seconds(client):
    client.send({"cmd": "sleep", "seconds": 60})
    deadline = time.monotonic() + 30
    root = psutil.Process(client.process.pid)
    while not root.children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = root.children(recursive=True)
    assert children, "the sleep request should run a child process"
    start = time.monotonic()
    assert client.cancel(), "a process of the worker's family outlived the kill"
    # the kill is immediate; the bound is cancel's own timeout plus scheduling slack on a loaded 2-core machine
    assert time.monotonic() - start < worker.CANCEL_TIMEOUT_S + 1.0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children + [root])
    assert not client.running


# ------------------------------------------------------------------------------ the Logic around the worker
def test_import_model_refuses_zip_with_path_traversal(tmp_path, monkeypatch, tiny_bundle):
    import zipfile

    from HeadCTMoLRELib.model import bundle
    from HeadCTMoLRELib.slicer import logic

    monkeypatch.setenv(logic.MODELS_ENV, str(tmp_path / "models"))
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../outside.txt", "x")
    with pytest.raises(bundle.BundleError, match="unsafe path"):
        logic.HeadCTMoLRECore(scene=object()).import_model(evil)
    assert not (tmp_path / "outside.txt").exists()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        for path in tiny_bundle.rglob("*"):
            if path.is_file():
                archive.write(path, Path("tiny") / path.relative_to(tiny_bundle))
    entry = logic.HeadCTMoLRECore(scene=object()).import_model(good)
    listed = [m["id"] for m in logic.list_models()]
    assert entry["sha256_ok"] and listed.count(entry["id"]) == 1 and listed[-1] == entry["id"]  # after Models.json


def test_background_job_result_shows_the_same_nodes_as_the_blocking_run(tmp_path, tiny_bundle):
    slicer = pytest.importorskip("slicer")
    from HeadCTMoLRELib.slicer import logic, mrml, app as slicer_app

    scene = slicer.vtkMRMLScene()
    slicer_app.scene_logics(scene)
    ct = mrml.volume_node_from_image(scene, phantom.generate_phantom([], seed=9).image, "CT")
    core = logic.HeadCTMoLRECore(scene)
    blocking = core.run(ct, str(tiny_bundle), "cpu")
    job = core.start(ct, str(tiny_bundle), "cpu")
    stages = []
    job.on_progress = lambda stage, fraction, details: stages.append(stage)
    deadline = time.monotonic() + 120
    while job.state == "running" and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    core.shutdown()
    assert job.state == "done", job.error
    assert "running model" in stages
    shown = core.show(job, ct_node=ct)
    assert np.allclose(slicer.util.arrayFromVolume(shown.attention), slicer.util.arrayFromVolume(blocking.attention),
                       atol=1e-6)
    assert shown.findings_table.GetCellText(0, 1) == blocking.findings_table.GetCellText(0, 1)


def test_fine_tune_request_reaches_train_and_reports_its_refusal(client, tiny_bundle, tmp_path):
    labels = phantom.write_phantom_dataset(tmp_path / "cases", 2, seed=1)
    request = client.send({"cmd": "fine_tune", "cases_csv": str(labels), "start_model": str(tiny_bundle),
                           "epochs": 1, "output": str(tmp_path / "tuned")})
    final, _ = client.wait_for(request, timeout_s=120)
    assert final["type"] == "error" and final["error_type"] == "TrainError" and "never been trained" in final["message"]
    assert not (tmp_path / "tuned").exists()
