"""Headless batch inference: `headct-molre batch` for Slicer's --python-script and plain Python.

Desktop Slicer:
    Slicer --no-splash --no-main-window --python-script scripts/headct_batch.py \
        --input CASES --model MODEL --output OUT
Plain Python with slicer-core installed:
    python scripts/headct_batch.py --input CASES --model MODEL --output OUT

Every option of `headct-molre batch` works here (INPUT..., --cases, --series, --hu-offset, --resume,
--dicom, --keep-paths, ...); see HeadCTMoLRELib/batch.py for the outputs and guarantees. Exit status 0 when
every case succeeded, 1 when any failed, 2 for bad arguments.
"""

import sys

if sys.version_info < (3, 10):  # Slicer 5.8 ships Python 3.9; the library needs 3.10+
    sys.stderr.write("headct_batch.py needs Python 3.10 or newer (Slicer 5.10+); this is Python "
                     f"{sys.version.split()[0]}. Update Slicer or run it with a newer Python.\n")
    sys.exit(2)

from pathlib import Path

_LIBRARY_PARENT = Path(__file__).resolve().parent.parent / "HeadCTMoLRE"
if str(_LIBRARY_PARENT) not in sys.path:
    sys.path.insert(0, str(_LIBRARY_PARENT))


def main(argv=None) -> int:
    from HeadCTMoLRELib import batch

    return batch.main(sys.argv[1:] if argv is None else argv, prog="headct_batch.py")


if __name__ == "__main__":
    sys.exit(main())
