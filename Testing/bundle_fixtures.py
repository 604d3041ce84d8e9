"""Helpers that build tiny, randomly initialised model bundles for tests (seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from HeadCTMoLRELib.model import backbones, bundle, classifier as model
from HeadCTMoLRELib import findings
from HeadCTMoLRELib.ct import preprocess


def make_classifier(family: str = "dinov3", image_size: int = 32, use_molre: bool = True, seed: int = 0,
                    randomize_adapters: bool = True):
    """A tiny classifier; with randomize_adapters the zero-initialised LoRA B / MoLRE experts get random
    values so that outputs depend on every trainable tensor (as after training)."""
    torch.manual_seed(seed)
    catalog = findings.default_catalog()
    spec = backbones.BackboneSpec(family=family, size="tiny", image_size=image_size)
    config = model.ModelConfig(backbone=spec, num_findings=len(catalog), use_molre=use_molre)
    classifier = model.build_classifier(config).eval()
    if randomize_adapters:
        with torch.no_grad():
            for tensor in model.trainable_state_dict(classifier).values():
                if tensor.dtype.is_floating_point:
                    tensor.copy_(torch.randn_like(tensor) * 0.05)
    return classifier, catalog


def make_bundle(out: Path, *, family: str = "dinov3", image_size: int = 32, use_molre: bool = True,
                alignment: str = "center", seed: int = 0, **save_kwargs) -> Path:
    classifier, catalog = make_classifier(family, image_size, use_molre, seed)
    pre = preprocess.PreprocessConfig(image_size=image_size, alignment=alignment)
    return bundle.save_bundle(classifier, out, catalog=catalog, preprocessing=pre, **save_kwargs)


def edit_manifest(folder: Path, edit, *, reseal: bool = True) -> dict:
    """Apply ``edit(manifest)`` to a bundle's manifest.json. With ``reseal`` the manifest digest is
    recomputed (as a hostile publisher could do), so the edit reaches the checks behind the digest;
    without it the edit is a plain hand edit, which the digest catches."""
    path = Path(folder) / bundle.MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    if reseal:
        bundle.seal_manifest(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return manifest
