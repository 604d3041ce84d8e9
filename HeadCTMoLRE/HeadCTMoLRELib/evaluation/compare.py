"""`headct-molre compare`: the paper's Table 2 (LoRA-only vs LoRA + MoLRE per backbone) in one command.

For every backbone FAMILY:SIZE of ``--backbones`` both arms are built from the same backbone weights with
the same seed (so LoRA A and the head start equal), trained on the same cases CSV with the same
TrainConfig (same split, seed, budget; they differ only in ``use_molre``) and evaluated on the same
held-out cases (the CSV's ``test`` split when it has one, otherwise every case, with a warning) with
paired bootstrap intervals of every per-finding gain (MoLRE minus LoRA-only; evaluate.comparison_summary).

Protocol: frozen backbone + LoRA for every family except Pillar0, which the paper fine-tunes in full
(``train --train-backbone`` in both arms; ``--frozen-backbones`` keeps it frozen too).

Backbone weights: ``BACKBONE_ROOT/FAMILY-SIZE`` (a Hugging Face folder, or for MedImageInsight and Pillar0 a
folder written by ``convert-weights``); tiny sizes without a folder are randomly initialised (tests). Outputs in
OUT: ``table2.md`` / ``table2.json`` (mean AUC +- std over findings, total / trainable / MoLRE parameters,
the gain with its interval), ``fig2_strata.png`` (findings with AUC >= 0.90 and 0.80-0.90 per arm and
backbone), ``fig3_radar_<backbone>.png`` (per-finding AUC of both arms), and per backbone and arm its start
bundle, training run and evaluation. A run that was stopped resumes: finished arms are kept, an
interrupted training continues from its checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ARMS = (("lora", False, "LoRA only"), ("molre", True, "LoRA + MoLRE"))
# The paper fine-tunes these backbones in full (both arms; MoLRE on the pooled volume embedding); the others
# stay frozen with LoRA. --frozen-backbones trains every backbone frozen.
FULLY_FINE_TUNED = frozenset({"pillar0"})
# Table 2 of the paper; DeepCNTD has neither public weights nor a public architecture.
NOT_AVAILABLE = {"deepcntd": "DeepCNTD: no public weights or architecture (see docs/backbones.md)"}


class CompareError(ValueError):
    """The comparison cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class BackboneChoice:
    family: str
    size: str
    folder: Path | None  # None: random initialisation (tiny sizes only)

    @property
    def label(self) -> str:
        return f"{self.family}-{self.size}"


def parse_backbones(text: str, backbone_root: str | os.PathLike | None) -> tuple[list[BackboneChoice], list[str]]:
    """'dinov3:base,medimageinsight:base,deepcntd' -> (runnable choices, not-available notes)."""
    from ..model.backbones import FAMILIES

    choices, notes = [], []
    root = Path(backbone_root).expanduser() if backbone_root else None
    for item in [part.strip() for part in text.split(",") if part.strip()]:
        family, _, size = item.partition(":")
        if family in NOT_AVAILABLE:
            notes.append(NOT_AVAILABLE[family])
            continue
        if family not in FAMILIES:
            raise CompareError(f"--backbones: unknown family {family!r} in {item!r}; choose from {sorted(FAMILIES)}")
        if size not in FAMILIES[family].sizes:
            raise CompareError(f"--backbones: {family} has no size {size!r}; choose from {list(FAMILIES[family].sizes)}")
        folder = root / f"{family}-{size}" if root else None
        if folder is not None and not folder.is_dir():
            folder = None
        if folder is None and not size.startswith("tiny"):
            raise CompareError(
                f"--backbones {item}: no weights folder {root / f'{family}-{size}' if root else 'BACKBONE_ROOT/' + family + '-' + size}; "
                "download the backbone (docs/backbones.md says what each needs) and pass --backbone-root"
            )
        choices.append(BackboneChoice(family, size, folder))
    if not choices:
        raise CompareError("--backbones names no runnable backbone")
    return choices, notes


def arm_config(choice: BackboneChoice, config, frozen_backbones: bool = False):
    """The TrainConfig of both arms of a backbone: the paper's protocol (full fine-tuning for Pillar0)."""
    import dataclasses

    full = choice.family in FULLY_FINE_TUNED and not frozen_backbones
    return dataclasses.replace(config, train_backbone=full) if full != config.train_backbone else config


