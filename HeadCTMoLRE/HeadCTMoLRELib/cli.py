"""`headct-molre`: the command line of HeadCTMoLRE.

Each subcommand is a thin wrapper over the library: it parses arguments, calls one library function and
prints its result (text, or JSON with --json). Heavy modules (torch, transformers) are imported inside
the handlers so that `headct-molre validate` stays fast.

Exit status: 0 success, 2 refused input or bad arguments, 1 unexpected error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2


def _print_json(obj) -> None:
    from .outputs import json_default

    print(json.dumps(obj, indent=2, default=json_default))


# --------------------------------------------------------------------------------------------- validate
def _cmd_validate(args) -> int:
    from .ct import loader as ctio
    from . import terminal

    report = ctio.validation_report(args.input, series=args.series, hu_offset=args.hu_offset)
    report.setdefault("source", str(args.input))
    if args.json:
        _print_json(report)
    else:
        print(terminal.format_validation(report))
    return EXIT_OK if report["accepted"] else EXIT_REFUSED


# ------------------------------------------------------------------------------------------------- demo
def _stack_summary(stack, timings_s: dict) -> dict:
    return {
        "shape": list(stack.pixels.shape),
        "valid_slices": int(stack.slice_valid.sum()),
        "spacing_mm": [float(v) for v in stack.spacing_mm],
        "alignment": stack.alignment,
        "warnings": list(stack.warnings),
        "timings_s": timings_s,
    }


def default_demo_model() -> Path:
    """The bundled demo model (trained on synthetic phantoms by scripts/train_demo_model.py)."""
    from .resources import resource_path

    return resource_path("Models", "demo")


#: Sizes small enough that a random backbone is only ever made on purpose (tests, CPU smoke runs).
RANDOM_OK_SIZES = ("tiny",)

DEMO_CAVEAT = (
    "The demo model was trained on SYNTHETIC phantoms only: its probabilities on a real scan show that the "
    "pipeline works, not what the scan contains. Research use only, not for clinical use."
)


def _cmd_demo(args) -> int:
    from .ct import loader as ctio
    from . import terminal

    from .resources import default_sample_path

    source = Path(args.input) if args.input else default_sample_path()
    model = Path(args.model) if args.model else default_demo_model()
    t0 = time.perf_counter()
    volume, report = ctio.load_with_report(source)  # read and checked once; predict reuses the volume
    read_s = time.perf_counter() - t0
    report.setdefault("source", str(source))
    if not report["accepted"]:
        if args.json:
            _print_json({"validation": report})
        else:
            print(terminal.format_validation(report))
        return EXIT_REFUSED
    if not (model / "manifest.json").is_file():
        return _demo_without_model(args, volume, report, model)

    from . import inference, outputs

    log = None if args.json else (lambda message: print(f"[headct-molre] {message}", file=sys.stderr))
    prediction = inference.predict(volume, model, device=args.device, threads=args.threads, log=log)
    written = outputs.write_prediction(prediction, args.out) if args.out else {}
    timings = {k: prediction.timings_s[k] for k in ("imports", "model", "preprocess", "forward")}
    summary = _stack_summary(prediction.stack, {**timings, "read": read_s})
    phantom = None if (args.input or args.no_phantom) else _demo_on_phantom(model, args.device, args.threads, log)
    if args.json:
        _print_json({"validation": report, "preprocessing": summary, "model": str(model),
                     "model_status": dict(prediction.model_status),  # first, as in every other output
                     "prediction": prediction.to_json(), "outputs": {k: str(v) for k, v in written.items()},
                     "phantom": phantom})
        return EXIT_OK
    print(terminal.format_validation(report))
    print(terminal.format_stack_summary(summary))
    print(f"\nModel: {model}")
    print(terminal.format_findings_table(prediction.findings(), limit=args.top, status=prediction.model_status))
    print(f"\n{DEMO_CAVEAT}" if model == default_demo_model() else "\nResearch use only, not for clinical use.")
    if prediction.status_label:
        print(prediction.status_label)
    print(f"device {prediction.provenance['device']} ({prediction.provenance['precision']}), total "
          f"{prediction.timings_s['total'] + read_s:.1f} s")
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    if phantom is not None:
        print(f"\nBundled phantom with known findings ({phantom['image']}, synthetic, seed {phantom['seed']}): "
              "truth next to prediction")
        print(terminal.format_truth_table(phantom["comparison"]))
    return EXIT_OK


def _demo_on_phantom(model: Path, device: str, threads, log) -> dict | None:
    """The model on the bundled phantom whose findings are known (Resources/Samples/phantom_demo*, made by
    scripts/make_demo_phantom.py): {"image", "seed", "truth", "comparison" (terminal.truth_comparison),
    "findings"}; None when the phantom is not bundled."""
    from .resources import demo_phantom_paths
    from . import inference, terminal

    image, truth_path = demo_phantom_paths()
    if not (image.is_file() and truth_path.is_file()):
        return None
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    prediction = inference.predict(image, model, device=device, threads=threads, log=log)
    rows = prediction.findings()
    return {"image": image.name, "seed": truth.get("seed"), "truth": list(truth["positive_labels"]),
            "comparison": terminal.truth_comparison(rows, truth["positive_labels"]), "findings": rows}


def _demo_without_model(args, volume, report: dict, model: Path) -> int:
    """No model bundle: show what the input path does and say how to get a model."""
    from .ct import preprocess
    from . import terminal

    t1 = time.perf_counter()
    stack = preprocess.preprocess(volume)
    summary = _stack_summary(stack, {"preprocess": time.perf_counter() - t1})
    missing = (f"no model bundle at {model}: train the demo model with `python scripts/train_demo_model.py` "
               f"or pass --model BUNDLE")
    if args.json:
        _print_json({"validation": report, "preprocessing": summary, "model": None, "note": missing})
    else:
        print(terminal.format_validation(report))
        print(terminal.format_stack_summary(summary))
        print(f"\n{missing}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- phantoms
def _cmd_phantoms(args) -> int:
    from . import phantoms as phantom

    out = phantom.write_phantom_dataset(
        Path(args.out), n=args.n, seed=args.seed, fmt="dicom" if args.dicom else "nifti"
    )
    print(f"wrote {args.n} synthetic head CT phantoms and labels.csv to {out}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- info
def _cmd_info(args) -> int:
    from .model import bundle
    from .model.status import bundle_status
    from . import terminal

    manifest = bundle.read_manifest(args.bundle)
    status = bundle_status(manifest).to_json()
    if args.json:
        _print_json({**manifest, "model_status": status})
        return EXIT_OK
    banner = terminal.format_status_banner(status)
    if banner:
        print(banner)
    if not args.verify:
        print(bundle.describe(manifest))
        return EXIT_OK
    loaded = _verify_bundle(args.bundle, args.backbone_path, None)
    print(bundle.describe(loaded.manifest, loaded.signature))
    print(_verified_text(loaded))
    return EXIT_OK


def _verify_bundle(path, backbone_path, trusted_keys):
    """Everything a load checks, plus the external backbone folder's hashes."""
    from .model import bundle

    loaded = bundle.load_bundle(path, verify=True, trusted_keys=trusted_keys, rehash=True)  # really re-read
    loaded.backbone_folder = bundle.resolve_backbone_folder(loaded, backbone_path)
    return loaded


