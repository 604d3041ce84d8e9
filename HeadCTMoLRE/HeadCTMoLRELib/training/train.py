"""Training and fine-tuning on labelled cases: the MoLRE paper's protocol.

    fit(cases, start_bundle, out_dir, TrainConfig()) -> TrainResult
    fine_tune(cases, trained_bundle, out_dir, TrainConfig()) -> TrainResult

Protocol:
- loss: multi-label focal loss, gamma = 2, alpha per finding from its prevalence in the training cases,
  alpha_c = clip(1 - prevalence_c, 0.05, 0.95) (weight of the positive term; rare findings weigh more).
  Per finding and case: -[alpha y (1-p)^gamma log p + (1-alpha)(1-y) p^gamma log(1-p)], averaged over
  the KNOWN labels of the batch (unknown = NaN labels contribute nothing, not even a gradient).
  Optional MoLRE load-balancing term: molre.load_balance_loss (balance of the mean expert usage over a
  batch) times the bundle's ``MoLREConfig.load_balance_weight`` (0 = the paper's default), which
  ``TrainConfig.load_balance_weight`` overrides when set; the trained bundle records the weight used.
- sampling: Repeat Factor Sampling (LVIS): f_c = fraction of training cases (with a known label for c)
  positive for c, r_c = max(1, sqrt(t / f_c)), a case repeats r_i = max over its positive findings of
  r_c (1 without any) times per epoch, rounded stochastically each epoch (floor(r_i) + Bernoulli(frac)).
- AdamW, lr 1e-3 for pooling + head, 1e-4 for LoRA + MoLRE (model.param_groups); constant rates.
  ``train_backbone=True`` also trains the backbone's own weights at ``lr_backbone`` (the paper's protocol
  for Pillar0-HeadCT, "fully fine-tuned + MoLRE"; for the 2-D backbones a stand-in for foundation
  pre-training when no pretrained weights exist, used by scripts/train_demo_model.py); its bundles then
  carry the trained backbone (always bundled). The LoRA adapters stay and train too (they start at zero).
- augmentation: augment.AugmentConfig (the paper's list), on the training device.
- early stopping on the mean validation AUC over findings with both classes among the validation
  cases: at least ``min_epochs`` (20), then stop after ``patience`` (5) epochs without gain, at most
  ``max_epochs`` (50). The best epoch's model is written as a bundle to ``OUT/model``.
- bf16 autocast on CUDA ("auto"), fp32 on the CPU; gradient accumulation; DistributedDataParallel
  under torchrun (see distributed.py).

Run folder ``OUT``: ``model/`` (the best bundle, atomically replaced when validation improves: written
in a staging folder, the old one renamed aside, the new one renamed in),
``checkpoint/`` (``state.json`` + ``tensors-*.safetensors``: trainable weights, AdamW state and RNG
states, rewritten atomically (fsync + rename) each epoch and on cancel, so ``resume=True`` continues
exactly where the run stopped), ``history.json`` (one entry per epoch). Each epoch's checkpoint is
written BEFORE its best bundle, and a resumed run first writes the best bundle a crash kept from being
written, so the bundle's training record always matches its weights. Staging folders a crash left
behind are cleaned at the next run; ``resume`` checks the checkpoint before any case is preprocessed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .augment import AugmentConfig
from . import distributed
from .. import calibration
from ..calibration import ALPHA_CLIP
from ..atomic_files import atomic_write, atomic_write_text
from ..datasets.importer import read_dataset_sidecar
from ..settings import reject_unknown_settings

CHECKPOINT_FORMAT = "headct-molre-checkpoint"
CHECKPOINT_VERSION = 1
EXIT_OK, EXIT_NO_MODEL, EXIT_REFUSED, EXIT_CANCELLED = 0, 1, 2, 130


class TrainError(ValueError):
    """Training cannot start or continue; the message says what to change."""


# ------------------------------------------------------------------------------------------------ config
@dataclass
class TrainConfig:
    """Training settings (JSON-able with to_dict / from_dict); defaults follow the paper."""

    max_epochs: int = 50
    min_epochs: int = 20
    patience: int = 5
    batch_size: int = 4
    grad_accum_steps: int = 1
    lr_heads: float = 1e-3
    lr_adapters: float = 1e-4
    weight_decay: float = 0.01
    focal_gamma: float = 2.0
    rfs_threshold: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    val_fraction: float = 0.2
    load_balance_weight: float | None = None  # None: the start bundle's MoLREConfig.load_balance_weight
    max_minutes: float | None = None
    cache_workers: int | None = None
    train_backbone: bool = False
    lr_backbone: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)
        if self.max_epochs < 1 or self.min_epochs < 0 or self.patience < 1:
            raise TrainError(f"epochs: need max_epochs >= 1, min_epochs >= 0, patience >= 1 (got {self.max_epochs}, "
                             f"{self.min_epochs}, {self.patience}).")
        if self.batch_size < 1 or self.grad_accum_steps < 1:
            raise TrainError(f"batch_size and grad_accum_steps must be >= 1 (got {self.batch_size}, {self.grad_accum_steps}).")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainError(f"training precision must be auto, fp32 or bf16 (got {self.precision!r}); fp16 "
                             "training would need loss scaling, use bf16.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["augment"] = self.augment.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        reject_unknown_settings(cls, data, "training", TrainError)
        return cls(**data)


# ------------------------------------------------------------------------------------------ loss, sampler
def prevalence_alpha(labels: np.ndarray, clip: tuple[float, float] = ALPHA_CLIP) -> np.ndarray:
    """float32 (C,) focal alpha per finding: clip(1 - prevalence, *clip), prevalence over known labels
    of (N, C) ``labels`` (NaN = unknown); 0.5 for a finding without any known label."""
    labels = np.asarray(labels, dtype=np.float64)
    known = np.isfinite(labels).sum(axis=0)
    positives = np.nansum(labels == 1, axis=0)
    prevalence = np.divide(positives, known, out=np.full(labels.shape[1], 0.5), where=known > 0)
    alpha = np.where(known > 0, np.clip(1.0 - prevalence, *clip), 0.5)
    return alpha.astype(np.float32)


def focal_loss(logits, labels, alpha, gamma: float = 2.0):
    """Mean multi-label focal loss over the known entries of ``labels`` (B, C) (1/0, NaN = unknown),
    for ``logits`` (B, C) and ``alpha`` (C,). Unknown entries add neither loss nor gradient; a batch
    without any known label gives 0."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    known = ~torch.isnan(labels)
    target = torch.where(known, labels, torch.zeros_like(labels)).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    alpha = alpha.to(logits)
    p, not_p = log_p.exp(), log_not_p.exp()
    per_entry = -(alpha * target * not_p.pow(gamma) * log_p + (1 - alpha) * (1 - target) * p.pow(gamma) * log_not_p)
    per_entry = torch.where(known, per_entry, torch.zeros_like(per_entry))
    return per_entry.sum() / known.sum().clamp_min(1)


