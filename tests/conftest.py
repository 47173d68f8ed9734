"""Shared test fixtures. Tests never touch the network: the Hub is switched off before anything imports it."""

import os
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The small real CT fixtures in ../shared/data/real_ct (read in place, never copied into the repo)."""
    path = SHARED / "data" / "real_ct"
    if not path.is_dir():
        pytest.skip(f"real CT fixtures not found at {path}")
    return path
