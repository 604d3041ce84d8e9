"""What a model bundle can be trusted for, in one label every output carries.

    bundle_status(manifest) -> BundleStatus(synthetic, untrained, random_backbone, label, warnings)

Read from keys every bundle already has (no new manifest keys, so old bundles get the right label):

* **synthetic**: ``synthetic_training_data`` is true (top level, or in ``training``): the adapters were
  fitted on computer-generated phantoms, so findings on a real scan mean nothing.
* **untrained**: ``training`` is null, or ``training.epochs_run`` is 0: the adapters and head are at their
  initialisation (``new-model`` writes ``training: null``; ``train``/``fine-tune`` write the provenance
  with the epochs run when they save a bundle, which clears the flag).
* **random_backbone**: ``model.backbone.source`` is null (``new-model`` without ``--backbone-path``) and
  the backbone was not itself trained (``training.config.train_backbone``): the frozen features are
  noise, and a model on them cannot learn anything real.

``label`` is one line, empty only for a model trained on real data with a real backbone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

__all__ = ["BundleStatus", "bundle_status", "frozen_random_backbone_error"]


@dataclass(frozen=True)
class BundleStatus:
    synthetic: bool
    untrained: bool
    random_backbone: bool
    label: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def trustworthy(self) -> bool:
        """True when nothing is known to make this model's findings meaningless (still research use only)."""
        return not self.label

    def to_json(self) -> dict:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        return out


def _training(manifest: Mapping) -> Mapping:
    training = manifest.get("training")
    return training if isinstance(training, Mapping) else {}


def bundle_status(manifest: Mapping) -> BundleStatus:
    """The status of a bundle from its manifest (a dict as in manifest.json)."""
    training = _training(manifest)
    synthetic = bool(manifest.get("synthetic_training_data") or training.get("synthetic_training_data"))
    untrained = not training or int(training.get("epochs_run") or 0) == 0
    spec = ((manifest.get("model") or {}).get("backbone") or {})
    backbone_trained = bool((training.get("config") or {}).get("train_backbone")) and not untrained
    random_backbone = spec.get("source") in (None, "") and not backbone_trained
    words, warnings = [], []
    if untrained:
        words.append("UNTRAINED")
        warnings.append("The adapters and the finding head were never trained: every probability is noise.")
    if random_backbone:
        words.append("RANDOM BACKBONE")
        warnings.append("The backbone was not loaded from pretrained weights (random initialisation): its "
                        "features carry no medical knowledge.")
    if synthetic:
        words.append("SYNTHETIC")
        warnings.append("Trained on SYNTHETIC phantoms only: findings on a real scan show that the pipeline "
                        "runs, not what the scan contains.")
    label = ""
    if words:
        label = f"{' + '.join(words)} MODEL: findings are not meaningful. Research use only."
    return BundleStatus(synthetic=synthetic, untrained=untrained, random_backbone=random_backbone, label=label,
                        warnings=tuple(warnings))


def frozen_random_backbone_error(manifest: Mapping, *, train_backbone: bool) -> str | None:
    """The refusal message for training adapters on a random, frozen backbone (None when training is fine)."""
    if train_backbone or not bundle_status(manifest).random_backbone:
        return None
    name = manifest.get("name", "this bundle")
    return (f"{name}: its backbone is randomly initialised and would stay frozen, so training could never "
            "learn anything. Create the model from pretrained weights (new-model --backbone-path DIR), or "
            "train the backbone too (--train-backbone).")
