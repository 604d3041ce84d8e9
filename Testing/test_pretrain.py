"""Dense pre-training on phantoms (HeadCTMoLRELib.training.pretrain): targets from masks, head transfer, learning."""

import numpy as np
import pytest
import torch

from HeadCTMoLRELib.model import backbones, classifier as model
from HeadCTMoLRELib import findings, metrics, phantoms as phantom
from HeadCTMoLRELib.training import pretrain
from HeadCTMoLRELib.ct import preprocess

SMALL = preprocess.PreprocessConfig(image_size=64, in_plane_fov_mm=224.0, slice_spacing_mm=8.0, num_slices=20,
                                    alignment="center")
IDS = tuple(phantom.RENDERABLE_FINDINGS)


def _demo_vit(seed: int = 0):
    torch.manual_seed(seed)
    encoder = backbones.build_backbone(backbones.BackboneSpec("dinov3", "demo", 64))
    return encoder, encoder.backbone.merge_and_unload()


def test_cell_labels_follow_the_masks_and_merge_implied_labels():
    drawn = phantom.generate_phantom(["epidural_hematoma", "lobar_hemorrhage"], 3, return_masks=True)
    stack = preprocess.preprocess(drawn.image, SMALL)
    cells = pretrain.phantom_cell_labels(drawn, stack, 8, IDS)
    assert cells.shape == (20, 8, 8, len(IDS)) and cells.dtype == np.uint8
    epidural, lobar, iph = (IDS.index(f) for f in ("epidural_hematoma", "lobar_hemorrhage", "intraparenchymal_hemorrhage"))
    assert cells[..., epidural].any() and cells[..., lobar].any()
    # the unspecified IPH label is implied by the lobar hematoma: same cells
    np.testing.assert_array_equal(cells[..., iph], cells[..., lobar])
    others = [i for i in range(len(IDS)) if i not in (epidural, lobar, iph)]
    assert not cells[..., others].any()
    # the cell holding the centre of the epidural mask is positive
    zyx = np.argwhere(drawn.finding_masks["epidural_hematoma"]).mean(0)
    centre = np.array(drawn.image.GetOrigin()) + zyx[::-1] * np.array(drawn.image.GetSpacing())
    k, r, c = stack.patient_to_stack_index(centre)
    assert cells[int(round(k)), int((r + 0.5) * 8 / 64), int((c + 0.5) * 8 / 64), epidural] == 1
    # a few cells, not the whole head: an 8 x 8 grid over 20 slices has 1280 cells
    assert 1 <= cells[..., epidural].sum() < 200


def test_cell_labels_need_masks():
    drawn = phantom.generate_phantom(["epidural_hematoma"], 3)
    with pytest.raises(ValueError, match="return_masks"):
        pretrain.phantom_cell_labels(drawn, preprocess.preprocess(drawn.image, SMALL), 8, IDS)


def test_pretrain_set_shapes_and_label_consistency():
    data = pretrain.make_pretrain_set(3, 5, SMALL, grid=8, findings=["epidural_hematoma", "hydrocephalus"],
                                      prevalence=0.6, workers=0)
    assert data.pixels.shape == (3, 20, 3, 64, 64) and data.pixels.dtype == np.uint8
    assert data.cell_labels.shape == (3, 20, 8, 8, 2) and data.volume_labels.shape == (3, 2)
    assert data.finding_ids == ("epidural_hematoma", "hydrocephalus") and data.grid == 8
    # a finding seen in some cell is a positive volume label
    seen = data.cell_labels.any(axis=(1, 2, 3))
    assert np.all(data.volume_labels[seen] == 1)
    with pytest.raises(ValueError, match="grid"):
        pretrain.make_pretrain_set(1, 5, SMALL, grid=7, workers=0)


def test_slice_head_init_with_per_finding_pooling_starts_at_the_smooth_maximum_of_slice_logits():
    catalog = findings.default_catalog()
    torch.manual_seed(0)
    classifier = model.build_classifier(model.ModelConfig(backbones.BackboneSpec("dinov3", "tiny", 32), len(catalog),
                                                          pooling="per_finding"))
    classifier.pool.log_sharpness.data.fill_(0.7)
    chosen = ("epidural_hematoma", "atrophy")
    head = {"weight": np.random.default_rng(1).normal(size=(2, classifier.feature_dim)).astype(np.float32),
            "bias": np.array([0.5, -1.0], np.float32)}
    assert pretrain.slice_head_init(classifier, head, chosen, catalog.ids) == 2
    assert torch.all(classifier.pool.log_sharpness == 0)  # sharpness 1
    pixels, mask = torch.rand(1, 5, 3, 32, 32), torch.tensor([[True, True, True, False, True]])
    classifier.eval()
    with torch.no_grad():
        out = classifier(pixels, mask)
        z = out.slice_features[0, mask[0]] @ torch.from_numpy(head["weight"]).T + torch.from_numpy(head["bias"])
    rows = [catalog.ids.index(f) for f in chosen]
    torch.testing.assert_close(out.logits[0, rows], (torch.softmax(z, 0) * z).sum(0))


