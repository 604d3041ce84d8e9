"""Reading and checking CT, the standard head frame and the slice stack (bottom layer: imports nothing
of ours above ``findings``/``resources``/``settings``).

Modules, in the data's order: ``loader`` (``load_ct``: NIfTI/NRRD/MHA files and DICOM folders -> CTVolume in
HU, LPS), ``nifti`` (NIfTI-1/2 header, geometry and payload by the standard), ``dicom_series`` /
``dicom_volume`` (splitting, choice, sorting and geometry of DICOM series, Enhanced CT included),
``checks`` (plausibility rules shared by every source), ``alignment`` (registration to the head template),
``preprocess`` (CTVolume -> SliceStack, S x 3 x H x W windows in 0..1; needs torch) and ``slice_stack``
(the stack's parameters and geometry, the map back to patient space; numpy only).
"""

from ..exports import lazy_exports

__all__ = ["CTInputError", "CTVolume", "PreprocessConfig", "SliceStack", "list_dicom_series", "load_ct",
           "validation_report"]
__getattr__ = lazy_exports(__name__, {
    "CTInputError": "checks", "CTVolume": "loader", "list_dicom_series": "loader", "load_ct": "loader",
    "validation_report": "loader", "PreprocessConfig": "slice_stack", "SliceStack": "slice_stack",
})
