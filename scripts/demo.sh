#!/usr/bin/env bash
# Runs the main job on the built-in default (the bundled real head CT). Creates the virtual environment
# first when it is missing. Extra arguments go to `headct-molre demo`, e.g. `bash scripts/demo.sh --json`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec "$HEADCT_VENV/bin/headct-molre" demo "$@"
