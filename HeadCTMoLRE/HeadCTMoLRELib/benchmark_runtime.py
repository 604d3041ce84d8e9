"""What a user pays besides the forward (`headct-molre benchmark --runtime`): whole processes, memory, loading.

Three measurements, each printed with its median and spread (min-max) over at least 5 runs:

1. Whole-process `headct-molre infer` of the bundled sample (start to exit, as a user runs it) against
   - an import-only floor: a process that imports what any such pipeline needs (torch, transformers'
     DINOv3 model, SimpleITK) and exits;
   - a naive pipeline: SimpleITK read + resample to 1 x 1 x 4 mm + the three HU windows + bilinear resize,
     then transformers' ``DINOv3ViTModel.from_pretrained`` and its forward, 8 slices at a time (default
     threads and fp32: what a script written from the libraries' documentation does).
   All three use the same backbone weights (a random DINOv3 of the chosen size, written locally with
   ``save_pretrained``; the product's bundle carries a copy of them).
2. Preprocessing peak memory for a large input (default 512 x 512 x 600 voxels, the sample resampled
   to that grid): resident-set high-water of `load_ct` + `preprocess` above the process after its imports.
3. Model load after imports: `load_bundle` + `build_model` + `optimize_for_inference` (what `infer` does the
   first time) against ``from_pretrained`` of the same weights, each in a fresh process and with every
   weight read once (``from_pretrained`` maps the file and reads it only when touched), with the peak
   memory of each stage.

Memory is the stage's own: the kernel's resident high-water mark (VmHWM) is reset by writing "5" to
/proc/self/clear_refs before the stage and read after it (Linux; elsewhere the figures are left out).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

MIN_REPEATS = 5

NAIVE_PIPELINE = r"""
import sys
import numpy as np, SimpleITK as sitk, torch
from transformers import DINOv3ViTModel
image = sitk.ReadImage(sys.argv[1])
spacing = (1.0, 1.0, 4.0)
size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                      image.GetDirection(), -1024.0, sitk.sitkFloat32)
hu = sitk.GetArrayFromImage(image)  # (z, y, x)
windows = [(0.0, 80.0), (-20.0, 180.0), (-800.0, 2000.0)]
slices = np.stack([np.clip((hu - low) / (high - low), 0.0, 1.0) for low, high in windows], axis=1)
pixels = torch.nn.functional.interpolate(torch.from_numpy(slices), size=(224, 224), mode="bilinear")
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
pixels = (pixels - mean) / std
model = DINOv3ViTModel.from_pretrained(sys.argv[2]).eval()
with torch.inference_mode():
    features = torch.cat([model(pixel_values=pixels[i:i + 8]).pooler_output for i in range(0, len(pixels), 8)])
head = torch.nn.Linear(features.shape[-1], 75)
print(torch.sigmoid(head(features.mean(0)))[:3].tolist())
"""

IMPORT_FLOOR = "import torch, SimpleITK, transformers; transformers.DINOv3ViTModel"


# ------------------------------------------------------------------------------------------- helpers
def spread(values: list[float]) -> dict:
    """{"median", "min", "max", "runs"} of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _return_freed_memory() -> None:
    """Give memory freed earlier back to the system (glibc ``malloc_trim``), so that a stage that reuses it
    still shows as resident growth; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def stage_peak_mib(fn: Callable[[], object]) -> tuple[object, float | None]:
    """Run ``fn``; returns (its result, resident high-water during it minus resident before it, MiB).
    Freed memory is returned to the system first, so that memory ``fn`` reuses from earlier work counts."""
    _return_freed_memory()
    before = _status_kib("VmRSS")
    ok = _reset_high_water()
    result = fn()
    high = _status_kib("VmHWM")
    if not ok or before is None or high is None:
        return result, None
    return result, (high - before) / 1024


def run_process(argv: list[str], env: dict | None = None) -> dict:
    """Run a whole process; {"wall_s", "cpu_s", "peak_mib", "returncode"} from the kernel's accounting."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... exited with {process.returncode}: {stderr[-1500:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def _processes(commands: dict[str, list[str]], repeats: int, log) -> dict:
    """Each command ``repeats`` times, interleaved (A B C A B C ...) so that drift hits all alike."""
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for name, argv in commands.items():  # one warm-up each: file cache, compiled bytecode
        run_process(argv)
    for index in range(repeats):
        for name, argv in commands.items():
            log(f"  run {index + 1}/{repeats}: {name}")
            runs[name].append(run_process(argv))
    return {name: {key: spread([r[key] for r in items]) for key in ("wall_s", "cpu_s", "peak_mib")}
            for name, items in runs.items()}


