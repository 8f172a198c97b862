"""Parley's duplex engine: the MLX model, the Mimi codec, the session runtime and audio I/O.

Nothing here imports a UI toolkit; front ends drive the engine through its public objects and read
its telemetry snapshots.
"""

import os as _os

__version__ = "0.1.0"

# MLX's CUDA backend keeps 100 CUDA graphs by default; a frame replays several hundred, so a larger
# cache keeps them instantiated (H100: p95 60 -> 42 ms, docs/benchmarks.md). No effect elsewhere.
_os.environ.setdefault("MLX_CUDA_GRAPH_CACHE_SIZE", "4000")
