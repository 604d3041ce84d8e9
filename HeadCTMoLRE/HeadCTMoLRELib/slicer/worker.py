"""Background worker for the GUI: one long-lived process that speaks line-delimited JSON; no Qt, no slicer.

Run as ``python -m HeadCTMoLRELib.slicer.worker`` (``PythonSlicer -m HeadCTMoLRELib.slicer.worker`` inside Slicer). It
reads one JSON request per line on stdin and answers with JSON lines on stdout, each carrying the
request's ``id`` and a ``type``:

    {"id": 7, "type": "progress", "stage": "running model", "fraction": 0.5}
    {"id": 7, "type": "log", "message": "..."}
    {"id": 7, "type": "result", ...}          the request is finished
    {"id": 7, "type": "error", "message": "...", "error_type": "CTInputError"}

Requests (``cmd``):
    ping                                   -> result {"pong": true, "pid": ...}
    device_info                            -> result {"device": inference.device_report()} (torch build, GPUs)
    infer   input, model, output, device   -> result {"output": folder, "findings": [...top 5...], ...}
    fine_tune cases_csv, start_model, epochs, output -> result {"bundle": folder, ...}
    sleep   seconds (tests: a slow request with a child process, to test cancel)
    shutdown                               -> the process exits

Loaded models stay cached between requests (``inference.cached_model``). Only protocol lines reach the
real stdout: at start-up file descriptor 1 is pointed at stderr, so library and C-level prints cannot
corrupt the protocol.

``write_result`` / ``read_result`` store a Prediction in a folder (outputs.write_prediction's files plus
the per-slice arrays and the head-frame stack geometry) and rebuild it, so the GUI process can show it
with exactly the maps the worker computed.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ..outputs import json_default

RESULT_JSON = "prediction_maps.json"
HEAD_MASK_NRRD = "head_mask.nrrd"
INPUT_NRRD = "input.nrrd"
CANCEL_TIMEOUT_S = 2.0
STAGING_PREFIX = ".partial-"
MAX_REQUEST_BYTES = 1 << 20  # a request is a few hundred bytes; longer lines are refused, not parsed


class WorkerError(RuntimeError):
    """The worker process failed or answered something unexpected; the message says what."""


# ------------------------------------------------------------------------------ prediction <-> folder
def write_result(prediction, folder: str | os.PathLike, *, input_path: str | os.PathLike | None = None) -> dict:
    """Write ``prediction`` into ``folder``: findings.tsv/json, attention/experts NRRD (input grid, LPS),
    prediction_maps.json (per-slice arrays, catalog, stack geometry) and head_mask.nrrd (stack grid).

    input_path: the CT file the prediction was made from; when None the CT is written as input.nrrd so the
    folder is self-contained. Returns {kind: path}.
    """
    import SimpleITK as sitk

    from ..outputs import write_prediction

    folder = Path(folder)
    paths = {k: str(v) for k, v in write_prediction(prediction, folder).items()}
    if input_path is None:
        input_path = folder / INPUT_NRRD
        sitk.WriteImage(prediction.volume.image, str(input_path), useCompression=True)
    stack = prediction.stack
    mask = sitk.GetImageFromArray(np.asarray(stack.head_mask, dtype=np.uint8))
    sitk.WriteImage(mask, str(folder / HEAD_MASK_NRRD), useCompression=True)

    def arr(values):
        return None if values is None else np.asarray(values).tolist()

    record = {
        "input": str(Path(input_path).resolve()),
        "catalog": prediction.catalog.to_dict(),
        "probabilities": arr(prediction.probabilities), "logits": arr(prediction.logits),
        "thresholds": arr(prediction.thresholds), "attention": arr(prediction.attention),
        "router_weights": arr(prediction.router_weights), "dominant_expert": arr(prediction.dominant_expert),
        "contributions": arr(prediction.contributions), "slice_valid": arr(prediction.slice_valid),
        "slice_positions_mm": arr(prediction.slice_positions_mm),
        "stack": {"origin_mm": arr(stack.origin_mm), "spacing_mm": arr(stack.spacing_mm),
                  "head_to_patient": arr(stack.head_to_patient), "alignment": stack.alignment,
                  "warnings": list(stack.warnings), "config": stack.config.to_dict()},
        "timings_s": prediction.timings_s, "provenance": prediction.provenance,
        "warnings": list(prediction.warnings), "model_status": dict(prediction.model_status or {}),
    }
    (folder / RESULT_JSON).write_text(json.dumps(record, default=json_default) + "\n", encoding="utf-8")
    paths.update(prediction_maps=str(folder / RESULT_JSON), head_mask=str(folder / HEAD_MASK_NRRD),
                 input=str(input_path))
    return paths


def read_result(folder: str | os.PathLike, volume=None):
    """Rebuild the inference.Prediction written by ``write_result`` (the stack holds geometry and head
    mask, not pixels). volume: the ctio.CTVolume it was made from; None reads the recorded input file.
    numpy and SimpleITK only: the Slicer GUI process shows a result without importing torch."""
    import SimpleITK as sitk

    from ..ct import loader as ctio
    from ..findings import FindingCatalog
    from ..inference import Prediction
    from ..ct.slice_stack import PreprocessConfig, SliceStack

    folder = Path(folder)
    maps = folder / RESULT_JSON
    if not maps.is_file():
        raise WorkerError(f"{folder}: no {RESULT_JSON}; this is not a HeadCTMoLRE result folder (run inference "
                          "again).")
    record = json.loads(maps.read_text(encoding="utf-8"))
    if volume is None:
        volume = ctio.load_ct(record["input"])
    head_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / HEAD_MASK_NRRD))).astype(bool)
    geometry = record["stack"]

    def arr(key, dtype=np.float64):
        return None if record.get(key) is None else np.asarray(record[key], dtype=dtype)

    stack = SliceStack(
        pixels=np.zeros((head_mask.shape[0], 0, 1, 1), np.float32), slice_valid=arr("slice_valid", bool),
        head_mask=head_mask, slice_positions_mm=arr("slice_positions_mm"),
        origin_mm=np.asarray(geometry["origin_mm"]), spacing_mm=np.asarray(geometry["spacing_mm"]),
        head_to_patient=np.asarray(geometry["head_to_patient"]), alignment=geometry["alignment"],
        warnings=list(geometry.get("warnings", [])), config=PreprocessConfig.from_dict(geometry["config"]))
    return Prediction(
        catalog=FindingCatalog.from_dict(record["catalog"]), probabilities=arr("probabilities"),
        logits=arr("logits"), thresholds=arr("thresholds"), attention=arr("attention", np.float32),
        router_weights=arr("router_weights", np.float32), dominant_expert=arr("dominant_expert", np.int64),
        contributions=arr("contributions", np.float32), slice_valid=arr("slice_valid", bool),
        slice_positions_mm=arr("slice_positions_mm"), stack=stack, volume=volume,
        timings_s=record.get("timings_s", {}), provenance=record.get("provenance", {}),
        warnings=record.get("warnings", []), model_status=record.get("model_status") or {})


# ------------------------------------------------------------------------------------- the work itself
INFER_STAGES = {"loading model": 0.05, "preprocessing": 0.3, "running model": 0.5, "writing results": 0.85}


def infer_to_folder(input_path, model_path, output, device="auto", *, progress: Callable | None = None,
                    log: Callable | None = None) -> dict:
    """Run inference on a CT file and write ``write_result``'s files into ``output``; returns a summary."""
    from .. import inference

    def stage(name):
        if progress:
            progress(name, INFER_STAGES[name])

    def on_log(message: str):
        if message.startswith("preprocessing"):
            stage("preprocessing")
        elif message.startswith("running the model"):
            stage("running model")
        if log:
            log(message)

    stage("loading model")
    prediction = inference.predict(str(input_path), str(model_path), device, log=on_log)
    stage("writing results")
    paths = write_result(prediction, output, input_path=input_path)
    top = sorted(prediction.findings(), key=lambda f: f["probability"], reverse=True)[:5]
    if progress:
        progress("done", 1.0)
    return {"output": str(Path(output).resolve()), "files": paths, "device": prediction.provenance.get("device"),
            "precision": prediction.provenance.get("precision"), "timings_s": prediction.timings_s,
            "warnings": prediction.warnings,
            "findings": [{k: f[k] for k in ("id", "name", "probability", "positive")} for f in top]}


