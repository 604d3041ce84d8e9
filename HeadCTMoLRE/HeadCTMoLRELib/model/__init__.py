"""The model and its bundle: backbones (transformers + peft LoRA), fused attention, the MoLRE layer, the
classifier (backbone -> MoLRE -> attention pool -> linear head) and model bundles on disk (safetensors +
JSON manifest + sha256). Uses ``ct`` only for the preprocessing parameters a bundle records."""

from ..exports import lazy_exports

__all__ = ["Bundle", "BundleError", "HeadCTClassifier", "ModelConfig", "MoLRE", "MoLREConfig", "build_model",
           "load_bundle", "read_manifest", "save_bundle"]
__getattr__ = lazy_exports(__name__, {
    "Bundle": "bundle", "BundleError": "bundle", "build_model": "bundle", "load_bundle": "bundle",
    "read_manifest": "bundle", "save_bundle": "bundle", "HeadCTClassifier": "classifier",
    "ModelConfig": "classifier", "MoLRE": "molre", "MoLREConfig": "molre",
})
