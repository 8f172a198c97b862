"""Where MLX keeps the CUDA kernels it compiles at run time, kept across reboots.

On MLX's CUDA backend every kernel (Parley's own, engine/lm/fused.py, and MLX's) is compiled with
NVRTC the first time it runs and cached on disk in MLX_PTX_CACHE_DIR, by default under the system's
temporary directory (/tmp/mlx/<version>/ptx). After a reboot, or wherever /tmp is a tmpfs or
belongs to another user, the first persona prefill then compiles everything again: 72-126 s on the
lent H200/H100 (docs/benchmarks.md). Parley points the cache at ~/.cache/parley/mlx-ptx/<mlx
version> unless the user chose a place. Metal and the CPU backend compile nothing there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "MLX_PTX_CACHE_DIR"


def _mlx_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("mlx")
    except metadata.PackageNotFoundError:
        return "unknown"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parley" / "mlx-ptx" / _mlx_version()


def use_persistent_cache() -> Path | None:
    """Sets MLX_PTX_CACHE_DIR to `default_dir()` (created) unless it is set already; call before
    the first kernel compiles (MLX reads it once). Returns the directory MLX will use, or None on
    macOS (no CUDA) or where the directory cannot be made (MLX's default then stays)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if sys.platform == "darwin":
        return None
    path = default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    os.environ[ENV] = str(path)
    return path


def describe() -> str | None:
    """'<dir> (N kernels, X MB)' for the doctor, or None where no cache directory is set."""
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value)
    files = [p for p in path.glob("*") if p.is_file()] if path.is_dir() else []
    size = sum(p.stat().st_size for p in files)
    return f"{path} ({len(files)} files, {size / 1e6:.1f} MB)"
