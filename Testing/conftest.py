"""Shared pytest fixtures: where the repository, its test data and the shared bad-input set live."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = REPO_ROOT / "Testing" / "Data"

# Import the library from the source tree even without `pip install -e .`.
_lib_parent = REPO_ROOT / "HeadCTMoLRE"
if str(_lib_parent) not in sys.path:
    sys.path.insert(0, str(_lib_parent))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA
