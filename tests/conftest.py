"""Shared test fixtures: paths to the committed tiny PersonaPlex model and the reference run."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DIR = FIXTURES / "personaplex-tiny"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny model directory in the real checkpoint layout, plus NVIDIA's reference outputs."""
    return TINY_DIR