def repeat_factors(labels: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """LVIS repeat factors: (per case (N,), per finding (C,)). f_c = positives / known labels of c,
    r_c = max(1, sqrt(threshold / f_c)) (1 when f_c = 0), r_i = max of r_c over case i's positives."""
    labels = np.asarray(labels, dtype=np.float64)
    known = np.isfinite(labels).sum(axis=0)
    frequency = np.divide(np.nansum(labels == 1, axis=0), known, out=np.zeros(labels.shape[1]), where=known > 0)
    finding_factor = np.ones(labels.shape[1])
    seen = frequency > 0
    finding_factor[seen] = np.maximum(1.0, np.sqrt(threshold / frequency[seen]))
    positive = labels == 1
    case_factor = np.where(positive, finding_factor[None, :], 1.0).max(axis=1) if labels.size else np.ones(len(labels))
    return case_factor, finding_factor


def epoch_sample_order(case_factors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Indices of one epoch: case i appears floor(r_i) + Bernoulli(r_i - floor(r_i)) times, shuffled;
    a pure function of (seed, epoch) so that resumed and distributed runs draw the same list."""
    rng = np.random.default_rng([int(seed), int(epoch), 11])
    whole = np.floor(case_factors)
    counts = (whole + (rng.random(len(case_factors)) < case_factors - whole)).astype(int)
    order = np.repeat(np.arange(len(case_factors)), counts)
    rng.shuffle(order)
    return order


def auc_per_finding(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,) ROC AUC per finding over cases with a known label (Mann-Whitney, ties count half); NaN
    where the known labels do not hold both classes. The one implementation is metrics.roc_auc."""
    from ..metrics import roc_auc

    return roc_auc(probabilities, labels)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a gain in the score, never before ``min_epochs`` epochs,
    always at ``max_epochs``. A NaN score never counts as a gain. Epochs are numbered from 1."""

    min_epochs: int
    patience: int
    max_epochs: int
    best_score: float = -math.inf
    best_epoch: int = 0
    epochs_seen: int = 0

    def update(self, epoch: int, score: float | None) -> bool:
        """Record epoch ``epoch``'s score; True when it is the best so far."""
        self.epochs_seen = epoch
        if score is not None and math.isfinite(score) and score > self.best_score:
            self.best_score, self.best_epoch = float(score), epoch
            return True
        return False

    def should_stop(self) -> bool:
        if self.epochs_seen >= self.max_epochs:
            return True
        return self.epochs_seen >= self.min_epochs and self.epochs_seen - self.best_epoch >= self.patience

    def state(self) -> dict:
        return {"best_score": None if not math.isfinite(self.best_score) else self.best_score,
                "best_epoch": self.best_epoch, "epochs_seen": self.epochs_seen}

    def load(self, state: dict) -> None:
        self.best_score = -math.inf if state.get("best_score") is None else float(state["best_score"])
        self.best_epoch, self.epochs_seen = int(state["best_epoch"]), int(state["epochs_seen"])


# ------------------------------------------------------------------------------------------- checkpoint
def _rng_tensors(augment_generator) -> dict:
    import torch

    tensors = {"rng.torch_cpu": torch.get_rng_state(), "rng.augment": augment_generator.get_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.torch_cuda.{index}"] = state
    return tensors


def _python_rng_json() -> dict:
    name, keys, position, gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {"numpy": [name, keys.tolist(), int(position), int(gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def _restore_python_rng(state: dict) -> None:
    name, keys, position, gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(folder: Path, *, model, optimizer, augment_generator, state: dict) -> None:
    """Write trainable weights, AdamW state (tensors in safetensors, scalars in JSON) and RNG states.

    A new ``tensors-<epoch>-<step>.safetensors`` is written first, then ``state.json`` (naming it and its
    sha256) replaces the old one atomically, then older tensor files are removed: a crash at any point
    leaves a complete checkpoint.
    """
    from safetensors.torch import save_file

    from ..model.bundle import sha256_file
    from ..model.backbones import base_state_dict
    from ..model.classifier import backbone_is_trainable, trainable_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable_state_dict(model).items()}
    if backbone_is_trainable(model):
        tensors.update({f"backbone.{k}": v.detach().cpu().contiguous() for k, v in base_state_dict(model.encoder).items()})
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if hasattr(value, "detach"):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors.update({k: v.cpu().contiguous() for k, v in _rng_tensors(augment_generator).items()})
    name = f"tensors-{state['epoch']:04d}-{state['step']:06d}.safetensors"
    atomic_write(folder / name, lambda temporary: save_file(tensors, temporary))
    document = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "tensors": name,
                "tensors_sha256": sha256_file(folder / name), "optimizer_param_groups": optimizer_state["param_groups"],
                "optimizer_scalars": scalars, "host_rng": _python_rng_json(), **state}
    atomic_write_text(folder / "state.json", json.dumps(document, indent=1))
    for old in folder.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def check_checkpoint(folder: Path) -> dict:
    """The checkpoint's JSON state, after checking (cheaply, before any case is preprocessed) that it
    exists, is of this version and that its tensor file is the one it names. Raises TrainError."""
    from ..model.bundle import sha256_file

    state_path = folder / "state.json"
    if not state_path.is_file():
        raise TrainError(f"{folder}: no checkpoint to resume from (state.json missing); start without --resume.")
    try:
        document = json.loads(state_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise TrainError(f"{state_path} is damaged ({str(error)[:200]}); cannot resume. Start a new run in "
                         "another --out.") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT \
            or document.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{state_path}: not a checkpoint of this HeadCTMoLRE version.")
    name = str(document.get("tensors", ""))
    tensor_path = folder / name
    if "/" in name or not name.startswith("tensors-") or not tensor_path.is_file() \
            or sha256_file(tensor_path) != document.get("tensors_sha256"):
        raise TrainError(f"{tensor_path}: missing or changed since the checkpoint was written; cannot resume.")
    return document


def clean_stale_outputs(out_dir: Path) -> list[Path]:
    """Remove what an interrupted run left in ``out_dir``: staging folders of the best bundle (putting
    the previous bundle back if a crash came between its two renames) and temporary checkpoint files."""
    from ..model.bundle import recover_interrupted_save

    removed = recover_interrupted_save(out_dir / "model")
    for temporary in [*(out_dir / "checkpoint").glob(".*.tmp"), *out_dir.glob(".history.json.*.tmp")]:
        temporary.unlink(missing_ok=True)
        removed.append(temporary)
    return removed


def load_checkpoint(folder: Path, *, model, optimizer, augment_generator) -> dict:
    """Restore what `save_checkpoint` wrote into ``model``, ``optimizer`` and the RNGs; returns the
    JSON state (epoch, step, history, ...). Raises TrainError for a damaged or foreign checkpoint."""
    import torch
    from safetensors.torch import load_file

    from ..model.backbones import load_base_state_dict
    from ..model.classifier import backbone_is_trainable, load_trainable_state_dict

    document = check_checkpoint(folder)
    tensors = load_file(str(folder / document["tensors"]))
    load_trainable_state_dict(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if bool(backbone) != backbone_is_trainable(model):
        raise TrainError(f"{folder}: the checkpoint was made with{'' if backbone else 'out'} train_backbone; resume "
                         "with the same settings.")
    if backbone:
        load_base_state_dict(model.encoder, backbone)
    optimizer_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    for index, entries in document["optimizer_scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": document["optimizer_param_groups"]})
    torch.set_rng_state(tensors["rng.torch_cpu"])
    augment_generator.set_state(tensors["rng.augment"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.torch_cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    _restore_python_rng(document["host_rng"])
    return document


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """``status``: "completed" (max_epochs), "early_stopped", "cancelled" or "time_limit";
    ``bundle_path``: the best model bundle (None when no epoch finished); ``history``: one dict per
    epoch; ``problems``: skipped cases and CSV issues; ``model``: the trained classifier in memory
    (last state, not necessarily the best)."""

    status: str
    bundle_path: Path | None
    checkpoint_dir: Path
    epochs_run: int
    best_epoch: int
    best_val_mean_auc: float | None
    history: list[dict]
    problems: list[str]
    duration_s: float
    model: Any = None


def _software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors", "numpy", "SimpleITK"):
        try:
            versions[name] = getattr(__import__(name), "__version__", "?")
        except ImportError:
            pass
    from .. import __version__

    versions["headct_molre"] = __version__
    return versions


def _training_precision(device, requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _config_fingerprint(config: TrainConfig) -> str:
    stable = {k: v for k, v in config.to_dict().items() if k not in ("max_epochs", "max_minutes", "device",
                                                                      "cache_workers")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- fit
@dataclass
class _Run:
    """Everything one training run needs, prepared by `_prepare`."""

    config: TrainConfig
    context: Any
    start_bundle: Any
    table: Any
    train_cases: list
    val_table: Any
    files: dict
    problems: list[str]
    out_dir: Path
    precision: str
    kind: str
    parent: dict | None
    cache_dir: Any = None
    case_sha256: dict = field(default_factory=dict)  # "train"/"val" -> sha256 of each input (overlap checks)
    focal_alpha: Any = None  # (C,) the loss's alpha, recorded for the prior correction


def _prepare(cases, start_bundle, out_dir, config: TrainConfig, cache_dir, progress, kind, context) -> _Run:
    from ..model.bundle import Bundle, load_bundle
    from .cases import CaseTable, assign_splits, build_cache, read_cases

    bundle = start_bundle if isinstance(start_bundle, Bundle) else load_bundle(start_bundle)
    table = cases if isinstance(cases, CaseTable) else read_cases(cases, bundle.catalog)
    if tuple(table.catalog.ids) != tuple(bundle.catalog.ids):
        table = read_cases(table.csv_path, bundle.catalog) if table.csv_path else table
    if tuple(table.catalog.ids) != tuple(bundle.catalog.ids):
        raise TrainError("The cases were read with another finding catalog than the model's; read them with "
                         "the bundle's catalog.")
    if not table.has_split or any(case.split is None for case in table.cases):
        table = assign_splits(table, config.val_fraction, config.seed)
    problems = list(table.problems)
    _check_splits(table)
    usable = [c for c in table.cases if c.split in ("train", "val")]
    cached = None
    if context.is_main:
        cached = build_cache(usable, bundle.preprocessing, cache_dir=cache_dir, workers=config.cache_workers,
                             progress=progress)
    distributed.barrier(context)
    if not context.is_main:
        cached = build_cache(usable, bundle.preprocessing, cache_dir=cache_dir, workers=0)
    problems += [reason for _, reason in cached.failures]
    train_cases = [c for c in table.cases if c.split == "train" and str(c.path) in cached.files]
    val_cases = [c for c in table.cases if c.split == "val" and str(c.path) in cached.files]
    if not train_cases:
        raise TrainError(f"No usable training case in {table.csv_path or 'the cases'} ({len(problems)} problem(s): "
                         + "; ".join(problems[:3]) + ").")
    from .cases import input_sha256

    device = context.device
    hashes = {role: [input_sha256(c.path) for c in chosen] for role, chosen in (("train", train_cases),
                                                                               ("val", val_cases))}
    return _Run(config=config, context=context, start_bundle=bundle, table=table, train_cases=train_cases,
                val_table=table.subset(val_cases), files=cached.files, problems=problems, out_dir=Path(out_dir),
                precision=_training_precision(device, config.precision), kind=kind, parent=None,
                cache_dir=cache_dir, case_sha256=hashes)


def _check_splits(table) -> None:
    """Refuse, before any preprocessing, a table without a training case (e.g. every row split=test)."""
    counts = table.counts()["splits"]
    if not counts.get("train"):
        where = table.csv_path or "the cases"
        found = ", ".join(f"{n} {split}" for split, n in counts.items()) or "no usable case"
        raise TrainError(f"{where}: no case for training ({found}). Mark training cases split=train (or leave the "
                         "split blank to let training choose a validation share); test cases are never trained on.")


class _Prefetcher:
    """Reads the next micro-batch of cached stacks in a background thread."""

    def __init__(self, files: list[list[Path]]):
        from .cases import stack_batch

        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._futures = {0: self._pool.submit(stack_batch, files[0])} if files else {}
        self._files, self._read = files, stack_batch

    def get(self, index: int):
        future = self._futures.pop(index, None) or self._pool.submit(self._read, self._files[index])
        if index + 1 < len(self._files):
            self._futures[index + 1] = self._pool.submit(self._read, self._files[index + 1])
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def fit(cases, start_bundle, out_dir, config: TrainConfig | None = None, *, cache_dir=None,
        progress: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
        resume: bool = False, _kind: str = "train", _parent: dict | None = None) -> TrainResult:
    """Train ``start_bundle``'s adapters (LoRA, MoLRE, pooling, head) on ``cases``.

    ``cases``: a cases CSV or data.CaseTable; ``start_bundle``: a bundle folder or bundle.Bundle (its
    catalog and preprocessing are kept); ``out_dir``: the run folder (see the module docstring).
    ``progress`` receives dicts with "stage" in cache / train / validate / done. ``should_stop()``
    returning True ends the run at the next optimiser step with a checkpoint (status "cancelled").
    ``resume=True`` continues from ``out_dir/checkpoint`` and gives the same weights as a run that
    was never interrupted. Under torchrun the same call trains with DistributedDataParallel.
    """
    import torch

    config = config or TrainConfig()
    started = time.perf_counter()
    context = distributed.init_from_env(config.device)
    try:
        out_dir = Path(out_dir)
        checkpoint_dir = out_dir / "checkpoint"
        if context.is_main and not resume and (checkpoint_dir / "state.json").exists():
            raise TrainError(f"{out_dir} already holds a training run; pass --resume to continue it or choose "
                             "another --out.")
        if resume:
            check_checkpoint(checkpoint_dir)  # refuse before preprocessing any case
        if context.is_main:
            clean_stale_outputs(out_dir)
        run = _prepare(cases, start_bundle, out_dir, config, cache_dir, progress, _kind, context)
        run.parent = _parent
        return _train(run, checkpoint_dir, progress, should_stop, resume, started)
    finally:
        distributed.cleanup(context)


def _build_training_model(run: _Run):
    import torch

    from ..model.bundle import build_model
    from ..model.classifier import param_groups, unfreeze_backbone

    torch.manual_seed(run.config.seed)
    model = build_model(run.start_bundle).to(run.context.device)
    weight = run.config.load_balance_weight
    if weight is not None and model.config.use_molre and weight != model.config.molre.load_balance_weight:
        # the bundle records the weight it was trained with (MoLREConfig validates it)
        model.config = dataclasses.replace(model.config, molre=dataclasses.replace(model.config.molre,
                                                                                   load_balance_weight=float(weight)))
    if run.config.train_backbone:
        unfreeze_backbone(model)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, run.config.lr_heads, run.config.lr_adapters,
                                               run.config.lr_backbone),
                                  weight_decay=run.config.weight_decay)
    return model, optimizer


def _train(run: _Run, checkpoint_dir: Path, progress, should_stop, resume: bool, started: float) -> TrainResult:
    import torch

    from .augment import augment_batch
    from ..inference import _autocast
    from ..model.molre import expert_usage, router_entropy

    config, context, device = run.config, run.context, run.context.device
    model, optimizer = _build_training_model(run)
    generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + context.rank)
    train_labels = np.stack([c.labels for c in run.train_cases])
    run.focal_alpha = prevalence_alpha(train_labels)
    alpha = torch.from_numpy(run.focal_alpha).to(device)
    case_factors, _ = repeat_factors(train_labels, config.rfs_threshold)
    stopper = EarlyStopping(config.min_epochs, config.patience, config.max_epochs)
    history: list[dict] = []
    start_epoch, start_step, running = 0, 0, None
    elapsed_before = 0.0
    if resume:
        document = load_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, augment_generator=generator)
        if document.get("config_fingerprint") != _config_fingerprint(config):
            raise TrainError(f"{checkpoint_dir}: the checkpoint was made with other training settings; resume with "
                             "the same settings (only --epochs, --max-minutes and --device may change).")
        start_epoch, start_step, running = document["epoch"], document["step"], document.get("running")
        history, elapsed_before = document["history"], float(document.get("elapsed_s", 0.0))
        stopper.load(document["early_stopping"])
        stopper.max_epochs = config.max_epochs
        if context.is_main and start_step == 0 and _best_bundle_pending(run, history):
            _save_best(run, model, history[-1], history)  # the checkpoint's weights are that epoch's
    wrapped = distributed.wrap_model(model, context)
    spacing = run.start_bundle.preprocessing
    status, epoch = "completed", start_epoch
    deadline = None if config.max_minutes is None else started + 60.0 * config.max_minutes - elapsed_before

    def checkpoint(epoch_index: int, step: int, running_state):
        if context.is_main:
            save_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, augment_generator=generator, state={
                "epoch": epoch_index, "step": step, "running": running_state, "history": history,
                "early_stopping": stopper.state(), "config": config.to_dict(),
                "config_fingerprint": _config_fingerprint(config),
                "elapsed_s": elapsed_before + time.perf_counter() - started,
                "cases_csv_sha256": run.table.csv_sha256})
        distributed.barrier(context)

    while epoch < config.max_epochs and not stopper.should_stop():
        order = distributed.shard(epoch_sample_order(case_factors, config.seed, epoch), context)
        batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        files = [[run.files[str(run.train_cases[i].path)] for i in batch] for batch in batches]
        sums = running or {"loss": 0.0, "batches": 0, "usage": None, "entropy": 0.0, "slices": 0}
        running = None
        prefetch = _Prefetcher(files)
        epoch_start = time.perf_counter()
        try:
            for step in range(start_step, len(batches)):
                if step % config.grad_accum_steps == 0:
                    stop_now = bool(should_stop and should_stop())
                    out_of_time = deadline is not None and time.perf_counter() > deadline
                    if distributed.any_rank(stop_now or out_of_time, context):
                        status = "cancelled" if distributed.any_rank(stop_now, context) else "time_limit"
                        checkpoint(epoch, step, sums)
                        return _finish(run, status, model, history, stopper, checkpoint_dir, started, elapsed_before, progress)
                pixels, valid = prefetch.get(step)
                pixels = pixels.to(device, non_blocking=True).float().div_(255.0)
                valid = valid.to(device)
                pixels, valid = augment_batch(pixels, valid, config.augment, generator,
                                              pixel_spacing_mm=spacing.pixel_spacing_mm,
                                              slice_spacing_mm=spacing.slice_spacing_mm)
                labels = torch.from_numpy(train_labels[batches[step]]).to(device)
                group_start = step - step % config.grad_accum_steps
                group_size = min(config.grad_accum_steps, len(batches) - group_start)
                last_in_group = step == group_start + group_size - 1
                sync = wrapped.no_sync() if context.enabled and not last_in_group else contextlib.nullcontext()
                with sync:
                    with _autocast(device, run.precision):
                        output = wrapped(pixels, valid)
                    loss = focal_loss(output.logits, labels, alpha, config.focal_gamma)
                    # where MoLRE routed: each valid slice (2-D), or once per volume (3-D backbones)
                    routed = valid.any(dim=1, keepdim=True) if model.volumetric else valid
                    balance = model.config.molre.load_balance_weight if model.config.use_molre else 0.0
                    if balance > 0 and output.router_weights is not None:
                        from ..model.molre import load_balance_loss

                        loss = loss + balance * load_balance_loss(output.router_weights, routed)
                    (loss / group_size).backward()
                if last_in_group:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums["loss"] += float(loss.detach())
                sums["batches"] += 1
                if output.router_weights is not None:
                    count = int(routed.sum())
                    usage = (expert_usage(output.router_weights.detach(), routed) * count).tolist()
                    sums["usage"] = usage if sums["usage"] is None else [a + b for a, b in zip(sums["usage"], usage)]
                    sums["entropy"] += float(router_entropy(output.router_weights.detach(), routed)) * count
                    sums["slices"] += count
                if progress and context.is_main:
                    done = (step + 1 - start_step) / max(1, len(batches) - start_step)
                    per_epoch = (time.perf_counter() - epoch_start) / max(done, 1e-9)
                    progress({"stage": "train", "epoch": epoch + 1, "epochs": config.max_epochs, "step": step + 1,
                              "steps": len(batches), "loss": sums["loss"] / sums["batches"],
                              "eta_s": per_epoch * (1 - done) + per_epoch * (config.max_epochs - epoch - 1)})
        finally:
            prefetch.close()
        start_step = 0
        epoch += 1
        record = _epoch_record(epoch, sums, model)
        _validate(run, model, record, stopper, history, progress)
        checkpoint(epoch, 0, None)  # before the best bundle: a crash between them is repaired on resume
        if history[-1].get("best") and context.is_main:
            _save_best(run, model, history[-1], history)
        distributed.barrier(context)
    status = "early_stopped" if epoch < config.max_epochs else "completed"
    return _finish(run, status, model, history, stopper, checkpoint_dir, started, elapsed_before, progress)


def _epoch_record(epoch: int, sums: dict, model) -> dict:
    record = {"epoch": epoch, "train_loss": sums["loss"] / max(1, sums["batches"])}
    if sums["slices"]:
        record["expert_usage"] = [u / sums["slices"] for u in sums["usage"]]
        record["router_entropy"] = sums["entropy"] / sums["slices"]
        record["router_entropy_max"] = math.log(len(sums["usage"]))
    return record


def _validate(run: _Run, model, record: dict, stopper: EarlyStopping, history: list, progress) -> None:
    """Rank 0 predicts the validation cases and decides; every rank gets the same record."""
    from .cases import predict_cases

    context = run.context
    if context.is_main:
        if len(run.val_table):
            predictions = predict_cases(model, run.val_table, preprocessing=run.start_bundle.preprocessing,
                                        cache_dir=run.cache_dir, device=str(context.device), precision=run.precision,
                                        batch_size=run.config.batch_size, workers=0, catalog=run.table.catalog)
            aucs = auc_per_finding(predictions.probabilities, predictions.labels)
            finite = aucs[np.isfinite(aucs)]
            record["val_mean_auc"] = float(finite.mean()) if len(finite) else None
            record["val_findings_evaluated"] = int(len(finite))
            record["val_auc"] = {fid: float(a) for fid, a in zip(run.table.catalog.ids, aucs) if np.isfinite(a)}
        else:
            record["val_mean_auc"] = None
    record = distributed.broadcast_from_main(record, context)
    score = record.get("val_mean_auc")
    if not len(run.val_table):  # no validation cases: the latest epoch is the one kept
        score = float(record["epoch"])
    improved = stopper.update(record["epoch"], score)
    record["best"] = improved
    history.append(record)
    if progress and context.is_main:
        progress({"stage": "validate", **record, "epochs": run.config.max_epochs,
                  "best_val_mean_auc": None if not len(run.val_table) else stopper.state()["best_score"]})


def _provenance(run: _Run, history: list, stopper: EarlyStopping, status: str | None, duration_s: float | None) -> dict:
    bundle = run.start_bundle
    counts = run.table.counts()
    provenance = {
        "kind": run.kind,
        "status": status or "running",
        "cases_csv": run.table.csv_path.name if run.table.csv_path else None,  # a name, not a machine path
        "cases_csv_sha256": run.table.csv_sha256,
        "counts": {"train": len(run.train_cases), "val": len(run.val_table),
                   "test_held_out": counts["splits"].get("test", 0), "skipped": len(run.problems),
                   "train_positives": {fid: int(np.nansum(np.stack([c.labels for c in run.train_cases])[:, i] == 1))
                                       for i, fid in enumerate(run.table.catalog.ids)}},
        "config": run.config.to_dict(),
        "epochs_run": stopper.epochs_seen,
        "best_epoch": stopper.best_epoch,
        "best_val_mean_auc": stopper.state()["best_score"] if len(run.val_table) else None,
        "seed": run.config.seed,
        "device": str(run.context.device),
        "precision": run.precision,
        "world_size": run.context.world_size,
        "duration_s": duration_s,
        "software": _software_versions(),
        "start_bundle": {"name": bundle.name, "fingerprint": bundle.fingerprint},
        "synthetic_training_data": bool(run.table.synthetic),
        "focal_alpha": None if run.focal_alpha is None else {
            fid: round(float(a), 6) for fid, a in zip(run.table.catalog.ids, run.focal_alpha)},
        "case_sha256": run.case_sha256,
        "patients": {role: sorted({c.patient for c in chosen if c.patient})
                     for role, chosen in (("train", run.train_cases), ("val", run.val_table.cases))},
        "history": history,
        "problems": run.problems[:50],
    }
    if run.parent:
        provenance["parent_bundle"] = run.parent
    dataset = read_dataset_sidecar(run.table.csv_path)  # CASES.dataset.json from `import-dataset`: name, licence
    if dataset:
        provenance["dataset"] = dataset
    return provenance


def _best_bundle_pending(run: _Run, history: list) -> bool:
    """True when the last finished epoch was the best but OUT/model does not hold it (a crash came
    between its checkpoint and its bundle)."""
    from ..model.bundle import BundleError, read_manifest

    if not history or not history[-1].get("best"):
        return False
    try:
        written = (read_manifest(run.out_dir / "model").get("metrics") or {}).get("best_epoch")
    except BundleError:
        return True
    return written != history[-1]["epoch"]


def _save_best(run: _Run, model, record: dict, history: list) -> None:
    from ..model.bundle import resolve_backbone_folder, save_bundle

    bundle = run.start_bundle
    folder = resolve_backbone_folder(bundle)
    stopper_view = EarlyStopping(0, 1, 1, best_epoch=record["epoch"], epochs_seen=record["epoch"],
                                 best_score=record.get("val_mean_auc") or -math.inf)
    metrics = {"val_mean_auc": record.get("val_mean_auc"), "best_epoch": record["epoch"],
               "val_findings_evaluated": record.get("val_findings_evaluated", 0),
               "val_auc_per_finding": record.get("val_auc", {})}
    kind = "Fine-tuned" if run.kind == "fine-tune" else "Trained"
    ids = bundle.catalog.ids
    prior = calibration.prior_correction_record(ids, run.focal_alpha, "training.focal_alpha")
    save_bundle(model, run.out_dir / "model", catalog=bundle.catalog, preprocessing=bundle.preprocessing,
                name=f"{bundle.name}-{run.kind}", overwrite=True,
                description=f"{kind} from {bundle.name} on {len(run.train_cases)} case(s)"
                + (" of SYNTHETIC phantoms (not for clinical use)" if run.table.synthetic else ""),
                backbone_weights_dir=folder, bundle_backbone=folder is None or run.config.train_backbone,
                training=_provenance(run, list(history), stopper_view, None, None), metrics=metrics,
                calibration=calibration.calibration_record(prior_correction=prior),
                synthetic_training_data=bool(run.table.synthetic))


def _finish(run: _Run, status: str, model, history, stopper, checkpoint_dir, started, elapsed_before, progress):
    from ..model.bundle import update_bundle

    duration = elapsed_before + time.perf_counter() - started
    bundle_path = run.out_dir / "model"
    if run.context.is_main:
        atomic_write_text(run.out_dir / "history.json", json.dumps(history, indent=1))
        if (bundle_path / "manifest.json").is_file():
            update_bundle(bundle_path, training=_provenance(run, history, stopper, status, duration))
    distributed.barrier(run.context)
    result = TrainResult(status=status, bundle_path=bundle_path if bundle_path.is_dir() else None,
                         checkpoint_dir=checkpoint_dir, epochs_run=stopper.epochs_seen, best_epoch=stopper.best_epoch,
                         best_val_mean_auc=stopper.state()["best_score"] if len(run.val_table) else None,
                         history=history, problems=run.problems, duration_s=duration, model=model)
    if progress and run.context.is_main:
        progress({"stage": "done", "status": status, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                  "best_val_mean_auc": result.best_val_mean_auc, "bundle": str(result.bundle_path), "duration_s": duration})
    return result


def fine_tune(cases, trained_bundle, out_dir, config: TrainConfig | None = None, **kwargs) -> TrainResult:
    """`fit` starting from a TRAINED bundle's adapters on new cases; the output bundle records the parent
    (name, fingerprint, path). The parent's catalog and preprocessing are kept; a CSV that names none of
    its findings is refused."""
    from ..model.bundle import Bundle, load_bundle

    bundle = trained_bundle if isinstance(trained_bundle, Bundle) else load_bundle(trained_bundle)
    if not bundle.manifest.get("training"):
        raise TrainError(f"{bundle.path} has never been trained (no training provenance); use `train` to train "
                         "it first, or pass a trained bundle to fine-tune.")
    parent = {"name": bundle.name, "fingerprint": bundle.fingerprint}
    return fit(cases, bundle, out_dir, config, _kind="fine-tune", _parent=parent, **kwargs)


# --------------------------------------------------------------------------------------------------- CLI
def _add_common_arguments(parser, model_help: str) -> None:
    defaults = TrainConfig()
    parser.add_argument("--cases", required=True, help="cases CSV: path, optional split, one 1/0/blank column per finding")
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--out", required=True, help="run folder: OUT/model (best bundle), OUT/checkpoint, OUT/history.json")
    parser.add_argument("--epochs", type=int, default=defaults.max_epochs, help="maximum epochs (default 50)")
    parser.add_argument("--min-epochs", type=int, default=defaults.min_epochs, help="never stop before (default 20)")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="epochs without validation gain (default 5)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="volumes per step (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    parser.add_argument("--lr-heads", type=float, default=defaults.lr_heads)
    parser.add_argument("--lr-adapters", type=float, default=defaults.lr_adapters)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="validation share when the CSV has no split column (default 0.2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    parser.add_argument("--cache", help="preprocessing cache folder (default $HEADCT_MOLRE_CACHE or ~/.cache/headct-molre/stacks)")
    parser.add_argument("--workers", type=int, default=None, help="preprocessing processes (default min(4, CPUs))")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--load-balance-weight", type=float, default=None,
                        help="weight of the balance of mean expert usage per batch (default: the bundle's "
                             "MoLREConfig.load_balance_weight, 0 = the paper's unsupervised routing)")
    parser.add_argument("--train-backbone", action="store_true",
                        help="also train the backbone's own weights (the paper's protocol for pillar0; for 2-D "
                             "backbones only without foundation pre-training); the bundle then carries the "
                             "trained backbone")
    parser.add_argument("--lr-backbone", type=float, default=defaults.lr_backbone,
                        help="learning rate of the backbone weights with --train-backbone (default 1e-4)")


def add_train_arguments(parser) -> None:
    """Arguments of `headct-molre train`."""
    _add_common_arguments(parser, "start bundle (e.g. made by `headct-molre new-model`)")


def add_fine_tune_arguments(parser) -> None:
    """Arguments of `headct-molre fine-tune`."""
    _add_common_arguments(parser, "a TRAINED bundle whose adapters are fine-tuned on the new cases")


def _config_from_args(args) -> TrainConfig:
    return TrainConfig(max_epochs=args.epochs, min_epochs=min(args.min_epochs, args.epochs), patience=args.patience,
                       batch_size=args.batch_size, grad_accum_steps=args.grad_accum, lr_heads=args.lr_heads,
                       lr_adapters=args.lr_adapters, seed=args.seed, device=args.device, precision=args.precision,
                       val_fraction=args.val_fraction, load_balance_weight=args.load_balance_weight,
                       max_minutes=args.max_minutes, cache_workers=args.workers,
                       train_backbone=bool(getattr(args, "train_backbone", False)),
                       lr_backbone=getattr(args, "lr_backbone", TrainConfig.lr_backbone),
                       augment=AugmentConfig.off() if args.no_augment else AugmentConfig())


class ProgressPrinter:
    """Plain-text progress on a stream: a rewritten line on a terminal, one line per epoch otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, event: dict) -> None:
        stage = event.get("stage")
        if stage == "cache":
            if self.tty or event["done"] == event["total"]:
                self._line(f"preprocessing {event['done']}/{event['total']}", final=event["done"] == event["total"])
        elif stage == "train" and self.tty:
            width = 24
            filled = int(width * event["step"] / max(1, event["steps"]))
            self._line(f"epoch {event['epoch']}/{event['epochs']} [{'#' * filled}{'.' * (width - filled)}] "
                       f"step {event['step']}/{event['steps']} loss {event['loss']:.4f} eta {_duration(event['eta_s'])}")
        elif stage == "validate":
            auc = event.get("val_mean_auc")
            usage = event.get("expert_usage")
            text = (f"epoch {event['epoch']}/{event['epochs']}: loss {event['train_loss']:.4f}, val mean AUC "
                    + ("n/a" if auc is None else f"{auc:.3f}") + (" (best)" if event.get("best") else ""))
            if usage:
                text += f", router entropy {event['router_entropy']:.2f}/{event['router_entropy_max']:.2f}, usage " \
                        + " ".join(f"{u:.2f}" for u in usage)
            self._line(text, final=True)
        elif stage == "done":
            self._line(f"{event['status']} after {event['epochs_run']} epoch(s) in {_duration(event['duration_s'])}; "
                       f"best epoch {event['best_epoch']}; model: {event['bundle']}", final=True)

    def _line(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run_from_args(args, runner) -> int:
    config = _config_from_args(args)
    cancel = {"requested": False}

    def on_interrupt(signum, frame):
        if cancel["requested"]:
            raise KeyboardInterrupt
        cancel["requested"] = True
        print("\ncancelling at the next step (checkpoint kept; Ctrl-C again to abort now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = runner(args.cases, args.model, args.out, config, cache_dir=args.cache, progress=ProgressPrinter(),
                        should_stop=lambda: cancel["requested"], resume=args.resume)
    finally:
        signal.signal(signal.SIGINT, previous)
    for problem in result.problems[:20]:
        print(f"skipped: {problem}", file=sys.stderr)
    if len(result.problems) > 20:
        print(f"... and {len(result.problems) - 20} more problem(s)", file=sys.stderr)
    if result.status == "cancelled":
        print(f"cancelled; continue with the same command plus --resume (checkpoint: {result.checkpoint_dir})",
              file=sys.stderr)
        return EXIT_CANCELLED
    if result.bundle_path is None:
        print(f"error: no model was produced ({result.status} after {result.epochs_run} epoch(s)): no epoch "
              "finished. Give more time (--max-minutes) or fewer cases; continue with --resume.", file=sys.stderr)
        return EXIT_NO_MODEL
    return EXIT_OK


def run_train_from_args(args) -> int:
    """`headct-molre train`: 0 a model was written (completed, early-stopped or out of time after at
    least one epoch), 1 no model was produced (no epoch finished), 2 bad input (checked before any
    work), 130 cancelled."""
    return _run_from_args(args, fit)


def run_fine_tune_from_args(args) -> int:
    """`headct-molre fine-tune`: exit codes as `train`."""
    return _run_from_args(args, fine_tune)
