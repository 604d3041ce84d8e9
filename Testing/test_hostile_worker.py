"""Issue 16, worker class: the GUI's worker process survives any input line, cancel cleans up, messages
reach their own job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from HeadCTMoLRELib.slicer import logic, worker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def client():
    client = worker.WorkerClient().start()
    yield client
    client.cancel()


@pytest.mark.parametrize("line", [b"[1, 2, 3]", b"42", b'"ping"', b"null", b"[" * 100000 + b"]" * 100000,
                                  b"\xff\xfe garbage \x00", b"{not json", b'{"cmd": 7}', b'{"cmd": "ping", "id": [1]}'])
def test_worker_survives_any_input_line_and_reports_it(client, line):
    client.process.stdin.write(line.decode("latin-1") + "\n")  # raw bytes as the GUI could send them
    client.process.stdin.flush()
    request = client.send({"cmd": "ping"})
    final, seen = client.wait_for(request, timeout_s=60)
    assert final["type"] == "result" and final["pong"] is True, "the worker died on a hostile line"
    refusals = [m for m in client.poll() + seen if m.get("type") == "error"]
    assert refusals and refusals[0]["error_type"] == "RequestError" and refusals[0]["message"]


def test_polling_one_job_never_discards_another_jobs_messages(client):
    first, second = client.send({"cmd": "ping"}), client.send({"cmd": "ping"})
    final, _ = client.wait_for(second, timeout_s=60)
    assert final["id"] == second
    again, _ = client.wait_for(first, timeout_s=5)  # its result arrived while the other job was polled
    assert again["id"] == first and again["type"] == "result"


def test_cancel_during_the_bundle_copy_leaves_nothing_that_blocks_the_name(tmp_path, monkeypatch):
    models = tmp_path / "models"
    monkeypatch.setenv(logic.MODELS_ENV, str(models))
    source = tmp_path / "trained"
    (source / "weights").mkdir(parents=True)
    for name in ("manifest.json", "weights/a.safetensors", "weights/b.safetensors"):
        (source / name).write_bytes(os.urandom(1024))
    core = logic.HeadCTMoLRECore(scene=object())
    target, run_dir = core._fine_tune_output("My tuned model")
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "state.json").write_text("{}")
    # The worker is killed (no cleanup handlers run) after the first file of the copy.
    child = ("import os, shutil, sys\nreal = shutil.copyfile\ncount = [0]\n"
             "def dying_copy(*a, **k):\n    count[0] += 1\n    if count[0] == 2: os._exit(9)\n    return real(*a, **k)\n"
             "shutil.copyfile = dying_copy\nfrom HeadCTMoLRELib.slicer import worker\n"
             "worker.publish_bundle(sys.argv[1], sys.argv[2])\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "HeadCTMoLRE"))
    done = subprocess.run([sys.executable, "-c", child, str(source), str(target)], env=env)
    assert done.returncode == 9
    assert not target.exists(), "a half-copied bundle sits under the model's name"

    class Killed:  # what WorkerJob.cancel() hands to the job's on_end hook
        state = "cancelled"
        kept_folder = None
    logic._end_fine_tune(target, run_dir)(Killed())
    assert not run_dir.exists() and not list(models.glob(".partial-*")), sorted(p.name for p in models.rglob("*"))
    assert core._fine_tune_output("My tuned model")[0] == target  # the name can be used again
    assert [m["title"] for m in logic.list_models() if m["source"] == "user"] == []
