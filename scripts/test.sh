#!/usr/bin/env bash
# Runs the whole test suite. Creates the virtual environment first when it is missing.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k ctio -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$HEADCT_ROOT"
exec "$HEADCT_PYTHON" -m pytest "$@"
