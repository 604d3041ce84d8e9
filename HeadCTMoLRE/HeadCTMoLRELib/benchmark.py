"""Speed benchmark: time per stage, FLOPs per volume, achieved TFLOP/s and peak memory.

For each backbone size (random weights, DINOv3 ViT family by default) it reports:
- forward: the classifier on one volume (1 x S x 3 x H x W) already on the device, in each execution
  mode: ``eager`` (peft LoRA layers as trained), ``merged`` (LoRA folded into the frozen weights),
  ``fused`` (merged + fused DINOv3 attention, as inference uses), ``graph`` (fused + one CUDA graph
  replay, CUDA only), ``graph_bf16_weights`` (the same with bf16 backbone weights) and ``compiled``
  (torch.compile, opt-in with --compile since compiling takes minutes);
- end to end: `inference.predict` from the image file on disk (read, preprocess, forward, total) with
  the model already loaded, as a user's second and later cases run;
- FLOPs per volume counted by torch's FlopCounterMode, the achieved TFLOP/s against the device's
  measured dense matmul peak (bf16/fp32), and peak memory (CUDA allocator, or process RSS on CPU).

Medians of ``repeats`` runs after warm-up. Run: ``headct-molre benchmark`` or ``scripts/benchmark.py``.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

DEFAULT_SIZES = ("tiny", "small", "base")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_matmul_peak_tflops(device, precision: str) -> float:
    """Dense matmul throughput of this device in TFLOP/s (the 'peak' achieved FLOP rates compare to)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _median_time(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def count_flops(classifier, pixels, slice_mask, device, precision: str) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .inference import _autocast

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), _autocast(device, precision), counter:
        classifier(pixels, slice_mask)
    return int(counter.get_total_flops())


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _profile_table(fn: Callable[[], object], device, rows: int = 18) -> str:
    """The GPU kernels that take the most time in ``fn`` (a torch.profiler table)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn()
        _sync(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


class _GraphedForward:
    """One CUDA graph of the classifier for a fixed input shape: replays with no launch overhead."""

    def __init__(self, classifier, pixels, slice_mask, device, precision: str):
        import torch

        from .inference import _autocast

        self.static_pixels = pixels.clone()
        self.static_mask = slice_mask.clone()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode(), _autocast(device, precision):
            for _ in range(3):
                classifier(self.static_pixels, self.static_mask)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode(), _autocast(device, precision):
            self.static_output = classifier(self.static_pixels, self.static_mask)

    def __call__(self):
        self.graph.replay()
        return self.static_output


def benchmark_size(
    size: str,
    *,
    family: str = "dinov3",
    device: str = "auto",
    precision: str = "auto",
    source: str | Path | None = None,
    num_slices: int = 40,
    image_size: int = 224,
    repeats: int = 5,
    compile_model: bool = False,
    profile: bool = False,
    compile_mode: str = "max-autotune",
    log: Callable[[str], None] = print,
) -> dict:
    import torch

    from .model import backbones, bundle, classifier as model
    from . import findings, inference
    from .ct import preprocess
    from .model.fused_attention import fuse_dinov3_attention

    torch_device = inference.select_device(device)
    chosen = inference.select_precision(torch_device, precision)
    catalog = findings.default_catalog()
    torch.manual_seed(0)
    spec = backbones.BackboneSpec(family=family, size=size, image_size=image_size)
    config = model.ModelConfig(backbone=spec, num_findings=len(catalog))
    classifier = model.build_classifier(config).eval()
    counts = model.count_parameters(classifier)
    pixels = torch.rand(1, num_slices, backbones.input_channels(family, size), image_size, image_size, device=torch_device)
    slice_mask = torch.ones(1, num_slices, dtype=torch.bool, device=torch_device)
    classifier.to(torch_device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    result: dict = {
        "family": family, "size": size, "device": str(torch_device), "precision": chosen,
        "slices": num_slices, "image_size": image_size, "parameters": counts,
    }
    if torch_device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(torch_device)
    result["flops_per_volume"] = count_flops(classifier, pixels, slice_mask, torch_device, chosen)

    def forward(module):
        def run():
            with torch.inference_mode(), inference._autocast(torch_device, chosen):
                return module(pixels, slice_mask)
        return run

    cpu = torch_device.type == "cpu"
    cpu_repeats = max(1, min(repeats, 2)) if size not in ("tiny",) else repeats
    forward_s = {}
    log(f"[{size}] eager forward")
    forward_s["eager"] = _median_time(forward(classifier), torch_device, cpu_repeats if cpu else repeats, warmup=1 if cpu else 3)
    inference.merge_lora_for_inference(classifier)
    log(f"[{size}] merged forward")
    forward_s["merged"] = _median_time(forward(classifier), torch_device, cpu_repeats if cpu else repeats, warmup=1 if cpu else 3)
    if fuse_dinov3_attention(classifier):
        log(f"[{size}] merged + fused attention forward")
        forward_s["fused"] = _median_time(forward(classifier), torch_device, cpu_repeats if cpu else repeats, warmup=1 if cpu else 3)
    if torch_device.type == "cuda":
        log(f"[{size}] CUDA graph forward")
        graphed = _GraphedForward(classifier, pixels, slice_mask, torch_device, chosen)
        forward_s["graph"] = _median_time(graphed, torch_device, repeats * 4, warmup=3)
        del graphed
        if chosen in ("bf16", "fp16"):
            # weights stored in the autocast dtype: no per-call weight casts, half the weight traffic
            inference.cast_encoder_for_inference(classifier, chosen)
            log(f"[{size}] {chosen} weights + CUDA graph forward")
            graphed = _GraphedForward(classifier, pixels, slice_mask, torch_device, chosen)
            forward_s[f"graph_{chosen}_weights"] = _median_time(graphed, torch_device, repeats * 4, warmup=3)
            if profile:
                result["profile"] = _profile_table(graphed, torch_device)
            del graphed
    if compile_model:
        log(f"[{size}] torch.compile forward (compiling...)")
        compiled = torch.compile(classifier, mode=compile_mode if torch_device.type == "cuda" else "default")
        result["compile_mode"] = compile_mode
        t0 = time.perf_counter()
        forward(compiled)()
        _sync(torch_device)
        result["compile_s"] = time.perf_counter() - t0
        forward_s["compiled"] = _median_time(forward(compiled), torch_device, repeats * (4 if not cpu else 1), warmup=3)
    result["forward_s"] = forward_s
    best_mode = min(forward_s, key=forward_s.get)
    result["best_forward_mode"] = best_mode
    result["achieved_tflops"] = result["flops_per_volume"] / forward_s[best_mode] / 1e12
    result["peak_memory_mb"] = _peak_memory_mb(torch_device)

    if source is not None:
        log(f"[{size}] end to end from {source}")
        with tempfile.TemporaryDirectory() as tmp:
            classifier_cpu = model.build_classifier(config).eval()
            pre = preprocess.PreprocessConfig(**{**backbones.default_preprocessing(family, size),
                                                 "image_size": image_size, "num_slices": num_slices})
            bundle_dir = bundle.save_bundle(classifier_cpu, Path(tmp) / f"bench-{size}", catalog=catalog, preprocessing=pre)
            loaded = bundle.load_bundle(bundle_dir)
            inference.predict(source, loaded, device=str(torch_device), precision=chosen)  # load + warm up
            stage_runs = []
            for _ in range(max(1, repeats if not cpu or size == "tiny" else 2)):
                prediction = inference.predict(source, loaded, device=str(torch_device), precision=chosen)
                stage_runs.append(prediction.timings_s)
            stages = {k: statistics.median(run[k] for run in stage_runs) for k in ("read", "preprocess", "forward")}
            stages["total"] = sum(stages.values())
            result["end_to_end_s"] = stages
            result["non_forward_fraction"] = (stages["read"] + stages["preprocess"]) / stages["total"]
            inference.clear_model_cache()
    return result


def run_benchmark(sizes=DEFAULT_SIZES, *, peak: bool = True, **kwargs) -> dict:
    """Benchmark several sizes; returns {"device":..., "peak_tflops":..., "results": [...]}."""
    from . import inference

    torch_device = inference.select_device(kwargs.get("device", "auto"))
    chosen = inference.select_precision(torch_device, kwargs.get("precision", "auto"))
    report = {"device": inference.device_report(), "precision": chosen, "results": []}
    if peak:
        report["peak_tflops"] = measure_matmul_peak_tflops(torch_device, chosen)
    for size in sizes:
        entry = benchmark_size(size, **kwargs)
        if peak:
            entry["fraction_of_peak"] = entry["achieved_tflops"] / report["peak_tflops"]
        report["results"].append(entry)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"device: {report['results'][0]['device'] if report['results'] else '?'} "
        f"{report['results'][0].get('device_name', '') if report['results'] else ''}; precision {report['precision']}"
        + (f"; measured dense matmul peak {report['peak_tflops']:.1f} TFLOP/s" if "peak_tflops" in report else ""),
    ]
    for r in report["results"]:
        modes = ", ".join(f"{mode} {seconds * 1e3:.1f} ms" for mode, seconds in r["forward_s"].items())
        lines.append(
            f"{r['family']} {r['size']}: {r['parameters']['total'] / 1e6:.1f} M params, "
            f"{r['flops_per_volume'] / 1e12:.3f} TFLOP/volume ({r['slices']} slices @ {r['image_size']} px)"
        )
        lines.append(f"  forward: {modes}")
        lines.append(
            f"  best {r['best_forward_mode']}: {r['achieved_tflops']:.1f} TFLOP/s"
            + (f" = {100 * r['fraction_of_peak']:.0f}% of peak" if "fraction_of_peak" in r else "")
            + f"; peak memory {r['peak_memory_mb']:.0f} MB"
            + (f"; compile {r['compile_s']:.0f} s" if "compile_s" in r else "")
        )
        if "end_to_end_s" in r:
            e = r["end_to_end_s"]
            lines.append(
                "  end to end: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in e.items())
                + f" (everything but the forward: {100 * r['non_forward_fraction']:.0f}%)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated backbone sizes")
    parser.add_argument("--family", default="dinov3", help="backbone family")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--input", help="image file for the end-to-end timing (default: the bundled sample)")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end timing")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of the best CUDA mode")
    parser.add_argument("--compile-mode", default="max-autotune",
                        help="torch.compile mode on CUDA (max-autotune, reduce-overhead, default)")
    parser.add_argument("--json", help="also write the full report as JSON to this file")


def run_from_args(args) -> int:
    from .resources import default_sample_path

    source = None if args.no_end_to_end else (args.input or default_sample_path())
    report = run_benchmark(
        [s.strip() for s in args.sizes.split(",") if s.strip()],
        family=args.family, device=args.device, precision=args.precision, source=source,
        num_slices=args.slices, image_size=args.image_size, repeats=args.repeats, compile_model=args.compile,
        profile=args.profile, compile_mode=args.compile_mode,
    )
    print(format_report(report))
    for entry in report["results"]:
        if entry.get("profile"):
            print(f"\nTop GPU kernels, {entry['family']} {entry['size']}:\n{entry['profile']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0