# ---------------------------------------------------------------------------------------- fixtures
def make_backbone_and_bundle(folder: Path, size: str, image_size: int = 224) -> tuple[Path, Path]:
    """A random DINOv3 of ``size`` saved with save_pretrained, and a product bundle carrying its weights."""
    import torch

    from . import findings
    from .ct import preprocess
    from .model import backbones, bundle, classifier as model

    backbone_dir, bundle_dir = folder / f"dinov3-{size}", folder / f"bundle-{size}"
    if not (backbone_dir / "config.json").is_file():
        spec = backbones.BackboneSpec(family="dinov3", size=size, image_size=image_size)
        config_class, model_class = backbones.FAMILIES["dinov3"].classes()
        torch.manual_seed(0)
        model_class(config_class(**backbones.random_init_config_dict(spec))).save_pretrained(backbone_dir)
    if not (bundle_dir / "manifest.json").is_file():
        catalog = findings.default_catalog()
        spec = backbones.BackboneSpec(family="dinov3", size=size, image_size=image_size, source=str(backbone_dir))
        classifier = model.build_classifier(model.ModelConfig(backbone=spec, num_findings=len(catalog)),
                                            backbone_weights_dir=backbone_dir)
        bundle.save_bundle(classifier, bundle_dir, catalog=catalog,
                           preprocessing=preprocess.PreprocessConfig(image_size=image_size),
                           backbone_weights_dir=backbone_dir, bundle_backbone=True)
    return backbone_dir, bundle_dir


def make_large_input(source: Path, out: Path, shape_xyz=(512, 512, 600)) -> Path:
    """``source`` resampled onto a grid of ``shape_xyz`` voxels over the same extent, stored as int16."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, shape_xyz)]
    large = sitk.Resample(image, [int(n) for n in shape_xyz], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                          spacing, image.GetDirection(), -1024.0, sitk.sitkInt16)
    sitk.WriteImage(large, str(out))
    return out


# ------------------------------------------------------------------------------------- measurements
def whole_process_infer(source: Path, bundle_dir: Path, backbone_dir: Path, repeats: int, log) -> dict:
    python = sys.executable
    commands = {
        "product": [python, "-m", "HeadCTMoLRELib.cli", "infer", str(source), "--model", str(bundle_dir), "--json"],
        "import_floor": [python, "-c", IMPORT_FLOOR],
        "naive": [python, "-c", NAIVE_PIPELINE, str(source), str(backbone_dir)],
    }
    result = _processes(commands, repeats, log)
    result["product_over_naive"] = result["product"]["wall_s"]["median"] / result["naive"]["wall_s"]["median"]
    return result


_PREPROCESS_PROBE = r"""
import json, sys
from HeadCTMoLRELib.benchmark_runtime import stage_peak_mib
from HeadCTMoLRELib.ct.loader import load_ct
from HeadCTMoLRELib.ct.preprocess import PreprocessConfig, preprocess
import torch, SimpleITK
stack, peak = stage_peak_mib(lambda: preprocess(load_ct(sys.argv[1]), PreprocessConfig()))
print(json.dumps({"peak_above_imports_mib": peak, "slices": list(stack.pixels.shape)}))
"""


def preprocessing_peak(large_input: Path, repeats: int) -> dict:
    """Peak resident memory of load_ct + preprocess above the imports, each run in a fresh process."""
    peaks, seconds, shape = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, "-c", _PREPROCESS_PROBE, str(large_input)], capture_output=True,
                                   text=True, check=True)
        seconds.append(time.perf_counter() - start)
        probe = json.loads(completed.stdout.strip().splitlines()[-1])
        if probe["peak_above_imports_mib"] is None:
            return {"unavailable": "no /proc/self/clear_refs on this system"}
        peaks.append(probe["peak_above_imports_mib"])
        shape = probe["slices"]
    return {"peak_above_imports_mib": spread(peaks), "process_wall_s": spread(seconds), "stack_shape": shape}


_LOAD_PROBE = r"""
import gc, json, sys, time
import torch
from HeadCTMoLRELib import inference
from HeadCTMoLRELib.benchmark_runtime import stage_peak_mib
from HeadCTMoLRELib.model import backbones, bundle
inference.import_runtime("dinov3")
import safetensors.torch
kind, bundle_dir, backbone_dir = sys.argv[1:4]
_, model_class = backbones.FAMILIES["dinov3"].classes()

def touch(model):  # read every weight once (page in lazily mapped files): what a forward does first
    with torch.no_grad():
        return float(sum(float(p.double().sum()) for p in model.parameters()))

def product():  # what `infer` does the first time: inference.cached_model
    inference.clear_model_cache()
    classifier = inference.cached_model(bundle.load_bundle(bundle_dir), torch.device("cpu"), "fp32")
    touch(classifier)
    return classifier

def reference():
    model = model_class.from_pretrained(backbone_dir).eval()
    touch(model)
    return model

if kind == "product_verification_cached":
    bundle.load_bundle(bundle_dir)  # verified before the stage, as a second case in the same process
