"""Importers for public head CT datasets (training layer: uses ``ct`` and ``findings``, nothing above).

``headct-molre import-dataset {rsna-ich,cq500,ct-ich} --src DIR --out CASES.csv`` turns a downloaded
dataset into a cases CSV (``path``, ``patient``, ``series``, optional ``split``, one 1/0/blank column per
finding id) that ``validate``, ``infer``, ``train`` and ``evaluate`` read. Modules: ``dicom_index`` (the
parallel, resumable, indexed header scan), ``labels`` (dataset label -> finding id tables,
``Resources/datasets/*.csv``), ``importer`` (writing the CSV, its dataset sidecar, the import log and the
patient-level splits), and one module per dataset: ``rsna_ich``, ``cq500``, ``ct_ich``.
"""

from ..exports import lazy_exports

__all__ = ["ImportResult", "import_dataset", "read_dataset_sidecar", "scan_folder"]
__getattr__ = lazy_exports(__name__, {
    "ImportResult": "importer", "import_dataset": "importer", "read_dataset_sidecar": "importer",
    "scan_folder": "dicom_index",
})
