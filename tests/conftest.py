"""Shared test fixtures: paths to the committed tiny PersonaPlex model and the reference run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The float32 parity tests compare with reference fixtures to ~1e-5. Newer MLX releases run float32
# products in TF32 by default where the hardware has it (Apple M5, NVIDIA): full float32 here.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# The `parley` command keeps compiled CUDA kernels under ~/.cache (engine/kernel_cache.py); tests
# that run it must not create that in the tester's home.
if "MLX_PTX_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["MLX_PTX_CACHE_DIR"] = tempfile.mkdtemp(prefix="parley-test-ptx-")

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DIR = FIXTURES / "personaplex-tiny"


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny model directory in the real checkpoint layout, plus NVIDIA's reference outputs."""
    return TINY_DIR
