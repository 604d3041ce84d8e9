"""Measure the header scan of `import-dataset` on a generated flat folder of tiny DICOM files.

    python scripts/benchmark_dicom_index.py --files 100000 --dir /tmp/headct-index-bench [--workers N] [--keep]

Writes N single-slice CT files (8 x 8 pixels, 40 slices per series, RSNA-style random names) into one
flat folder, scans it twice with `datasets.dicom_index.scan_folder` (first scan: every header read;
re-scan: the index answers) and prints files/s for both, the index size and the peak memory of this
process. The folder is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "HeadCTMoLRE"))

SLICES_PER_SERIES = 40


def _write(folder: str, start: int, stop: int) -> int:
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    pixels = np.full((8, 8), 24, np.uint16).tobytes()
    for i in range(start, stop):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1.{i}"
        ds = FileDataset("bench", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        series = i // SLICES_PER_SERIES
        ds.SeriesInstanceUID, ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.2.{series}", f"1.2.826.0.1.3680043.10.3.{series}"
        ds.PatientID, ds.Modality = f"P{series // 2}", "CT"
        ds.ImagePositionPatient = [0, 0, 5 * (i % SLICES_PER_SERIES)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope, ds.PixelSpacing = -1024, 1, [1, 1]
        ds.PixelData = pixels
        ds.save_as(os.path.join(folder, f"ID_{(i * 2654435761) % 16 ** 9:09x}.dcm"), enforce_file_format=True)
    return stop - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", default="/tmp/headct-index-bench")
    parser.add_argument("--workers", type=int, default=None, help="scan processes (default: all CPUs)")
    parser.add_argument("--keep", action="store_true", help="keep the generated folder and index")
    args = parser.parse_args()
    from HeadCTMoLRELib.datasets.dicom_index import scan_folder
    from HeadCTMoLRELib.datasets.importer import progress_printer

    root = Path(args.dir)
    flat, index = root / "stage_2_train", root / "index.sqlite"
    shutil.rmtree(root, ignore_errors=True)
    flat.mkdir(parents=True)
    started = time.perf_counter()
    step = 2000
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        written = sum(pool.map(_write, [str(flat)] * len(range(0, args.files, step)), range(0, args.files, step),
                               [min(s + step, args.files) for s in range(0, args.files, step)]))
    print(f"generated {written:,} files in {time.perf_counter() - started:.1f} s "
          f"({sum(f.stat().st_size for f in flat.iterdir()) / 1e6:.0f} MB)")
    try:
        for label in ("first scan", "re-scan"):
            summary = scan_folder(flat, index, workers=args.workers, progress=progress_printer())
            print(f"{label}: {summary.total:,} files, {summary.scanned:,} read, {summary.reused:,} from the index, "
                  f"{summary.seconds:.1f} s = {summary.files_per_second:,.0f} files/s")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker (and writer)
        print(f"index {index.stat().st_size / 1e6:.1f} MB; peak memory of the scanning process {peak_mb:.0f} MB, "
              f"of its largest child process {child_mb:.0f} MB; {os.cpu_count()} CPUs")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
