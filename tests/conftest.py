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


def _real_cuda() -> bool:
    from engine.lm import fused
    return fused.enabled()


_REAL_CUDA = _real_cuda()


@pytest.fixture(autouse=True)
def _mimi_kernels_only_where_cuda_runs(monkeypatch):
    """Many tests stand in for MLX's CUDA backend (fused.enabled patched true) to check the LM's
    kernels on this CPU; Mimi's transformer kernels, which would follow, stay off there (their
    own tests, tests/test_mimi_kernel.py, turn them on explicitly)."""
    if not _REAL_CUDA:
        monkeypatch.setenv("PARLEY_MIMI_KERNEL", "0")


_KERNEL_CACHES = (("engine.lm.fused", "_kernel"), ("engine.lm.temporal_kernel", "_kernel"),
                  ("engine.lm.temporal_kernel", "_capture_kernel"),
                  ("engine.lm.depth_kernel", "_kernel"), ("engine.lm.sample_kernel", "_kernel"),
                  ("engine.mimi.transformer_kernel", "_kernel"))


@pytest.fixture(autouse=True)
def _no_stand_in_kernel_outlives_its_test(monkeypatch):
    """Tests that stand in for mx.fast.cuda_kernel fill the engine's kernel caches with stand-ins;
    a later CUDA test would run one (zeros out). After a test that patched it (this fixture's
    teardown runs before monkeypatch undoes the patch), every kernel cache is dropped."""
    import importlib

    import mlx.core as mx
    real = mx.fast.cuda_kernel
    yield
    if mx.fast.cuda_kernel is not real:
        for module, name in _KERNEL_CACHES:
            getattr(importlib.import_module(module), name).cache_clear()
