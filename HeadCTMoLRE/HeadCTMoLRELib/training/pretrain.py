"""Dense supervised pre-training of a 2-D slice backbone on synthetic phantoms.

No foundation-model weights can be downloaded on a machine without a model hub, so the demo model
(``scripts/train_demo_model.py``) and the learning test stand in for foundation pre-training with this:
a ViT of a supported family is trained UNFROZEN on single slices of phantoms, with targets made from the
phantoms' finding masks rather than from volume labels:

- the CLS (pooled) token predicts which findings the slice cuts (slice labels, (F,));
- every patch token predicts which findings fall into its cell of the slice (cell labels, (G, G, F),
  G = image size / patch size).

Volume labels alone did not train a randomly initialised ViT in the minutes available (AUC at chance);
the dense targets tell the network where to look. The result is a plain transformers model (save it with
``save_pretrained``) plus the slice head, which can initialise the classifier of the adapted model so that
its volume logit starts as the mean of the slice logits (``slice_head_init``).

Conventions: pixels are uint8 (window value * 255) of shape (N volumes, S slices, 3 windows, H, W), slices
inferior -> superior, rows anterior -> posterior, columns patient right -> left (the SliceStack layout);
cell (r, c) of a slice covers rows r*H/G .. (r+1)*H/G and the same for columns.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..phantoms.findings import IMPLIED_LABELS, RENDERABLE_FINDINGS, check_renderable, sample_findings


# ------------------------------------------------------------------------------------------------- data
@dataclass
class PretrainSet:
    """Phantom slices with dense targets (see the module docstring for layouts).

    ``pixels`` uint8 (N, S, 3, H, W); ``slice_valid`` bool (N, S); ``cell_labels`` uint8 (N, S, G, G, F);
    ``volume_labels`` uint8 (N, F); ``finding_ids`` the F finding ids; ``seeds`` each volume's phantom seed.
    """

    pixels: np.ndarray
    slice_valid: np.ndarray
    cell_labels: np.ndarray
    volume_labels: np.ndarray
    finding_ids: tuple[str, ...]
    seeds: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def grid(self) -> int:
        return int(self.cell_labels.shape[2])


def phantom_cell_labels(phantom, stack, grid: int, finding_ids: Sequence[str]) -> np.ndarray:
    """Cell labels (S, grid, grid, F) uint8 of one phantom on one SliceStack: 1 where a finding's mask
    (``phantom.finding_masks``, merged into the labels it implies) has a voxel inside that cell of that
    slice. The stack's slices are thicker than the phantom's voxels, so every mask voxel is mapped through
    ``stack.patient_to_stack_index`` and rounded to the nearest slice."""
    if phantom.finding_masks is None:
        raise ValueError("The phantom was drawn without masks; call generate_phantom(..., return_masks=True).")
    slices, height, width = stack.pixels.shape[0], stack.pixels.shape[-2], stack.pixels.shape[-1]
    masks = dict(phantom.finding_masks)
    for finding, implied in IMPLIED_LABELS.items():
        for label in implied:
            if finding in masks:
                masks[label] = masks[label] | masks[finding] if label in masks else masks[finding]
    image = phantom.image
    origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    cells = np.zeros((slices, grid, grid, len(finding_ids)), np.uint8)
    for column, finding in enumerate(finding_ids):
        mask = masks.get(finding)
        if mask is None or not mask.any():
            continue
        zyx = np.argwhere(mask)
        points_lps = origin + (zyx[:, ::-1] * spacing) @ direction.T  # voxel (x, y, z) -> patient LPS mm
        index = stack.patient_to_stack_index(points_lps)  # (slice, row, col), continuous
        k = np.rint(index[:, 0]).astype(int)
        r = np.floor((index[:, 1] + 0.5) * grid / height).astype(int)
        c = np.floor((index[:, 2] + 0.5) * grid / width).astype(int)
        inside = (k >= 0) & (k < slices) & (r >= 0) & (r < grid) & (c >= 0) & (c < grid)
        cells[k[inside], r[inside], c[inside], column] = 1
    return cells


def render_geometry(seed: int, render_spacing_mm: float | None) -> dict:
    """``generate_phantom`` keyword arguments of a pre-training phantom: {} (the generator's own 0.88-0.98 mm
    pixels and 4-5 mm slices) or, with ``render_spacing_mm`` r, r x r mm pixels on a matrix covering at
    least 240 mm and slices of 4, 4.5 or 5 mm (drawn from the seed), which the generator draws about five
    times faster at r = 1.75 mm; the demo's 3.5 mm input pixels still average 2 x 2 of them."""
    if render_spacing_mm is None:
        return {}
    r = float(render_spacing_mm)
    thickness = float(np.random.default_rng([seed, 2]).choice((4.0, 4.5, 5.0)))
    return {"spacing_mm": (r, r, thickness), "size_px": int(math.ceil(240.0 / r / 16.0)) * 16}


