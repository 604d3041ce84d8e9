"""MoLRE versus the LoRA-only baseline on the same synthetic phantoms and the same frozen backbone.

SYNTHETIC DATA ONLY: the outcome says how the two adapters behave on computer-generated phantoms with a
small phantom-pretrained backbone, nothing about real scans or the paper's foundation backbones.

Both arms start from the stage-A backbone of scripts/train_demo_model.py (frozen), use the same training
and validation phantoms (same split), the same seed, the same protocol (stage-B settings: focal loss,
RFS, AdamW with the demo's stage-B learning rates, augmentation, early stopping, the same time limit) and
differ only in ``use_molre``. Both are evaluated on the same fresh phantoms (paired bootstrap of the
per-finding AUC differences, MoLRE minus LoRA-only). The result is written, whatever it is, to
``docs/comparison.md``.

Run from the repository root after (or without) the demo training; with the demo's work folder the
phantoms, preprocessing cache and backbone are reused::

    .venv/bin/python scripts/compare_molre_lora.py --work ~/.cache/headct-molre/demo-training
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as demo  # noqa: E402  (also puts HeadCTMoLRE on sys.path)

ARMS = (("molre", True, "LoRA + MoLRE (K=6)"), ("lora", False, "LoRA only"))


def ensure_backbone(work: Path, args) -> tuple[Path, Path, dict]:
    """(training cases CSV, stage-A backbone folder, stage-A slice head) from the demo's work folder; stage A
    runs first when its backbone is missing."""
    backbone, head_file = work / "backbone", work / demo.SLICE_HEAD_FILE
    if (backbone / "config.json").is_file() and head_file.is_file():
        head = demo.load_slice_head(head_file)
    else:
        backbone, head, _ = demo.run_stage_a(demo.parse_args(["--seed", str(args.seed), "--work", str(work)]), work)
    cases_csv = demo.write_phantoms(work / "phantoms", args.n_train, args.seed)
    return cases_csv, backbone, head


def renderable_ids() -> list[str]:
    from HeadCTMoLRELib.phantoms import RENDERABLE_FINDINGS

    return list(RENDERABLE_FINDINGS)


def summary_over(ids: list[str], aucs: dict[str, float | None]) -> dict:
    import numpy as np

    from HeadCTMoLRELib.metrics import stratify

    values = np.array([aucs[i] for i in ids if aucs.get(i) is not None], dtype=float)
    return {"mean_auc": float(values.mean()) if values.size else None, "std_auc": float(values.std()) if values.size else None,
            "n": int(values.size), "strata": stratify(values)}


def write_markdown(path: Path, result: dict) -> None:
    arms, rows = result["arms"], result["rows"]
    rend = result["renderable"]
    lines = [
        "# MoLRE versus LoRA-only on synthetic phantoms",
        "",
        "> **Synthetic data only.** Both models were trained and tested on computer-generated head CT phantoms "
        "with a small backbone pre-trained on the same kind of phantoms (no foundation model). The numbers say "
        "how the two adapter types behave here; they say nothing about real scans, and do not test the paper's "
        "claim about foundation backbones.",
        "",
        f"Made by `scripts/compare_molre_lora.py` ({result['date']}, {result['duration_min']:.1f} min on "
        f"{result['machine']}).",
        "",
        "## Setup",
        "",
        f"- Training: {result['n_train']} phantoms (seed {result['seed']}; {result['split']['train']} train / "
        f"{result['split']['val']} validation, the same split for both arms).",
        f"- Test: {result['n_test']} FRESH phantoms (seed {result['test_seed']}), never seen in training or validation "
        "(the demo's calibration phantoms are the same seed: its calibration is a monotonic map per finding, AUCs unchanged).",
        "- Backbone: the demo's stage-A DINOv3-architecture ViT (4 layers, width 128, patch 8, 64 px; pre-trained on phantom slices with dense targets), frozen; "
        "LoRA r=8, alpha=16 on the attention projections in both arms; MoLRE K=6, rank 8, router hidden 256 "
        "in the MoLRE arm only. Both heads start from the same stage-A slice head and pool the slices the same way ("
        + ("per finding: each volume logit = smooth maximum of that finding's slice logits"
           if result.get("pooling", "attention") == "per_finding" else "attention pooling: each volume logit starts as the "
           "mean of slice logits") + ").",
        f"- Protocol (identical): focal loss gamma=2 with prevalence alpha, Repeat Factor Sampling (t=0.1), AdamW "
        f"(heads {result['config']['lr_heads']}, adapters {result['config']['lr_adapters']}), the paper's "
        f"augmentations, batch {result['config']['batch_size']}, early stopping on the validation mean AUC "
        f"(min {result['config']['min_epochs']} epochs, patience {result['config']['patience']}), at most "
        f"{result['config']['max_minutes']} min per arm, seed {result['seed']}.",
        "- Metric: ROC AUC per finding on the test phantoms; differences are MoLRE minus LoRA-only with paired "
        "bootstrap 95% intervals (1000 resamples of cases).",
        "",
        "## Result",
        "",
        "| | LoRA only | LoRA + MoLRE | gain |",
        "|---|---|---|---|",
    ]
    lo, mo = arms["lora"], arms["molre"]

    def fmt(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    def signed(value):
        return "n/a" if value is None else f"{value:+.3f}"

    def gain(a, b):
        return "n/a" if a is None or b is None else f"{b - a:+.3f}"

    lines += [
        f"| mean AUC, the {rend['lora']['n']} rendered findings | {fmt(rend['lora']['mean_auc'])} | "
        f"{fmt(rend['molre']['mean_auc'])} | {gain(rend['lora']['mean_auc'], rend['molre']['mean_auc'])} |",
        f"| mean AUC, all {lo['n_findings_evaluated']} evaluable labels (incl. implied) | {fmt(lo['mean_auc'])} | "
        f"{fmt(mo['mean_auc'])} | {gain(lo['mean_auc'], mo['mean_auc'])} |",
        f"| findings with AUC >= 0.90 (rendered) | {rend['lora']['strata'].get('auc_ge_0.90', 'n/a')} | "
        f"{rend['molre']['strata'].get('auc_ge_0.90', 'n/a')} | |",
        f"| findings with AUC 0.80-0.90 (rendered) | {rend['lora']['strata'].get('auc_0.80_0.90', 'n/a')} | "
        f"{rend['molre']['strata'].get('auc_0.80_0.90', 'n/a')} | |",
        f"| epochs run (best epoch) | {lo['epochs_run']} ({lo['best_epoch']}) | {mo['epochs_run']} ({mo['best_epoch']}) | |",
        f"| best validation mean AUC | {fmt(lo['best_val_mean_auc'])} | {fmt(mo['best_val_mean_auc'])} | |",
        f"| training time (s) | {lo['train_s']:.0f} | {mo['train_s']:.0f} | |",
        f"| trainable parameters | {lo['trainable']} | {mo['trainable']} | |",
        "",
        f"Mean per-finding gain over the evaluable labels: {fmt(result['mean_gain'])} (95% CI "
        f"{fmt(result['mean_gain_ci'][0])} to {fmt(result['mean_gain_ci'][1])}); MoLRE better on "
        f"{result['n_improved']}, worse on {result['n_worse']}, equal on {result['n_equal']} of "
        f"{result['n_compared']} labels.",
        "",
        f"Strata (all of the paper's bins, rendered findings): LoRA only {rend['lora']['strata']}, "
        f"MoLRE {rend['molre']['strata']}.",
        "",
        "## Per finding (rendered findings first, then implied labels; sorted by gain)",
        "",
        "| finding | n pos | AUC LoRA only | AUC MoLRE | gain | gain 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['id']}{'' if row['rendered'] else ' (implied)'} | {row['n_pos']} | "
                     f"{fmt(row['auc_lora'])} | {fmt(row['auc_molre'])} | {signed(row['gain'])} | "
                     f"{fmt(row['gain_ci_low'])} to {fmt(row['gain_ci_high'])} |")
    lines += ["", "## Reading it", "", result["reading"], "",
              "Reproduce: `.venv/bin/python scripts/compare_molre_lora.py --work WORK --molre-bundle Resources/Models/demo` "
              "after `scripts/train_demo_model.py --work WORK` (raw numbers: "
              "`comparison.json` and the evaluation folder under the work folder).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def reading(result: dict) -> str:
    lo, mo = result["renderable"]["lora"]["mean_auc"], result["renderable"]["molre"]["mean_auc"]
    low, high = result["mean_gain_ci"]
    if max(lo, mo) < 0.6:
        return (f"Rendered-finding mean AUC: LoRA only {lo:.3f}, MoLRE {mo:.3f}: BOTH ARMS ARE AT CHANCE. The frozen "
                "backbone (pre-trained here on phantoms, not a foundation model) does not represent the findings, so "
                "neither adapter can learn them, and this run says nothing about whether MoLRE helps. Differences "
                "per finding are noise (see their intervals). The comparison has to be repeated with a backbone that "
                "carries the findings (a real foundation model, or a better phantom pre-training).")
    if low is not None and low > 0:
        verdict = "MoLRE is better than LoRA-only here: the paired interval of the mean gain excludes zero."
    elif high is not None and high < 0:
        verdict = "LoRA-only is better than MoLRE here: the paired interval of the mean gain lies below zero."
    else:
        verdict = ("The difference is within noise: the paired interval of the mean gain contains zero, so this "
                   "run does not show MoLRE beating (or losing to) LoRA-only.")
    return (f"Rendered-finding mean AUC: LoRA only {lo:.3f}, MoLRE {mo:.3f}. {verdict} One seed, one data set and a "
            "small phantom-pretrained backbone limit what this can show; the paper's setting (a general foundation "
            "backbone, thousands of real scans, 75 findings) is not reproduced.")


def rewrite_markdown(work: Path, markdown: Path) -> None:
    """Write the Markdown again from ``work/comparison.json`` (after a change of the text)."""
    result = json.loads((work / "comparison.json").read_text(encoding="utf-8"))
    result["reading"] = reading(result)
    write_markdown(markdown, result)


def reused_arm(path: Path, title: str, config, pooling: str) -> dict:
    """The MoLRE arm from an existing bundle trained with the same settings (checked against ``config``)."""
    from HeadCTMoLRELib.model import bundle, classifier as model

    trained = bundle.load_bundle(path)
    training = trained.manifest["training"]
    stored = {k: v for k, v in training["config"].items() if k not in ("max_minutes",)}
    wanted = {k: v for k, v in config.to_dict().items() if k not in ("max_minutes",)}
    if stored != wanted or not trained.model_config.use_molre or trained.model_config.pooling != pooling:
        raise SystemExit(f"{path} was not trained with the comparison's settings; train both arms (drop --molre-bundle).")
    counts = training["counts"]
    return {"title": title, "bundle": str(path), "epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"],
            "best_val_mean_auc": training["best_val_mean_auc"], "train_s": training["duration_s"],
            "trainable": model.count_parameters(bundle.build_model(trained))["trainable"],
            "split": {"train": counts["train"], "val": counts["val"]}, "reused": True}


def main(argv=None) -> int:
    import torch

    from HeadCTMoLRELib.model import bundle, classifier as model
    from HeadCTMoLRELib.evaluation.compare import read_comparison
    from HeadCTMoLRELib.evaluation.evaluate import evaluate
    from HeadCTMoLRELib.model.manifest_schema import POOLINGS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(demo.default_work_dir()), help="the demo's work folder (reused)")
    parser.add_argument("--n-train", type=int, default=400, help="stage-B phantoms, as the demo's --n-train")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--minutes", type=float, default=6.0,
                        help="time limit per arm, as the demo's stage B (default 6; early stopping may end an arm first)")
    parser.add_argument("--pooling", default="per_finding", choices=POOLINGS,
                        help="slice pooling of both arms (default per_finding, as the demo model)")
    parser.add_argument("--eval-n", type=int, default=150, help="fresh test phantoms (seed + 1)")
    parser.add_argument("--markdown", default="docs/comparison.md")
    parser.add_argument("--molre-bundle", help="use this already trained MoLRE arm (e.g. Resources/Models/demo, which is "
                        "the demo's stage B: same backbone, data, seed and settings) instead of training it again")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cases_csv, backbone, slice_head = ensure_backbone(work, args)
    origin = "phantom pre-training (scripts/train_demo_model.py stage A), not a foundation model"
    config = demo.stage_b_config(args.seed, args.minutes)
    arms: dict[str, dict] = {}
    for key, use_molre, title in ARMS:
        tick = time.perf_counter()
        if key == "molre" and args.molre_bundle:
            arms[key] = reused_arm(Path(args.molre_bundle), title, config, args.pooling)
            continue
        start = demo.start_bundle(work / f"compare-start-{key}", seed=args.seed, use_molre=use_molre,
                                  backbone_folder=backbone, origin=origin, slice_head=slice_head, pooling=args.pooling)
        result = demo.train_stage(cases_csv, start, work / f"compare-{key}", config, work / "cache", title)
        trained = bundle.load_bundle(result.bundle_path)
        counts = trained.manifest["training"]["counts"]
        arms[key] = {"title": title, "bundle": str(result.bundle_path), "epochs_run": result.epochs_run,
                     "best_epoch": result.best_epoch, "best_val_mean_auc": result.best_val_mean_auc,
                     "train_s": time.perf_counter() - tick, "trainable": model.count_parameters(bundle.build_model(trained))["trainable"],
                     "split": {"train": counts["train"], "val": counts["val"]}}
    test_csv = demo.write_phantoms(work / "fresh-phantoms", args.eval_n, args.seed + 1)
    out = work / "compare-evaluation"
    evaluation = evaluate(test_csv, arms["molre"]["bundle"], out, compare=arms["lora"]["bundle"], device="cpu",
                          cache_dir=work / "cache")
    comparison = evaluation["comparison"]
    rendered = renderable_ids()
    per_finding = read_comparison(out)  # the same reading of evaluate's comparison as `headct-molre compare`
    aucs_lora = {row["id"]: row["auc_lora"] for row in per_finding}
    aucs_molre = {row["id"]: row["auc_molre"] for row in per_finding}
    arms["molre"].update(mean_auc=comparison["mean_auc_candidate"], n_findings_evaluated=evaluation["n_findings_evaluated"])
    arms["lora"].update(mean_auc=comparison["mean_auc_reference"], n_findings_evaluated=evaluation["n_findings_evaluated"])
    rows = [{"id": row["id"], "rendered": row["id"] in rendered, "n_pos": row["n_pos"], "auc_lora": row["auc_lora"],
             "auc_molre": row["auc_molre"], "gain": row["gain"], "gain_ci_low": row["gain_ci"][0],
             "gain_ci_high": row["gain_ci"][1]}
            for row in per_finding if row["auc_lora"] is not None or row["auc_molre"] is not None]
    rows.sort(key=lambda r: (not r["rendered"], -(r["gain"] if r["gain"] is not None else -9)))
    result = {
        "date": time.strftime("%Y-%m-%d"), "duration_min": (time.perf_counter() - started) / 60,
        "machine": f"{torch.get_num_threads()} CPU threads", "seed": args.seed, "test_seed": args.seed + 1,
        "n_train": args.n_train, "n_test": evaluation["n_cases_evaluated"], "split": arms["molre"]["split"],
        "pooling": args.pooling,
        "config": config.to_dict(), "arms": arms,
        "renderable": {"lora": summary_over(rendered, aucs_lora), "molre": summary_over(rendered, aucs_molre)},
        "mean_gain": comparison["mean_gain"], "mean_gain_ci": comparison["mean_gain_ci"],
        "n_improved": comparison["n_improved"], "n_worse": comparison["n_worse"], "n_equal": comparison["n_equal"],
        "n_compared": comparison["n_compared"], "rows": rows,
    }
    result["reading"] = reading(result)
    (work / "comparison.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    write_markdown(Path(args.markdown), result)
    print(f"LoRA only {result['renderable']['lora']['mean_auc']:.3f}, MoLRE {result['renderable']['molre']['mean_auc']:.3f} "
          f"(rendered findings); written {args.markdown} in {result['duration_min']:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