def test_an_implied_only_label_starts_from_its_single_source_row_and_shared_ones_keep_theirs():
    """vessel_occlusion is only implied (by a hyperdense vessel): its head row starts as the vessel's, so it
    is not left untrained; intraparenchymal_hemorrhage, implied by two chosen findings, keeps its own row."""
    catalog = findings.default_catalog()
    torch.manual_seed(0)
    classifier = model.build_classifier(model.ModelConfig(backbones.BackboneSpec("dinov3", "tiny", 32), len(catalog),
                                                          pooling="per_finding"))
    chosen = ("hyperdense_vessel", "lobar_hemorrhage", "thalamic_hemorrhage")
    before = classifier.classifier.weight.detach().clone()
    head = {"weight": np.random.default_rng(2).normal(size=(3, classifier.feature_dim)).astype(np.float32),
            "bias": np.array([0.5, -1.0, 0.2], np.float32)}
    assert pretrain.slice_head_init(classifier, head, chosen, catalog.ids) == 4
    weight, bias = classifier.classifier.weight.detach(), classifier.classifier.bias.detach()
    occlusion, vessel = catalog.ids.index("vessel_occlusion"), catalog.ids.index("hyperdense_vessel")
    torch.testing.assert_close(weight[occlusion], torch.from_numpy(head["weight"][0]))
    assert float(bias[occlusion]) == float(bias[vessel]) == 0.5
    iph = catalog.ids.index("intraparenchymal_hemorrhage")
    torch.testing.assert_close(weight[iph], before[iph])
    assert pretrain.implied_sources(chosen)["intraparenchymal_hemorrhage"] == ("lobar_hemorrhage", "thalamic_hemorrhage")


def test_per_finding_prevalences_draw_the_focus_findings_more_often():
    ids = ("epidural_hematoma", "atrophy")
    table = pretrain.finding_prevalences(ids, 0.0, {"atrophy": 1.0})
    assert table == {"epidural_hematoma": 0.0, "atrophy": 1.0}
    data = pretrain.make_pretrain_set(3, 11, SMALL, grid=8, findings=ids, prevalence=table, workers=0)
    assert data.volume_labels[:, 1].all() and not data.volume_labels[:, 0].any()
    with pytest.raises(ValueError, match="not among the pre-training findings"):
        pretrain.finding_prevalences(ids, 0.2, {"lacunar_infarct": 0.5})
    with pytest.raises(ValueError, match="exactly the findings drawn"):
        pretrain.make_pretrain_set(1, 11, SMALL, grid=8, findings=ids, prevalence={"atrophy": 0.5}, workers=0)
    with pytest.raises(ValueError, match="probabilities"):
        pretrain.make_pretrain_set(1, 11, SMALL, grid=8, findings=ids, prevalence=1.5, workers=0)


def test_pretrain_phantoms_drawn_on_coarser_voxels_look_like_the_generators_own():
    """render_spacing_mm draws the phantoms on 1.75 mm pixels (about 5x faster); in the demo's 3.5 mm input
    they differ from the generator's own 0.9 mm phantoms of the same seed by a few grey levels only, with
    the same labels and the finding in the same cells."""
    chosen = ["epidural_hematoma", "pathological_calcification"]
    fine = pretrain.make_pretrain_set(2, 7, SMALL, grid=8, findings=chosen, prevalence=1.0, workers=0)
    coarse = pretrain.make_pretrain_set(2, 7, SMALL, grid=8, findings=chosen, prevalence=1.0, workers=0,
                                        render_spacing_mm=1.75)
    assert coarse.pixels.shape == fine.pixels.shape and coarse.cell_labels.shape == fine.cell_labels.shape
    np.testing.assert_array_equal(coarse.volume_labels, fine.volume_labels)
    difference = np.abs(coarse.pixels.astype(int) - fine.pixels.astype(int))
    assert difference.mean() < 4.0  # grey levels of 255; the two renderings differ at edges (skull) only
    both = (coarse.cell_labels > 0) & (fine.cell_labels > 0)
    assert both.sum() >= 0.6 * max(1, fine.cell_labels.sum())
    geometry = pretrain.render_geometry(7, 1.75)
    assert geometry["spacing_mm"][:2] == (1.75, 1.75) and geometry["size_px"] * 1.75 >= 240
    assert pretrain.render_geometry(7, None) == {}
    with pytest.raises(ValueError, match="render_spacing_mm"):
        pretrain.make_pretrain_set(1, 7, SMALL, grid=8, findings=chosen, workers=0, render_spacing_mm=3.5)


