#!/usr/bin/env bash
# Runs the main job on the built-in default: the bundled real head CT, then the bundled synthetic phantom
# with known findings (truth next to prediction, where the demo model can be judged). Creates the virtual
# environment first when it is missing. Extra arguments go to `headct-molre demo`, e.g.
# `bash scripts/demo.sh --json` or `--no-phantom`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec "$HEADCT_VENV/bin/headct-molre" demo "$@"
