"""Evaluation of a bundle on labelled cases (``evaluate``: AUCs with CIs, calibration, comparison) and its
reports (``report``: plots, model card). Reads cases and predictions through ``training.cases``; the
metrics themselves live in ``HeadCTMoLRELib.metrics``, below training and evaluation alike."""

from ..exports import lazy_exports

__all__ = ["EvaluationError", "ModelEvaluation", "evaluate_predictions"]
__getattr__ = lazy_exports(__name__, {
    "EvaluationError": "evaluate", "ModelEvaluation": "evaluate", "evaluate_predictions": "evaluate",
})
