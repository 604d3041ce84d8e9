"""Inference: a head CT and a model bundle in, a `Prediction` out.

    predict(source, bundle, device="auto") -> Prediction

Steps: ctio.load_ct (HU, true geometry) -> preprocess (S x 3 x H x W slice stack in the head frame) ->
classifier forward on the chosen device and precision -> per-finding probabilities (the bundle's
calibration: sigmoid((logit - prior offset) / temperature), see calibration.py), attention per
slice, router weights per slice, per-slice contributions to each logit, all tied to the slice
positions in the input's patient space so that presenters can draw them on the original image.

Device choice (`device="auto"`): CUDA, then Apple MPS, then CPU. Precision (`precision="auto"`): bf16
autocast on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16 (AVX512-BF16 / AMX),
fp32 otherwise and on MPS. CUDA out-of-memory halves the slice chunk and retries, then falls back to
the CPU with a warning. Loaded models are cached (keyed by bundle fingerprint, device, precision).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import calibration
from .model.bundle import Bundle, build_model, load_bundle

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
_CPU_DEFAULT_CHUNK = 8  # slices per backbone call on the CPU: bounds activation memory


class DeviceError(ValueError):
    """The requested device cannot be used; the message says why and what to do."""


# ------------------------------------------------------------------------------------------- devices
def device_report() -> dict:
    """Facts about torch and the accelerators, for `info`, the Slicer panel and bug reports."""
    import torch

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu_bf16": cpu_supports_bf16(),
        "cpu_threads": torch.get_num_threads(),
        "gpus": [],
    }
    if report["cuda_available"]:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            report["gpus"].append(
                {"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": f"{props.major}.{props.minor}"}
            )
    return report


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (where bf16 autocast is faster)."""
    try:
        import torch

        if hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported"):
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - capability probe only
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def select_device(requested: str = "auto"):
    """Resolve "auto"/"cuda"/"cuda:N"/"mps"/"cpu" to a torch.device, with an actionable error."""
    import torch

    requested = (requested or "auto").lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            why = (
                f"this torch {torch.__version__} is a CPU-only build"
                if torch.version.cuda is None
                else "no NVIDIA GPU is visible (driver missing, CUDA_VISIBLE_DEVICES empty, or the GPU is busy)"
            )
            raise DeviceError(
                f"CUDA was requested but {why}. Install a CUDA build of torch (Slicer: PyTorch extension, "
                f"'Install PyTorch' with CUDA) or choose --device cpu / auto."
            )
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{requested} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    if requested == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("Apple MPS was requested but is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    if requested == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def select_precision(device, requested: str = "auto") -> str:
    """"fp32", "bf16" or "fp16" for autocast on ``device``."""
    import torch

    requested = (requested or "auto").lower()
    if requested not in PRECISION_CHOICES:
        raise DeviceError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def _autocast(device, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ model cache
_MODEL_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_MODEL_CACHE_SIZE = 2


def cached_model(bundle: Bundle, device, precision: str = "fp32", *, backbone_folder=None):
    """The bundle's classifier on ``device``, optimised for inference; built once, then reused."""
    key = (str(bundle.path), bundle.fingerprint, str(device), precision, str(backbone_folder or ""))
    if key in _MODEL_CACHE:
        _MODEL_CACHE.move_to_end(key)
        return _MODEL_CACHE[key]
    from .threads import threads_for_work, torch_threads

    # building is memory-bound and its GEMMs tiny (LoRA B @ A): one thread; several only spin (10x slower
    # LoRA merge measured on a busy 2-core machine)
    with torch_threads(threads_for_work(0.0)):
        classifier = build_model(bundle, backbone_folder=backbone_folder)
        optimize_for_inference(classifier, device, precision)
    _MODEL_CACHE[key] = classifier
    while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
        _MODEL_CACHE.popitem(last=False)
    return classifier


def merge_lora_for_inference(classifier) -> int:
    """Fold every LoRA update into its frozen base weight (W + s B A), in place; returns the count.

    The output is unchanged (to float rounding) and each adapted Linear becomes one matmul, which
    removes ~4 small kernels per layer: the inference-only models of the cache use this. Never save
    a merged model as a bundle (its base weights then include the adapters).
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for module in classifier.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()
            merged += 1
    return merged


def optimize_for_inference(classifier, device, precision: str) -> None:
    """Make an inference-only model fast, in place: LoRA merged into the weights, DINOv3 attention fused
    (one QKV GEMM, rotary embedding without copies), and on GPUs the backbone's weights stored in the
    autocast dtype. The outputs are those of the trained model (to float rounding). Never train or save
    a model after this."""
    from .model.fused_attention import fuse_dinov3_attention

    merge_lora_for_inference(classifier)
    fuse_dinov3_attention(classifier)
    classifier.to(device).eval()
    if device.type == "cuda":
        cast_encoder_for_inference(classifier, precision)


def cast_encoder_for_inference(classifier, precision: str) -> None:
    """Store the backbone's (merged) weights in the autocast dtype, so that each forward skips the
    weight casts; pooling and the head stay float32 (the model runs them outside autocast)."""
    import torch

    if precision in ("bf16", "fp16"):
        classifier.encoder.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        if getattr(classifier, "molre", None) is not None:
            classifier.molre.to(torch.bfloat16 if precision == "bf16" else torch.float16)


def clear_model_cache() -> None:
    _MODEL_CACHE.clear()


# ------------------------------------------------------------------------------------------ prediction
@dataclass
class Prediction:
    """The result of one inference.

    Arrays (numpy): ``probabilities``, ``logits``, ``thresholds`` (C,) in catalog order;
    ``attention`` (S,) (sums to 1 over valid slices; None for 3-D backbones); ``router_weights`` (S, K)
    (None for the LoRA-only baseline; (1, K) for 3-D backbones, one decision per volume);
    ``dominant_expert`` (S,) int 0..K-1, -1 on slices outside the scan; ``contributions`` (S, C):
    each slice's additive share of each finding's logit (sum over S = logit - bias);
    ``slice_valid`` (S,) bool; ``slice_positions_mm`` (S, 3) slice centres in the input's patient LPS mm.
    ``stack`` is the preprocess.SliceStack (geometry back to the input), ``volume`` the ctio.CTVolume.
    """

    catalog: Any
    probabilities: np.ndarray
    logits: np.ndarray
    thresholds: np.ndarray
    attention: np.ndarray | None
    router_weights: np.ndarray | None
    dominant_expert: np.ndarray | None
    contributions: np.ndarray
    slice_valid: np.ndarray
    slice_positions_mm: np.ndarray
    stack: Any
    volume: Any
    timings_s: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    model_status: dict = field(default_factory=dict)  # model.status.BundleStatus.to_json() of the bundle

    @property
    def status_label(self) -> str:
        """One line saying why this model's findings mean nothing (synthetic, untrained, random backbone);
        empty for a model trained on real data with a real backbone."""
        return str(self.model_status.get("label", ""))

    # -- tables -------------------------------------------------------------------------------------
    def findings(self) -> list[dict]:
        """One dict per finding in catalog order: id, name, category, probability, threshold, positive,
        top_slice (index of the slice inside the scan that contributed most, see :meth:`top_slice`) and its
        position in patient LPS mm."""
        rows = []
        for index, finding in enumerate(self.catalog.findings):
            top = self.top_slice(index)
            rows.append(
                {
                    "id": finding.id,
                    "name": finding.name,
                    "category": finding.category,
                    "probability": float(self.probabilities[index]),
                    "threshold": float(self.thresholds[index]),
                    "positive": bool(self.probabilities[index] >= self.thresholds[index]),
                    "top_slice": top,
                    "top_slice_position_mm": [float(v) for v in self.slice_positions_mm[min(top, len(self.slice_positions_mm) - 1)]],
                }
            )
        return rows

    def top_slice(self, finding_index: int) -> int:
        """Index of the slice that contributed most to finding ``finding_index``'s logit, among the
        slices inside the scan (``slice_valid``): padded slices outside it carry no image and are never
        the answer (the Slicer jump and the TSV use this). 0 for a 3-D backbone's single contribution."""
        values = np.asarray(self.contributions[:, finding_index], dtype=np.float64)
        if len(values) <= 1:
            return 0
        valid = np.asarray(self.slice_valid, dtype=bool)
        if len(valid) == len(values) and valid.any():
            values = np.where(valid, values, -np.inf)
        return int(np.argmax(values))

    # -- maps in the input's own geometry -------------------------------------------------------------
    def attention_image(self):
        """Attention per slice as a float32 SimpleITK image on the input's grid (0 outside the head)."""
        from .ct.slice_stack import stack_to_image

        values = self.attention if self.attention is not None else np.zeros(len(self.slice_valid), np.float32)
        return stack_to_image(values.astype(np.float32), self.stack, self.volume.image, interpolation="linear")

    def expert_image(self):
        """Dominant expert per slice as a uint8 label image on the input's grid: 1..K, 0 = none."""
        import SimpleITK as sitk

        from .ct.slice_stack import stack_to_image

        if self.dominant_expert is None or len(self.dominant_expert) != len(self.slice_valid):
            labels = np.zeros(len(self.slice_valid), np.float32)
        else:
            labels = np.where(self.dominant_expert >= 0, self.dominant_expert + 1, 0).astype(np.float32)
        image = stack_to_image(labels, self.stack, self.volume.image, interpolation="nearest")
        return sitk.Cast(image, sitk.sitkUInt8)

    def contribution_image(self, finding_id: str):
        """One finding's per-slice logit contribution as a float32 image on the input's grid."""
        from .ct.slice_stack import stack_to_image

        index = self.catalog.index_of(finding_id)
        values = self.contributions[:, index].astype(np.float32)
        if len(values) != len(self.slice_valid):  # 3-D backbone: one value for the whole volume
            values = np.full(len(self.slice_valid), float(values[0]), np.float32)
        return stack_to_image(values, self.stack, self.volume.image, interpolation="linear")

    def to_json(self) -> dict:
        def arr(a):
            return None if a is None else np.asarray(a).tolist()

        return {
            "findings": self.findings(),
            "attention": arr(self.attention),
            "router_weights": arr(self.router_weights),
            "dominant_expert": arr(self.dominant_expert),
            "slice_valid": arr(self.slice_valid),
            "slice_positions_mm": arr(self.slice_positions_mm),
            "timings_s": self.timings_s,
            "provenance": self.provenance,
            "warnings": list(self.warnings),
            "model_status": dict(self.model_status),
        }


# ---------------------------------------------------------------------------------------------- predict
def _as_bundle(bundle) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def _forward(classifier, pixels, slice_mask, device, precision: str, chunk_size):
    import torch

    with torch.inference_mode(), _autocast(device, precision):
        output = classifier(pixels.to(device), slice_mask.to(device), chunk_size=chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return output


def run_model(classifier, stack, device, precision: str, *, chunk_size=None, log=None):
    """Run ``classifier`` on one SliceStack; returns (output on CPU as numpy dict, device, notes).

    On CUDA out-of-memory the slice chunk is halved down to 1, then the CPU is used, with a warning.
    """
    import torch

    notes: list[str] = []
    pixels = torch.from_numpy(np.ascontiguousarray(stack.pixels))[None]  # (1, S, 3, H, W)
    slice_mask = torch.from_numpy(np.asarray(stack.slice_valid, dtype=bool))[None]  # (1, S)
    if chunk_size is None and device.type == "cpu":
        chunk_size = _CPU_DEFAULT_CHUNK
    while True:
        try:
            output = _forward(classifier, pixels, slice_mask, device, precision, chunk_size)
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            current = chunk_size or pixels.shape[1]
            if current > 1:
                chunk_size = max(1, current // 2)
                notes.append(f"CUDA out of memory: retrying with {chunk_size} slices per chunk")
                if log:
                    log(notes[-1])
                continue
            notes.append("CUDA out of memory even one slice at a time: falling back to the CPU (slower)")
            if log:
                log(notes[-1])
            device = torch.device("cpu")
            precision = select_precision(device)
            classifier = classifier.to(device).float()  # GPU models keep bf16 weights; the CPU path wants fp32
            chunk_size = _CPU_DEFAULT_CHUNK
    result = {
        "logits": output.logits.float().cpu().numpy()[0],
        "attention": None if output.attention is None else output.attention.float().cpu().numpy()[0],
        "router_weights": None if output.router_weights is None else output.router_weights.float().cpu().numpy()[0],
        "contributions": output.contributions.float().cpu().numpy()[0],
    }
    return result, device, precision, notes


#: Rough arithmetic per input voxel of read-out + filtering + resampling (for the thread policy only).
PREPROCESS_FLOPS_PER_VOXEL = 20.0


def import_runtime(family: str | None = None) -> float:
    """Import what a forward needs (torch, our model code, and with ``family`` that backbone family's
    classes); returns the seconds it took (about 0 once imported). Lets `predict` report start-up apart
    from building the model."""
    import sys

    start = time.perf_counter()
    import torch  # noqa: F401

    from .model import backbones, classifier  # noqa: F401

    if family is not None and family in backbones.FAMILIES:
        backbones.FAMILIES[family].classes()
        if "peft" not in sys.modules:
            import peft  # noqa: F401
    return time.perf_counter() - start


def _voxel_count(volume) -> int:
    image = getattr(volume, "image", None)
    if image is not None and hasattr(image, "GetNumberOfPixels"):
        return int(image.GetNumberOfPixels())
    return int(np.prod(getattr(volume, "shape", (0,))))


def forward_flops_per_slice(classifier) -> float:
    """Approximate FLOPs of one slice through the backbone: 2 x parameters x tokens (a ViT's GEMMs)."""
    encoder = getattr(classifier, "encoder", None)
    config = getattr(encoder, "hf_config", None)
    parameters = sum(p.numel() for p in classifier.parameters())
    size, patch = getattr(config, "image_size", 224), getattr(config, "patch_size", 16)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    tokens = (int(size) // max(int(patch), 1)) ** 2 + 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return 2.0 * parameters * tokens


def _cpu_threads(device, flops_per_call: float, threads):
    """torch threads for CPU work of this size (threads.py); nothing changes on accelerators."""
    from .threads import threads_for_work, torch_threads

    if device.type != "cpu":
        return contextlib.nullcontext()
    return torch_threads(threads_for_work(flops_per_call, threads))


def predict(
    source,
    bundle,
    device: str = "auto",
    *,
    precision: str = "auto",
    series: str | None = None,
    hu_offset: float | None = None,
    chunk_size: int | None = None,
    backbone_folder: str | os.PathLike | None = None,
    threads: int | str | None = None,
    log=None,
) -> Prediction:
    """Run a bundle on one head CT.

    ``source``: image file / DICOM folder / list of DICOM files (see ctio.load_ct), or an already
    loaded ctio.CTVolume. ``bundle``: a bundle folder or a loaded bundle.Bundle. ``device``: auto, cuda,
    cuda:N, mps, cpu. ``precision``: auto, fp32, bf16, fp16. ``chunk_size``: slices per backbone call
    (None: all at once on GPU, 8 on CPU). ``threads``: CPU threads for torch (None: $HEADCT_THREADS, else
    chosen by work size, see threads.py). ``log``: optional callable(str) for progress messages.
    ``timings_s``: imports (torch, transformers... the first time in a process, else 0), model (build, or
    the cache), read, preprocess, forward, total (everything, imports included).
    Raises ctio.CTInputError for refused input, bundle.BundleError for an unusable bundle,
    DeviceError for an unusable device.
    """
    from .ct import loader as ctio
    from .ct.preprocess import preprocess
    from .model.status import bundle_status

    timings: dict[str, float] = {}
    start = time.perf_counter()
    timings["imports"] = import_runtime()
    t0 = time.perf_counter()
    the_bundle = _as_bundle(bundle)  # manifest checks; file hashes once per change of the bundle's files
    family_imports = import_runtime(the_bundle.model_config.backbone.family)
    timings["imports"] += family_imports
    torch_device = select_device(device)
    chosen_precision = select_precision(torch_device, precision)
    classifier = cached_model(the_bundle, torch_device, chosen_precision, backbone_folder=backbone_folder)
    timings["model"] = time.perf_counter() - t0 - family_imports  # verify + build (or the cache)

    t0 = time.perf_counter()
    volume = source if isinstance(source, ctio.CTVolume) else ctio.load_ct(source, series=series, hu_offset=hu_offset)
    timings["read"] = time.perf_counter() - t0
    if log:
        log("preprocessing")
    t0 = time.perf_counter()
    with _cpu_threads(torch_device, PREPROCESS_FLOPS_PER_VOXEL * _voxel_count(volume), threads):
        stack = preprocess(volume, the_bundle.preprocessing, device=torch_device)
    timings["preprocess"] = time.perf_counter() - t0
    if log:
        log(f"running the model on {torch_device} ({chosen_precision})")
    t0 = time.perf_counter()
    slices_per_call = chunk_size or (_CPU_DEFAULT_CHUNK if torch_device.type == "cpu" else len(stack.slice_valid))
    with _cpu_threads(torch_device, forward_flops_per_slice(classifier) * slices_per_call, threads):
        result, used_device, used_precision, notes = run_model(
            classifier, stack, torch_device, chosen_precision, chunk_size=chunk_size, log=log
        )
    timings["forward"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    offsets = calibration.logit_offsets(the_bundle.manifest, the_bundle.catalog.ids)  # focal prior correction
    logits = calibration.calibrated_logits(result["logits"], offsets, the_bundle.temperature)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    router = result["router_weights"]
    slice_valid = np.asarray(stack.slice_valid, dtype=bool)
    dominant = None
    if router is not None and router.shape[0] == len(slice_valid):
        dominant = np.where(slice_valid, np.argmax(router, axis=-1), -1).astype(np.int64)
    elif router is not None:  # 3-D backbone: one routing decision per volume
        dominant = np.argmax(router, axis=-1).astype(np.int64)

    provenance = {
        "input": dict(volume.provenance),
        "bundle": {"name": the_bundle.name, "path": str(the_bundle.path), "fingerprint": the_bundle.fingerprint},
        "device": str(used_device),
        "precision": used_precision,
        "alignment": stack.alignment,
    }
    return Prediction(
        catalog=the_bundle.catalog,
        probabilities=probabilities.astype(np.float64),
        logits=logits.astype(np.float64),
        thresholds=np.asarray(the_bundle.threshold_vector(), dtype=np.float64),
        attention=result["attention"],
        router_weights=router,
        dominant_expert=dominant,
        contributions=result["contributions"] / max(the_bundle.temperature, 1e-6),
        slice_valid=slice_valid,
        slice_positions_mm=np.asarray(stack.slice_positions_mm, dtype=np.float64),
        stack=stack,
        volume=volume,
        timings_s=timings,
        provenance=provenance,
        warnings=list(getattr(volume, "warnings", [])) + list(stack.warnings) + notes,
        model_status=bundle_status(the_bundle.manifest).to_json(),
    )
