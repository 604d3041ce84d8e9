"""Inference: predict() on a real head CT, the invariants of a Prediction, maps in the input's
geometry, determinism, the model cache, device/precision choice and the CUDA out-of-memory fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bundle_fixtures import make_bundle
from HeadCTMoLRELib.ct import loader as ctio
from HeadCTMoLRELib import inference, outputs

REAL_NIFTI = "real/derived/GE_head_axial_1x1x5mm.nii.gz"
REAL_DICOM = "real/dcm_qa_ct_GE_tilt"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("inference") / "tiny")


@pytest.fixture(scope="module")
def prediction(tiny_bundle, test_data):
    inference.clear_model_cache()
    return inference.predict(test_data / REAL_NIFTI, tiny_bundle, device="cpu")


def test_probabilities_are_the_sigmoid_of_logits_in_catalog_order(prediction):
    assert prediction.probabilities.shape == (75,)
    np.testing.assert_allclose(prediction.probabilities, 1 / (1 + np.exp(-prediction.logits)))
    rows = prediction.findings()
    assert [r["id"] for r in rows] == list(prediction.catalog.ids)
    for row in rows:
        assert row["positive"] == (row["probability"] >= row["threshold"])


def test_attention_sums_to_one_over_valid_slices_and_is_zero_elsewhere(tiny_bundle, test_data):
    full = ctio.load_ct(test_data / REAL_NIFTI)
    partial = ctio.CTVolume(image=full.image[:, :, 12:28], provenance={"format": "test"})  # 80 mm of the head
    result = inference.predict(partial, tiny_bundle, device="cpu")
    valid = result.slice_valid
    assert 0 < valid.sum() < len(valid)
    assert result.attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(result.attention[~valid] == 0)
    assert np.all(result.contributions[~valid] == 0)


def test_router_weights_and_dominant_expert_per_slice(prediction):
    S = len(prediction.slice_valid)
    assert prediction.router_weights.shape == (S, 6)
    np.testing.assert_allclose(prediction.router_weights.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(prediction.dominant_expert[~prediction.slice_valid] == -1)
    valid = prediction.slice_valid
    np.testing.assert_array_equal(prediction.dominant_expert[valid], prediction.router_weights[valid].argmax(axis=1))


def test_contributions_sum_to_logit_minus_bias(prediction, tiny_bundle):
    from HeadCTMoLRELib.model import bundle

    model = inference.cached_model(bundle.load_bundle(tiny_bundle), torch.device("cpu"),
                                   prediction.provenance["precision"])
    bias = model.classifier.bias.detach().numpy()
    np.testing.assert_allclose(prediction.contributions.sum(axis=0) + bias, prediction.logits, atol=1e-4)


def test_slice_positions_are_in_patient_space_and_run_inferior_to_superior(prediction):
    positions = prediction.slice_positions_mm
    assert positions.shape == (len(prediction.slice_valid), 3)
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    np.testing.assert_allclose(steps, 4.0, atol=1e-6)  # 4 mm slices in the head frame (rigid map)
    assert positions[-1, 2] > positions[0, 2]  # LPS: +z is superior


def test_predict_is_deterministic_and_reuses_the_cached_model(tiny_bundle, test_data, prediction):
    cached = len(inference._MODEL_CACHE)
    again = inference.predict(test_data / REAL_NIFTI, tiny_bundle, device="cpu")
    np.testing.assert_array_equal(again.logits, prediction.logits)
    np.testing.assert_array_equal(again.attention, prediction.attention)
    assert again.timings_s["model"] < 0.5  # no rebuild: the first call built it
    assert len(inference._MODEL_CACHE) == cached


def test_maps_are_written_in_the_input_geometry(prediction, tmp_path):
    written = outputs.write_prediction(prediction, tmp_path)
    reference = prediction.volume.image
    for key in ("attention", "experts"):
        image = sitk.ReadImage(str(written[key]))
        assert image.GetSize() == reference.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing())
        np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    experts = sitk.GetArrayFromImage(sitk.ReadImage(str(written["experts"])))
    assert set(np.unique(experts)) <= set(range(0, 7)) and experts.max() >= 1
    attention = sitk.GetArrayFromImage(sitk.ReadImage(str(written["attention"])))
    assert attention.max() <= prediction.attention.max() + 1e-6 and attention.max() > 0
    table = (tmp_path / outputs.FINDINGS_TSV).read_text().splitlines()
    assert table[0].split("\t") == list(outputs.TSV_COLUMNS) and len(table) == 76
    probabilities = [float(line.split("\t")[3]) for line in table[1:]]
    assert probabilities == sorted(probabilities, reverse=True)
    data = json.loads((tmp_path / outputs.FINDINGS_JSON).read_text())
    assert {"findings", "attention", "router_weights", "slice_positions_mm"} <= set(data)


def test_attention_map_places_each_slice_value_at_its_own_height(prediction):
    image = prediction.attention_image()
    values = sitk.GetArrayFromImage(image)  # (z, y, x) of the input grid
    top = int(np.argmax(prediction.stack.head_mask.sum(axis=(1, 2))))  # the slice with the most head in it
    z_mm = prediction.slice_positions_mm[top, 2]
    # the input is axial with identity direction: its slice k sits at origin_z + k * spacing_z
    k = int(round((z_mm - image.GetOrigin()[2]) / image.GetSpacing()[2]))
    k = min(max(k, 0), values.shape[0] - 1)
    assert values[k].max() == pytest.approx(prediction.attention[top], rel=0.35)


def test_real_dicom_series_runs_end_to_end(tiny_bundle, test_data):
    result = inference.predict(test_data / REAL_DICOM, tiny_bundle, device="cpu")
    assert result.provenance["input"]["format"] == "dicom"
    assert any("tilt" in w.lower() for w in result.warnings)
    assert np.isfinite(result.probabilities).all()


def test_refused_input_raises_ct_input_error(tiny_bundle, test_data):
    with pytest.raises(ctio.CTInputError):
        inference.predict(test_data / "bad" / "13_dicom_mr_series", tiny_bundle, device="cpu")


def test_lora_merge_keeps_outputs(tiny_bundle):
    from HeadCTMoLRELib.model import bundle

    loaded = bundle.load_bundle(tiny_bundle)
    unmerged = bundle.build_model(loaded)
    merged = bundle.build_model(loaded)
    assert inference.merge_lora_for_inference(merged) > 0
    torch.manual_seed(0)
    pixels, mask = torch.rand(1, 5, 3, 32, 32), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(merged(pixels, mask).logits, unmerged(pixels, mask).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- device and precision
def test_auto_device_falls_back_to_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert inference.select_device("auto").type == "cpu"


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference.select_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert inference.select_device("auto").type == "mps"


def test_requesting_cuda_without_it_explains_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(inference.DeviceError, match="--device cpu"):
        inference.select_device("cuda")
    with pytest.raises(inference.DeviceError, match="unknown device"):
        inference.select_device("tpu")


def test_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert inference.select_precision(cpu, "fp32") == "fp32"
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: False)
    assert inference.select_precision(cpu) == "fp32"
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)
    assert inference.select_precision(cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference.select_precision(torch.device("cuda")) == "fp16"
    assert inference.select_precision(torch.device("mps")) == "fp32"
    with pytest.raises(inference.DeviceError):
        inference.select_precision(cpu, "int4")


class _FakeStack:
    def __init__(self, slices=12, size=32):
        rng = np.random.default_rng(0)
        self.pixels = rng.random((slices, 3, size, size), dtype=np.float32)
        self.slice_valid = np.ones(slices, dtype=bool)


def test_cuda_out_of_memory_shrinks_chunks_then_falls_back_to_cpu(tiny_bundle, monkeypatch):
    from HeadCTMoLRELib.model import bundle

    classifier = bundle.build_model(bundle.load_bundle(tiny_bundle))
    real_forward = inference._forward
    attempts = []

    def forward(model, pixels, mask, device, precision, chunk_size):
        attempts.append((device.type, chunk_size))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(model, pixels, mask, device, precision, chunk_size)

    monkeypatch.setattr(inference, "_forward", forward)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    result, device, precision, notes = inference.run_model(classifier, _FakeStack(), torch.device("cuda"), "bf16")
    assert [a[1] for a in attempts if a[0] == "cuda"] == [None, 6, 3, 1]
    assert attempts[-1][0] == "cpu" and device.type == "cpu"
    assert any("falling back to the CPU" in n for n in notes)
    assert result["logits"].shape == (75,)


def test_cuda_out_of_memory_recovers_with_smaller_chunks(tiny_bundle, monkeypatch):
    from HeadCTMoLRELib.model import bundle

    classifier = bundle.build_model(bundle.load_bundle(tiny_bundle))
    real_forward = inference._forward

    def forward(model, pixels, mask, device, precision, chunk_size):
        if chunk_size is None or chunk_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(model, pixels, mask, torch.device("cpu"), "fp32", chunk_size)

    monkeypatch.setattr(inference, "_forward", forward)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    reference = real_forward(classifier, torch.from_numpy(_FakeStack().pixels)[None],
                             torch.ones(1, 12, dtype=torch.bool), torch.device("cpu"), "fp32", None)
    result, device, _, notes = inference.run_model(classifier, _FakeStack(), torch.device("cuda"), "bf16")
    assert device.type == "cuda" and notes == ["CUDA out of memory: retrying with 6 slices per chunk",
                                               "CUDA out of memory: retrying with 3 slices per chunk"]
    np.testing.assert_allclose(result["logits"], reference.logits[0].numpy(), atol=1e-5)


def test_static_shape_path_for_cuda_graphs_gives_the_same_outputs(tiny_bundle, monkeypatch):
    """CUDA-graph capture and torch.compile encode every slice and zero the invalid ones afterwards."""
    from HeadCTMoLRELib.model import bundle
    from HeadCTMoLRELib.model import classifier as model_lib

    classifier = bundle.build_model(bundle.load_bundle(tiny_bundle))
    torch.manual_seed(1)
    pixels = torch.rand(2, 7, 3, 32, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, -3:] = False
    with torch.no_grad():
        dynamic = classifier(pixels, mask)
        monkeypatch.setattr(model_lib, "_static_shapes_required", lambda: True)
        static = classifier(pixels, mask)
    for name in ("logits", "attention", "router_weights", "contributions"):
        torch.testing.assert_close(getattr(static, name), getattr(dynamic, name), atol=1e-5, rtol=1e-5)


def test_fused_dinov3_attention_gives_the_trained_models_outputs():
    """One QKV GEMM and copy-free rotary embedding compute the same function as transformers' attention."""
    import copy

    from bundle_fixtures import make_classifier
    from HeadCTMoLRELib.model.fused_attention import FusedRotaryAttention, fuse_dinov3_attention

    classifier, _ = make_classifier(image_size=64)  # tiny dinov3 with random LoRA/MoLRE weights
    merged = copy.deepcopy(classifier)
    inference.merge_lora_for_inference(merged)
    fused = copy.deepcopy(merged)
    assert fuse_dinov3_attention(fused) == 2  # one per layer of the tiny backbone
    assert any(isinstance(m, FusedRotaryAttention) for m in fused.modules())
    torch.manual_seed(3)
    pixels = torch.rand(2, 5, 3, 64, 64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        reference = classifier(pixels, mask)
        result = fused(pixels, mask)
    for name in ("logits", "attention", "router_weights", "contributions"):
        torch.testing.assert_close(getattr(result, name), getattr(reference, name), atol=2e-5, rtol=2e-5)


def test_fusing_before_merging_is_refused():
    from bundle_fixtures import make_classifier
    from HeadCTMoLRELib.model.fused_attention import fuse_dinov3_attention

    classifier, _ = make_classifier()
    with pytest.raises(ValueError, match="after merging LoRA"):
        fuse_dinov3_attention(classifier)


def test_top_slice_is_always_a_slice_inside_the_scan(tiny_bundle, test_data):
    """Issue 17: slices outside the scan contribute 0, so a finding whose valid slices all pull its logit
    down had its "top slice" (the Slicer jump, the TSV column) outside the scan."""
    import dataclasses

    full = ctio.load_ct(test_data / REAL_NIFTI)
    partial = ctio.CTVolume(image=full.image[:, :, 12:28], provenance={"format": "test"})
    result = inference.predict(partial, tiny_bundle, device="cpu")
    valid = result.slice_valid
    assert not valid[0], "the partial scan leaves the lowest slices of the stack outside it"
    contributions = np.where(valid[:, None], -1.0 - np.random.default_rng(0).random(result.contributions.shape), 0.0)
    negative = dataclasses.replace(result, contributions=contributions.astype(np.float32))
    assert all(valid[negative.top_slice(i)] for i in range(contributions.shape[1]))
    rows = negative.findings()
    assert all(valid[row["top_slice"]] for row in rows)
    best_valid = np.flatnonzero(valid)[np.argmax(contributions[valid, 0])]
    assert rows[0]["top_slice"] == best_valid
    np.testing.assert_allclose(rows[0]["top_slice_position_mm"], result.slice_positions_mm[best_valid])