def fine_tune_bundle(cases_csv, start_model, epochs: int, output, *, progress: Callable | None = None,
                     should_stop: Callable | None = None, cache_dir=None, run_dir=None) -> dict:
    """Fine-tune ``start_model``'s adapters on the labelled cases of ``cases_csv`` (train.fine_tune) and
    copy the best bundle to the folder ``output``.

    epochs: maximum epochs (the minimum before early stopping is lowered to it when smaller).
    run_dir: train.fit's run folder (checkpoint, history); default ``output`` + ".run".
    progress(stage, fraction, details) with stage cache / train / validate / done and fraction = share of
    the maximum epochs. Returns {"bundle", "status", "epochs_run", "best_epoch", "best_val_mean_auc",
    "history", "problems"}; "bundle" is None when no epoch finished (e.g. cancelled at once).
    """
    import dataclasses

    from ..training import train

    output = Path(output)
    run_dir = Path(run_dir) if run_dir is not None else output.with_name(output.name + ".run")
    defaults = train.TrainConfig()
    config = dataclasses.replace(defaults, max_epochs=int(epochs), min_epochs=min(defaults.min_epochs, int(epochs)))

    def on_progress(details: dict):
        if progress is None:
            return
        epoch = details.get("epoch")
        fraction = (float(epoch) / max(int(epochs), 1)) if isinstance(epoch, (int, float)) else None
        if details.get("stage") == "done":
            fraction = 1.0
        progress(str(details.get("stage", "train")), fraction, _jsonable(details))

    if output.exists():
        raise FileExistsError(f"{output} already exists; choose another name for the fine-tuned model.")
    result = train.fine_tune(str(cases_csv), str(start_model), run_dir, config, cache_dir=cache_dir,
                             progress=on_progress, should_stop=should_stop)
    bundle_path = None
    if result.bundle_path is not None:
        bundle_path = str(publish_bundle(result.bundle_path, output).resolve())
    return {"bundle": bundle_path, "status": result.status, "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch, "best_val_mean_auc": result.best_val_mean_auc,
            "history": _jsonable(result.history), "problems": _jsonable(result.problems)}


