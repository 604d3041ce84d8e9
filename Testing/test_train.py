"""Training protocol: focal loss, masking, prevalence alpha, RFS, early stopping, AUC, fit / resume /
cancel / fine-tune and the CLI glue, on tiny models and toy CT volumes (CPU)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from HeadCTMoLRELib.model import backbones, bundle, classifier as model
from HeadCTMoLRELib.training import cases as data, train
from HeadCTMoLRELib.training.augment import AugmentConfig
from test_data import PRE, small_catalog, write_toy_dataset


def make_start_bundle(folder, *, seed=0, catalog=None):
    torch.manual_seed(seed)
    catalog = catalog or small_catalog()
    config = model.ModelConfig(backbone=backbones.BackboneSpec("dinov3", "tiny", image_size=32),
                               num_findings=len(catalog))
    return bundle.save_bundle(model.build_classifier(config), folder, catalog=catalog, preprocessing=PRE)


def tiny_config(**overrides) -> train.TrainConfig:
    values = dict(max_epochs=2, min_epochs=1, patience=5, batch_size=2, grad_accum_steps=2, device="cpu",
                  precision="fp32", cache_workers=0, augment=AugmentConfig(p_elastic=1.0))
    values.update(overrides)
    return train.TrainConfig(**values)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    csv_path = write_toy_dataset(root / "cases", 8, splits=("train", "val", "train"))
    start = make_start_bundle(root / "start")
    return {"csv": csv_path, "start": start, "cache": root / "cache"}


# ------------------------------------------------------------------------------------------------ loss
def test_focal_loss_matches_a_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha = torch.tensor([0.75, 0.25])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # positive: -a (1-p)^2 ln p ; negative: -(1-a) p^2 ln(1-p)
    e00 = -0.75 * (1 - 0.5) ** 2 * math.log(0.5)                  # 0.129965
    e01 = -(1 - 0.25) * sig(2.0) ** 2 * math.log(1 - sig(2.0))     # 1.2299...
    e10 = -(1 - 0.75) * sig(-1.0) ** 2 * math.log(1 - sig(-1.0))   # 0.0064...
    e11 = -0.25 * (1 - sig(0.5)) ** 2 * math.log(sig(0.5))         # 0.0183...
    expected = (e00 + e01 + e10 + e11) / 4
    assert abs(e00 - 0.129965) < 1e-6
    assert float(train.focal_loss(logits, labels, alpha, gamma=2.0)) == pytest.approx(expected, rel=1e-6)
    # gamma 0 and alpha 0.5 is half the binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert float(train.focal_loss(logits, labels, torch.full((2,), 0.5), gamma=0.0)) == pytest.approx(0.5 * float(bce))


def test_unknown_labels_change_neither_loss_nor_gradients():
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4]], requires_grad=True)
    labels = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 0.0]])
    alpha = torch.tensor([0.6, 0.8, 0.7])
    loss = train.focal_loss(logits, labels, alpha)
    loss.backward()
    known = ~torch.isnan(labels)
    subset = torch.stack([train.focal_loss(logits[known][i:i + 1].detach()[None],
                                           labels[known][i:i + 1][None], alpha[known.nonzero()[i, 1]][None])
                          for i in range(int(known.sum()))]).mean()
    assert float(loss.detach()) == pytest.approx(float(subset), rel=1e-6)
    assert torch.all(logits.grad[~known] == 0) and torch.all(logits.grad[known] != 0)
    assert torch.isfinite(logits.grad).all()
    all_unknown = train.focal_loss(logits, torch.full_like(labels, float("nan")), alpha)
    assert float(all_unknown.detach()) == 0.0


def test_prevalence_alpha_is_one_minus_prevalence_clipped():
    labels = np.array([[1, 0, 0, np.nan], [0, 0, 1, np.nan], [0, 0, 1, np.nan], [0, 0, 1, np.nan]], float)
    alpha = train.prevalence_alpha(labels)
    assert alpha == pytest.approx([0.75, 0.95, 0.25, 0.5])  # 1-0.25; 1-0 clipped to 0.95; 1-0.75; no label


# ----------------------------------------------------------------------------------------------- sampler
def test_repeat_factors_follow_the_lvis_rule():
    # 10 cases: finding 0 positive in 1 (f=0.1), finding 1 in 4 (f=0.4), finding 2 in none; t = 0.4
    labels = np.zeros((10, 3))
    labels[0, 0] = 1
    labels[0:4, 1] = 1
    labels[9, 1] = np.nan  # unknown: finding 1's frequency is 4 / 9
    case_factor, finding_factor = train.repeat_factors(labels, threshold=0.4)
    assert finding_factor == pytest.approx([math.sqrt(0.4 / 0.1), max(1, math.sqrt(0.4 / (4 / 9))), 1.0])
    assert case_factor[0] == pytest.approx(2.0)  # max over its positives
    assert case_factor[1:4] == pytest.approx([1.0] * 3) and case_factor[4:] == pytest.approx([1.0] * 6)


def test_epoch_order_rounds_repeat_factors_stochastically_and_reproducibly():
    factors = np.array([1.0, 2.5, 1.2])
    counts = np.array([np.bincount(train.epoch_sample_order(factors, 3, e), minlength=3) for e in range(400)])
    assert set(counts[:, 0]) == {1} and set(counts[:, 1]) <= {2, 3} and set(counts[:, 2]) <= {1, 2}
    assert counts.mean(axis=0) == pytest.approx(factors, abs=0.08)
    assert np.array_equal(train.epoch_sample_order(factors, 3, 7), train.epoch_sample_order(factors, 3, 7))


# ------------------------------------------------------------------------------------- stopping, AUC
def test_early_stopping_follows_a_scripted_auc_sequence():
    stopper = train.EarlyStopping(min_epochs=6, patience=2, max_epochs=50)
    scores = [0.60, 0.70, 0.69, 0.68, 0.67, float("nan"), 0.66, 0.80, 0.79, 0.79, 0.95]
    stopped_at = None
    for epoch, score in enumerate(scores, start=1):
        stopper.update(epoch, score)
        if stopper.should_stop():
            stopped_at = epoch
            break
    assert stopped_at == 6  # no gain since epoch 2, but never before min_epochs
    late = train.EarlyStopping(min_epochs=2, patience=2, max_epochs=50)
    for epoch, score in enumerate([0.5, 0.6, 0.7, 0.65, 0.7], start=1):
        late.update(epoch, score)
    assert late.should_stop() and late.best_epoch == 3  # equal is no gain
    capped = train.EarlyStopping(min_epochs=20, patience=5, max_epochs=3)
    for epoch in (1, 2, 3):
        capped.update(epoch, 0.5 + epoch)
    assert capped.should_stop()


def test_auc_per_finding_handles_ties_unknowns_and_single_class():
    probabilities = np.array([[0.9, 0.1], [0.4, 0.2], [0.4, 0.3], [0.1, 0.4]])
    labels = np.array([[1, 0], [1, 0], [0, 0], [0, np.nan]])
    auc = train.auc_per_finding(probabilities, labels)
    assert auc[0] == pytest.approx((1 + 1 + 1 + 0.5) / 4)  # one tie counts half
    assert np.isnan(auc[1])


# --------------------------------------------------------------------------------------------- fit
def _trainable(result):
    return {k: v.clone() for k, v in model.trainable_state_dict(result.model).items()}


def test_fit_writes_a_bundle_with_provenance_and_history(toy, tmp_path):
    events = []
    result = train.fit(toy["csv"], toy["start"], tmp_path / "run", tiny_config(), cache_dir=toy["cache"],
                       progress=events.append)
    assert result.status == "completed" and result.epochs_run == 2
    loaded = bundle.load_bundle(result.bundle_path)
    training = loaded.manifest["training"]
    assert training["cases_csv_sha256"] == data._sha256_bytes_of(toy["csv"])
    assert training["counts"]["train"] == 5 and training["counts"]["val"] == 3
    assert training["status"] == "completed" and training["epochs_run"] == 2
    assert training["start_bundle"]["fingerprint"] == bundle.load_bundle(toy["start"]).fingerprint
    assert len(training["history"]) == 2 and "expert_usage" in training["history"][0]
    assert sum(training["history"][0]["expert_usage"]) == pytest.approx(1.0, abs=1e-4)
    assert loaded.manifest["synthetic_training_data"] is False
    assert loaded.manifest["metrics"]["best_epoch"] == result.best_epoch
    assert {e["stage"] for e in events} >= {"cache", "train", "validate", "done"}
    assert json.loads((tmp_path / "run" / "history.json").read_text())[-1]["epoch"] == 2
    rebuilt = bundle.build_model(loaded)
    assert rebuilt.classifier.weight.shape == (2, 64)


def test_interrupted_and_resumed_run_gives_the_same_weights(toy, tmp_path):
    straight = train.fit(toy["csv"], toy["start"], tmp_path / "straight", tiny_config(), cache_dir=toy["cache"])
    calls = {"n": 0}

    def stop_on_fourth_check():
        calls["n"] += 1
        return calls["n"] == 4  # mid-way through epoch 2 (2 optimiser steps per epoch)

    interrupted = train.fit(toy["csv"], toy["start"], tmp_path / "resumed", tiny_config(), cache_dir=toy["cache"],
                            should_stop=stop_on_fourth_check)
    assert interrupted.status == "cancelled"
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = train.fit(toy["csv"], toy["start"], tmp_path / "resumed", tiny_config(), cache_dir=toy["cache"],
                        resume=True)
    assert resumed.status == "completed" and resumed.epochs_run == 2
    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in straight.history] == pytest.approx([h["train_loss"] for h in resumed.history])


def test_a_run_folder_is_not_overwritten_without_resume(toy, tmp_path):
    train.fit(toy["csv"], toy["start"], tmp_path / "run", tiny_config(max_epochs=1), cache_dir=toy["cache"])
    with pytest.raises(train.TrainError, match="--resume"):
        train.fit(toy["csv"], toy["start"], tmp_path / "run", tiny_config(max_epochs=1), cache_dir=toy["cache"])
    with pytest.raises(train.TrainError, match="no checkpoint"):
        train.fit(toy["csv"], toy["start"], tmp_path / "fresh", tiny_config(), cache_dir=toy["cache"], resume=True)


def test_fine_tune_records_its_parent_and_refuses_untrained_or_foreign_data(toy, tmp_path):
    with pytest.raises(train.TrainError, match="never been trained"):
        train.fine_tune(toy["csv"], toy["start"], tmp_path / "ft0", tiny_config(max_epochs=1), cache_dir=toy["cache"])
    trained = train.fit(toy["csv"], toy["start"], tmp_path / "first", tiny_config(max_epochs=1), cache_dir=toy["cache"])
    parent = bundle.load_bundle(trained.bundle_path)
    tuned = train.fine_tune(toy["csv"], parent, tmp_path / "ft", tiny_config(max_epochs=1), cache_dir=toy["cache"])
    manifest = bundle.load_bundle(tuned.bundle_path).manifest
    assert manifest["training"]["kind"] == "fine-tune"
    assert manifest["training"]["parent_bundle"]["fingerprint"] == parent.fingerprint
    foreign = tmp_path / "foreign.csv"
    foreign.write_text(f"path,atrophy\n{data.read_cases(toy['csv'], small_catalog()).cases[0].path},1\n")
    with pytest.raises(data.CaseTableError, match="no column names a finding"):
        train.fine_tune(foreign, parent, tmp_path / "ft2", tiny_config(max_epochs=1), cache_dir=toy["cache"])


def test_checkpoint_holds_only_safetensors_and_json(toy, tmp_path):
    train.fit(toy["csv"], toy["start"], tmp_path / "run", tiny_config(max_epochs=1), cache_dir=toy["cache"])
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert len(files) == 2 and files[0] == "state.json" and files[1].endswith(".safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "checkpoint" / files[1]), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in keys)
    assert "rng.torch_cpu" in keys and "rng.augment" in keys


# --------------------------------------------------------------------------------------------------- CLI
def _parse(argv, adder):
    parser = argparse.ArgumentParser()
    adder(parser)
    return parser.parse_args(argv)


def test_cli_trains_and_reports_cancellation_exit_code(toy, tmp_path, monkeypatch, capsys):
    args = _parse(["--cases", str(toy["csv"]), "--model", str(toy["start"]), "--out", str(tmp_path / "cli"),
                   "--epochs", "1", "--min-epochs", "1", "--batch-size", "2", "--device", "cpu", "--precision",
                   "fp32", "--cache", str(toy["cache"]), "--workers", "0"], train.add_train_arguments)
    assert train.run_train_from_args(args) == 0
    assert (tmp_path / "cli" / "model" / "manifest.json").is_file()
    assert "epoch 1/1" in capsys.readouterr().err
    original_fit = train.fit

    def cancelled_fit(*a, **k):
        return original_fit(*a, **{**k, "should_stop": lambda: True})

    monkeypatch.setattr(train, "fit", cancelled_fit)
    args = _parse(["--cases", str(toy["csv"]), "--model", str(toy["start"]), "--out", str(tmp_path / "cli2"),
                   "--epochs", "1", "--device", "cpu", "--cache", str(toy["cache"]), "--workers", "0"],
                  train.add_train_arguments)
    assert train.run_train_from_args(args) == 130
    assert "--resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- learning
def test_a_tiny_model_learns_a_visible_finding_on_held_out_cases(tmp_path):
    """End to end: a randomly initialised tiny DINOv3 (frozen) + LoRA + MoLRE learns a bright 75 HU blob
    (a hematoma stand-in) in toy head volumes and ranks held-out cases with AUC >= 0.85."""
    train_csv = write_toy_dataset(tmp_path / "train", 48, seed=1)
    test_csv = write_toy_dataset(tmp_path / "test", 32, seed=2)
    start = make_start_bundle(tmp_path / "start")
    config = train.TrainConfig(max_epochs=15, min_epochs=15, batch_size=4, lr_heads=1e-2, lr_adapters=1e-3,
                               device="cpu", precision="fp32", cache_workers=0, seed=0)
    result = train.fit(train_csv, start, tmp_path / "run", config, cache_dir=tmp_path / "cache")
    assert result.best_val_mean_auc is not None and result.best_val_mean_auc >= 0.85
    held_out = data.predict_cases(result.bundle_path, test_csv, cache_dir=tmp_path / "cache", device="cpu",
                                  precision="fp32", workers=0)
    auc = train.auc_per_finding(held_out.probabilities, held_out.labels)
    assert auc[0] >= 0.85, auc


def test_load_balance_weight_is_zero_by_default_and_when_set_changes_the_router_training(toy, tmp_path):
    """MoLREConfig.load_balance_weight: 0 (the paper's unsupervised routing) unless asked; a positive weight
    adds molre.load_balance_loss (balance of the mean expert usage) to the loss, so the router learns
    differently and the trained bundle records the weight used."""
    from HeadCTMoLRELib.model.molre import MoLREConfig

    assert MoLREConfig().load_balance_weight == 0.0
    assert bundle.load_bundle(toy["start"]).manifest["model"]["molre"]["load_balance_weight"] == 0.0
    plain = train.fit(toy["csv"], toy["start"], tmp_path / "plain", tiny_config(max_epochs=1), cache_dir=toy["cache"])
    balanced = train.fit(toy["csv"], toy["start"], tmp_path / "balanced",
                         tiny_config(max_epochs=1, load_balance_weight=2.0), cache_dir=toy["cache"])
    assert bundle.load_bundle(plain.bundle_path).manifest["model"]["molre"]["load_balance_weight"] == 0.0
    assert bundle.load_bundle(balanced.bundle_path).manifest["model"]["molre"]["load_balance_weight"] == 2.0
    a, b = _trainable(plain), _trainable(balanced)
    router = [k for k in a if "router" in k]
    assert router and any(not torch.equal(a[k], b[k]) for k in router)
    # the balance term (>= 1 for any routing) is part of the training loss
    assert balanced.history[0]["train_loss"] > plain.history[0]["train_loss"] + 1.0