def plan(choices: list[BackboneChoice], n_cases: int, config, frozen_backbones: bool = False) -> list[dict]:
    """Per backbone: parameters (counted on the meta device), weight memory, and the step budget."""
    import torch

    from ..model import backbones

    rows = []
    for choice in choices:
        spec = backbones.BackboneSpec(choice.family, choice.size, backbones.default_image_size(choice.family, choice.size))
        with torch.device("meta"):
            _, model_class = backbones.FAMILIES[choice.family].classes()
            config_class, _ = backbones.FAMILIES[choice.family].classes()
            model = model_class(config_class(**backbones.random_init_config_dict(spec)))
        params = sum(p.numel() for p in model.parameters())
        steps = config.max_epochs * max(1, n_cases // max(1, config.batch_size))
        full = arm_config(choice, config, frozen_backbones).train_backbone
        rows.append({
            "backbone": choice.label, "weights": str(choice.folder or "random initialisation"),
            "backbone_parameters": params,
            # fp32 weights (fully fine-tuned: + gradients + two AdamW moments); activations come on top
            "weight_memory_gb": round(params * 4 * (4 if full else 1) / 1e9, 2),
            "max_optimizer_steps_per_arm": steps,
            "protocol": "fully fine-tuned" if full else "frozen + LoRA",
            "time_estimate": "at most "
            + (f"{config.max_minutes:.0f} min per arm (--max-minutes)" if config.max_minutes else f"{config.max_epochs} epochs per arm"),
        })
    return rows


def _start_bundle(choice: BackboneChoice, use_molre: bool, folder: Path, catalog, preprocessing, seed: int) -> Path:
    import torch

    from ..model import backbones, bundle, classifier as model_lib

    if (folder / "manifest.json").is_file():
        return folder
    torch.manual_seed(seed)  # the same backbone (random sizes), LoRA A and head in both arms
    spec = backbones.BackboneSpec(choice.family, choice.size, preprocessing.image_size,
                                  source=str(choice.folder) if choice.folder else None)
    config = model_lib.ModelConfig(backbone=spec, num_findings=len(catalog), use_molre=use_molre)
    classifier = model_lib.build_classifier(config, backbone_weights_dir=choice.folder)
    return bundle.save_bundle(classifier, folder, catalog=catalog, preprocessing=preprocessing,
                              backbone_weights_dir=choice.folder,
                              description=f"compare start: {choice.label} {'LoRA + MoLRE' if use_molre else 'LoRA only'}")


def _train_arm(cases_csv, start: Path, run_dir: Path, config, cache_dir, nproc: int | None, progress) -> Path:
    """Train one arm (resuming an interrupted run); returns its best bundle."""
    from ..training import train

    model_dir = run_dir / "model"
    done = run_dir / "compare_done.json"
    if done.is_file() and model_dir.is_dir():
        return model_dir
    resume = (run_dir / "checkpoint" / "state.json").exists()
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "HeadCTMoLRELib.cli", "train", "--cases", str(cases_csv), "--model", str(start),
                   "--out", str(run_dir), "--epochs", str(config.max_epochs), "--min-epochs", str(config.min_epochs),
                   "--patience", str(config.patience), "--batch-size", str(config.batch_size),
                   "--grad-accum", str(config.grad_accum_steps), "--seed", str(config.seed),
                   "--device", config.device, "--precision", config.precision]
        command += ["--cache", str(cache_dir)] if cache_dir else []
        command += ["--max-minutes", str(config.max_minutes)] if config.max_minutes else []
        command += ["--resume"] if resume else []
        command += ["--train-backbone"] if config.train_backbone else []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                         os.environ.get("PYTHONPATH")])))
        if subprocess.run(command, env=env).returncode != 0:
            raise CompareError(f"torchrun training of {start} failed; rerun the same compare command to resume")
    else:
        result = train.fit(cases_csv, start, run_dir, config, cache_dir=cache_dir, progress=progress, resume=resume)
        if result.status == "cancelled":
            raise CompareError(f"training of {start} was cancelled; rerun the same compare command to resume")
    done.write_text(json.dumps({"finished": time.time()}) + "\n", encoding="utf-8")
    return model_dir


def _float(text):
    return float(text) if text not in (None, "") else None


def read_comparison(evaluation_dir) -> list[dict]:
    """Per-finding rows of an `evaluate --compare` folder (candidate = LoRA + MoLRE, reference = LoRA only), in
    catalog order: id, n_pos, auc_lora, auc_molre, gain (MoLRE minus LoRA only) and its paired bootstrap
    interval gain_ci; AUCs are None where a finding could not be evaluated."""
    from .evaluate import COMPARISON_TSV

    with (Path(evaluation_dir) / COMPARISON_TSV).open(newline="", encoding="utf-8") as handle:
        return [{"id": r["id"], "n_pos": int(r["n_pos"] or 0), "auc_lora": _float(r["auc_reference"]),
                 "auc_molre": _float(r["auc_candidate"]), "gain": _float(r["difference"]),
                 "gain_ci": [_float(r["difference_ci_low"]), _float(r["difference_ci_high"])]}
                for r in csv.DictReader(handle, delimiter="\t")]


