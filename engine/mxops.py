"""Small MLX indexing helpers that cost no kernel.

In MLX (0.32), indexing an array with a single integer (`x[i]`) is a `take` — a gather kernel, and
on the CUDA backend one of the dearest to issue (~20 µs of host time, against ~4 µs for a plain
kernel) — whereas a range slice is a free view. A live frame used to spend ~200 gathers this way.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx


def at(x: mx.array, i: int) -> mx.array:
    """`x[i]` along the first axis, as a view (i >= 0)."""
    return x[i: i + 1].squeeze(0)


def unbatch(x: mx.array) -> mx.array:
    """`x[0]` of an array whose first axis has length 1, as a view."""
    return x.squeeze(0)


def primitive_counts(*outputs) -> Counter:
    """How many of each MLX primitive the (unevaluated) graph of `outputs` holds, by name, as
    MLX's own graph export names them (views such as Reshape and Slice included)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as fh:
        mx.export_to_dot(fh.name, *outputs)
        text = Path(fh.name).read_text()
    return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', text))
