"""Training: labelled cases and the preprocessed-stack cache (``cases``), augmentation, the paper's
training protocol (``train``: fit, fine-tune, resume, DDP hooks in ``distributed``) and dense pre-training
of a backbone stand-in on phantoms (``pretrain``). Uses ``ct``, ``model``, ``inference`` and ``phantoms``."""

from ..exports import lazy_exports

__all__ = ["CaseTable", "TrainConfig", "TrainError", "TrainResult", "fine_tune", "fit", "predict_cases",
           "read_cases"]
__getattr__ = lazy_exports(__name__, {
    "CaseTable": "cases", "predict_cases": "cases", "read_cases": "cases", "TrainConfig": "train",
    "TrainError": "train", "TrainResult": "train", "fine_tune": "train", "fit": "train",
})