def run_compare(cases_csv, backbones_text: str, out_dir, *, backbone_root=None, config=None, image_size=None,
                cache_dir=None, device: str = "auto", n_boot: int = 1000, nproc: int | None = None,
                frozen_backbones: bool = False,
                progress: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the comparison; returns the Table 2 result also written to OUT/table2.json."""
    from .. import findings, metrics
    from ..ct import preprocess
    from ..model import backbones, bundle, classifier as model_lib
    from ..training import train
    from ..training.cases import read_cases
    from . import report
    from .evaluate import evaluate

    config = config or train.TrainConfig()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    choices, notes = parse_backbones(backbones_text, backbone_root)
    catalog = findings.default_catalog()
    table = read_cases(cases_csv, catalog)
    split = "test" if table.has_split and len(table.split("test")) else None
    rows_plan = plan(choices, len(table), config, frozen_backbones)
    log("plan:")
    for row in rows_plan:
        log(f"  {row['backbone']}: {row['backbone_parameters'] / 1e6:.1f} M backbone parameters, about "
            f"{row['weight_memory_gb']} GB of weights"
            f"{' + gradients + AdamW moments' if row['protocol'] == 'fully fine-tuned' else ''} (+ activations), "
            f"{row['protocol']}, 2 arms x {row['time_estimate']}, "
            f"weights: {row['weights']}")
    for note in notes:
        log(f"  not available: {note}")
    if split is None:
        log("  warning: the cases CSV has no 'test' split; both arms are evaluated on every case (optimistic)")

    results = []
    for choice in choices:
        size = image_size or backbones.default_image_size(choice.family, choice.size)
        pre = preprocess.PreprocessConfig(**{**backbones.default_preprocessing(choice.family, choice.size),
                                             "image_size": size})
        base = out / choice.label
        trained = {}
        for key, use_molre, title in ARMS:
            log(f"{choice.label}: {title}")
            start = _start_bundle(choice, use_molre, base / key / "start", catalog, pre, config.seed)
            trained[key] = _train_arm(cases_csv, start, base / key / "run", arm_config(choice, config, frozen_backbones),
                                      cache_dir, nproc, progress)
        evaluation_dir = base / "evaluation"
        evaluation = evaluate(cases_csv, trained["molre"], evaluation_dir, compare=trained["lora"], device=device,
                              cache_dir=cache_dir, split=split, n_boot=n_boot, seed=config.seed)
        comparison = evaluation["comparison"]
        per_finding = read_comparison(evaluation_dir)
        aucs = {key: [r[f"auc_{key}"] for r in per_finding] for key, _, _ in ARMS}
        arms = {}
        for key, _, title in ARMS:
            values = [v if v is not None else float("nan") for v in aucs[key]]
            counts = model_lib.count_parameters(bundle.build_model(bundle.load_bundle(trained[key])))
            arms[key] = {"title": title, "bundle": str(trained[key]), **metrics.summarize_aucs(values),
                         "parameters": counts}
        results.append({
            "backbone": choice.label, "family": choice.family, "size": choice.size, "image_size": size,
            "weights": str(choice.folder or "random initialisation"), "arms": arms,
            "protocol": "fully fine-tuned" if arm_config(choice, config, frozen_backbones).train_backbone
            else "frozen + LoRA",
            "mean_gain": comparison["mean_gain"], "mean_gain_ci": comparison["mean_gain_ci"],
            "n_improved": comparison["n_improved"], "n_worse": comparison["n_worse"],
            "n_compared": comparison["n_compared"], "n_cases": comparison["n_cases"],
            "per_finding": per_finding,
        })
        report.radar_plot(out / f"fig3_radar_{choice.label}.png", catalog,
                          {f"{choice.label} {title}": [v if v is not None else float("nan") for v in aucs[key]]
                           for key, _, title in ARMS}, title=f"Per-finding AUC, {choice.label}")
    strata = {f"{r['backbone']} {r['arms'][k]['title']}": r["arms"][k]["strata"] for r in results for k, _, _ in ARMS}
    report.strata_bar_chart(out / "fig2_strata.png", strata, title="Findings per AUC stratum (Fig. 2)")
    result = {"cases_csv": str(Path(cases_csv).resolve()), "evaluated_split": split or "all cases",
              "train_config": config.to_dict(), "backbones": results, "not_available": notes,
              "files": ["table2.md", "table2.json", "fig2_strata.png"]
              + [f"fig3_radar_{r['backbone']}.png" for r in results]}
    (out / "table2.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "table2.md").write_text(table2_markdown(result), encoding="utf-8")
    return result


def table2_markdown(result: dict) -> str:
    def fmt(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    def params(count):
        return f"{count / 1e6:.2f} M"

    lines = ["# Table 2: LoRA only vs LoRA + MoLRE", "",
             f"Cases: `{result['cases_csv']}`; evaluated on: {result['evaluated_split']} (held out from training "
             "when that is the test split). Mean AUC +- std over the evaluable findings; gain = MoLRE minus LoRA "
             "only, with a paired bootstrap 95% interval over cases.", "",
             "| backbone | arm | mean AUC +- std | findings | AUC >= 0.90 | 0.80-0.90 | total params | trainable | MoLRE | gain (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["backbones"]:
        for key, _, title in ARMS:
            arm = row["arms"][key]
            p = arm["parameters"]
            gain = "" if key == "lora" else (f"{fmt(row['mean_gain'])} ({fmt(row['mean_gain_ci'][0])} to "
                                             f"{fmt(row['mean_gain_ci'][1])})")
            protocol = " (fully fine-tuned)" if row.get("protocol") == "fully fine-tuned" else ""
            lines.append(f"| {row['backbone']}{protocol} | {title} | {fmt(arm['mean_auc'])} +- {fmt(arm['std_auc'])} | "
                         f"{arm['n_findings_evaluated']} | {arm['strata'].get('auc_ge_0.90', 0)} | "
                         f"{arm['strata'].get('auc_0.80_0.90', 0)} | {params(p['total'])} | {params(p['trainable'])} | "
                         f"{params(p['molre'])} | {gain} |")
    for note in result["not_available"]:
        lines.append(f"| {note.split(':')[0]} | not available | | | | | | | | |")
    for row in result["backbones"]:
        lines += ["", f"## {row['backbone']}: per finding (n pos = positives among the evaluated cases)", "",
                  "| finding | n pos | AUC LoRA only | AUC MoLRE | gain (95% CI) |", "|---|---|---|---|---|"]
        for f in row["per_finding"]:
            if f["auc_lora"] is None and f["auc_molre"] is None:
                continue
            lines.append(f"| {f['id']} | {f['n_pos']} | {fmt(f['auc_lora'])} | {fmt(f['auc_molre'])} | "
                         f"{fmt(f['gain'])} ({fmt(f['gain_ci'][0])} to {fmt(f['gain_ci'][1])}) |")
    lines += ["", "Figures: fig2_strata.png (Fig. 2), fig3_radar_BACKBONE.png (Fig. 3).", ""]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    from ..training.train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--cases", required=True, help="cases CSV (path, split, one column per finding)")
    parser.add_argument("--backbones", required=True,
                        help="comma-separated FAMILY:SIZE, e.g. dinov3:base,dinov3:large,siglip:so400m,"
                        "medimageinsight:base,pillar0:headct,deepcntd (DeepCNTD is listed as not available)")
    parser.add_argument("--backbone-root", help="folder holding FAMILY-SIZE weight folders (e.g. dinov3-base/)")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--min-epochs", type=int, default=defaults.min_epochs)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-minutes", type=float, default=None, help="time budget per arm")
    parser.add_argument("--image-size", type=int, default=None, help="slice size (default: each family's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--cache", help="preprocessing cache folder")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--torchrun", type=int, default=None, metavar="N",
                        help="train each arm under torchrun with N processes (GPUs) on this machine")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--frozen-backbones", action="store_true",
                        help="train every backbone frozen with LoRA (default: Pillar0 fully fine-tuned, as in the paper)")


def run_from_args(args) -> int:
    from ..training.augment import AugmentConfig
    from ..training.train import ProgressPrinter, TrainConfig

    config = TrainConfig(max_epochs=args.epochs, min_epochs=min(args.min_epochs, args.epochs), patience=args.patience,
                         batch_size=args.batch_size, seed=args.seed, device=args.device, precision=args.precision,
                         max_minutes=args.max_minutes,
                         augment=AugmentConfig.off() if args.no_augment else AugmentConfig())
    result = run_compare(args.cases, args.backbones, args.out, backbone_root=args.backbone_root, config=config,
                         image_size=args.image_size, cache_dir=args.cache, device=args.device,
                         n_boot=args.bootstrap, nproc=args.torchrun, progress=ProgressPrinter(),
                         frozen_backbones=args.frozen_backbones,
                         log=lambda m: print(m, file=sys.stderr))
    print(table2_markdown(result))
    print(f"wrote {Path(args.out) / 'table2.md'}, table2.json and the figures")
    return 0
