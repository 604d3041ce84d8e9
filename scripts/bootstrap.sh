#!/usr/bin/env bash
# Creates the project's virtual environment (.venv, or $HEADCT_VENV) with everything the product and
# its tests need, when it is missing or when pyproject.toml changed since it was made. Idempotent.
# Usage: source scripts/bootstrap.sh   (sets HEADCT_PYTHON to the environment's python)
set -euo pipefail
HEADCT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HEADCT_VENV="${HEADCT_VENV:-$HEADCT_ROOT/.venv}"
HEADCT_PYTHON="$HEADCT_VENV/bin/python"
_stamp="$HEADCT_VENV/.headct-installed"
_want="$(sha256sum "$HEADCT_ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$HEADCT_PYTHON" ]; then
    echo "[bootstrap] creating virtual environment $HEADCT_VENV" >&2
    "${PYTHON:-python3}" -m venv "$HEADCT_VENV"
fi
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ]; then
    echo "[bootstrap] installing packages into $HEADCT_VENV (first run takes a few minutes)" >&2
    # torch first and pinned, so pip never resolves an unpinned (multi-GB) build for a dependency.
    "$HEADCT_PYTHON" -m pip install --quiet "torch==2.13.0"
    "$HEADCT_PYTHON" -m pip install --quiet -e "$HEADCT_ROOT[test]"
    echo "$_want" > "$_stamp"
fi
export HEADCT_ROOT HEADCT_VENV HEADCT_PYTHON
