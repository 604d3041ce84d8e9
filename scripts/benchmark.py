#!/usr/bin/env python3
"""Speed benchmark (same as `headct-molre benchmark`): runs with the project's environment or any
Python that can import HeadCTMoLRELib. Example: python scripts/benchmark.py --sizes tiny,small,base"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HeadCTMoLRE"))

from HeadCTMoLRELib.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
