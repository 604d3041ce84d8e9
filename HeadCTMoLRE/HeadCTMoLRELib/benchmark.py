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
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

DEFAULT_SIZES = ("tiny", "small", "base")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_REPEATS = 5  # a median of fewer runs is not a median anyone can reproduce


def _timed(fn: Callable[[], object], device, repeats: int, warmup: int = 2) -> dict:
    """{"median", "min", "max", "runs"} of ``fn``'s wall time in seconds, after ``warmup`` calls."""
    from .benchmark_runtime import spread

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(MIN_REPEATS, repeats)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return spread(times)


def measure_matmul_peak_tflops(device, precision: str) -> dict:
    """Dense matmul throughput of this device (TFLOP/s: median, min, max), the rate achieved FLOP rates
    are compared with. On a CPU: 2048^3 products with every core this process may use."""
    import torch

    from .threads import available_cores, torch_threads

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with torch_threads(available_cores()) if device.type == "cpu" else _nullcontext():
        timing = _timed(lambda: a @ b, device, repeats=10 if device.type == "cuda" else MIN_REPEATS)
    rate = lambda seconds: 2 * n**3 / seconds / 1e12  # noqa: E731
    return {"median": rate(timing["median"]), "min": rate(timing["max"]), "max": rate(timing["min"]),
            "runs": timing["runs"], "n": n, "dtype": str(dtype).replace("torch.", "")}


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def attention_flops(classifier, num_slices: int) -> int:
    """FLOPs of the attention products (Q K^T and A V) of a ViT backbone over ``num_slices`` slices:
    4 x tokens^2 x width per layer and slice. torch's FLOP counter misses them on the CPU."""
    config = getattr(classifier.encoder, "hf_config", None)
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int):
        return 0
    image = classifier.config.backbone.image_size
    tokens = (image // patch) ** 2 + 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return 4 * tokens**2 * int(config.hidden_size) * int(config.num_hidden_layers) * num_slices


def count_flops(classifier, pixels, slice_mask, device, precision: str) -> dict:
    """{"total", "counted", "analytic_attention"}: torch's FlopCounterMode over one forward, plus the
    attention products computed analytically when the counter saw no attention kernel (CPU SDPA)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .inference import _autocast

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), _autocast(device, precision), counter:
        classifier(pixels, slice_mask)
    counted = int(counter.get_total_flops())
    operations = {str(op) for ops in counter.get_flop_counts().values() for op in ops}
    saw_attention = any("attention" in op or op.endswith("bmm") for op in operations)
    missing = 0 if saw_attention else attention_flops(classifier, int(slice_mask.sum()))
    return {"total": counted + missing, "counted": counted, "analytic_attention": missing}


class _ReusableThreads:
    """inference's thread policy for CPU work of this size, as a context manager usable many times."""

    def __init__(self, device, flops_per_call: float):
        from .threads import threads_for_work

        self.device, self.flops = device, flops_per_call
        self.count = threads_for_work(flops_per_call) if device.type == "cpu" else None
        self._active = []

    def __enter__(self):
        from . import inference

        context = inference._cpu_threads(self.device, self.flops, None)
        self._active.append(context)
        return context.__enter__()

    def __exit__(self, *exc):
        return self._active.pop().__exit__(*exc)


def _stage_memory_mib(fn: Callable[[], object], device) -> float | None:
    """Peak memory of one call of ``fn`` above what was held before it: the CUDA allocator's peak, or on
    the CPU the resident high-water mark reset before the call (benchmark_runtime.stage_peak_mib)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from .benchmark_runtime import stage_peak_mib

    return stage_peak_mib(fn)[1]


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
    flops = count_flops(classifier, pixels, slice_mask, torch_device, chosen)
    result["flops_per_volume"] = flops["total"]
    result["flops_counted"] = flops

    def forward(module):
        def run():
            with threads, torch.inference_mode(), inference._autocast(torch_device, chosen):
                return module(pixels, slice_mask, chunk_size=chunk)
        return run

    cpu = torch_device.type == "cpu"
    chunk = inference._CPU_DEFAULT_CHUNK if cpu else None  # as `infer` runs it: chunks, threads by work size
    work = inference.forward_flops_per_slice(classifier) * (chunk or num_slices)
    threads = _ReusableThreads(torch_device, work)
    result["threads"] = threads.count
    warmup = 1 if cpu else 3
    forward_s = {}
    log(f"[{size}] eager forward")
    forward_s["eager"] = _timed(forward(classifier), torch_device, repeats, warmup=warmup)
    inference.merge_lora_for_inference(classifier)
    log(f"[{size}] merged forward")
    forward_s["merged"] = _timed(forward(classifier), torch_device, repeats, warmup=warmup)
    if fuse_dinov3_attention(classifier):
        log(f"[{size}] merged + fused attention forward")
        forward_s["fused"] = _timed(forward(classifier), torch_device, repeats, warmup=warmup)
    result["forward_memory_mib"] = _stage_memory_mib(forward(classifier), torch_device)
    if torch_device.type == "cuda":
        log(f"[{size}] CUDA graph forward")
        graphed = _GraphedForward(classifier, pixels, slice_mask, torch_device, chosen)
        forward_s["graph"] = _timed(graphed, torch_device, repeats * 4, warmup=3)
        del graphed
        if chosen in ("bf16", "fp16"):
            # weights stored in the autocast dtype: no per-call weight casts, half the weight traffic
            inference.cast_encoder_for_inference(classifier, chosen)
            log(f"[{size}] {chosen} weights + CUDA graph forward")
            graphed = _GraphedForward(classifier, pixels, slice_mask, torch_device, chosen)
            forward_s[f"graph_{chosen}_weights"] = _timed(graphed, torch_device, repeats * 4, warmup=3)
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
        forward_s["compiled"] = _timed(forward(compiled), torch_device, repeats * (4 if not cpu else 1), warmup=3)
    result["forward_s"] = forward_s
    best_mode = min(forward_s, key=lambda mode: forward_s[mode]["median"])
    result["best_forward_mode"] = best_mode
    result["achieved_tflops"] = result["flops_per_volume"] / forward_s[best_mode]["median"] / 1e12

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
            for _ in range(max(MIN_REPEATS, repeats)):
                prediction = inference.predict(source, loaded, device=str(torch_device), precision=chosen)
                stage_runs.append(prediction.timings_s)
            from .benchmark_runtime import spread

            keys = ("read", "preprocess", "forward")
            stages = {k: spread([run[k] for run in stage_runs]) for k in keys}
            stages["total"] = spread([sum(run[k] for k in keys) for run in stage_runs])
            result["end_to_end_s"] = stages
            result["non_forward_fraction"] = ((stages["read"]["median"] + stages["preprocess"]["median"])
                                              / stages["total"]["median"])
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
            entry["fraction_of_peak"] = entry["achieved_tflops"] / report["peak_tflops"]["median"]
        report["results"].append(entry)
    return report


def _ms(timing: dict) -> str:
    return f"{timing['median'] * 1e3:.1f} ms ({timing['min'] * 1e3:.1f}-{timing['max'] * 1e3:.1f}, n={timing['runs']})"


def format_report(report: dict) -> str:
    """Medians with their spread (min-max, number of runs) for every timing."""
    peak = report.get("peak_tflops")
    first = report["results"][0] if report["results"] else {}
    lines = [
        f"device: {first.get('device', '?')} {first.get('device_name', '')}; precision {report['precision']}; "
        f"torch threads {report['device'].get('cpu_threads')}"
        + (f"; measured dense {peak['dtype']} matmul ({peak['n']}^3) {peak['median']:.2f} TFLOP/s "
           f"({peak['min']:.2f}-{peak['max']:.2f}, n={peak['runs']})" if peak else ""),
    ]
    for r in report["results"]:
        flops = r.get("flops_counted", {})
        analytic = (f", of which {flops['analytic_attention'] / 1e12:.3f} attention counted analytically"
                    if flops.get("analytic_attention") else "")
        lines.append(
            f"{r['family']} {r['size']}: {r['parameters']['total'] / 1e6:.1f} M params, "
            f"{r['flops_per_volume'] / 1e12:.3f} TFLOP/volume{analytic} ({r['slices']} slices @ {r['image_size']} px)"
        )
        threads = f" ({r['threads']} thread(s), threads.py policy)" if r.get("threads") else ""
        lines.append(f"  forward{threads}: " + "; ".join(f"{mode} {_ms(t)}" for mode, t in r["forward_s"].items()))
        memory = r.get("forward_memory_mib")
        lines.append(
            f"  best {r['best_forward_mode']}: {r['achieved_tflops']:.2f} TFLOP/s"
            + (f" = {100 * r['fraction_of_peak']:.0f}% of the measured matmul rate" if "fraction_of_peak" in r else "")
            + (f"; forward memory {memory:.0f} MiB above the loaded model" if memory is not None else "")
            + (f"; compile {r['compile_s']:.0f} s" if "compile_s" in r else "")
        )
        if "end_to_end_s" in r:
            e = r["end_to_end_s"]
            lines.append(
                "  end to end (model loaded): " + "; ".join(f"{k} {_ms(v)}" for k, v in e.items())
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
    parser.add_argument("--runtime", action="store_true",
                        help="instead: whole-process infer vs an import-only floor and a naive transformers + "
                             "SimpleITK pipeline, preprocessing peak memory of a large input, model load vs "
                             "from_pretrained (benchmark_runtime.py; --sizes takes one size, default base)")
    parser.add_argument("--large-shape", default="512,512,600",
                        help="with --runtime: voxels x,y,z of the large preprocessing input")
    parser.add_argument("--workdir", help="with --runtime: keep the generated backbone, bundle and input here")


def run_from_args(args) -> int:
    from .resources import default_sample_path

    if args.runtime:
        from .benchmark_runtime import format_runtime_report, run_runtime_benchmark

        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        report = run_runtime_benchmark(
            size=sizes[0] if args.sizes != ",".join(DEFAULT_SIZES) else "base", source=args.input,
            repeats=args.repeats, large_shape=tuple(int(v) for v in args.large_shape.split(",")),
            workdir=args.workdir, log=lambda message: print(message, file=sys.stderr, flush=True))
        print(format_runtime_report(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        return 0

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
