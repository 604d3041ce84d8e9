"""Train the demo model (Resources/Models/demo) from scratch on synthetic phantoms, seeded and reproducible.

SYNTHETIC DEMONSTRATION ONLY, NOT FOR CLINICAL USE: the model has never seen a patient's scan.

No foundation-model weights can be shipped or downloaded, so the demo stands in for them in two stages:

1. Stage A (stand-in for foundation pre-training): a small ViT of the DINOv3 architecture (size "demo":
   4 layers of width 128, patch 16, 64 px slices) is trained UNFROZEN (``TrainConfig.train_backbone``)
   with a plain head and the focal loss on the training phantoms, without augmentation (faster learning;
   the phantoms already vary in pose, size and noise). Its LoRA
   deltas are merged and the result is saved as a local Hugging Face folder: the "foundation" backbone.
2. Stage B (the paper's protocol): a new bundle on that FROZEN backbone with LoRA (r=8, alpha=16) and
   MoLRE (K=6), trained by ``train.fit`` (focal loss with prevalence alpha, Repeat Factor Sampling,
   AdamW, augmentation, early stopping on the validation mean AUC), with raised learning rates
   (heads 3e-3, adapters 1e-3; the paper uses 1e-3 / 1e-4 for days on GPUs, this runs minutes on 2 CPU
   cores). The backbone is bundled so the demo bundle is self-contained (a few MB).

Run from the repository root (about 17 minutes on 2 CPU cores)::

    .venv/bin/python scripts/train_demo_model.py --out Resources/Models/demo --evaluate 200

``--evaluate N`` then draws N FRESH phantoms (another seed) and runs ``evaluate.evaluate`` on them, which
writes the temperature, thresholds, metrics and the model card back into the bundle (not counted in the
training time). Timings of every step are printed and stored in the bundle's training provenance.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HeadCTMoLRE"))

DEMO_IMAGE_SIZE = 64
#: Slices of 3.5 mm pixels (224 mm / 64 px), 20 slices of 8 mm (160 mm, skull base to vertex): what 2 CPU
#: cores can train in minutes; the paper's three windows (brain, subdural, bone); the head is centred,
#: not template-registered (the template fit turns analytic phantoms by about 13 degrees).
DEMO_PREPROCESSING = dict(image_size=DEMO_IMAGE_SIZE, in_plane_fov_mm=224.0, slice_spacing_mm=8.0, num_slices=20,
                          alignment="center")
DEMO_NAME = "headct-molre-demo"
DEMO_DESCRIPTION = ("SYNTHETIC DEMONSTRATION MODEL, NOT FOR CLINICAL USE. DINOv3-architecture ViT (4 layers, width "
                    "128, patch 16, 64 px) pre-trained on synthetic head CT phantoms (stand-in for a foundation "
                    "model), then frozen and adapted with LoRA (r=8) + MoLRE (K=6) on the same phantoms. Its "
                    "outputs say nothing about real scans. Made by scripts/train_demo_model.py.")


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def default_work_dir() -> Path:
    """``demo-training`` next to the default preprocessing cache (outside the repository)."""
    from HeadCTMoLRELib.data import default_cache_dir

    return default_cache_dir().parent / "demo-training"


# ------------------------------------------------------------------------------------------------ data
def _write_part(folder: str, n: int, seed: int) -> str:
    from HeadCTMoLRELib.phantom import write_phantom_dataset

    return str(write_phantom_dataset(folder, n, seed))


def write_phantoms(out_dir: Path, n: int, seed: int, workers: int = 2) -> Path:
    """``n`` phantoms in ``workers`` parallel parts (part k: seed ``seed * 100 + k``), merged into one
    ``labels.csv`` + ``metadata.json`` under ``out_dir`` (a phantom dataset as data.read_cases knows it).
    Reuses a complete dataset already there. Returns the path of labels.csv."""
    labels_csv = out_dir / "labels.csv"
    if labels_csv.is_file() and (out_dir / "metadata.json").is_file():
        with labels_csv.open(newline="", encoding="utf-8") as handle:
            if sum(1 for _ in handle) - 1 == n:
                return labels_csv
    sizes = [n // workers + (1 if k < n % workers else 0) for k in range(workers)]
    parts = [(str(out_dir / f"part{k}"), size, seed * 100 + k) for k, size in enumerate(sizes) if size]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(parts), mp_context=context) as pool:
        list(pool.map(_write_part, *zip(*parts)))
    header, rows, metadata = None, [], []
    for folder, _, _ in parts:
        prefix = Path(folder).name
        with (Path(folder) / "labels.csv").open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            rows += [[f"{prefix}/{row[0]}"] + row[1:] for row in reader]
        for entry in json.loads((Path(folder) / "metadata.json").read_text(encoding="utf-8")):
            metadata.append({**entry, "path": f"{prefix}/{entry['path']}"})
    with labels_csv.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header] + rows)
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=1), encoding="utf-8")
    return labels_csv


# ---------------------------------------------------------------------------------------------- models
def start_bundle(out: Path, *, seed: int, use_molre: bool, backbone_folder: Path | None, origin: str | None) -> Path:
    """An untrained bundle: DINOv3 "demo" backbone (random, or the stage-A folder) + LoRA r=8 alpha=16
    (+ MoLRE K=6), the demo preprocessing, the default 75-finding catalog; the backbone is bundled."""
    import torch

    from HeadCTMoLRELib import backbones, bundle, findings, model, molre, preprocess

    torch.manual_seed(seed)
    catalog = findings.default_catalog()
    spec = backbones.BackboneSpec("dinov3", "demo", DEMO_IMAGE_SIZE, source=origin,
                                  lora=backbones.LoraSpec(r=8, alpha=16))
    config = model.ModelConfig(spec, len(catalog), use_molre=use_molre, molre=molre.MoLREConfig(num_experts=6))
    classifier = model.build_classifier(config, backbone_weights_dir=backbone_folder)
    return bundle.save_bundle(classifier, out, catalog=catalog, preprocessing=preprocess.PreprocessConfig(**DEMO_PREPROCESSING),
                              name=out.name, description="untrained start bundle of scripts/train_demo_model.py",
                              backbone_weights_dir=backbone_folder, bundle_backbone=True, overwrite=True,
                              synthetic_training_data=True)


def save_merged_backbone(stage_a_bundle: Path, out: Path) -> Path:
    """The stage-A backbone with its LoRA deltas merged, as a Hugging Face folder (config + safetensors)."""
    from HeadCTMoLRELib import bundle

    classifier = bundle.build_model(bundle.load_bundle(stage_a_bundle))
    plain = classifier.encoder.backbone.merge_and_unload()
    if out.exists():
        shutil.rmtree(out)
    plain.save_pretrained(out, safe_serialization=True)
    return out


def stage_a_config(seed: int, minutes: float):
    from HeadCTMoLRELib.train import TrainConfig

    from HeadCTMoLRELib.augment import AugmentConfig

    return TrainConfig(train_backbone=True, lr_backbone=1e-3, lr_heads=3e-3, lr_adapters=1e-3, batch_size=8,
                       max_epochs=60, min_epochs=8, patience=5, max_minutes=minutes, seed=seed, cache_workers=2,
                       device="cpu", augment=AugmentConfig.off())


def stage_b_config(seed: int, minutes: float):
    from HeadCTMoLRELib.train import TrainConfig

    return TrainConfig(lr_heads=3e-3, lr_adapters=1e-3, batch_size=8, max_epochs=40, min_epochs=6, patience=4,
                       max_minutes=minutes, seed=seed, cache_workers=2, device="cpu")


def _progress(prefix: str):
    from HeadCTMoLRELib.train import ProgressPrinter

    printer = ProgressPrinter(sys.stderr)

    def forward(event: dict) -> None:
        if event.get("stage") in ("validate", "done") or (event.get("stage") == "cache" and event["done"] == event["total"]):
            sys.stderr.write(f"[{prefix}] ")
            printer(event)

    return forward


def train_stage(cases_csv: Path, start: Path, out: Path, config, cache_dir: Path, label: str):
    from HeadCTMoLRELib.train import TrainError, fit

    if out.exists():
        shutil.rmtree(out)
    result = fit(cases_csv, start, out, config, cache_dir=cache_dir, progress=_progress(label))
    if result.bundle_path is None:
        raise TrainError(f"{label}: no epoch finished; give the stage more minutes.")
    return result


# ----------------------------------------------------------------- stage A: dense supervision from masks
def _finding_slice_patch_labels(entry: dict, image_path: str, preprocessing_dict: dict, catalog_ids: list[str],
                                grid: int) -> dict:
    """Per-slice (S, C) and per-patch (S, grid, grid, C) labels of one phantom: 1 where the finding's mask
    falls into that slice / patch of the model's stack, 0 in cases without the finding, NaN (unknown) for a
    positive label that has no mask. The phantom is redrawn with its masks from its seed."""
    import numpy as np
    import SimpleITK as sitk

    from HeadCTMoLRELib.phantom import IMPLIED_LABELS, generate_phantom
    from HeadCTMoLRELib.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig.from_dict(preprocessing_dict)
    drawn = generate_phantom(entry["findings_drawn"], int(entry["seed"]), return_masks=True)
    stack = preprocess(sitk.ReadImage(image_path), config)
    slices, size = config.num_slices, config.image_size
    masks = dict(drawn.finding_masks or {})
    for finding, implied in IMPLIED_LABELS.items():
        for label in implied:
            if finding in masks:
                masks[label] = masks[label] | masks[finding] if label in masks else masks[finding]
    positives = {fid for fid, value in drawn.labels.items() if value}
    per_slice = np.zeros((slices, len(catalog_ids)), np.float32)
    per_patch = np.zeros((slices, grid, grid, len(catalog_ids)), np.float32)
    origin, spacing = np.array(drawn.image.GetOrigin()), np.array(drawn.image.GetSpacing())
    rng = np.random.default_rng(int(entry["seed"]))
    for column, fid in enumerate(catalog_ids):
        if fid not in positives:
            continue
        if fid not in masks or not masks[fid].any():
            per_slice[:, column] = np.nan
            per_patch[..., column] = np.nan
            continue
        zyx = np.argwhere(masks[fid])
        if len(zyx) > 20000:
            zyx = zyx[rng.choice(len(zyx), 20000, replace=False)]
        kji = stack.patient_to_stack_index(origin + zyx[:, ::-1] * spacing)
        k = np.rint(kji[:, 0]).astype(int)
        j, i = (kji[:, 1] * grid / size).astype(int), (kji[:, 2] * grid / size).astype(int)
        inside = (k >= 0) & (k < slices) & (j >= 0) & (j < grid) & (i >= 0) & (i < grid)
        per_slice[np.unique(k[inside]), column] = 1
        per_patch[k[inside], j[inside], i[inside], column] = 1
    return {"per_slice": per_slice, "per_patch": per_patch}


def dense_labels(cases_csv: Path, preprocessing, catalog, grid: int, out: Path, workers: int = 2) -> dict:
    """Dense labels of every case of a phantom dataset (``path`` -> dict of arrays), computed in parallel
    and stored in ``out`` (safetensors, reused when present)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    root = cases_csv.parent
    entries = json.loads((root / "metadata.json").read_text(encoding="utf-8"))
    if out.is_file():
        stored = load_file(str(out))
        return {e["path"]: {"per_slice": stored[f"{n}.slice"], "per_patch": stored[f"{n}.patch"]}
                for n, e in enumerate(entries)}
    context = multiprocessing.get_context("spawn")
    ids = list(catalog.ids)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = list(pool.map(_finding_slice_patch_labels, entries, [str(root / e["path"]) for e in entries],
                                [preprocessing.to_dict()] * len(entries), [ids] * len(entries),
                                [grid] * len(entries), chunksize=4))
    tensors = {}
    for n, result in enumerate(results):
        tensors[f"{n}.slice"] = np.ascontiguousarray(result["per_slice"])
        tensors[f"{n}.patch"] = np.ascontiguousarray(result["per_patch"])
    save_file(tensors, str(out))
    return {e["path"]: r for e, r in zip(entries, results)}


