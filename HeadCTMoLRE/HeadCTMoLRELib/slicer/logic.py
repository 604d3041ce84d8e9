"""The one Logic of the Slicer module, without Qt: blocking calls for batch and tests, worker jobs for the GUI.

    core = HeadCTMoLRECore(scene)                 # scene: slicer.mrmlScene by default
    nodes = core.run(ct_node, "demo")             # blocking: PredictionNodes in the scene
    job = core.start(ct_node, "demo")             # background: poll() from a timer, cancel() on Cancel
    ... job.poll() ... -> core.show(job.result_folder, ct_node=ct_node)

Models: the entries of Resources/Models.json plus every bundle folder in the user model folder
(``HEADCT_MOLRE_MODELS``, default ``~/.cache/headct-molre/models``). Listing reads manifests and checks file
hashes (once per change of the files: ``model.verification_cache``) and imports no torch; the worker process
loads and fully checks a bundle when it is used. Nothing is downloaded here, so everything works offline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from ..model import bundle as bundle_lib, verification_cache
from ..model.status import bundle_status
from . import worker as worker_lib

MODELS_ENV = "HEADCT_MOLRE_MODELS"
MODELS_JSON = "Models.json"
RUN_FOLDER_PREFIX = "headct-molre-run-"
RUNS_FOLDER = ".runs"  # fine-tuning run folders inside the user model folder
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}

logger = logging.getLogger(__name__)


class Cancelled(RuntimeError):
    """The user cancelled the operation."""


def user_model_folder() -> Path:
    """Where imported and fine-tuned bundles live (``HEADCT_MOLRE_MODELS`` or ~/.cache/headct-molre/models)."""
    return Path(os.environ.get(MODELS_ENV) or Path.home() / ".cache" / "headct-molre" / "models").expanduser()


def _describe_bundle(path: Path, entry: dict | None = None) -> dict:
    """A model-list entry: id, title, path, description, backbone, synthetic, status (``bundle_status``'s
    JSON: synthetic / untrained / random backbone and the one-line label), sha256_ok (+ error).

    Reads the manifest (JSON) and checks the file hashes (once per change, ``verification_cache``); imports
    no torch, so the panel lists models before PyTorch is installed. The worker checks everything else
    (catalog, preprocessing, architecture) when the model is used. User bundles are titled by their folder
    name: the name typed for a fine-tuned model, the bundle's own name for an imported one."""
    entry = dict(entry or {})
    source = entry.get("source", "user")
    info = {"id": entry.get("id") or path.name, "title": entry.get("title") or path.name, "path": str(path),
            "description": entry.get("description", ""), "backbone": entry.get("backbone", ""),
            "synthetic": bool(entry.get("synthetic", False)), "sha256_ok": False, "error": None,
            "source": source, "status": None}
    try:
        manifest = bundle_lib.read_manifest(path)
        verification_cache.verify_bundle_files(path, manifest)
        model = manifest.get("model") or {}
        backbone = model.get("backbone") or {} if isinstance(model, dict) else {}
        bundle_name = str(manifest.get("name") or path.name)
        description = entry.get("description") or str(manifest.get("description") or "")
        if source == "user" and bundle_name != path.name:
            description = " ".join(p for p in (description, f"(bundle name: {bundle_name})") if p)
        info.update(sha256_ok=True, title=entry.get("title") or (path.name if source == "user" else bundle_name),
                    description=description,
                    backbone=entry.get("backbone") or f"{backbone.get('family', '')} {backbone.get('size', '')}".strip(),
                    synthetic=bool(entry.get("synthetic", manifest.get("synthetic_training_data", False))),
                    training=manifest.get("training"), metrics=manifest.get("metrics"),
                    status=bundle_status(manifest).to_json())
    except (bundle_lib.BundleError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        info["error"] = str(error)  # one broken bundle is listed as unusable, never empties the list
    return info


def model_folder_name(typed: str) -> str:
    """The folder name of a new model: the name the user typed, which must be a valid folder name on every
    system (ValueError saying what to change otherwise)."""
    name = str(typed or "").strip()
    bad = sorted({c for c in name if c in '<>:"/\\|?*' or ord(c) < 32})
    problem = None
    if not name:
        problem = "it is empty"
    elif bad:
        problem = "it contains " + " ".join(repr(c) for c in bad)
    elif name.startswith("."):
        problem = "it starts with '.' (a hidden folder)"
    elif name.endswith("."):
        problem = "it ends with '.'"
    elif name.split(".")[0].upper() in _WINDOWS_RESERVED:
        problem = f"{name.split('.')[0]!r} is a reserved device name on Windows"
    elif len(name) > 100:
        problem = f"it is {len(name)} characters long (at most 100)"
    if problem:
        raise ValueError(f"model name {name!r} cannot be used: {problem}. Choose a name made of letters, digits, "
                         "spaces, '-', '_' or '.'.")
    return name


def _manifest_entries() -> list[dict]:
    from ..resources import resource_path

    path = resource_path(MODELS_JSON)
    if not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    entries = data.get("models", []) if isinstance(data, dict) else data
    out = []
    for entry in entries:
        folder = Path(entry.get("path", entry.get("id", "")))
        if not folder.is_absolute():
            folder = Path(path).parent / folder
        out.append(dict(entry, path=str(folder), source="builtin"))
    return out


def list_models() -> list[dict]:
    """Built-in (Resources/Models.json) and user bundles: id, title, path, description, backbone,
    synthetic, sha256_ok (False with ``error`` when the bundle fails verification), source."""
    out, seen = [], set()
    for entry in _manifest_entries():
        out.append(_describe_bundle(Path(entry["path"]), entry))
        seen.add(Path(entry["path"]).resolve())
    folder = user_model_folder()
    if folder.is_dir():
        for path in sorted(p.parent for p in folder.glob(f"*/{bundle_lib.MANIFEST}")):
            if path.name.startswith("."):  # staging and run folders, never models
                continue
            if path.resolve() not in seen:
                out.append(_describe_bundle(path))
    return out


def resolve_model(model_id: str) -> Path:
    """The verified bundle folder of a model id, or of a bundle folder path given directly."""
    candidate = Path(str(model_id)).expanduser()
    if (candidate / bundle_lib.MANIFEST).is_file():
        return candidate.resolve()
    models = list_models()
    for info in models:
        if info["id"] == model_id:
            if not info["sha256_ok"]:
                raise bundle_lib.BundleError(f"model {model_id!r} cannot be used: {info['error']}")
            return Path(info["path"])
    known = ", ".join(m["id"] for m in models) or "none"
    raise bundle_lib.BundleError(f"unknown model {model_id!r} (known: {known}); import its bundle folder or "
                                 f"zip first, or put it into {user_model_folder()}.")


class WorkerJob:
    """One request running in the worker process, polled from the GUI's timer.

    poll() -> messages of this job received since the last call (never blocks) and calls the callbacks:
    on_progress(stage, fraction, details), on_log(text), on_result(result dict), on_error(message, type).
    state: "running", "done", "failed" or "cancelled". cancel() ends the worker and its children (< 2 s).
    ``on_end(job)`` (given by the logic) runs once when the job ends, whatever the ending: it deletes the
    job's temporary files (kept when it failed; ``kept_folder`` then names them and the log says where).
    """

    def __init__(self, client: worker_lib.WorkerClient, request: dict, *, result_folder: Path | None = None,
                 on_end: Callable | None = None):
        self.client = client
        self.request_id = client.send(request)
        self.kind = request.get("cmd")
        self.result_folder = result_folder
        self.state = "running"
        self.result: dict | None = None
        self.error: str | None = None
        self.prediction = None  # inference: the Prediction read from the result folder before it is deleted
        self.kept_folder: Path | None = None
        self.progress = (None, 0.0)
        self.on_progress: Callable | None = None
        self.on_log: Callable | None = None
        self.on_result: Callable | None = None
        self.on_error: Callable | None = None
        self._on_end = on_end

    def poll(self) -> list[dict]:
        if self.state != "running":
            return []
        mine = self.client.poll(self.request_id)
        for message in mine:
            kind = message.get("type")
            if kind == "progress":
                self.progress = (message.get("stage"), message.get("fraction"))
                if self.on_progress:
                    self.on_progress(message.get("stage"), message.get("fraction"), message.get("details"))
            elif kind == "log" and self.on_log:
                self.on_log(message.get("message", ""))
            elif kind == "result" and message.get("id") == self.request_id:
                self.result = message
                self._end("done")  # reads the result, then removes the temporary files
                if self.on_result:
                    self.on_result(message)
                return mine
            elif kind == "error" and message.get("id") == self.request_id:
                self._fail(message.get("message", "unknown error"), message.get("error_type", "Error"))
                return mine
        if self.state == "running" and self.client.exit_status is not None and not self.client.running:
            self._fail(f"the worker process ended unexpectedly (exit status {self.client.exit_status}); "
                       "see the log for its last messages", "WorkerError")
        return mine

    def _fail(self, text: str, error_type: str) -> None:
        self.error = text
        self._end("failed")
        if self.kept_folder is not None:
            self.error = text = f"{text} (its files are kept in {self.kept_folder})"
        if self.on_error:
            self.on_error(text, error_type)

    def _end(self, state: str) -> None:
        self.state = state
        self.client.forget(self.request_id)
        hook, self._on_end = self._on_end, None
        if hook is None:
            return
        try:
            hook(self)
        except Exception as error:  # noqa: BLE001 - e.g. an unreadable result: the job failed, files kept
            if state == "done":
                self.state, self.error = "failed", str(error)
                if self.result_folder is not None:
                    self.kept_folder = self.result_folder
            raise

    def cancel(self) -> bool:
        stopped = self.client.cancel()
        if self.state == "running":
            self._end("cancelled")
        return stopped


class ThreadJob:
    """Light work (no torch, no MRML) run in a Python thread of the GUI process, with WorkerJob's interface:
    poll() never blocks and calls on_result({"type": "result", **returned dict}) or on_error(message, type)
    once the function returned. cancel() stops waiting for it (a thread cannot be killed: it finishes alone)."""

    def __init__(self, function: Callable[[], dict], kind: str):
        self.kind = kind
        self.state = "running"
        self.result: dict | None = None
        self.error: str | None = None
        self.on_progress: Callable | None = None
        self.on_log: Callable | None = None
        self.on_result: Callable | None = None
        self.on_error: Callable | None = None
        self._outcome: tuple | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), name=f"HeadCTMoLRE-{kind}", daemon=True)
        self._thread.start()

    def _run(self, function) -> None:
        try:
            self._outcome = ("result", function())
        except Exception as error:  # noqa: BLE001 - reported to the GUI by poll()
            logger.exception(f"HeadCTMoLRE {self.kind} failed")
            self._outcome = ("error", error)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the function returned (tests and batch)."""
        self._thread.join(timeout_s)

    def poll(self) -> list[dict]:
        if self.state != "running" or self._thread.is_alive() or self._outcome is None:
            return []
        kind, value = self._outcome
        if kind == "result":
            self.state = "done"
            self.result = {"type": "result", **value}
            if self.on_result:
                self.on_result(self.result)
            return [self.result]
        self.state, self.error = "failed", str(value)
        if self.on_error:
            self.on_error(self.error, type(value).__name__)
        return [{"type": "error", "message": self.error, "error_type": type(value).__name__}]

    def cancel(self) -> bool:
        if self.state == "running":
            self.state = "cancelled"
        return not self._thread.is_alive()


def _end_inference(volume) -> Callable:
    """on_end of an inference job: read the Prediction, then delete the run folder (kept on failure)."""
    def end(job: WorkerJob) -> None:
        folder = job.result_folder
        if job.state == "failed":
            job.kept_folder = folder
            logger.warning(f"HeadCTMoLRE: the failed run's files are kept in {folder}")
            return
        try:
            if job.state == "done":
                job.prediction = worker_lib.read_result(folder, volume)
        except Exception:
            job.kept_folder = folder
            logger.warning(f"HeadCTMoLRE: the run's result could not be read; its files are kept in {folder}")
            raise
        shutil.rmtree(folder, ignore_errors=True)
    return end


def _end_fine_tune(target: Path, run_dir: Path) -> Callable:
    """on_end of a fine-tuning job: remove copy leftovers of a killed worker and the run folder (kept, with
    its checkpoint and history, only on failure; its name is unique, so it never blocks a model name)."""
    def end(job: WorkerJob) -> None:
        worker_lib.remove_staging(target)
        if job.state == "failed":
            job.kept_folder = run_dir
            logger.warning(f"HeadCTMoLRE: the failed fine-tuning run is kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return end


def dicom_source_files(ct_node) -> list[str]:
    """The DICOM files a volume node was loaded from by Slicer's DICOM module ("DICOM.instanceUIDs" looked up
    in ``slicer.dicomDatabase``), or [] for a volume from another source (or files no longer on disk)."""
    if ct_node is None:
        return []
    uids = (ct_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    try:
        import slicer

        database = getattr(slicer, "dicomDatabase", None)
    except ImportError:
        database = None
    if not uids or database is None:
        return []
    files = [database.fileForInstance(uid) for uid in uids]
    return [f for f in files if f and Path(f).is_file()]


def _write_dicom(prediction, out_dir, source_files: list[str], case_id: str) -> dict:
    from ..reports import dicom

    if source_files:
        return dicom.write_dicom_outputs(prediction, out_dir, dicom_source=source_files, case_id=case_id)
    return dicom.write_dicom_outputs(prediction, out_dir, generate_study=True, case_id=case_id)


class HeadCTMoLRECore:
    """Everything the module does, Qt-free. ``scene``: an MRML scene (default ``slicer.mrmlScene``)."""

    def __init__(self, scene=None):
        if scene is None:
            from . import app as slicer_app

            scene = slicer_app.default_scene()
        self.scene = scene
        self._worker: worker_lib.WorkerClient | None = None
        self.python_executable: str | None = None  # PythonSlicer inside Slicer (set by the module)

    # ----------------------------------------------------------------------------------------- models
    def models(self) -> list[dict]:
        """See ``list_models``."""
        return list_models()

    def model_path(self, model_id: str) -> Path:
        """The bundle folder of a model id (or a bundle folder path given directly)."""
        return resolve_model(model_id)

    def import_model(self, path) -> dict:
        """Verify a bundle folder or .zip and copy it into the user model folder; returns its entry."""
        from ..model.bundle_import import import_bundle

        return _describe_bundle(import_bundle(path, user_model_folder()))

    def start_device_info(self) -> WorkerJob:
        """Background query of the torch build and accelerators (``inference.device_report``), answered by the
        worker process: torch is never imported into the GUI process. The result message's "device" holds
        the report; the worker keeps torch loaded for the next Run."""
        return WorkerJob(self.worker(), {"cmd": "device_info"})

    # -------------------------------------------------------------------------------------- inference
    def run(self, volume_node, model_id: str, device: str = "auto", progress: Callable | None = None,
            should_cancel: Callable | None = None):
        """Blocking inference on a CT volume node; returns mrml.PredictionNodes. progress(stage, fraction);
        should_cancel() -> True raises Cancelled between stages."""
        from .. import inference
        from . import mrml

        def step(stage: str):
            if should_cancel and should_cancel():
                raise Cancelled(f"cancelled before '{stage}'")
            if progress:
                progress(stage, worker_lib.INFER_STAGES.get(stage, 1.0))

        step("loading model")
        volume = mrml.ct_volume_from_node(volume_node)
        bundle_path = self.model_path(model_id)

        def on_log(message: str):
            if message.startswith("preprocessing"):
                step("preprocessing")
            elif message.startswith("running the model"):
                step("running model")

        prediction = inference.predict(volume, bundle_path, device, log=on_log)
        step("writing results")
        nodes = mrml.show_prediction(self.scene, prediction, ct_node=volume_node)
        if progress:
            progress("done", 1.0)
        return nodes

    def worker(self) -> worker_lib.WorkerClient:
        """The long-lived worker process (started on first use, restarted after a cancel)."""
        if self._worker is None or not self._worker.running:
            self._worker = worker_lib.WorkerClient().start(self.python_executable)
        return self._worker

    def start(self, volume_node, model_id: str, device: str = "auto") -> WorkerJob:
        """Background inference. The CT (checked, parent transforms applied) goes to the worker as an
        uncompressed NRRD in a temporary run folder (a plain write, ~0.1 s for 512 x 512 x 300 voxels,
        where compression took 8-9 s); the folder is deleted when the job ends (kept on failure)."""
        import SimpleITK as sitk

        from . import mrml

        volume = mrml.ct_volume_from_node(volume_node)
        bundle_path = self.model_path(model_id)
        output = Path(tempfile.mkdtemp(prefix=RUN_FOLDER_PREFIX))
        try:
            input_path = output / worker_lib.INPUT_NRRD
            sitk.WriteImage(volume.image, str(input_path), useCompression=False)
            request = {"cmd": "infer", "input": str(input_path), "model": str(bundle_path), "device": device,
                       "output": str(output)}
            return WorkerJob(self.worker(), request, result_folder=output, on_end=_end_inference(volume))
        except BaseException:
            shutil.rmtree(output, ignore_errors=True)
            raise

    def show(self, result, ct_node=None, name: str | None = None):
        """Nodes for a Prediction or a worker result folder (or a finished WorkerJob)."""
        from . import mrml

        if isinstance(result, WorkerJob):
            result = result.prediction if result.prediction is not None else result.result_folder
        if isinstance(result, (str, os.PathLike)):
            volume = None
            if ct_node is not None:
                volume = mrml.ct_volume_from_node(ct_node)
            result = worker_lib.read_result(result, volume)
        return mrml.show_prediction(self.scene, result, ct_node=ct_node, name=name)

    def export_dicom(self, prediction, out_dir, ct_node=None) -> dict:
        """DICOM SR + Parametric Map (attention) + Segmentation (experts) of ``prediction`` into ``out_dir``
        (``reports.dicom.write_dicom_outputs``; highdicom, no torch). They reference the DICOM series the CT
        node was loaded from (its "DICOM.instanceUIDs" attribute and Slicer's DICOM database); a volume that
        did not come from DICOM gets a generated study (``out_dir``/source_series). Writes only into
        ``out_dir``; returns {kind: path}."""
        return _write_dicom(prediction, out_dir, dicom_source_files(ct_node),
                            ct_node.GetName() if ct_node is not None else "case")

    def start_export_dicom(self, prediction, out_dir, ct_node=None) -> ThreadJob:
        """``export_dicom`` in a background thread (the GUI polls the job); result message: {"files": ...}.
        The CT node's DICOM source files are looked up here, on the calling (main) thread."""
        source_files = dicom_source_files(ct_node)
        name = ct_node.GetName() if ct_node is not None else "case"

        def export() -> dict:
            files = _write_dicom(prediction, out_dir, source_files, name)
            return {"files": {kind: str(path) for kind, path in files.items()}}

        return ThreadJob(export, "dicom")

    def select_finding(self, nodes, finding_id: str) -> float:
        from . import mrml

        return mrml.select_finding(self.scene, nodes, finding_id)

    # ------------------------------------------------------------------------------------ fine-tuning
    def _fine_tune_output(self, output_name: str) -> tuple[Path, Path]:
        """(bundle folder, run folder) for a new fine-tuned model in the user model folder. The bundle folder
        is named exactly as typed (so the model is listed under that name); the run folder is unique."""
        name = model_folder_name(output_name)
        target = user_model_folder() / name
        worker_lib.remove_staging(target)  # what a killed worker left behind never blocks the name
        if target.exists():
            raise FileExistsError(f"a model named {name!r} already exists in {user_model_folder()}; choose another "
                                  "name for the new model.")
        runs = user_model_folder() / RUNS_FOLDER
        runs.mkdir(parents=True, exist_ok=True)
        return target, Path(tempfile.mkdtemp(prefix=f"{name}-", dir=runs))

    def fine_tune(self, cases_csv, start_model_id: str, epochs: int, output_name: str,
                  progress: Callable | None = None, should_cancel: Callable | None = None) -> dict:
        """Blocking fine-tuning into a new bundle in the user model folder (it then appears in ``models()``).

        progress(stage, fraction, details): stage cache / train / validate / done; details carry epoch,
        loss and validation AUC. should_cancel() -> True stops at the next step (best bundle so far kept).
        Returns the new model's entry plus "training" (status, epochs_run, best_val_mean_auc, history).
        Raises Cancelled when cancelled before any epoch finished.
        """
        target, run_dir = self._fine_tune_output(output_name)
        try:
            summary = worker_lib.fine_tune_bundle(cases_csv, self.model_path(start_model_id), epochs, target,
                                                  progress=progress, should_stop=should_cancel, run_dir=run_dir)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        if summary["bundle"] is None:
            raise Cancelled(f"fine-tuning ended ({summary['status']}) before an epoch finished; no bundle was written")
        return dict(_describe_bundle(target), training=summary)

    def start_fine_tune(self, cases_csv, start_model_id: str, epochs: int, output_name: str) -> WorkerJob:
        target, run_dir = self._fine_tune_output(output_name)
        try:
            request = {"cmd": "fine_tune", "cases_csv": str(Path(cases_csv).resolve()),
                       "start_model": str(self.model_path(start_model_id)), "epochs": int(epochs),
                       "output": str(target), "run_dir": str(run_dir)}
            return WorkerJob(self.worker(), request, result_folder=target, on_end=_end_fine_tune(target, run_dir))
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def shutdown(self) -> None:
        """End the worker process (module cleanup / scene close)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None


__all__ = ["HeadCTMoLRECore", "WorkerJob", "ThreadJob", "Cancelled", "user_model_folder", "list_models", "resolve_model",
           "dicom_source_files", "MODELS_ENV"]
