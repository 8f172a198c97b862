"""Random LM weights in the real (fused) checkpoint naming, with controlled initialisation.

REFERENCE.md §4.1: PyTorch's default init gives a model dominated by its input embeddings, where
transformer bugs barely show and greedy decoding is nearly constant. So:

* RMSNorm `alpha` uniform in [0.5, 1.5];
* token embeddings (`text_emb`, `emb.*`) N(0, 1) / sqrt(n_q + 1);
* depformer embeddings (`depformer_text_emb`, `depformer_emb.*`) N(0, 1);
* heads (`text_linear`, `linears.*`) N(0, 1) * 5 / sqrt(fan_in), so greedy decisions have margins;
* every other matrix N(0, 1 / fan_in).

Every tensor has its own generator seeded from (seed, tensor name), so the values do not depend
on the order of generation: `random_lm_weights` (a dict, for tiny models) and
`write_random_lm_checkpoint` (streamed to disk one tensor at a time, for the 16.7 GB full-size
model) give the same numbers.
"""

from __future__ import annotations

import os
import zlib
from typing import Iterator

import numpy as np

from engine.config import LMConfig

from .checkpoint import expected_lm_tensors, float32_to_bf16_bits, write_safetensors_streamed

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


def random_lm_tensor(cfg: LMConfig, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One tensor (float32) of the controlled random init."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    if name.endswith(".alpha"):
        return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    x = rng.standard_normal(size=shape, dtype=np.float32)
    if name == "text_emb.weight" or name.startswith("emb."):
        x *= np.float32(1.0 / np.sqrt(cfg.n_q + 1))
    elif name.startswith("depformer_text_emb.") or name.startswith("depformer_emb."):
        pass
    elif name == "text_linear.weight" or name.startswith("linears."):
        x *= np.float32(5.0 / np.sqrt(shape[-1]))
    else:
        x *= np.float32(1.0 / np.sqrt(shape[-1]))
    return x


def iter_random_lm_weights(cfg: LMConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of the checkpoint, one at a time."""
    for name, shape in expected_lm_tensors(cfg).items():
        yield name, random_lm_tensor(cfg, name, shape, seed)


def random_lm_weights(cfg: LMConfig, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """All LM tensors in the published fused naming (75 for dep_q 8, 115 for dep_q 16 on a tiny
    2-layer config; 355 / 475 full size). dtype "float32" or "float16" gives numpy floats;
    "bfloat16" gives the bf16 bit patterns as uint16 arrays (numpy has no bf16; MLX reads them with
    `mx.array(bits).view(mx.bfloat16)`). Meant for tiny models: use `write_random_lm_checkpoint`
    for full size."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = {}
    for name, arr in iter_random_lm_weights(cfg, seed):
        if dtype == "bfloat16":
            out[name] = float32_to_bf16_bits(arr).reshape(arr.shape)
        else:
            out[name] = arr.astype(_DTYPES[dtype], copy=False)
    return out


def write_random_lm_checkpoint(path: str | os.PathLike, cfg: LMConfig, seed: int = 0,
                               dtype: str = "bfloat16") -> int:
    """Streams a random checkpoint to `path` (safetensors, fused naming) holding one tensor at a
    time; returns the file size. dtype "bfloat16" (the real checkpoint's), "float16" or "float32"."""
    st = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    shapes = expected_lm_tensors(cfg)
    write_safetensors_streamed(path, shapes, lambda n: random_lm_tensor(cfg, n, shapes[n], seed),
                               dtype=st, metadata={"format": "pt", "generator": "parley random_lm"})
    return os.path.getsize(path)