def _pretrain_sample(seed: int, preprocessing_dict: dict, grid: int, finding_ids: tuple[str, ...],
                     prevalence: float | dict[str, float], render_spacing_mm: float | None = None) -> tuple:
    """Worker: one phantom -> (pixels uint8, slice_valid, cell labels, volume labels)."""
    from ..phantoms.generator import generate_phantom
    from ..ct.preprocess import PreprocessConfig, preprocess

    drawn = sample_findings(np.random.default_rng([seed, 1]), prevalence, finding_ids)
    phantom = generate_phantom(drawn, seed, return_masks=True, **render_geometry(seed, render_spacing_mm))
    stack = preprocess(phantom.image, PreprocessConfig.from_dict(preprocessing_dict))
    pixels = np.round(np.clip(stack.pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    volume = np.array([phantom.labels.get(f, 0) for f in finding_ids], np.uint8)
    return pixels, stack.slice_valid.astype(bool), phantom_cell_labels(phantom, stack, grid, finding_ids), volume


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def make_pretrain_set(n: int, seed: int, preprocessing, *, grid: int, findings: Iterable[str] | None = None,
                      prevalence: float | Mapping[str, float] = 0.12, workers: int | None = None,
                      render_spacing_mm: float | None = None,
                      progress: Callable[[dict], None] | None = None) -> PretrainSet:
    """Draw ``n`` phantoms (case i: seed ``seed * 100000 + i``) with findings from ``findings`` (default:
    every renderable one) at ``prevalence`` each (a probability, or finding id -> probability for every one of
    ``findings``: see :func:`finding_prevalences`), preprocess them with ``preprocessing`` (a
    PreprocessConfig) and compute their cell labels on a ``grid`` x ``grid`` grid. ``render_spacing_mm``:
    draw the phantoms on coarser voxels (see :func:`render_geometry`; None: the generator's own). ``workers`` processes
    (default: the CPU count, at most 8; 0 or 1: in this process). ``progress`` gets {"stage": "phantoms",
    "done", "total"}."""
    finding_ids = tuple(RENDERABLE_FINDINGS) if findings is None else tuple(findings)
    check_renderable(finding_ids)
    if n < 1 or grid < 1 or preprocessing.image_size % grid:
        raise ValueError(f"need n >= 1 and a grid dividing the image size {preprocessing.image_size} px "
                         f"(got n={n}, grid={grid}).")
    seeds = [seed * 100000 + i for i in range(n)]
    if isinstance(prevalence, Mapping):
        if set(prevalence) != set(finding_ids):
            raise ValueError(f"per-finding prevalences must name exactly the findings drawn: missing "
                             f"{[f for f in finding_ids if f not in prevalence]}, not drawn "
                             f"{[f for f in prevalence if f not in finding_ids]}.")
        prevalence = {f: float(prevalence[f]) for f in finding_ids}
        values = list(prevalence.values())
    else:
        prevalence = float(prevalence)
        values = [prevalence]
    if not all(0.0 <= p <= 1.0 for p in values):
        raise ValueError(f"prevalences are probabilities (0-1), got {prevalence}.")
    if render_spacing_mm is not None and not 0.3 <= float(render_spacing_mm) <= 2.0:
        raise ValueError(f"render_spacing_mm must be 0.3-2 mm (the generator's in-plane range), got {render_spacing_mm}.")
    args = (preprocessing.to_dict(), grid, finding_ids, prevalence,
            None if render_spacing_mm is None else float(render_spacing_mm))
    workers = default_workers() if workers is None else int(workers)
    results = []
    if workers <= 1:
        for s in seeds:
            results.append(_pretrain_sample(s, *args))
            if progress:
                progress({"stage": "phantoms", "done": len(results), "total": n})
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        try:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
                for result in pool.map(_pretrain_sample, seeds, *[[a] * n for a in args], chunksize=4):
                    results.append(result)
                    if progress:
                        progress({"stage": "phantoms", "done": len(results), "total": n})
        except concurrent.futures.process.BrokenProcessPool:
            if results:  # a worker died mid-way (e.g. out of memory): nothing sensible to fall back to
                raise
            # the pool never started (a script without `if __name__ == "__main__":`): draw them here
            return make_pretrain_set(n, seed, preprocessing, grid=grid, findings=finding_ids, prevalence=prevalence,
                                     workers=0, render_spacing_mm=render_spacing_mm, progress=progress)
    return PretrainSet(pixels=np.stack([r[0] for r in results]), slice_valid=np.stack([r[1] for r in results]),
                       cell_labels=np.stack([r[2] for r in results]), volume_labels=np.stack([r[3] for r in results]),
                       finding_ids=finding_ids, seeds=seeds)


def finding_prevalences(finding_ids: Iterable[str], prevalence: float,
                        focus: Mapping[str, float] | None = None) -> dict[str, float]:
    """Finding id -> probability per pre-training phantom: ``prevalence`` for each of ``finding_ids``, and the
    probability given in ``focus`` for the findings it names (findings a backbone under-learns get more
    positive slices). Raises ``ValueError`` for a focus finding that is not drawn (``make_pretrain_set`` checks
    the values)."""
    ids = tuple(finding_ids)
    focus = dict(focus or {})
    unknown = [f for f in focus if f not in ids]
    if unknown:
        raise ValueError(f"focus finding(s) {unknown} are not among the pre-training findings {list(ids)}.")
    return {f: float(focus.get(f, prevalence)) for f in ids}


# --------------------------------------------------------------------------------------------- training
@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain_backbone` (JSON-able with ``asdict``).

    ``steps`` optimizer steps of ``batch_slices`` slices drawn at random from the valid slices (uniformly,
    or, with ``slice_repeat_threshold`` t, with probability proportional to the slice's repeat factor, see
    :func:`slice_repeat_factors`: Repeat Factor Sampling of slices, so that slices cutting rare findings
    come up more often); AdamW
    with a one-cycle schedule (:func:`one_cycle_lr`) peaking at ``lr`` after ``warmup_fraction`` of the run
    (of the steps, or of ``max_minutes`` when the time runs out first, so a slow machine still anneals); binary
    cross-entropy on slice and cell targets with positive weights (1 - p) / p clipped to
    ``pos_weight_cap`` (p: the target's frequency among the slices as sampled); random left-right flips
    (``flip``); validation every ``eval_every`` steps (mean volume AUC, volume score = max over valid
    slices of the slice probability); the best validated weights are kept. ``max_minutes`` stops early.
    """

    steps: int = 4000
    batch_slices: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    pos_weight_cap: float = 30.0
    flip: bool = True
    eval_every: int = 1000
    seed: int = 0
    max_minutes: float | None = None
    slice_repeat_threshold: float | None = None


def slice_repeat_factors(slice_targets: np.ndarray, threshold: float) -> np.ndarray:
    """Repeat Factor Sampling over slices: ``slice_targets`` (N, F) 0/1 (which findings each slice cuts) ->
    (N,) factors r_s = max(1, max over the slice's findings f of sqrt(threshold / p_f)), p_f the share of
    slices cutting f. A slice without findings, or with only common ones (p_f >= threshold), keeps 1.
    The slices are the "cases" of ``train.repeat_factors`` (the case-level sampler of the paper's protocol)."""
    from .train import repeat_factors

    if threshold <= 0:
        raise ValueError(f"slice_repeat_threshold must be > 0, got {threshold}.")
    return repeat_factors(np.asarray(slice_targets, dtype=np.float64), threshold)[0]


@dataclass
class PretrainResult:
    """``status``: "completed", "time_limit" or "cancelled"; ``history``: one record per validation
    (step, loss, val_mean_auc, seconds); ``best_step`` / ``best_val_mean_auc`` / ``per_finding_auc`` of the
    kept weights; ``slice_head`` / ``cell_head``: {"weight": (F, d), "bias": (F,)} float32 numpy of the kept
    slice and cell heads (rows in the order of the training set's finding ids)."""

    status: str
    steps_run: int
    best_step: int
    best_val_mean_auc: float
    per_finding_auc: dict[str, float]
    history: list[dict]
    seconds: float
    slice_head: dict[str, np.ndarray]
    cell_head: dict[str, np.ndarray]
    config: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no weights)."""
        return {k: v for k, v in asdict(self).items() if k not in ("slice_head", "cell_head")}


def _token_layout(hf_model) -> tuple[int, int, int]:
    """(feature dim, patch size, number of leading non-patch tokens) of a DINOv3/DINOv2-style model."""
    config = hf_model.config
    return int(config.hidden_size), int(config.patch_size), 1 + int(getattr(config, "num_register_tokens", 0) or 0)


class _DenseHeads:
    """Slice head (on the pooled token) and cell head (on patch tokens), both Linear(d, F)."""

    def __init__(self, dim: int, num_findings: int):
        import torch

        self.slice = torch.nn.Linear(dim, num_findings)
        self.cell = torch.nn.Linear(dim, num_findings)

    def parameters(self):
        return list(self.slice.parameters()) + list(self.cell.parameters())

    def start_from(self, earlier: "PretrainResult", earlier_ids: Sequence[str], finding_ids: Sequence[str]) -> None:
        """Copy the rows of an earlier run's slice and cell heads into these heads, for the findings both
        runs have (matched by id). The other rows keep their fresh initialisation."""
        import torch

        earlier_row = {f: k for k, f in enumerate(earlier_ids)}
        with torch.no_grad():
            for layer, head in ((self.slice, earlier.slice_head), (self.cell, earlier.cell_head)):
                for row, f in enumerate(finding_ids):
                    if f in earlier_row:
                        layer.weight[row] = torch.from_numpy(head["weight"][earlier_row[f]])
                        layer.bias[row] = float(head["bias"][earlier_row[f]])


def _forward(hf_model, heads: _DenseHeads, pixels_u8, normalise, grid: int):
    """uint8 (N, 3, H, W) -> (slice logits (N, F), cell logits (N, G, G, F), pooled features (N, d))."""
    dim, _, leading = _token_layout(hf_model)
    output = hf_model(pixel_values=normalise(pixels_u8.float() / 255.0))
    patches = output.last_hidden_state[:, leading:].reshape(len(pixels_u8), grid, grid, dim)
    pooled = output.pooler_output
    return heads.slice(pooled), heads.cell(patches), pooled


def volume_scores(hf_model, slice_weight, slice_bias, data: PretrainSet, normalise, *, batch: int = 64) -> np.ndarray:
    """(N, F) float64: per volume and finding, the max over valid slices of sigmoid(slice head(pooled))."""
    import torch

    was_training = hf_model.training
    hf_model.eval()
    scores = []
    with torch.no_grad():
        for i in range(len(data)):
            valid = torch.from_numpy(data.slice_valid[i])
            pixels = torch.from_numpy(data.pixels[i])[valid]
            logits = []
            for b in range(0, len(pixels), batch):
                pooled = hf_model(pixel_values=normalise(pixels[b:b + batch].float() / 255.0)).pooler_output
                logits.append(pooled @ slice_weight.T + slice_bias)
            scores.append(torch.sigmoid(torch.cat(logits)).amax(0).double().numpy())
    hf_model.train(was_training)
    return np.stack(scores)


def one_cycle_lr(peak: float, fraction: float, warmup_fraction: float) -> float:
    """Learning rate at ``fraction`` (0..1) of a run: linear warm-up from peak / 25 to ``peak`` over
    ``warmup_fraction``, then cosine decay to peak / 25e4 (the shape of torch's OneCycleLR). Driven by a
    fraction rather than a step count so that a run cut by its time limit still anneals."""
    start, end = peak / 25.0, peak / 25e4
    if fraction < warmup_fraction:
        return start + (peak - start) * fraction / warmup_fraction
    decay = (fraction - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, decay)))


def _positive_weight(frequency, cap: float):
    return ((1 - frequency) / frequency.clamp_min(1e-4)).clamp(1.0, cap)


def pretrain_backbone(hf_model, normalise: Callable, train: PretrainSet, val: PretrainSet,
                      config: PretrainConfig | None = None, *, progress: Callable[[dict], None] | None = None,
                      should_stop: Callable[[], bool] | None = None,
                      earlier: tuple[PretrainResult, Sequence[str]] | None = None) -> PretrainResult:
    """Train every parameter of ``hf_model`` (a transformers DINOv3/DINOv2-style ViT with ``pooler_output``)
    on ``train`` with dense targets; validate on ``val``; keep (and leave loaded) the best weights.

    ``normalise``: float pixels in 0..1 (N, 3, H, W) -> the family's normalised input (the encoder's
    ``normalise``). The image size must equal the patch size times ``train.grid``. ``progress`` gets
    {"stage": "pretrain", "step", "steps", "loss", "seconds"} every 50 steps and {"stage": "validate",
    "step", "val_mean_auc"} after each validation; ``should_stop()`` returning True cancels (the best
    weights so far are kept). ``earlier``: (the result of an earlier run on the same model, its finding ids):
    the heads start from its rows for the findings both runs have, e.g. the second part of a curriculum
    that first trained a few findings alone. Raises ValueError for mismatched data."""
    import torch
    import torch.nn.functional as F

    from ..metrics import roc_auc

    config = config or PretrainConfig()
    started = time.perf_counter()
    dim, patch, _ = _token_layout(hf_model)
    grid = train.grid
    if train.pixels.shape[-1] != patch * grid or val.finding_ids != train.finding_ids or val.grid != grid:
        raise ValueError(f"pre-training data do not fit the model: images {train.pixels.shape[-1]} px, patch {patch} "
                         f"px, grid {grid}; validation findings/grid must equal the training ones.")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    for parameter in hf_model.parameters():
        parameter.requires_grad_(True)
    hf_model.train()
    heads = _DenseHeads(dim, len(train.finding_ids))
    if earlier is not None:
        heads.start_from(earlier[0], earlier[1], list(train.finding_ids))
    pixels = torch.from_numpy(train.pixels).flatten(0, 1)
    cells = torch.from_numpy(train.cell_labels).flatten(0, 1)
    valid_index = torch.from_numpy(train.slice_valid.reshape(-1)).nonzero().squeeze(1)
    if len(valid_index) == 0:
        raise ValueError("the pre-training set has no valid slice.")
    slice_targets = cells[valid_index].amax((1, 2)).float()  # (n, F)
    if config.slice_repeat_threshold:
        factors = torch.from_numpy(slice_repeat_factors(slice_targets.numpy(), config.slice_repeat_threshold))
        sampling = (factors / factors.sum()).float()
    else:
        sampling = torch.full((len(valid_index),), 1.0 / len(valid_index))
    # frequencies of slice and cell targets among the slices as they will be drawn
    cell_frequency = torch.einsum("n,nf->f", sampling, cells[valid_index].float().mean((1, 2)))
    slice_frequency = sampling @ slice_targets
    cell_weight = _positive_weight(cell_frequency, config.pos_weight_cap)
    slice_weight = _positive_weight(slice_frequency, config.pos_weight_cap)
    parameters = list(hf_model.parameters()) + heads.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    deadline = None if config.max_minutes is None else started + 60.0 * config.max_minutes
    training_started = time.perf_counter()  # the time limit's schedule counts training only

    def progress_fraction(done_steps: int) -> float:
        """Share of the run done: of the steps or, with a time limit, of the time, whichever is further."""
        fraction = done_steps / max(1, config.steps)
        if deadline is not None:
            fraction = max(fraction, (time.perf_counter() - training_started) / max(1e-9, deadline - training_started))
        return min(1.0, fraction)
    best = {"auc": -1.0, "step": 0, "per": {}, "state": None}
    history, running, status, step = [], [], "completed", 0

    def validate(at_step: int) -> None:
        weight, bias = heads.slice.weight.detach(), heads.slice.bias.detach()
        aucs = roc_auc(volume_scores(hf_model, weight, bias, val, normalise), val.volume_labels.astype(float))
        mean_auc = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
        record = {"step": at_step, "loss": float(np.mean(running)) if running else None, "val_mean_auc": mean_auc,
                  "seconds": round(time.perf_counter() - started, 1)}
        history.append(record)
        running.clear()
        if progress:
            progress({"stage": "validate", **record})
        if mean_auc > best["auc"]:
            best.update(auc=mean_auc, step=at_step,
                        per={f: round(float(a), 4) for f, a in zip(train.finding_ids, aucs) if np.isfinite(a)},
                        state=({k: v.detach().clone() for k, v in hf_model.state_dict().items()},
                               weight.clone(), bias.clone(), heads.cell.weight.detach().clone(),
                               heads.cell.bias.detach().clone()))

    for step in range(1, config.steps + 1):
        cancelled = bool(should_stop and should_stop())
        if cancelled or (deadline and time.perf_counter() > deadline):
            status = "cancelled" if cancelled else "time_limit"
            step -= 1
            break
        for group in optimizer.param_groups:
            group["lr"] = one_cycle_lr(config.lr, progress_fraction(step - 1), config.warmup_fraction)
        if config.slice_repeat_threshold:
            drawn = torch.multinomial(sampling, config.batch_slices, replacement=True, generator=generator)
        else:
            drawn = torch.randint(len(valid_index), (config.batch_slices,), generator=generator)
        chosen = valid_index[drawn]
        x, target = pixels[chosen], cells[chosen]
        if config.flip:
            flip = torch.rand(len(chosen), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            target = torch.where(flip.view(-1, 1, 1, 1), target.flip(2), target)
        slice_logits, cell_logits, _ = _forward(hf_model, heads, x, normalise, grid)
        target = target.float()
        loss = F.binary_cross_entropy_with_logits(cell_logits, target, pos_weight=cell_weight) + \
            F.binary_cross_entropy_with_logits(slice_logits, target.amax((1, 2)), pos_weight=slice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(float(loss.detach()))
        if progress and step % 50 == 0:
            progress({"stage": "pretrain", "step": step, "steps": config.steps, "loss": running[-1],
                      "seconds": round(time.perf_counter() - started, 1)})
        if step % config.eval_every == 0 and step < config.steps:
            validate(step)
    if step > 0 and (not history or history[-1]["step"] != step):
        validate(step)
    if best["state"] is None:
        raise ValueError("pre-training stopped before its first step; give it more time.")
    state, weight, bias, kept_cell_weight, kept_cell_bias = best["state"]
    hf_model.load_state_dict(state)
    hf_model.eval()
    return PretrainResult(status=status, steps_run=step, best_step=best["step"], best_val_mean_auc=best["auc"],
                          per_finding_auc=best["per"], history=history,
                          seconds=round(time.perf_counter() - started, 1),
                          slice_head={"weight": weight.numpy().astype(np.float32), "bias": bias.numpy().astype(np.float32)},
                          cell_head={"weight": kept_cell_weight.numpy().astype(np.float32),
                                     "bias": kept_cell_bias.numpy().astype(np.float32)},
                          config=asdict(config))


def slice_head_init(classifier, slice_head: dict[str, np.ndarray], finding_ids: Sequence[str], catalog_ids: Sequence[str]) -> int:
    """Copy a pre-training slice head into ``classifier`` (a HeadCTClassifier whose MoLRE and LoRA are
    still identities): the rows of its Linear head for ``finding_ids`` take the slice head's weights and
    biases, so that with the pooling query at zero (uniform attention) each volume logit starts as the
    mean of the slice logits or, with ``pooling="per_finding"`` (sharpness 1), as their smooth maximum.
    A catalog label that the pre-training findings only imply (``IMPLIED_LABELS``: vessel occlusion for a
    hyperdense vessel, say) and that has ONE source among ``finding_ids`` starts as that source's row: on
    phantoms its positives are the source's. Other catalog rows keep their initialisation. Returns the rows
    copied (implied ones included)."""
    import torch

    from ..model.classifier import AttentionPool, FindingPool

    rows = {f: i for i, f in enumerate(catalog_ids)}
    missing = [f for f in finding_ids if f not in rows]
    if missing:
        raise ValueError(f"finding(s) {missing} of the pre-training head are not in the model's catalog.")
    weight, bias = torch.from_numpy(slice_head["weight"]), torch.from_numpy(slice_head["bias"])
    if weight.shape != (len(finding_ids), classifier.feature_dim):
        raise ValueError(f"slice head of shape {tuple(weight.shape)} does not fit {len(finding_ids)} findings x "
                         f"{classifier.feature_dim} features.")
    columns = {f: c for c, f in enumerate(finding_ids)}
    for label, sources in implied_sources(finding_ids).items():
        if label in rows and label not in columns and len(sources) == 1:
            columns[label] = columns[sources[0]]
    with torch.no_grad():
        for finding, column in columns.items():
            classifier.classifier.weight[rows[finding]] = weight[column]
            classifier.classifier.bias[rows[finding]] = bias[column]
        if isinstance(classifier.pool, AttentionPool):
            classifier.pool.query.zero_()
        elif isinstance(classifier.pool, FindingPool):
            classifier.pool.log_sharpness.zero_()
    return len(columns)


def implied_sources(finding_ids: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Implied label -> the findings among ``finding_ids`` that imply it (``IMPLIED_LABELS``), in their order."""
    sources: dict[str, list[str]] = {}
    for finding in finding_ids:
        for label in IMPLIED_LABELS.get(finding, ()):
            sources.setdefault(label, []).append(finding)
    return {label: tuple(found) for label, found in sources.items()}


def default_workers() -> int:
    """Processes for phantom drawing: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


__all__ = ["PretrainConfig", "PretrainResult", "PretrainSet", "finding_prevalences", "make_pretrain_set", "phantom_cell_labels", "render_geometry",
           "pretrain_backbone", "slice_head_init", "slice_repeat_factors", "volume_scores", "default_workers"]

