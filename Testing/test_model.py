"""HeadCTClassifier (Algorithm 1): pooling, exact per-slice contributions, masking, chunking, weights, gradients."""

from __future__ import annotations

import pytest
import torch

from HeadCTMoLRELib.model.backbones import BackboneSpec
from HeadCTMoLRELib.model.classifier import (
    AttentionPool,
    FindingPool,
    HeadCTClassifier,
    ModelConfig,
    build_classifier,
    count_parameters,
    full_state_dict,
    load_full_state_dict,
    load_trainable_state_dict,
    param_groups,
    trainable_state_dict,
)
from HeadCTMoLRELib.model.molre import MoLREConfig

FINDINGS = 5
MOLRE = MoLREConfig(num_experts=3, rank=2, router_hidden=16)


def config_2d(use_molre: bool = True, family: str = "dinov3") -> ModelConfig:
    size = 28 if family == "dinov2" else 32
    return ModelConfig(BackboneSpec(family, "tiny", size), FINDINGS, use_molre=use_molre, molre=MOLRE)


def config_3d(use_molre: bool = True) -> ModelConfig:
    return ModelConfig(BackboneSpec("videomae3d", "tiny", 32), FINDINGS, use_molre=use_molre, molre=MOLRE)


def build(config: ModelConfig, seed: int = 0) -> HeadCTClassifier:
    torch.manual_seed(seed)
    return build_classifier(config).eval()