fn = reference if kind == "from_pretrained" else product
gc.collect()
cpu0, start = time.process_time(), time.perf_counter()
model, peak = stage_peak_mib(fn)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu0, "peak_mib": peak}))
"""


def model_load(bundle_dir: Path, backbone_dir: Path, repeats: int, log) -> dict:
    """Product load vs from_pretrained, each in a fresh process after its imports, every weight touched once
    (from_pretrained maps the file lazily; the product reads it while checking it): wall and CPU seconds of
    the stage and its peak memory. Product: load_bundle + build_model + optimize_for_inference, with the
    first verification (hashing every file) or with it cached (a later case in the same process)."""
    kinds = ("product_verification_cached", "product_with_verification", "from_pretrained")
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for index in range(repeats):
        for kind in kinds:
            log(f"  load {index + 1}/{repeats}: {kind}")
            completed = subprocess.run([sys.executable, "-c", _LOAD_PROBE, kind, str(bundle_dir), str(backbone_dir)],
                                       capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    result = {kind: {key: spread([r[key] for r in items]) for key in ("seconds", "cpu_s", "peak_mib")
                     if all(r[key] is not None for r in items)} for kind, items in runs.items()}
    reference_s = result["from_pretrained"]["seconds"]["median"]
    result["cached_over_from_pretrained"] = result["product_verification_cached"]["seconds"]["median"] / reference_s
    result["verified_over_from_pretrained"] = result["product_with_verification"]["seconds"]["median"] / reference_s
    return result


def run_runtime_benchmark(*, size: str = "base", source: Path | None = None, repeats: int = MIN_REPEATS,
                          large_shape=(512, 512, 600), workdir: Path | None = None, log=print) -> dict:
    from .resources import default_sample_path
    from .threads import available_cores

    repeats = max(MIN_REPEATS, int(repeats))
    source = Path(source) if source else default_sample_path()
    with tempfile.TemporaryDirectory(prefix="headct-bench-") as tmp:
        folder = Path(workdir) if workdir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        log(f"making a random DINOv3 {size} backbone and its bundle in {folder}")
        backbone_dir, bundle_dir = make_backbone_and_bundle(folder, size)
        report = {"size": size, "source": str(source), "repeats": repeats, "cores": available_cores(),
                  "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
        log("model load after imports")
        report["model_load"] = model_load(bundle_dir, backbone_dir, repeats, log)
        large = folder / "large.nii.gz"
        if not large.is_file():
            make_large_input(source, large, large_shape)
        log(f"preprocessing peak memory, {'x'.join(map(str, large_shape))} voxels")
        report["preprocessing"] = {"shape_xyz": list(large_shape), **preprocessing_peak(large, repeats)}
        log("whole-process infer, import floor and naive pipeline")
        report["whole_process"] = whole_process_infer(source, bundle_dir, backbone_dir, repeats, log)
        report["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return report


def _fmt(s: dict, scale: float = 1.0, unit: str = "s", digits: int = 2) -> str:
    return (f"{s['median'] * scale:.{digits}f} {unit} (min {s['min'] * scale:.{digits}f}, "
            f"max {s['max'] * scale:.{digits}f}, n={s['runs']})")


def format_runtime_report(report: dict) -> str:
    lines = [f"runtime benchmark, DINOv3 {report['size']}, {report['cores']} core(s), load average "
             f"{report.get('load_average')} -> {report.get('load_average_after')}"]
    load = report["model_load"]
    lines.append("model load after imports (median, min-max):")
    for name in ("product_verification_cached", "product_with_verification", "from_pretrained"):
        entry = load[name]
        memory = f"; stage peak {_fmt(entry['peak_mib'], unit='MiB', digits=0)}" if "peak_mib" in entry else ""
        lines.append(f"  {name}: {_fmt(entry['seconds'])}; cpu {entry['cpu_s']['median']:.2f} s{memory}")
    lines.append(f"  product / from_pretrained: {load['cached_over_from_pretrained']:.2f}x (verification cached), "
                 f"{load['verified_over_from_pretrained']:.2f}x (with the first verification)   target <= 1.5x")
    pre = report["preprocessing"]
    if "peak_above_imports_mib" in pre:
        lines.append(f"preprocessing {'x'.join(map(str, pre['shape_xyz']))}: peak above imports "
                     f"{_fmt(pre['peak_above_imports_mib'], unit='MiB', digits=0)}   target < 1024 MiB; "
                     f"process {_fmt(pre['process_wall_s'])}")
    else:
        lines.append(f"preprocessing peak: {pre.get('unavailable')}")
    whole = report["whole_process"]
    lines.append("whole process on the sample (wall; cpu; peak RSS):")
    for name in ("product", "import_floor", "naive"):
        entry = whole[name]
        lines.append(f"  {name}: {_fmt(entry['wall_s'])}; cpu {entry['cpu_s']['median']:.2f} s; "
                     f"peak {entry['peak_mib']['median']:.0f} MiB")
    lines.append(f"  product / naive: {whole['product_over_naive']:.2f}x   target <= 1.0x")
    return "\n".join(lines)
