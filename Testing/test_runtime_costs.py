"""What a user pays besides the model's arithmetic (issue 18): imports on demand, a fast exit, model
construction without throw-away initialisation, verification once per bundle change, the warm-cache path
of evaluate without worker processes, and the CPU thread policy. Speed targets live in the benchmark
(`headct-molre benchmark`, docs/benchmarks.md), not here: these tests check the mechanisms."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bundle_fixtures import make_bundle
from HeadCTMoLRELib import inference, threads
from HeadCTMoLRELib.model import bundle, verification_cache
from HeadCTMoLRELib.model.meta_init import assign_state_dict, parameters_on_meta

REAL_NIFTI = "real/derived/GE_head_axial_1x1x5mm.nii.gz"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("runtime") / "tiny")


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------ imports
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["validate", "--help"], ["info", "BUNDLE"],
                                  ["info", "--help"]])
def test_light_commands_import_neither_torch_nor_transformers(argv, tiny_bundle):
    argv = [str(tiny_bundle) if word == "BUNDLE" else word for word in argv]
    code = ("import sys, json; from HeadCTMoLRELib import cli\n"
            "try:\n    cli.main(json.loads(sys.argv[1]))\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'peft', 'sympy') if m in sys.modules))")
    import json

    completed = _python(code, json.dumps(argv))
    assert completed.stdout.strip().splitlines()[-1] == "heavy: []", completed.stdout[-500:] + completed.stderr[-2000:]


def test_predict_reports_imports_apart_from_building_the_model(tiny_bundle, test_data):
    """In a fresh process the first predict's `imports` timing holds torch/transformers/peft; `model` does not."""
    code = ("import sys, json; from HeadCTMoLRELib import inference\n"
            "p = inference.predict(sys.argv[1], sys.argv[2], device='cpu')\n"
            "print(json.dumps(p.timings_s))")
    completed = _python(code, str(test_data / REAL_NIFTI), str(tiny_bundle), env={"OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    import json

    timings = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(timings) >= {"imports", "model", "read", "preprocess", "forward", "total"}
    assert timings["imports"] > timings["model"]  # torch + transformers take longer than building a tiny model
    parts = sum(timings[k] for k in ("imports", "model", "read", "preprocess", "forward"))
    assert parts <= timings["total"] + 1e-6


def test_the_program_exits_without_teardown_and_keeps_its_output_and_status(test_data):
    """`headct-molre` (cli.run) flushes and ends with os._exit once torch is loaded: atexit handlers do
    not run, yet the output and the exit status are those of the command."""
    code = ("import atexit, sys, torch\n"
            "atexit.register(lambda: print('TEARDOWN', flush=True))\n"
            "sys.argv = ['headct-molre', 'validate', sys.argv[1]]\n"
            "from HeadCTMoLRELib import cli\ncli.run()")
    completed = _python(code, str(test_data / "bad" / "05_nifti_2d.nii.gz"))
    assert completed.returncode == 2
    assert "2D" in completed.stdout or "2-D" in completed.stdout
    assert "TEARDOWN" not in completed.stdout


def test_the_program_keeps_the_normal_exit_while_other_threads_run(monkeypatch):
    from HeadCTMoLRELib import cli
    import threading

    with monkeypatch.context() as patched:  # as in a fresh program: this thread only
        patched.setattr(threading, "active_count", lambda: 1)
        assert cli.fast_exit_is_safe()
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert not cli.fast_exit_is_safe()
    finally:
        stop.set()
        worker.join()


# ------------------------------------------------------------------------------------ model loading
def test_bundle_model_is_built_without_random_initialisation_and_matches_a_plain_build(tiny_bundle):
    from torch.overrides import TorchFunctionMode

    class RandomDraws(TorchFunctionMode):
        """Counts the elements of every torch call that advanced the CPU random generator."""

        drawn = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            state = torch.get_rng_state()
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and not torch.equal(state, torch.get_rng_state()):
                RandomDraws.drawn += out.numel()
            return out

    loaded = bundle.load_bundle(tiny_bundle)
    with RandomDraws():
        classifier = bundle.build_model(loaded)
    assert not any(t.is_meta for t in [*classifier.parameters(), *classifier.buffers()])
    parameters = sum(p.numel() for p in classifier.parameters())
    # only the few token vectors transformers makes with torch.randn (CLS, mask) are drawn; no weight matrix
    assert RandomDraws.drawn < 0.01 * parameters, (RandomDraws.drawn, parameters)

    from HeadCTMoLRELib.model import classifier as model_lib
    from safetensors.torch import load_file

    plain = model_lib.build_classifier(loaded.model_config,
                                       backbone_transformers_config=loaded.manifest["backbone"]["transformers_config"])
    state = load_file(str(tiny_bundle / bundle.BACKBONE_FILE))
    state.update(load_file(str(tiny_bundle / bundle.ADAPTERS_FILE)))
    model_lib.load_full_state_dict(plain, state)
    plain.eval()
    torch.manual_seed(0)
    pixels, mask = torch.rand(1, 4, 3, 32, 32), torch.ones(1, 4, dtype=torch.bool)
    built, copied = classifier.state_dict(), plain.state_dict()
    assert set(built) == set(copied) and all(torch.equal(built[k], copied[k]) for k in built)  # bit for bit
    with torch.no_grad():
        # same weights, outputs equal up to a few float32 ulps: the assigned tensors keep the file buffer's memory
        # alignment, and on some CPUs (AMD EPYC) the vectorised kernels round differently there (1.2e-7 measured)
        torch.testing.assert_close(classifier(pixels, mask).logits, plain(pixels, mask).logits, rtol=1e-6, atol=1e-6)
    assert [n for n, p in classifier.named_parameters() if p.requires_grad] == \
        [n for n, p in plain.named_parameters() if p.requires_grad]


def test_assigned_weights_are_the_files_tensors_and_a_missing_one_is_named():
    with parameters_on_meta():
        layer = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    assert layer[0].weight.is_meta
    weight = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"1\.weight"):
        assign_state_dict(layer, {"0.weight": weight, "0.bias": torch.zeros(2), "1.bias": torch.zeros(2)})
    assign_state_dict(layer, {"0.weight": weight, "0.bias": torch.zeros(2), "1.weight": torch.ones(2),
                              "1.bias": torch.zeros(2)})
    assert layer[0].weight.data_ptr() == weight.data_ptr()  # no copy
    assert isinstance(layer[0].weight, torch.nn.Parameter) and layer[0].weight.requires_grad
    plain = torch.nn.Linear(3, 2)  # outside the block parameters are real again
    assert not plain.weight.is_meta


# ---------------------------------------------------------------------------------- verification
def test_a_bundle_is_hashed_once_per_change_of_its_files(tiny_bundle, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    calls = []
    real = bundle.verify_files
    monkeypatch.setattr(bundle, "verify_files", lambda folder, manifest: (calls.append(folder), real(folder, manifest)))
    verification_cache.clear()
    bundle.load_bundle(copy)
    bundle.load_bundle(copy)
    assert len(calls) == 1
    bundle.load_bundle(copy, rehash=True)  # `headct-molre verify` re-reads on purpose
    assert len(calls) == 2
    weights = copy / bundle.ADAPTERS_FILE
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, and the modification time put back
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(bundle.BundleError, match="has changed"):
        bundle.load_bundle(copy)
    assert len(calls) == 3


def test_predict_on_a_bundle_path_does_not_rehash_it_per_case(tiny_bundle, test_data, monkeypatch):
    calls = []
    real = bundle.verify_files
    monkeypatch.setattr(bundle, "verify_files", lambda folder, manifest: (calls.append(folder), real(folder, manifest)))
    verification_cache.clear()
    volume = __import__("HeadCTMoLRELib.ct.loader", fromlist=["load_ct"]).load_ct(test_data / REAL_NIFTI)
    first = inference.predict(volume, tiny_bundle, device="cpu")
    second = inference.predict(volume, tiny_bundle, device="cpu")
    assert len(calls) == 1
    np.testing.assert_array_equal(first.logits, second.logits)


# ----------------------------------------------------------------------------- evaluate and batch
def test_warm_cache_prediction_starts_no_worker_and_uses_the_inference_model(tiny_bundle, test_data, tmp_path,
                                                                              monkeypatch):
    from HeadCTMoLRELib.training import cases

    sources = [test_data / REAL_NIFTI, test_data / "real" / "dcm_qa_ct_GE_tilt"]
    inference.clear_model_cache()
    cold = cases.predict_cases(tiny_bundle, sources, cache_dir=tmp_path, device="cpu", precision="fp32", workers=0)
    assert len(cold.paths) == 2
    assert len(inference._MODEL_CACHE) == 1  # the merged + fused model of `infer`, built once
    model = next(iter(inference._MODEL_CACHE.values()))
    assert not any(type(m).__name__ == "DINOv3ViTAttention" for m in model.modules())  # fused

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started although every case is cached")

    monkeypatch.setattr(cases, "_build_in_pool", no_pool)
    warm = cases.predict_cases(tiny_bundle, sources, cache_dir=tmp_path, device="cpu", precision="fp32", workers=4)
    np.testing.assert_array_equal(warm.logits, cold.logits)


# ------------------------------------------------------------------------------------------ threads
def test_thread_policy_by_work_size_and_explicit_choices(monkeypatch):
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    assert threads.threads_for_work(1e6) == 1
    assert threads.threads_for_work(1e12) == threads.available_cores()
    assert threads.threads_for_work(1e6, 3) == 3
    monkeypatch.setenv(threads.THREADS_ENV, "2")
    assert threads.threads_for_work(1e12) == 2 and threads.threads_for_work(1e6) == 2
    assert threads.threads_for_work(1e6, "auto") == 1  # --threads auto overrides the environment
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="HEADCT_THREADS"):
        threads.threads_for_work(1e6)
    with pytest.raises(ValueError, match="--threads"):
        threads.threads_for_work(1e6, "-1")


def test_torch_threads_are_restored_after_the_block():
    before = torch.get_num_threads()
    with threads.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_infer_accepts_threads_and_refuses_a_bad_value(tiny_bundle, test_data, capsys):
    from HeadCTMoLRELib import cli

    assert cli.main(["infer", str(test_data / REAL_NIFTI), "--model", str(tiny_bundle), "--threads", "1",
                     "--device", "cpu", "--json"]) == 0
    capsys.readouterr()
    assert cli.main(["infer", str(test_data / REAL_NIFTI), "--model", str(tiny_bundle), "--threads", "x"]) == 2
    assert "--threads" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- benchmark
def test_benchmark_counts_attention_the_counter_misses_on_the_cpu():
    from bundle_fixtures import make_classifier
    from HeadCTMoLRELib import benchmark

    classifier, _ = make_classifier(image_size=32)
    pixels, mask = torch.rand(1, 3, 3, 32, 32), torch.ones(1, 3, dtype=torch.bool)
    flops = benchmark.count_flops(classifier, pixels, mask, torch.device("cpu"), "fp32")
    config = classifier.encoder.hf_config
    tokens = (32 // config.patch_size) ** 2 + 1 + config.num_register_tokens
    expected = 4 * tokens**2 * config.hidden_size * config.num_hidden_layers * 3
    assert flops["analytic_attention"] == expected  # torch's counter has no formula for CPU SDPA
    assert flops["total"] == flops["counted"] + expected


def test_benchmark_timings_are_medians_of_at_least_five_runs_with_their_spread():
    from HeadCTMoLRELib import benchmark

    calls = []
    timing = benchmark._timed(lambda: calls.append(1), torch.device("cpu"), repeats=2, warmup=1)
    assert timing["runs"] == 5 and len(calls) == 6
    assert timing["min"] <= timing["median"] <= timing["max"]


def test_stage_memory_is_the_stages_own_not_the_process_high_water():
    from HeadCTMoLRELib.benchmark_runtime import stage_peak_mib

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    big = np.ones(64 * 2**20 // 8)  # 64 MiB held before the stage: not part of its peak
    _, small = stage_peak_mib(lambda: np.ones(1024).sum())
    _, large = stage_peak_mib(lambda: np.ones(96 * 2**20 // 8).sum())
    assert small is not None and small < 16
    assert 80 < large < 200
    del big


def test_demo_reads_and_checks_its_input_once(tiny_bundle, test_data, monkeypatch, capsys):
    from HeadCTMoLRELib import cli
    from HeadCTMoLRELib.ct import loader

    reads = []
    real = loader.load_ct
    monkeypatch.setattr(loader, "load_ct", lambda *a, **k: (reads.append(a[0]), real(*a, **k))[1])
    assert cli.main(["demo", "--input", str(test_data / REAL_NIFTI), "--model", str(tiny_bundle),
                     "--device", "cpu", "--json"]) == 0
    assert len(reads) == 1
    import json

    timings = json.loads(capsys.readouterr().out)["preprocessing"]["timings_s"]
    assert timings["read"] > 0 and {"imports", "model", "preprocess", "forward"} <= set(timings)


# -------------------------------------------------------------------------------------- CT memory
def test_value_checks_keep_a_clean_float_image_and_cast_integers_once():
    import SimpleITK as sitk

    from HeadCTMoLRELib.ct import checks

    rng = np.random.default_rng(0)
    hu = np.where(rng.random((8, 16, 16)) < 0.5, -1000, 40).astype(np.int16)
    hu[0, 0, :4] = -3024  # outside-field-of-view padding
    clean = sitk.GetImageFromArray(np.maximum(hu, -1024).astype(np.float32))
    same, warnings, notes = checks.checked_values("clean", clean, None)
    assert same is clean and not warnings and not notes  # nothing to repair: no copy at all
    stored = sitk.GetImageFromArray(hu)
    image, _, notes = checks.checked_values("int16", stored, None)
    assert image.GetPixelID() == sitk.sitkFloat32 and "4 voxels below" in notes[0]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), np.maximum(hu, -1024).astype(np.float32))