def volumes(batch: int = 2, slices: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, slices, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_adapters_nonzero(model: HeadCTClassifier, seed: int = 1) -> None:
    """Trained-looking adapters: LoRA B, MoLRE B and the pooling query away from their zero init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and ("lora_B" in name or ".up." in name or name == "pool.query"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


MASK = torch.tensor([[True] * 6, [False, True, True, True, False, False]])


@pytest.fixture(scope="module")
def trained_2d() -> HeadCTClassifier:
    model = build(config_2d())
    make_adapters_nonzero(model)
    return model


def test_output_shapes_and_probabilities(trained_2d):
    with torch.no_grad():
        out = trained_2d(volumes(), MASK)
    assert out.logits.shape == out.probabilities.shape == (2, FINDINGS)
    assert out.attention.shape == (2, 6)
    assert out.router_weights.shape == (2, 6, 3)
    assert out.contributions.shape == (2, 6, FINDINGS)
    assert out.slice_features.shape == (2, 6, 64)
    torch.testing.assert_close(out.probabilities, torch.sigmoid(out.logits))
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))


def test_contributions_sum_exactly_to_logits_minus_bias(trained_2d):
    with torch.no_grad():
        out = trained_2d(volumes(), MASK)
    assert out.contributions.abs().max() > 1e-3  # a non-trivial decomposition
    torch.testing.assert_close(out.contributions.sum(1), out.logits - trained_2d.classifier.bias, atol=1e-6, rtol=1e-6)


def test_contributions_are_attention_times_head_projection_of_each_slice(trained_2d):
    with torch.no_grad():
        out = trained_2d(volumes(), MASK)
    weight = trained_2d.classifier.weight
    expected = out.attention[1, 2] * (weight @ out.slice_features[1, 2])
    torch.testing.assert_close(out.contributions[1, 2], expected)


def test_masked_slices_get_zero_attention_and_do_not_change_the_output(trained_2d):
    pixels = volumes()
    scrambled = pixels.clone()
    scrambled[~MASK] = torch.rand_like(scrambled[~MASK])
    with torch.no_grad():
        out = trained_2d(pixels, MASK)
        out_scrambled = trained_2d(scrambled, MASK)
        alone = trained_2d(pixels[1:, 1:4])  # the second volume without its padding
    assert torch.all(out.attention[~MASK] == 0)
    assert torch.all(out.router_weights[~MASK] == 0)
    assert torch.all(out.contributions[~MASK] == 0)
    torch.testing.assert_close(out_scrambled.logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.logits[1], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention[1, 1:4], alone.attention[0], atol=1e-6, rtol=1e-5)


def test_chunked_backbone_gives_the_same_result(trained_2d):
    pixels = volumes()
    with torch.no_grad():
        whole = trained_2d(pixels, MASK)
        chunked = trained_2d(pixels, MASK, chunk_size=2)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.attention, whole.attention, atol=1e-6, rtol=1e-5)


def test_new_molre_model_equals_its_lora_only_baseline():
    """MoLRE starts as W0 = identity: adding it to the baseline changes nothing until it is trained."""
    baseline = build(config_2d(use_molre=False), seed=0)
    with_molre = build(config_2d(use_molre=True), seed=1)
    make_adapters_nonzero(baseline)  # trained LoRA, query and head...
    result = with_molre.load_state_dict(baseline.state_dict(), strict=False)  # ...copied into the MoLRE model
    assert result.unexpected_keys == [] and all(k.startswith("molre.") for k in result.missing_keys)
    pixels = volumes()
    with torch.no_grad():
        out_baseline, out_molre = baseline(pixels, MASK), with_molre(pixels, MASK)
    torch.testing.assert_close(out_molre.logits, out_baseline.logits, rtol=0, atol=0)
    assert out_baseline.router_weights is None and out_molre.router_weights is not None


def test_lora_only_baseline_has_no_molre_parameters():
    baseline = build(config_2d(use_molre=False))
    counts = count_parameters(baseline)
    assert baseline.molre is None and counts["molre"] == 0
    assert counts["trainable"] == counts["lora"] + counts["head"]


def test_gradients_reach_exactly_the_trainable_parameters():
    model = build(config_2d())
    make_adapters_nonzero(model)
    model.train()
    out = model(volumes(), MASK)
    out.logits.sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith("encoder.") and "lora_" not in name for name in frozen)


def test_same_seed_same_model_and_repeated_forward_is_deterministic():
    first, second = build(config_2d(), seed=7), build(config_2d(), seed=7)
    pixels = volumes()
    with torch.no_grad():
        a, b, c = first(pixels, MASK), first(pixels, MASK), second(pixels, MASK)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.logits, c.logits, rtol=0, atol=0)


def test_trainable_state_round_trips_into_a_model_with_the_same_backbone(trained_2d):
    state = trainable_state_dict(trained_2d)
    assert any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    assert {"pool.query", "classifier.weight", "classifier.bias", "molre.router.0.weight"} <= set(state)
    assert not any(k.startswith("encoder.") and "lora_" not in k for k in state)
    fresh = build(config_2d(), seed=0)  # same random backbone, untrained adapters
    load_trainable_state_dict(fresh, state)
    pixels = volumes()
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixels, MASK).logits, trained_2d(pixels, MASK).logits, rtol=0, atol=0)


def test_loading_adapters_into_the_wrong_model_names_the_keys(trained_2d):
    state = trainable_state_dict(trained_2d)
    baseline = build(config_2d(use_molre=False))
    with pytest.raises(KeyError, match="unexpected .*molre"):
        load_trainable_state_dict(baseline, state)
    wrong_findings = build(ModelConfig(config_2d().backbone, FINDINGS + 1, molre=MOLRE))
    with pytest.raises(ValueError, match="classifier.weight"):
        load_trainable_state_dict(wrong_findings, state)


def test_full_state_round_trips_into_a_differently_seeded_model(trained_2d):
    other = build(config_2d(), seed=123)
    load_full_state_dict(other, full_state_dict(trained_2d))
    pixels = volumes()
    with torch.no_grad():
        torch.testing.assert_close(other(pixels, MASK).logits, trained_2d(pixels, MASK).logits, rtol=0, atol=0)
    with pytest.raises(KeyError, match="missing"):
        load_full_state_dict(build(config_2d(family="dinov2")), full_state_dict(trained_2d))


def test_param_groups_split_heads_and_adapters(trained_2d):
    groups = {g["name"]: g for g in param_groups(trained_2d, lr_heads=1e-3, lr_adapters=1e-4)}
    assert groups["heads"]["lr"] == 1e-3 and groups["adapters"]["lr"] == 1e-4
    heads = {id(p) for p in groups["heads"]["params"]}
    adapters = {id(p) for p in groups["adapters"]["params"]}
    assert heads == {id(trained_2d.pool.query), id(trained_2d.classifier.weight), id(trained_2d.classifier.bias)}
    trainable = {id(p) for p in trained_2d.parameters() if p.requires_grad}
    assert heads | adapters == trainable and not heads & adapters
    torch.optim.AdamW(param_groups(trained_2d))  # accepted as is


def test_paper_sized_model_parameter_counts():
    config = ModelConfig(BackboneSpec("dinov3", "base", 224), 75)
    with torch.device("meta"):
        model = build_classifier(config)
    counts = count_parameters(model)
    assert counts["molre"] == 276_742 and counts["lora"] == 589_824
    assert counts["head"] == 768 + 768 * 75 + 75
    assert counts["trainable"] == counts["molre"] + counts["lora"] + counts["head"]


def test_attention_pool_is_softmax_of_query_scores():
    pool = AttentionPool(4)
    with torch.no_grad():
        pool.query.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    features = torch.randn(1, 3, 4)
    mask = torch.tensor([[True, False, True]])
    pooled, attention = pool(features, mask)
    scores = features[0, [0, 2]] @ pool.query / 2.0
    weights = torch.softmax(scores, 0)
    torch.testing.assert_close(attention[0], torch.stack([weights[0], torch.tensor(0.0), weights[1]]))
    torch.testing.assert_close(pooled[0], weights @ features[0, [0, 2]])


def test_bad_inputs_are_refused_with_a_reason(trained_2d):
    with pytest.raises(ValueError, match=r"\(B, S, C, H, W\)"):
        trained_2d(torch.rand(6, 3, 32, 32))
    with pytest.raises(ValueError, match="no valid slice"):
        trained_2d(volumes(), torch.tensor([[True] * 6, [False] * 6]))
    with pytest.raises(ValueError, match="slice_mask must have shape"):
        trained_2d(volumes(), torch.ones(2, 5, dtype=torch.bool))


def test_bf16_autocast_keeps_pooling_and_head_in_float32(trained_2d):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = trained_2d(volumes(), MASK)
    assert out.logits.dtype == out.attention.dtype == out.contributions.dtype == torch.float32
    torch.testing.assert_close(out.contributions.sum(1), out.logits - trained_2d.classifier.bias, atol=1e-5, rtol=1e-5)


def test_config_round_trip():
    config = config_3d()
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown model settings"):
        ModelConfig.from_dict({**config.to_dict(), "dropout": 0.1})


# Per-finding pooling (ModelConfig.pooling="per_finding") ------------------------------------------


def per_finding_model(seed: int = 0) -> HeadCTClassifier:
    config = ModelConfig(BackboneSpec("dinov3", "tiny", 32), FINDINGS, molre=MOLRE, pooling="per_finding")
    model = build(config, seed)
    make_adapters_nonzero(model)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        model.pool.log_sharpness.copy_(torch.linspace(-1.0, 1.0, FINDINGS))
    return model


def test_per_finding_pooling_decomposes_exactly_and_ignores_masked_slices():
    model = per_finding_model()
    with torch.no_grad():
        out = model(volumes(), MASK)
        slice_logits = out.slice_features @ model.classifier.weight.T + model.classifier.bias  # (B, S, C)
    assert out.logits.shape == (2, FINDINGS) and out.contributions.shape == (2, 6, FINDINGS)
    torch.testing.assert_close(out.contributions.sum(1), out.logits - model.classifier.bias)
    # attention: the mean over findings of the per-finding weights, 0 on masked slices, summing to 1
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))
    assert torch.all(out.attention[~MASK] == 0) and torch.all(out.contributions[~MASK] == 0)
    # each volume logit is the softmax(r z)-weighted mean of that finding's valid slice logits
    sharpness = model.pool.log_sharpness.exp()
    for b in range(2):
        z = slice_logits[b, MASK[b]]
        expected = (torch.softmax(z * sharpness, 0) * z).sum(0)
        torch.testing.assert_close(out.logits[b], expected)
    # garbage in masked slices changes nothing
    noisy = volumes()
    noisy[~MASK] = torch.rand(int((~MASK).sum()), 3, 32, 32) * 5
    with torch.no_grad():
        torch.testing.assert_close(model(noisy, MASK).logits, out.logits)


def test_per_finding_pooling_keeps_a_finding_seen_on_one_slice_where_attention_averages_it_away():
    pool = FindingPool(2)
    slice_logits = torch.full((1, 40, 2), -6.0)
    slice_logits[0, 17, 0] = 4.0  # finding 0 shows on one slice of forty; finding 1 on none
    mask = torch.ones(1, 40, dtype=torch.bool)
    with torch.no_grad():
        logits, weights = pool(slice_logits, mask)
    assert logits[0, 0] > 3.9 and abs(float(logits[0, 1]) + 6.0) < 1e-5  # smooth maximum vs all-agreeing mean
    assert int(weights[0, :, 0].argmax()) == 17
    assert float(slice_logits[0, :, 0].mean()) < -5.7  # what a uniform pooling would give


def test_per_finding_pooling_round_trips_and_old_configs_mean_attention():
    config = ModelConfig(BackboneSpec("dinov3", "tiny", 32), FINDINGS, pooling="per_finding")
    assert ModelConfig.from_dict(config.to_dict()) == config
    old = {key: value for key, value in config_2d().to_dict().items() if key != "pooling"}
    assert ModelConfig.from_dict(old).pooling == "attention"  # bundles written before the option
    with pytest.raises(ValueError, match="pooling must be one of attention, per_finding"):
        ModelConfig(BackboneSpec("dinov3", "tiny", 32), FINDINGS, pooling="max")
    with pytest.raises(ValueError, match="encodes whole volumes"):
        build_classifier(ModelConfig(BackboneSpec("videomae3d", "tiny", 32), FINDINGS, pooling="per_finding"))
    model = per_finding_model()
    copy = build(ModelConfig(BackboneSpec("dinov3", "tiny", 32), FINDINGS, molre=MOLRE, pooling="per_finding"), 0)
    load_trainable_state_dict(copy, trainable_state_dict(model))
    assert "pool.log_sharpness" in trainable_state_dict(model)
    with torch.no_grad():
        torch.testing.assert_close(copy(volumes(), MASK).logits, model(volumes(), MASK).logits)
    groups = {group["name"]: group["params"] for group in param_groups(model)}
    assert any(p is model.pool.log_sharpness for p in groups["heads"])


# 3-D backbone: MoLRE routes once per volume -------------------------------------------------------


def test_3d_model_routes_once_per_volume_and_decomposes_exactly():
    model = build(config_3d())
    make_adapters_nonzero(model)
    with torch.no_grad():
        out = model(volumes(), MASK)
    assert out.attention is None and model.pool is None
    assert out.router_weights.shape == (2, 1, 3)
    assert out.contributions.shape == (2, 1, FINDINGS)
    torch.testing.assert_close(out.contributions.sum(1), out.logits - model.classifier.bias)


def test_3d_model_ignores_padding_and_chunks_by_volume():
    model = build(config_3d())
    make_adapters_nonzero(model)
    pixels = volumes()
    with torch.no_grad():
        out = model(pixels, MASK)
        alone = model(pixels[1:, 1:4])
        chunked = model(pixels, MASK, chunk_size=1)
    torch.testing.assert_close(out.logits[1], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.logits, out.logits, atol=1e-5, rtol=1e-5)


def test_3d_gradients_reach_exactly_the_trainable_parameters():
    model = build(config_3d())
    make_adapters_nonzero(model)
    model.train()
    model(volumes(), MASK).logits.sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
        if parameter.requires_grad:
            assert parameter.grad.abs().sum() > 0, name
    assert set(g["name"] for g in param_groups(model)) == {"heads", "adapters"}
