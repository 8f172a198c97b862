"""Parley's duplex engine: the MLX model, the Mimi codec, the session runtime and audio I/O.

Nothing here imports a UI toolkit; front ends drive the engine through its public objects and read
its telemetry snapshots.
"""

__version__ = "0.1.0"
