"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REAL_GALERA = DATA / "real-galera"


@pytest.fixture
def real_galera_dir() -> Path:
    """A MariaDB 10.11 / Galera 26.4 galera.cache and grastate.dat (read-only: copy before writing)."""
    return REAL_GALERA