def test_slice_head_init_makes_each_volume_logit_the_mean_of_slice_logits():
    catalog = findings.default_catalog()
    spec = backbones.BackboneSpec("dinov3", "tiny", 32)
    torch.manual_seed(0)
    classifier = model.build_classifier(model.ModelConfig(spec, len(catalog)))
    classifier.pool.query.data.normal_()
    chosen = ("epidural_hematoma", "atrophy")
    head = {"weight": np.random.default_rng(0).normal(size=(2, classifier.feature_dim)).astype(np.float32),
            "bias": np.array([0.5, -1.0], np.float32)}
    assert pretrain.slice_head_init(classifier, head, chosen, catalog.ids) == 2
    pixels = torch.rand(2, 6, 3, 32, 32)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    classifier.eval()
    with torch.no_grad():
        out = classifier(pixels, mask)
        features = out.slice_features
    rows = [catalog.ids.index(f) for f in chosen]
    for b in range(2):
        slice_logits = features[b, mask[b]] @ torch.from_numpy(head["weight"]).T + torch.from_numpy(head["bias"])
        torch.testing.assert_close(out.logits[b, rows], slice_logits.mean(0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not in the model's catalog"):
        pretrain.slice_head_init(classifier, head, ("epidural_hematoma", "no_such_finding"), catalog.ids)


def test_pretraining_is_cancellable_and_keeps_the_best_weights():
    data = pretrain.make_pretrain_set(4, 9, SMALL, grid=8, findings=["epidural_hematoma", "atrophy"], prevalence=0.5,
                                      workers=0)
    encoder, vit = _demo_vit()
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    result = pretrain.pretrain_backbone(vit, encoder.normalise, data, data,
                                        pretrain.PretrainConfig(steps=50, batch_slices=4, eval_every=2), should_stop=stop)
    assert result.status == "cancelled" and result.steps_run == 3
    assert [h["step"] for h in result.history] == [2, 3]
    assert result.best_step in (2, 3) and result.slice_head["weight"].shape == (2, 128)
    assert not vit.training  # left in eval mode with the kept weights


def test_a_curriculum_part_starts_its_heads_from_the_earlier_part_for_the_findings_both_have():
    """The second part of a curriculum (every finding) starts the slice and cell head rows of the findings
    the first part trained alone from that part's kept rows; the other rows start fresh. With lr 0 nothing
    moves, so the kept heads show the start exactly."""
    first_ids, all_ids = ["atrophy"], ["epidural_hematoma", "atrophy"]
    alone = pretrain.make_pretrain_set(3, 31, SMALL, grid=8, findings=first_ids, prevalence=0.5, workers=0)
    every = pretrain.make_pretrain_set(3, 32, SMALL, grid=8, findings=all_ids, prevalence=0.5, workers=0)
    encoder, vit = _demo_vit()
    first = pretrain.pretrain_backbone(vit, encoder.normalise, alone, alone,
                                       pretrain.PretrainConfig(steps=3, batch_slices=4, eval_every=3, lr=1e-3))
    assert first.cell_head["weight"].shape == (1, 128) and first.cell_head["bias"].shape == (1,)
    assert "cell_head" not in first.summary() and "slice_head" not in first.summary()
    frozen = pretrain.PretrainConfig(steps=2, batch_slices=4, eval_every=2, lr=0.0, seed=5)
    second = pretrain.pretrain_backbone(vit, encoder.normalise, every, every, frozen, earlier=(first, first_ids))
    for head in ("slice_head", "cell_head"):
        np.testing.assert_array_equal(getattr(second, head)["weight"][1], getattr(first, head)["weight"][0])
        np.testing.assert_array_equal(getattr(second, head)["bias"][1], getattr(first, head)["bias"][0])
        assert not np.allclose(getattr(second, head)["weight"][0], getattr(first, head)["weight"][0])
    fresh = pretrain.pretrain_backbone(vit, encoder.normalise, every, every, frozen)
    assert not np.allclose(fresh.slice_head["weight"][1], first.slice_head["weight"][0]), "without earlier: fresh rows"


def test_slice_repeat_factors_by_hand():
    # 4 slices, 2 findings: finding 0 cut by 1 slice (share 0.25), finding 1 by 2 (share 0.5)
    targets = np.array([[1, 0], [0, 0], [0, 1], [0, 1]])
    factors = pretrain.slice_repeat_factors(targets, threshold=0.5)
    np.testing.assert_allclose(factors, [np.sqrt(0.5 / 0.25), 1.0, 1.0, 1.0])
    both = pretrain.slice_repeat_factors(np.array([[1, 1], [0, 1], [0, 0], [0, 0]]), threshold=1.0)
    np.testing.assert_allclose(both, [np.sqrt(1 / 0.25), np.sqrt(1 / 0.5), 1.0, 1.0])  # the rarest finding counts
    assert pretrain.slice_repeat_factors(np.zeros((3, 2)), 0.1).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="must be > 0"):
        pretrain.slice_repeat_factors(targets, 0.0)


def test_pretraining_with_slice_repeat_sampling_runs_and_is_reproducible():
    data = pretrain.make_pretrain_set(3, 21, SMALL, grid=8, findings=["epidural_hematoma", "atrophy"], prevalence=0.5,
                                      workers=0)
    settings = pretrain.PretrainConfig(steps=3, batch_slices=4, eval_every=3, slice_repeat_threshold=0.5)
    heads = []
    for _ in range(2):
        encoder, vit = _demo_vit()
        result = pretrain.pretrain_backbone(vit, encoder.normalise, data, data, settings)
        assert result.status == "completed" and result.config["slice_repeat_threshold"] == 0.5
        heads.append(result.slice_head["weight"])
    np.testing.assert_array_equal(heads[0], heads[1])


def test_a_tiny_model_learns_phantom_findings_it_has_not_seen():
    """Learning test: the demo-size ViT (4 layers, width 128) trained from scratch for 600 steps of 32 slices
    (about a minute on 2 CPU cores, plus about a minute to draw the 260 phantoms) ranks 60 NEW phantoms
    (other seeds) with mean AUC >= 0.85 over three findings of two categories: one regional (an arterial
    territory 11-18 HU darker) and two global (enlarged ventricles; wide sulci). Small focal findings need
    far longer (docs/demo_model.md)."""
    chosen = ("hypodense_acute_infarct", "hydrocephalus", "atrophy")
    train = pretrain.make_pretrain_set(200, 11, SMALL, grid=8, findings=chosen, prevalence=0.35, workers=2)
    held_out = pretrain.make_pretrain_set(60, 12, SMALL, grid=8, findings=chosen, prevalence=0.35, workers=2)
    encoder, vit = _demo_vit()
    result = pretrain.pretrain_backbone(vit, encoder.normalise, train, train,
                                        pretrain.PretrainConfig(steps=600, batch_slices=32, lr=1e-3, eval_every=600))
    weight, bias = (torch.from_numpy(result.slice_head[k]) for k in ("weight", "bias"))
    scores = pretrain.volume_scores(vit, weight, bias, held_out, encoder.normalise)
    aucs = metrics.roc_auc(scores, held_out.volume_labels.astype(float))
    print("held-out AUC", dict(zip(chosen, np.round(aucs, 3))), round(float(np.nanmean(aucs)), 3))
    assert np.nanmean(aucs) >= 0.85, dict(zip(chosen, np.round(aucs, 3)))


def test_learning_rate_schedule_warms_up_peaks_and_anneals_whatever_cuts_the_run():
    peak = 5e-4
    rates = [pretrain.one_cycle_lr(peak, f, 0.05) for f in np.linspace(0, 1, 201)]
    assert rates[0] == pytest.approx(peak / 25) and max(rates) == pytest.approx(peak)
    assert int(np.argmax(rates)) == 10  # the peak at the end of the warm-up (5 % of 200)
    assert np.all(np.diff(rates[10:]) <= 0) and rates[-1] == pytest.approx(peak / 25e4)
    # a run cut by its time limit: the schedule follows the time, so the last steps still anneal
    data = pretrain.make_pretrain_set(2, 5, SMALL, grid=8, findings=["atrophy"], prevalence=0.5, workers=0)
    encoder, vit = _demo_vit()
    seen = []
    original = pretrain.one_cycle_lr
    try:
        pretrain.one_cycle_lr = lambda p, f, w: seen.append(f) or original(p, f, w)
        result = pretrain.pretrain_backbone(vit, encoder.normalise, data, data,
                                            pretrain.PretrainConfig(steps=10**6, batch_slices=4, eval_every=10**6,
                                                                    max_minutes=0.05))
    finally:
        pretrain.one_cycle_lr = original
    assert result.status == "time_limit" and result.steps_run < 10**6
    assert seen[-1] > 0.8, "the last step of a time-limited run is near the end of the schedule"
