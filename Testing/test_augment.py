"""Slice-stack augmentation: identity, mirroring conventions, ranges, determinism, magnitudes."""

from __future__ import annotations

import torch

from HeadCTMoLRELib.training import augment
from HeadCTMoLRELib.training.augment import AugmentConfig, augment_batch

SPACING = {"pixel_spacing_mm": 3.5, "slice_spacing_mm": 4.0}


def _batch(seed=0, batch=2, slices=10, size=32):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand((batch, slices, 3, size, size), generator=generator)
    valid = torch.ones(batch, slices, dtype=torch.bool)
    valid[:, :2] = False
    return pixels, valid


def _only(**kwargs) -> AugmentConfig:
    off = AugmentConfig.off().to_dict()
    off.update(kwargs)
    return AugmentConfig.from_dict(off)


def test_all_magnitudes_zero_is_the_exact_identity():
    pixels, valid = _batch()
    out, out_valid = augment_batch(pixels, valid, AugmentConfig.off(), torch.Generator().manual_seed(1), **SPACING)
    assert torch.equal(out, pixels) and torch.equal(out_valid, valid)


def test_identity_sampling_grid_reproduces_the_stack():
    # Forces the grid_sample path with zero rotation, unit scale and no mirror: guards the voxel-centre convention.
    pixels, valid = _batch()
    config = _only(p_rotation=1.0, p_scale=1.0)
    out, out_valid = augment._geometric(pixels, valid, config, torch.Generator().manual_seed(0), 3.5, 4.0)
    assert torch.allclose(out, pixels, atol=1e-5)
    assert torch.equal(out_valid, valid)


def test_mirroring_flips_the_named_axis_and_slice_validity():
    pixels, valid = _batch()
    generator = torch.Generator().manual_seed(0)
    out, _ = augment_batch(pixels, valid, _only(mirror_p={"lr": 1.0}), generator, **SPACING)
    assert torch.allclose(out, pixels.flip(-1), atol=1e-5)
    out, _ = augment_batch(pixels, valid, _only(mirror_p={"ap": 1.0}), generator, **SPACING)
    assert torch.allclose(out, pixels.flip(-2), atol=1e-5)
    out, out_valid = augment_batch(pixels, valid, _only(mirror_p={"si": 1.0}), generator, **SPACING)
    assert torch.allclose(out, pixels.flip(1), atol=1e-5)
    assert torch.equal(out_valid, valid.flip(1))


def test_full_augmentation_keeps_shapes_range_and_valid_slices():
    pixels, valid = _batch(batch=3)
    out, out_valid = augment_batch(pixels, valid, AugmentConfig(p_elastic=1.0, p_noise=1.0),
                                   torch.Generator().manual_seed(3), **SPACING)
    assert out.shape == pixels.shape and out_valid.shape == valid.shape and out_valid.dtype == torch.bool
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert bool(out_valid.any(dim=1).all())
    assert not torch.allclose(out, pixels)


def test_same_generator_state_gives_the_same_augmentation():
    pixels, valid = _batch()
    a = augment_batch(pixels, valid, AugmentConfig(p_elastic=1.0), torch.Generator().manual_seed(5), **SPACING)
    b = augment_batch(pixels, valid, AugmentConfig(p_elastic=1.0), torch.Generator().manual_seed(5), **SPACING)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_scaling_above_one_enlarges_a_centred_square():
    pixels = torch.zeros(1, 6, 3, 32, 32)
    pixels[:, :, :, 12:20, 12:20] = 1.0
    valid = torch.ones(1, 6, dtype=torch.bool)
    out, _ = augment_batch(pixels, valid, _only(scale=(1.3, 1.3)), torch.Generator().manual_seed(0), **SPACING)
    bright_in, bright_out = (pixels[0, 3, 0] > 0.5).sum(), (out[0, 3, 0] > 0.5).sum()
    assert bright_out > 1.4 * bright_in


def test_brightness_and_noise_stay_within_their_ranges():
    pixels = torch.full((4, 4, 3, 16, 16), 0.5)
    valid = torch.ones(4, 4, dtype=torch.bool)
    out, _ = augment_batch(pixels, valid, _only(brightness=(0.99, 1.01)), torch.Generator().manual_seed(0), **SPACING)
    assert float(out.min()) >= 0.495 - 1e-6 and float(out.max()) <= 0.505 + 1e-6
    out, _ = augment_batch(pixels, valid, _only(noise_variance=(0.03, 0.03), p_noise=1.0),
                           torch.Generator().manual_seed(0), **SPACING)
    expected_std = 0.03 ** 0.5 * AugmentConfig().intensity_std
    assert abs(float((out - 0.5).std()) - expected_std) < 0.1 * expected_std


def test_elastic_displacement_has_the_documented_magnitude():
    # alpha 200, sigma 10 mm: std ~ 200 * 0.577 / ((4 pi)^0.75 * 10^1.5) = 0.55 mm (a bit less near the borders).
    generator = torch.Generator().manual_seed(0)
    field = augment.elastic_displacement_mm(2, (40, 96, 96), (4.0, 2.0, 2.0), torch.tensor([200.0, 200.0]),
                                            torch.tensor([10.0, 10.0]), generator, "cpu")
    assert field.shape == (2, 40, 96, 96, 3)
    assert 0.3 < float(field.std()) < 0.8
    zero = augment.elastic_displacement_mm(1, (8, 16, 16), (4.0, 2.0, 2.0), torch.tensor([0.0]),
                                           torch.tensor([10.0]), generator, "cpu")
    assert float(zero.abs().max()) == 0.0


def test_config_round_trips_through_json_and_rejects_unknown_axes():
    config = AugmentConfig(mirror_p={"lr": 0.5, "ap": 0.0, "si": 0.0})
    assert AugmentConfig.from_dict(config.to_dict()) == config
    try:
        AugmentConfig(mirror_p={"xy": 0.5})
    except ValueError as error:
        assert "mirror_p" in str(error)
    else:
        raise AssertionError("an unknown mirror axis was accepted")