def _masked_bce(logits, targets):
    import torch
    import torch.nn.functional as F

    known = ~torch.isnan(targets)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


def train_stage_a_dense(cases_csv: Path, start: Path, out_backbone: Path, cache_dir: Path, *, seed: int,
                        minutes: float, lr: float = 1e-3, batch_volumes: int = 8) -> dict:
    """Stage A with dense targets: the ViT (unfrozen) learns per-slice findings from its CLS token and
    per-patch findings from its patch tokens (labels from the phantoms' finding masks), on the training
    split; the epoch with the best validation mean AUC (volume score = max over slices) is saved as a
    Hugging Face folder. Returns a summary (epochs, best epoch, validation AUC, seconds)."""
    import numpy as np
    import torch

    from HeadCTMoLRELib import bundle, data
    from HeadCTMoLRELib.train import auc_per_finding

    started = time.perf_counter()
    torch.manual_seed(seed)
    start_bundle = bundle.load_bundle(start)
    preprocessing, catalog = start_bundle.preprocessing, start_bundle.catalog
    table = data.assign_splits(data.read_cases(cases_csv, catalog), 0.2, seed)
    cached = data.build_cache(table.cases, preprocessing, cache_dir=cache_dir, workers=2)
    encoder = bundle.build_model(start_bundle).encoder
    hf = encoder.backbone.merge_and_unload()  # plain DINOv3 model (LoRA B is zero at the start)
    for parameter in hf.parameters():
        parameter.requires_grad_(True)
    dim, patch = hf.config.hidden_size, hf.config.patch_size
    grid = preprocessing.image_size // patch
    labels = dense_labels(cases_csv, preprocessing, catalog, grid, cases_csv.parent / f"dense-labels-{grid}.safetensors")
    root = cases_csv.parent
    def gather(split):
        chosen = [c for c in table.cases if c.split == split and str(c.path) in cached.files]
        pixels, valid = data.stack_batch([cached.files[str(c.path)] for c in chosen])
        keys = [Path(c.path).resolve().relative_to(root.resolve()).as_posix() for c in chosen]
        per_slice = torch.from_numpy(np.stack([labels[k]["per_slice"] for k in keys]))
        per_patch = torch.from_numpy(np.stack([labels[k]["per_patch"] for k in keys]))
        return pixels, valid, per_slice, per_patch, np.stack([c.labels for c in chosen])
    train_set, val_set = gather("train"), gather("val")
    slice_head, patch_head = torch.nn.Linear(dim, len(catalog)), torch.nn.Linear(dim, len(catalog))
    parameters = list(hf.parameters()) + list(slice_head.parameters()) + list(patch_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    mean, std = encoder.pixel_mean, encoder.pixel_std

    def run(pixels, valid):
        x = (pixels[valid].float() / 255.0 - mean) / std  # (N valid slices, 3, H, W)
        tokens = hf(pixel_values=x).last_hidden_state
        patches = tokens[:, -grid * grid:].reshape(-1, grid, grid, dim)
        return slice_head(tokens[:, 0]), patch_head(patches)

    def validate() -> float:
        hf.eval()
        pixels, valid, _, _, volume_labels = val_set
        scores = []
        with torch.no_grad():
            for b in range(0, len(pixels), 16):
                slice_logits, _ = run(pixels[b:b + 16], valid[b:b + 16])
                counts = valid[b:b + 16].sum(1).tolist()
                scores += [chunk.max(0).values for chunk in torch.split(slice_logits, counts)]
        aucs = auc_per_finding(torch.stack(scores).numpy(), volume_labels)
        hf.train()
        return float(np.nanmean(aucs))

    generator = torch.Generator().manual_seed(seed)
    best, best_epoch, epoch, history = -1.0, 0, 0, []
    deadline = time.perf_counter() + 60 * minutes  # training time only (labels and cache come before)
    while time.perf_counter() < deadline:
        epoch += 1
        order = torch.randperm(len(train_set[0]), generator=generator)
        losses = []
        for b in range(0, len(order), batch_volumes):
            if time.perf_counter() > deadline:
                break
            index = order[b:b + batch_volumes]
            pixels, valid = train_set[0][index], train_set[1][index]
            slice_logits, patch_logits = run(pixels, valid)
            loss = _masked_bce(slice_logits, train_set[2][index][valid]) + \
                _masked_bce(patch_logits, train_set[3][index][valid])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        score = validate()
        history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None, "val_mean_auc": score})
        _log(f"stage A (dense) epoch {epoch}: loss {history[-1]['loss']:.4f}, val mean AUC {score:.3f}")
        if score > best:
            best, best_epoch = score, epoch
            if out_backbone.exists():
                shutil.rmtree(out_backbone)
            hf.save_pretrained(out_backbone, safe_serialization=True)
    return {"epochs_run": epoch, "best_epoch": best_epoch, "best_val_mean_auc": best, "history": history,
            "seconds": time.perf_counter() - started, "lr": lr, "batch_volumes": batch_volumes,
            "objective": "per-slice (CLS token) and per-patch (patch tokens) binary cross-entropy on labels "
                         "from the phantoms' finding masks"}