def staging_folder(output: str | os.PathLike) -> Path:
    """The hidden sibling a bundle is copied into before it is renamed to ``output`` (one per process)."""
    output = Path(output)
    return output.with_name(f"{STAGING_PREFIX}{output.name}.{os.getpid()}")


def publish_bundle(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Copy the bundle folder ``source`` to ``output`` atomically: into ``staging_folder(output)``, then one
    rename. A kill during the copy leaves no ``output`` (only the hidden staging folder, which
    ``remove_staging`` deletes); ``output`` must not exist."""
    import shutil

    output = Path(output)
    staging = staging_folder(output)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging)
        os.rename(staging, output)  # fails (never merges) when output appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def remove_staging(output: str | os.PathLike) -> list[Path]:
    """Delete every staging folder ``publish_bundle`` may have left for ``output`` (a killed worker's)."""
    import shutil

    output = Path(output)
    removed = []
    for path in output.parent.glob(f"{STAGING_PREFIX}{glob.escape(output.name)}.*"):
        if path.is_dir() and path.name[len(STAGING_PREFIX) + len(output.name) + 1:].isdigit():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


# ------------------------------------------------------------------------------------------- the server
class _Server:
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def send(self, message: dict) -> None:
        line = json.dumps(message, default=json_default)
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()

    def handle(self, request: dict) -> bool:
        """Answer one request; returns False on shutdown."""
        rid, cmd = request.get("id"), request.get("cmd")

        def progress(stage, fraction, details=None):
            message = {"id": rid, "type": "progress", "stage": stage, "fraction": fraction}
            if details:
                message["details"] = details
            self.send(message)

        def log(text):
            self.send({"id": rid, "type": "log", "message": str(text)})

        if cmd == "shutdown":
            self.send({"id": rid, "type": "result", "shutdown": True})
            return False
        try:
            if cmd == "ping":
                result = {"pong": True, "pid": os.getpid(), "python": sys.executable}
            elif cmd == "device_info":  # torch is imported here, never in the GUI process
                from ..inference import device_report

                result = {"device": device_report()}
            elif cmd == "infer":
                result = infer_to_folder(request["input"], request["model"], request["output"],
                                         request.get("device", "auto"), progress=progress, log=log)
            elif cmd == "fine_tune":
                result = fine_tune_bundle(request["cases_csv"], request["start_model"], request.get("epochs", 20),
                                          request["output"], progress=progress, cache_dir=request.get("cache_dir"),
                                          run_dir=request.get("run_dir"))
            elif cmd == "sleep":
                progress("sleeping", 0.0)
                subprocess.run([sys.executable, "-c", f"import time; time.sleep({float(request.get('seconds', 60))})"],
                               check=True, stdout=subprocess.DEVNULL)
                result = {"slept": float(request.get("seconds", 60))}
            else:
                raise WorkerError(f"unknown command {cmd!r}; expected ping, device_info, infer, fine_tune, sleep or "
                                  "shutdown.")
        except KeyError as error:
            self.send({"id": rid, "type": "error", "message": f"request is missing the field {error}",
                       "error_type": "KeyError"})
        except Exception as error:  # noqa: BLE001 - every failure goes back to the GUI as a message
            traceback.print_exc(file=sys.stderr)
            self.send({"id": rid, "type": "error", "message": str(error), "error_type": type(error).__name__})
        else:
            self.send(dict(result, id=rid, type="result"))
        return True


def _protocol_stdout():
    """A private copy of the real stdout for protocol lines; fd 1 and sys.stdout then go to stderr."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return protocol


def parse_request(raw: bytes) -> dict:
    """One stdin line -> a request dict, or WorkerError saying why the line is not a request.

    Any bytes are survivable: invalid UTF-8, invalid or deeply nested JSON, JSON that is not an object, a
    ``cmd`` that is not a string and over-long lines are refused with a message, never a crash."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise WorkerError(f"request line of {len(raw)} bytes refused (at most {MAX_REQUEST_BYTES}).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WorkerError(f"not a JSON request: the line is not UTF-8 text ({error}).") from None
    try:
        request = json.loads(text)
    except RecursionError:
        raise WorkerError("not a JSON request: nested too deeply to be a request.") from None
    except ValueError as error:  # JSONDecodeError, and out-of-range numbers
        raise WorkerError(f"not a JSON request: {error}.") from None
    if not isinstance(request, dict):
        raise WorkerError(f"a request must be a JSON object with a 'cmd', got a JSON {type(request).__name__}.")
    if not isinstance(request.get("cmd"), str):
        raise WorkerError("a request needs a 'cmd' string (ping, infer, fine_tune, sleep or shutdown).")
    rid = request.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise WorkerError(f"a request 'id' must be a string or an integer, got a JSON {type(rid).__name__}.")
    return request


def _request_id(raw: bytes):
    """The id of a refused line when it has a readable one (so the sender's job hears about it)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    rid = value.get("id") if isinstance(value, dict) else None
    return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


def main() -> int:
    server = _Server(_protocol_stdout())
    server.send({"id": None, "type": "ready", "pid": os.getpid()})
    for raw in sys.stdin.buffer:
        raw = raw.strip()
        if not raw:
            continue
        try:
            request = parse_request(raw)
        except WorkerError as error:
            server.send({"id": _request_id(raw) if len(raw) <= MAX_REQUEST_BYTES else None, "type": "error",
                         "message": str(error), "error_type": "RequestError"})
            continue
        if not server.handle(request):
            break
    return 0


# ------------------------------------------------------------------------------------------- the client
def library_parent() -> Path:
    """The folder that holds the HeadCTMoLRELib package (goes on the worker's PYTHONPATH)."""
    return Path(__file__).resolve().parents[2]


def default_python_executable() -> str:
    """PythonSlicer inside the desktop Slicer, else this interpreter."""
    try:
        import slicer  # noqa: F401

        home = getattr(getattr(slicer, "app", None), "slicerHome", None)
    except ImportError:
        home = None
    if home:
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = Path(home) / "bin" / name
            if candidate.is_file():
                return str(candidate)
    return sys.executable


class WorkerClient:
    """The GUI side of the worker: start, send requests, poll messages without blocking, cancel.

    Messages are dicts as documented above; stderr lines arrive as {"type": "log", "stream": "stderr"}.
    Messages are routed by request id: ``poll(request_id)`` returns that request's messages (plus those
    addressed to no request) and leaves every other request's messages queued for its own poll, so jobs
    sharing the process never lose each other's results. ``exit_status`` is set once the process ended.
    """

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.messages: "queue.Queue[dict]" = queue.Queue()  # filled by the reader threads
        self.exit_status: int | None = None
        self._mailboxes: dict[Any, list[dict]] = {}
        self._route_lock = threading.Lock()
        self._next_id = 1
        self._threads: list[threading.Thread] = []

    def start(self, python_executable: str | None = None, env: dict | None = None) -> "WorkerClient":
        environment = dict(os.environ if env is None else env)
        paths = [str(library_parent())] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
        environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        environment.setdefault("PYTHONUNBUFFERED", "1")
        self.process = subprocess.Popen(
            [python_executable or default_python_executable(), "-m", "HeadCTMoLRELib.slicer.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
            text=True, encoding="utf-8", errors="replace", bufsize=1, creationflags=no_console_window_flags())
        for stream, reader in ((self.process.stdout, self._read_protocol), (self.process.stderr, self._read_stderr)):
            thread = threading.Thread(target=reader, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read_protocol(self, stream) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                message = None
            if not isinstance(message, dict):
                message = {"id": None, "type": "log", "stream": "stdout", "message": line[:2000]}
            self.messages.put(message)
        self.messages.put({"id": None, "type": "exit", "returncode": self.process.wait() if self.process else None})

    def _read_stderr(self, stream) -> None:
        for line in stream:
            self.messages.put({"id": None, "type": "log", "stream": "stderr", "message": line.rstrip("\n")})

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, request: dict) -> Any:
        """Send one request (an ``id`` is added when missing); returns the id."""
        if not self.running:
            raise WorkerError("the worker process is not running; start it (or see its log for why it ended).")
        request = dict(request)
        if request.get("id") is None:
            request["id"] = self._next_id
            self._next_id += 1
        self.process.stdin.write(json.dumps(request, default=json_default) + "\n")
        self.process.stdin.flush()
        return request["id"]

    def _route(self) -> None:
        """Move what the reader threads received into one mailbox per request id (None: no request)."""
        while True:
            try:
                message = self.messages.get_nowait()
            except queue.Empty:
                return
            rid = message.get("id")
            if isinstance(rid, (dict, list)):  # not a request id this client sent
                rid = None
            if message.get("type") == "exit":
                self.exit_status = message.get("returncode")
            self._mailboxes.setdefault(rid, []).append(message)

    def poll(self, request_id: Any = None) -> list[dict]:
        """Messages received since the last call (never blocks): those of ``request_id`` and those addressed
        to no request; with no ``request_id`` every queued message."""
        with self._route_lock:
            self._route()
            if request_id is None:
                out = [m for box in self._mailboxes.values() for m in box]
                self._mailboxes.clear()
                return out
            return self._mailboxes.pop(request_id, []) + self._mailboxes.pop(None, [])

    def forget(self, request_id: Any) -> None:
        """Drop whatever is still queued for a finished request."""
        with self._route_lock:
            self._mailboxes.pop(request_id, None)

    def wait_for(self, request_id, timeout_s: float = 600.0) -> tuple[dict, list[dict]]:
        """Block until ``request_id`` ends (tests and batch): returns (final message, its messages seen).
        Other requests' messages stay queued for them."""
        seen = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = self.poll(request_id)
            seen.extend(batch)  # the whole batch: nothing polled is dropped
            for message in batch:
                if message.get("id") == request_id and message.get("type") in ("result", "error"):
                    return message, seen
                if message.get("type") == "exit":
                    raise WorkerError(f"the worker ended (exit status {message.get('returncode')}) before answering "
                                      f"request {request_id}; its log: " + " | ".join(
                                          m.get("message", "") for m in seen if m.get("type") == "log")[-2000:])
            time.sleep(0.02)
        raise WorkerError(f"no answer to request {request_id} within {timeout_s:.0f} s.")

    def cancel(self, timeout_s: float = CANCEL_TIMEOUT_S) -> bool:
        """Kill the worker and all its children; True when every process was gone within ``timeout_s``."""
        if self.process is None:
            return True
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            family = root.children(recursive=True) + [root]
        except psutil.NoSuchProcess:
            family = []
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=timeout_s)
        try:
            self.process.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            pass
        return not alive

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit; kill it when it does not within ``timeout_s``."""
        if self.running:
            try:
                self.send({"cmd": "shutdown"})
                self.process.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired, WorkerError):
                self.cancel()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr) if self.process else ():
            try:
                stream.close()
            except OSError:
                pass


def no_console_window_flags() -> int:
    """``creationflags`` for the worker: on Windows no console window pops up (PythonSlicer is a console
    program); 0 elsewhere."""
    return getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000) if os.name == "nt" else 0


if __name__ == "__main__":
    sys.exit(main())