def _verified_text(loaded) -> str:
    backbone = (f"; external backbone {loaded.backbone_folder} matches its hashes" if loaded.backbone_folder
                else "; backbone bundled")
    return (f"Manifest digest verified. All file hashes verified{backbone}. "
            f"Signature: {loaded.signature.describe()}.")


def _cmd_verify(args) -> int:
    from .model import signing

    trusted = signing.read_trusted_keys(args.trusted_keys) if args.trusted_keys else None
    loaded = _verify_bundle(args.bundle, args.backbone_path, trusted)
    print(_verified_text(loaded))
    if trusted is not None and not loaded.signature.trusted:
        print(f"error: {args.bundle} is {'signed by an untrusted key' if loaded.signature.signed else 'not signed'}; "
              f"it cannot be told apart from a modified copy", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _cmd_sign(args) -> int:
    from .model import bundle, signing

    loaded = _verify_bundle(args.bundle, args.backbone_path, None)
    path = signing.sign_manifest_digest(loaded.path, loaded.manifest["integrity"]["manifest_sha256"], args.key,
                                        signer=args.signer)
    status = bundle.load_bundle(loaded.path).signature
    print(f"wrote {path}: {status.describe()}")
    return EXIT_OK


def _cmd_keygen(args) -> int:
    from .model import signing

    private, public = signing.generate_keypair(args.out)
    print(f"wrote private key {private} (keep it secret) and public key {public} (give it to users: "
          f"`headct-molre verify BUNDLE --trusted-keys {public.name}`)")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- new-model
def _cmd_new_model(args) -> int:
    import torch

    from .model import backbones, bundle, classifier as model
    from . import findings
    from .ct import preprocess

    if not args.backbone_path and not args.random_backbone and args.size not in RANDOM_OK_SIZES:
        print(f"error: no --backbone-path: a {args.backbone} {args.size} backbone would be randomly initialised, "
              "and training keeps it frozen, so the model could never learn. Download the pretrained weights and "
              "pass --backbone-path DIR, or pass --random-backbone to make one on purpose (tests, benchmarks).",
              file=sys.stderr)
        return EXIT_REFUSED
    catalog = findings.load_catalog(args.catalog) if args.catalog else findings.default_catalog()
    torch.manual_seed(args.seed)
    image_size = args.image_size or backbones.default_image_size(args.backbone, args.size)
    spec = backbones.BackboneSpec(
        family=args.backbone, size=args.size, image_size=image_size,
        source=str(Path(args.backbone_path).resolve()) if args.backbone_path else None,
    )
    try:
        config = model.ModelConfig(backbone=spec, num_findings=len(catalog), use_molre=not args.no_molre,
                                   pooling=args.pooling)
    except ValueError as error:  # e.g. per-finding pooling asked of a 3-D backbone
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    classifier = model.build_classifier(config, backbone_weights_dir=args.backbone_path)
    pre = preprocess.PreprocessConfig(**{**backbones.default_preprocessing(args.backbone, args.size),
                                         "image_size": image_size, "alignment": args.alignment})
    path = bundle.save_bundle(
        classifier, args.out, catalog=catalog, preprocessing=pre,
        name=args.name or Path(args.out).name,
        description=f"Untrained {args.backbone} {args.size} "
        + ("LoRA-only baseline" if args.no_molre else "LoRA + MoLRE")
        + " model (adapters at initialisation). Train it before use.",
        backbone_weights_dir=args.backbone_path,
        bundle_backbone=True if args.bundle_backbone else None,
    )
    from .model.status import bundle_status
    from . import terminal

    manifest = bundle.read_manifest(path)
    print(terminal.format_status_banner(bundle_status(manifest).to_json()))
    print(bundle.describe(manifest))
    print(f"\nwrote {path}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ convert-weights
def _cmd_convert_weights(args) -> int:
    from .model import convert

    out = convert.convert_weights(args.family, args.source, args.out, size=args.size)
    provenance = json.loads((out / "conversion.json").read_text(encoding="utf-8"))
    print(f"kept {provenance['tensors_kept']} tensors ({provenance['parameters_kept']:,} parameters), dropped "
          f"{provenance['tensors_dropped']} (text tower and the like)")
    print(f"wrote {out} (config.json + model.safetensors); use it as --backbone-path for "
          f"`headct-molre new-model --backbone {args.family} --size {provenance['size']}`")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ infer
def _cmd_infer(args) -> int:
    from . import inference, outputs, terminal

    log = None if args.json else (lambda message: print(f"[headct-molre] {message}", file=sys.stderr))
    prediction = inference.predict(
        args.input, args.model, device=args.device, precision=args.precision, series=args.series,
        hu_offset=args.hu_offset, backbone_folder=args.backbone_path, threads=args.threads, log=log,
    )
    written = outputs.write_prediction(prediction, args.out) if args.out else {}
    if args.json:
        result = prediction.to_json()
        result["outputs"] = {k: str(v) for k, v in written.items()}
        _print_json(result)
        return EXIT_OK
    print(terminal.format_findings_table(prediction.findings(), limit=None if args.all else args.top,
                                         status=prediction.model_status))
    positives = sum(1 for f in prediction.findings() if f["positive"])
    print(f"\n{positives} finding(s) above threshold (*). Research use only, not for clinical use.")
    if prediction.status_label:
        print(prediction.status_label)
    for warning in prediction.warnings:
        print(f"warning: {warning}")
    t = prediction.timings_s
    print(
        f"device {prediction.provenance['device']} ({prediction.provenance['precision']}); "
        + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
    )
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------- train, fine-tune
def _refuse_frozen_random_backbone(args) -> str | None:
    from .model import bundle
    from .model.status import frozen_random_backbone_error

    return frozen_random_backbone_error(bundle.read_manifest(args.model),
                                        train_backbone=bool(getattr(args, "train_backbone", False)))


def _cmd_train(args) -> int:
    from .training import train

    refusal = _refuse_frozen_random_backbone(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_REFUSED
    return train.run_train_from_args(args)


def _cmd_fine_tune(args) -> int:
    from .training import train

    refusal = _refuse_frozen_random_backbone(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_REFUSED
    return train.run_fine_tune_from_args(args)


# ------------------------------------------------------------------------------------------------ batch
def _cmd_batch(args) -> int:
    from . import batch

    return batch.run_from_args(args)


# --------------------------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args) -> int:
    from .evaluation import evaluate

    return evaluate.run_from_args(args)


def _cmd_compare(args) -> int:
    from .evaluation import compare

    return compare.run_from_args(args)


# ---------------------------------------------------------------------------------------- import-dataset
def _cmd_import_dataset(args) -> int:
    from .datasets import importer

    return importer.run_from_args(args)


# -------------------------------------------------------------------------------------------- benchmark
def _cmd_benchmark(args) -> int:
    from . import benchmark

    return benchmark.run_from_args(args)


# ---------------------------------------------------------------------------------------------- parser
def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: CPU threads for torch (threads.py; default $HEADCT_THREADS, else by work size)."""
    parser.add_argument("--threads", default=None,
                        help="CPU threads for the model and preprocessing (default: $HEADCT_THREADS, else chosen "
                             "by work size: 1 for small models, every core for large ones)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command``, the heavy subcommands' arguments (which import torch) are
    added only for that command, so `headct-molre validate` never pays for importing torch."""

    from .model.manifest_schema import POOLINGS  # standard library only

    def wanted(name: str) -> bool:
        return command is None or command == name

    parser = argparse.ArgumentParser(
        prog="headct-molre",
        description="MoLRE head CT finding detection: validate inputs, run models, train, evaluate. "
        "Research use only, not for clinical use.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"headct-molre {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("validate", _cmd_validate, "Load and check a head CT (NIfTI/NRRD/MHA file or DICOM folder).")
    p.add_argument("input", help="image file, DICOM folder (recursive, DICOMDIR allowed)")
    p.add_argument("--series", help="SeriesInstanceUID to use when the folder holds several series")
    p.add_argument(
        "--hu-offset",
        type=float,
        default=None,
        help="add this to every value (e.g. -1024 for raw CT numbers whose rescale is missing)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    p = add("demo", _cmd_demo, "Run the demo model on the bundled real head CT and on the bundled phantom with known "
                              "findings (or --input / --model).")
    p.add_argument("--input", help="another image file or DICOM folder instead of the bundled sample")
    p.add_argument("--model", help="another model bundle instead of the bundled demo model")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps, cpu")
    p.add_argument("--out", help="also write findings TSV/JSON and the attention/expert maps (NRRD) here")
    add_threads_argument(p)
    p.add_argument("--top", type=int, default=10, help="findings to print (default 10)")
    p.add_argument("--no-phantom", action="store_true",
                   help="skip the second part: the model on the bundled phantom with known findings, truth next "
                        "to prediction (only shown for the bundled sample, not with --input)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    p = add("phantoms", _cmd_phantoms, "Write synthetic head CT phantoms with finding labels.")
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    p.add_argument("--out", required=True, help="output folder (labels.csv + one image per case)")
    p.add_argument("--dicom", action="store_true", help="write DICOM series instead of NIfTI")

    p = add("info", _cmd_info, "Describe a model bundle in human terms.")
    p.add_argument("bundle", help="model bundle folder")
    p.add_argument("--verify", action="store_true",
                   help="also check every file's sha256, the external backbone and the signature")
    p.add_argument("--backbone-path", help="where the bundle's external backbone folder is on this machine")
    p.add_argument("--json", action="store_true", help="print the manifest (and its model_status) as JSON")

    p = add("verify", _cmd_verify, "Verify a model bundle: manifest digest, file hashes, backbone, signature.")
    p.add_argument("bundle", help="model bundle folder")
    p.add_argument("--trusted-keys", help="public keys (a file of 'ed25519:...' lines or a folder of *.pub): "
                                          "exit 2 unless the bundle is signed by one of them")
    p.add_argument("--backbone-path", help="where the bundle's external backbone folder is on this machine")

    p = add("sign", _cmd_sign, "Sign a verified model bundle as its publisher (writes BUNDLE/signature.json).")
    p.add_argument("bundle", help="model bundle folder")
    p.add_argument("--key", required=True, help="private key from `headct-molre keygen`")
    p.add_argument("--signer", help="your name or organisation, shown by info and verify")
    p.add_argument("--backbone-path", help="where the bundle's external backbone folder is on this machine")

    p = add("keygen", _cmd_keygen, "Make an ed25519 key pair for signing bundles (KEY and KEY.pub).")
    p.add_argument("--out", required=True, help="private key file to create (the public key goes to OUT.pub)")

    p = add("new-model", _cmd_new_model, "Create an untrained model bundle (LoRA + MoLRE adapters at init).")
    p.add_argument("--backbone", required=True,
                   help="backbone family: dinov3, dinov2, siglip, videomae3d, medimageinsight, pillar0")
    p.add_argument("--size", required=True, help="tiny, small, base, large (so400m for siglip; base for medimageinsight; headct for pillar0)")
    p.add_argument("--backbone-path", help="local Hugging Face folder with the pretrained backbone (no download)")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--image-size", type=int, default=None,
                   help="slice size in pixels fed to the backbone (default: the family's own, 480 for "
                   "medimageinsight, 256 for pillar0, else 224)")
    p.add_argument("--alignment", default="template", choices=("template", "center", "none"),
                   help="head-frame alignment used in preprocessing")
    p.add_argument("--no-molre", action="store_true", help="the paper's LoRA-only baseline")
    p.add_argument("--pooling", default="attention", choices=POOLINGS,
                   help="how slices become volume logits (2-D backbones): attention = the paper's single learned "
                        "query (default); per_finding = each finding's smooth maximum of its slice logits, for "
                        "findings seen on few slices")
    p.add_argument("--catalog", help="your own finding catalog CSV (default: the 75 findings)")
    p.add_argument("--bundle-backbone", action="store_true",
                   help="copy the backbone weights into the bundle (self-contained; larger)")
    p.add_argument("--name", help="model name shown in lists (default: the folder name)")
    p.add_argument("--seed", type=int, default=0, help="seed for randomly initialised weights")
    p.add_argument("--random-backbone", action="store_true",
                   help="allow a randomly initialised backbone without --backbone-path (tests, benchmarks); "
                        "such a model is labelled RANDOM BACKBONE and `train` refuses it unless --train-backbone")

    p = add("convert-weights", _cmd_convert_weights,
            "Convert a released checkpoint (MedImageInsight's .pt, Pillar0-HeadCT's model.safetensors) into a "
            "safetensors backbone folder.")
    p.add_argument("source", help="the released checkpoint (.pt read with torch.load(weights_only=True), or .safetensors)")
    p.add_argument("--family", required=True, help="medimageinsight or pillar0")
    p.add_argument("--size", help="the family's size the checkpoint has (default: base; headct for pillar0)")
    p.add_argument("--out", required=True, help="folder to create (config.json + model.safetensors + conversion.json)")

    p = add("infer", _cmd_infer, "Run a model bundle on a head CT and print the findings.")
    p.add_argument("input", help="image file or DICOM folder")
    p.add_argument("--model", required=True, help="model bundle folder")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps, cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--out", help="write findings.tsv/json and attention/expert NRRD maps here")
    p.add_argument("--series", help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--hu-offset", type=float, default=None, help="add to every value (e.g. -1024 for raw CT numbers)")
    p.add_argument("--backbone-path", help="where the bundle's external backbone folder is on this machine")
    add_threads_argument(p)
    p.add_argument("--top", type=int, default=15, help="rows to print (default 15)")
    p.add_argument("--all", action="store_true", help="print all findings")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    p = add("train", _cmd_train, "Train a model bundle's adapters on labelled cases (the paper's protocol).")
    if wanted("train"):
        from .training.train import add_train_arguments

        add_train_arguments(p)
    p = add("fine-tune", _cmd_fine_tune, "Continue from a trained bundle's adapters on new labelled cases.")
    if wanted("fine-tune"):
        from .training.train import add_fine_tune_arguments

        add_fine_tune_arguments(p)

    p = add("evaluate", _cmd_evaluate,
            "Evaluate a model bundle on labelled cases: AUCs with CIs, calibration, plots, model card.")
    if wanted("evaluate"):
        from .evaluation.evaluate import add_arguments as add_evaluate_arguments

        add_evaluate_arguments(p)

    p = add("batch", _cmd_batch, "Run a model over many head CTs: per-case results, HTML reports, DICOM outputs, "
            "a summary written as cases finish (resumable, sharded under torchrun).")
    from .batch import add_arguments as add_batch_arguments

    add_batch_arguments(p)

    p = add("compare", _cmd_compare,
            "The paper's Table 2: train LoRA-only and LoRA + MoLRE per backbone, compare them (MD + PNG + JSON).")
    if wanted("compare"):
        from .evaluation.compare import add_arguments as add_compare_arguments

        add_compare_arguments(p)

    p = add("import-dataset", _cmd_import_dataset,
            "Turn a downloaded public head CT dataset (RSNA ICH, CQ500, CT-ICH) into a cases CSV.")
    from .datasets.importer import add_arguments as add_import_arguments

    add_import_arguments(p)

    p = add("benchmark", _cmd_benchmark, "Time each stage, count FLOPs and memory for tiny/small/base models.")
    if wanted("benchmark"):
        from .benchmark import add_arguments as add_benchmark_arguments

        add_benchmark_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in argv if not word.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # CTInputError, BundleError...: a message for the user
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def fast_exit_is_safe() -> bool:
    """True when ending the process without interpreter teardown loses nothing: this thread is the only
    one and no child process is alive (our outputs are written and closed by then; atomic writes fsync)."""
    import threading

    if threading.active_count() > 1:
        return False
    multiprocessing = sys.modules.get("multiprocessing")
    return not (multiprocessing and multiprocessing.active_children())


def run() -> None:
    """The `headct-molre` program: ``main()``, then exit. Once torch or transformers are loaded, the
    interpreter's teardown (module and extension finalisers) takes about a second while nothing is left to
    do, so the process flushes its output and ends at once when that is safe (fast_exit_is_safe)."""
    code = main()  # an unexpected exception propagates with its traceback and the normal teardown
    if "torch" in sys.modules and fast_exit_is_safe():
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code if isinstance(code, int) else EXIT_FAILED)
    sys.exit(code)


if __name__ == "__main__":
    run()