# -------------------------------------------------------------------------------------------------- main
def run_stage_a(args, cases_csv: Path, start_a: Path, work: Path, cache_dir: Path) -> tuple[Path, dict]:
    """The stand-in for foundation pre-training; returns (backbone folder, summary for the provenance)."""
    backbone = work / "backbone"
    if args.stage_a == "dense":
        summary = train_stage_a_dense(cases_csv, start_a, backbone, cache_dir, seed=args.seed,
                                      minutes=args.stage_a_minutes)
        summary["what"] = ("DINOv3-architecture ViT trained unfrozen on the training phantoms with dense targets "
                           "from their finding masks; stand-in for foundation pre-training")
        return backbone, summary
    config = stage_a_config(args.seed, args.stage_a_minutes)
    result = train_stage(cases_csv, start_a, work / "stage-a", config, cache_dir, "stage A")
    save_merged_backbone(result.bundle_path, backbone)
    return backbone, {"config": config.to_dict(), "status": result.status, "epochs_run": result.epochs_run,
                      "best_epoch": result.best_epoch, "best_val_mean_auc": result.best_val_mean_auc,
                      "what": "DINOv3-architecture ViT trained unfrozen (train_backbone) with volume labels only; "
                              "LoRA merged; stand-in for foundation pre-training"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="Resources/Models/demo", help="bundle folder to write (replaced)")
    parser.add_argument("--work", default=str(default_work_dir()),
                        help="work folder: phantoms, cache, stage runs, backbone (default: next to the preprocessing "
                             "cache, ~/.cache/headct-molre/demo-training)")
    parser.add_argument("--n-train", type=int, default=560, help="training + validation phantoms (default 560)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of phantoms, splits, initialisation, sampling")
    parser.add_argument("--stage-a-minutes", type=float, default=6.0,
                        help="training time of stage A (dense: after the labels; volume: cache included) (default 6)")
    parser.add_argument("--stage-b-minutes", type=float, default=3.0, help="time limit of stage B (default 3)")
    parser.add_argument("--stage-a", choices=("dense", "volume"), default="volume",
                        help="stage-A targets: dense (per slice and patch, from the phantoms' finding masks) "
                             "or volume (the volume labels through train.fit with train_backbone; default, made the shipped bundle)")
    parser.add_argument("--evaluate", type=int, default=0, metavar="N",
                        help="then evaluate on N fresh phantoms (seed + 1) with write-back (default: skip)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from HeadCTMoLRELib import bundle, report

    args = parse_args(argv)
    torch.set_num_threads(2)
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    tick = time.perf_counter()
    cases_csv = write_phantoms(work / "phantoms", args.n_train, args.seed)
    timings["phantoms_s"] = round(time.perf_counter() - tick, 1)
    _log(f"{args.n_train} phantoms in {timings['phantoms_s']} s")

    tick = time.perf_counter()
    start_a = start_bundle(work / "start-a", seed=args.seed, use_molre=False, backbone_folder=None, origin=None)
    backbone_folder, stage_a = run_stage_a(args, cases_csv, start_a, work, cache_dir)
    timings["stage_a_s"] = round(time.perf_counter() - tick, 1)  # includes the preprocessing cache (and dense labels)
    _log(f"stage A ({args.stage_a}): best epoch {stage_a['best_epoch']} of {stage_a['epochs_run']}, val mean AUC "
         f"{stage_a['best_val_mean_auc']:.3f}, {timings['stage_a_s']} s (with the preprocessing cache)")

    tick = time.perf_counter()
    origin = "phantom pre-training (scripts/train_demo_model.py stage A), not a foundation model"
    start_b = start_bundle(work / "start-b", seed=args.seed, use_molre=True, backbone_folder=backbone_folder, origin=origin)
    result_b = train_stage(cases_csv, start_b, work / "stage-b", stage_b_config(args.seed, args.stage_b_minutes),
                           cache_dir, "stage B")
    timings["stage_b_s"] = round(time.perf_counter() - tick, 1)
    _log(f"stage B: {result_b.status}, best epoch {result_b.best_epoch}, val mean AUC {result_b.best_val_mean_auc:.3f}, "
         f"{timings['stage_b_s']} s")

    trained = bundle.load_bundle(result_b.bundle_path)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    training = dict(trained.manifest["training"])
    training["demo_pipeline"] = {
        "script": "scripts/train_demo_model.py", "arguments": vars(args), "timings_s": timings,
        "phantoms": {"n": args.n_train, "seed": args.seed, "parts_seeds": [args.seed * 100, args.seed * 100 + 1],
                     "prevalence": 0.1},
        "stage_a": stage_a,
        "stage_b": {"status": result_b.status, "epochs_run": result_b.epochs_run, "best_epoch": result_b.best_epoch,
                    "best_val_mean_auc": result_b.best_val_mean_auc,
                    "what": "frozen stage-A backbone + LoRA r=8 alpha=16 + MoLRE K=6, the paper's protocol with "
                            "raised learning rates (heads 3e-3, adapters 1e-3)"},
        "machine": f"{torch.get_num_threads()} CPU threads",
    }
    classifier = bundle.build_model(trained)
    bundle.save_bundle(classifier, out, catalog=trained.catalog, preprocessing=trained.preprocessing, name=DEMO_NAME,
                       description=DEMO_DESCRIPTION, backbone_weights_dir=backbone_folder, bundle_backbone=True,
                       training=training, metrics=trained.manifest.get("metrics"), overwrite=True,
                       synthetic_training_data=True)
    card = report.model_card(bundle.read_manifest(out))
    bundle.update_bundle(out, extra_files={"model_card.md": card})
    _log(f"wrote {out} in {timings['total_s']} s in all ({timings})")

    if args.evaluate:
        from HeadCTMoLRELib.evaluate import evaluate

        tick = time.perf_counter()
        eval_csv = write_phantoms(work / "fresh-phantoms", args.evaluate, args.seed + 1)
        evaluation = evaluate(eval_csv, out, work / "evaluation", device="cpu", cache_dir=cache_dir)
        _log(f"fresh phantoms (seed {args.seed + 1}, n={args.evaluate}): mean AUC {evaluation['mean_auc']:.3f} "
             f"({time.perf_counter() - tick:.0f} s); report in {work / 'evaluation'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
