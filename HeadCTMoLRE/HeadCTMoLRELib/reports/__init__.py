"""What a reader and a PACS receive for one case: the self-contained HTML report and the batch index
(``html``) and the DICOM outputs (``dicom``: Comprehensive 3D SR of the findings, Parametric Map of the attention,
Segmentation of the experts, with highdicom).

Layer: above inference/outputs and model (it reads Predictions and bundle status), below slicer and
cli; it never imports slicer, Qt or torch (the snapshot legends are drawn by slicer/snapshot_legend.py).
"""

from ..exports import lazy_exports

__all__ = ["write_case_report", "write_batch_index", "write_dicom_outputs"]
__getattr__ = lazy_exports(__name__, {
    "write_case_report": "html", "write_batch_index": "html", "write_dicom_outputs": "dicom",
})
