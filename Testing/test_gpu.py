"""GPU behaviour (run on a CUDA machine; skipped elsewhere): auto picks CUDA, bf16 results agree with
the CPU, CUDA outputs are deterministic, and the CUDA-graph forward equals the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle_fixtures import make_bundle
from HeadCTMoLRELib.model import bundle
from HeadCTMoLRELib import inference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REAL_NIFTI = "real/derived/GE_head_axial_1x1x5mm.nii.gz"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("gpu") / "tiny", image_size=64)


def test_auto_device_is_cuda_and_precision_bf16():
    device = inference.select_device("auto")
    assert device.type == "cuda"
    assert inference.select_precision(device) in ("bf16", "fp16")


def test_cuda_fp32_matches_cpu_and_bf16_is_close(tiny_bundle, test_data):
    cpu = inference.predict(test_data / REAL_NIFTI, tiny_bundle, device="cpu", precision="fp32")
    gpu32 = inference.predict(test_data / REAL_NIFTI, tiny_bundle, device="cuda", precision="fp32")
    gpu16 = inference.predict(test_data / REAL_NIFTI, tiny_bundle, device="cuda", precision="bf16")
    np.testing.assert_allclose(gpu32.probabilities, cpu.probabilities, atol=2e-4)
    np.testing.assert_allclose(gpu16.probabilities, cpu.probabilities, atol=3e-2)
    np.testing.assert_allclose(gpu16.attention, cpu.attention, atol=3e-2)


def test_cuda_outputs_are_deterministic(tiny_bundle, test_data):
    first = inference.predict(test_data / REAL_NIFTI, tiny_bundle, device="cuda")
    second = inference.predict(test_data / REAL_NIFTI, tiny_bundle, device="cuda")
    np.testing.assert_array_equal(first.logits, second.logits)
    np.testing.assert_array_equal(first.router_weights, second.router_weights)


def test_cuda_graph_forward_equals_eager(tiny_bundle):
    from HeadCTMoLRELib.benchmark import _GraphedForward

    device = torch.device("cuda")
    model = bundle.build_model(bundle.load_bundle(tiny_bundle)).to(device)
    inference.merge_lora_for_inference(model)
    pixels = torch.rand(1, 40, 3, 64, 64, device=device)
    mask = torch.ones(1, 40, dtype=torch.bool, device=device)
    graphed = _GraphedForward(model, pixels, mask, device, "bf16")
    with torch.inference_mode(), inference._autocast(device, "bf16"):
        eager = model(pixels, mask)
    torch.testing.assert_close(graphed().logits, eager.logits, atol=1e-3, rtol=1e-3)


def test_training_runs_on_cuda_in_bf16(tmp_path):
    """The paper's training loop on a GPU: bf16 autocast, augmentation on the device, a bundle written."""
    from HeadCTMoLRELib import phantoms as phantom
    from HeadCTMoLRELib.training import train

    cases = phantom.write_phantom_dataset(tmp_path / "phantoms", n=8, seed=5)
    start = make_bundle(tmp_path / "start", image_size=32)
    config = train.TrainConfig(max_epochs=2, min_epochs=2, batch_size=4, device="cuda", precision="bf16",
                               val_fraction=0.25, seed=0)
    result = train.fit(cases, start, tmp_path / "run", config, cache_dir=tmp_path / "cache")
    assert result.bundle_path is not None and result.epochs_run == 2
    assert all(np.isfinite(epoch["train_loss"]) for epoch in result.history)
    trained = bundle.load_bundle(result.bundle_path)
    assert trained.manifest["training"]["device"].startswith("cuda")


def test_cuda_graph_registration_agrees_with_the_cpu(test_data):
    """The registration's Adam steps replayed from a CUDA graph give the CPU's pose."""
    from HeadCTMoLRELib.ct import alignment, loader as ctio

    image = ctio.load_ct(test_data / REAL_NIFTI).image
    on_cpu = alignment.align_to_head_frame(image, "template")
    on_gpu = alignment.align_to_head_frame(image, "template", device="cuda")
    assert on_gpu.info["method"] == on_cpu.info["method"] == "template"
    np.testing.assert_allclose(on_gpu.head_to_patient, on_cpu.head_to_patient, atol=0.05)
