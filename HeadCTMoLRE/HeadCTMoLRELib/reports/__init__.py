"""What a reader and a PACS receive for one case: the self-contained HTML report and the batch index
(``html``), annotated slice snapshots (``snapshots``, matplotlib Agg on an image Slicer rendered) and the
DICOM outputs (``dicom``: Comprehensive 3D SR of the findings, Parametric Map of the attention,
Segmentation of the experts, with highdicom).

Layer: above inference/outputs and model (it reads Predictions and bundle status), below slicer and
cli; it never imports slicer, Qt or torch.
"""

from ..exports import lazy_exports

__all__ = ["write_case_report", "write_batch_index", "write_dicom_outputs", "annotate_axial_snapshot"]
__getattr__ = lazy_exports(__name__, {
    "write_case_report": "html", "write_batch_index": "html", "write_dicom_outputs": "dicom",
    "annotate_axial_snapshot": "snapshots",
})
