"""The LM checkpoint format: expected tensor names and shapes, a strict safetensors reader that
reads one tensor at a time, and a streaming writer.

Published checkpoints (PersonaPlex, Kyutai Moshi) use the *fused* naming of MODEL.md §4.1:
`...self_attn.in_proj_weight` / `...self_attn.out_proj.weight`, with the per-step depformer matrices
stacked on dim 0 in step order. Kyutai's `moshi` 0.2.x `state_dict()` names the same weights per
step (`...self_attn.in_projs.{k}.weight`, `...self_attn.out_projs.{k}.weight`); the reader accepts
that form too and concatenates the steps (REFERENCE.md §4.6). `_initialized` flags are ignored.

Errors are `CheckpointError`s with one sentence that names the file and the key.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from engine.config import LMConfig
from engine.errors import CheckpointError

# safetensors dtype name -> (numpy dtype used to hold the raw bytes, bytes per element)
_ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bf16 bits; converted by the caller (numpy has no bf16)
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_MAX_HEADER = 100 << 20


def expected_lm_tensors(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a fused-naming LM checkpoint for `cfg`, with its shape (MODEL.md §4.1)."""
    d, L = cfg.dim, cfg.num_layers
    D, Ld, S = cfg.depformer_dim, cfg.depformer_num_layers, cfg.dep_q
    V, C, Q = cfg.text_card, cfg.card, cfg.n_q
    h, hd = cfg.hidden_size, cfg.depformer_hidden_size
    out: dict[str, tuple[int, ...]] = {}
    for i in range(L):
        p = f"transformer.layers.{i}."
        out[p + "self_attn.in_proj_weight"] = (3 * d, d)
        out[p + "self_attn.out_proj.weight"] = (d, d)
        out[p + "gating.linear_in.weight"] = (2 * h, d)
        out[p + "gating.linear_out.weight"] = (d, h)
        out[p + "norm1.alpha"] = (1, 1, d)
        out[p + "norm2.alpha"] = (1, 1, d)
    out["out_norm.alpha"] = (1, 1, d)
    out["text_emb.weight"] = (V + 1, d)
    out["text_linear.weight"] = (V, d)
    for k in range(Q):
        out[f"emb.{k}.weight"] = (C + 1, d)
    for l in range(Ld):
        p = f"depformer.layers.{l}."
        out[p + "self_attn.in_proj_weight"] = (S * 3 * D, D)
        out[p + "self_attn.out_proj.weight"] = (S * D, D)
        for k in range(S):
            out[p + f"gating.{k}.linear_in.weight"] = (2 * hd, D)
            out[p + f"gating.{k}.linear_out.weight"] = (D, hd)
        out[p + "norm1.alpha"] = (1, 1, D)
        out[p + "norm2.alpha"] = (1, 1, D)
    for k in range(S):
        out[f"depformer_in.{k}.weight"] = (D, d)
    out["depformer_text_emb.weight"] = (V + 1, D)
    for k in range(S - 1):
        out[f"depformer_emb.{k}.weight"] = (C + 1, D)
    for k in range(S):
        out[f"linears.{k}.weight"] = (C, D)
    return out


def describe_cfg(cfg: LMConfig) -> str:
    return (f"dim {cfg.dim}, {cfg.num_layers} layers, depformer dim {cfg.depformer_dim}, "
            f"{cfg.depformer_num_layers} depformer layers, dep_q {cfg.dep_q}")


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parses and checks a safetensors header: (tensors, metadata, data start offset).

    Checks that every tensor's byte range fits the file and matches its dtype and shape, so a
    truncated or corrupt file fails here, before anything is loaded.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{name} is not a safetensors file (it is only {size} bytes long).")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{name} is corrupt or not a safetensors file (its header length {n} does not "
                    f"fit the {size}-byte file).")
            header_bytes = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"the checkpoint {path} does not exist.") from None
    except IsADirectoryError:
        raise CheckpointError(f"the checkpoint {path} is a directory, not a safetensors file.") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror}.") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{name} is corrupt: its safetensors header is not valid JSON.") from None
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(x) for x in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{name} is corrupt: the header entry for '{key}' is malformed.") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor '{key}' in {name} has unsupported dtype {dtype}.")
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * _ST_DTYPES[dtype].itemsize or begin < 0 or end > data_len:
            raise CheckpointError(
                f"{name} is corrupt or truncated: tensor '{key}' does not fit the file "
                f"(bytes {begin}..{end} of {data_len}).")
        tensors[key] = TensorInfo(key, dtype, shape, begin, end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}, start


_PER_STEP = re.compile(r"^(.*\.self_attn\.)(in_projs|out_projs)\.(\d+)\.weight$")


def plan_lm_checkpoint(path: Path, cfg: LMConfig) -> tuple[dict[str, list[TensorInfo]], int]:
    """Validates a checkpoint against `cfg` and maps each fused key to the stored tensors that
    make it up (one, or one per step for the per-step naming). Returns (plan, data offset)."""
    tensors, _meta, start = read_safetensors_header(path)
    name = path.name
    expected = expected_lm_tensors(cfg)
    plan: dict[str, list[TensorInfo]] = {}
    per_step: dict[tuple[str, str], dict[int, TensorInfo]] = {}
    unexpected: list[str] = []
    for key, info in tensors.items():
        if key.endswith("_initialized"):
            continue
        m = _PER_STEP.match(key)
        if m:
            per_step.setdefault((m.group(1), m.group(2)), {})[int(m.group(3))] = info
        elif key in expected:
            plan[key] = [info]
        else:
            unexpected.append(key)
    for (prefix, kind), steps in per_step.items():
        fused = prefix + ("in_proj_weight" if kind == "in_projs" else "out_proj.weight")
        if fused not in expected:
            unexpected.append(f"{prefix}{kind}.{min(steps)}.weight")
            continue
        if fused in plan:
            raise CheckpointError(
                f"{name} stores '{fused}' both fused and per step; keep only one form.")
        if sorted(steps) != list(range(len(steps))):
            missing = min(set(range(max(steps) + 1)) - set(steps))
            raise CheckpointError(f"{name} is missing tensor '{prefix}{kind}.{missing}.weight'.")
        parts = [steps[i] for i in range(len(steps))]
        plan[fused] = parts
    # dep_q must equal the number of depth steps the file stores (MODEL.md §2.2).
    n_linears = sum(1 for k in tensors if re.fullmatch(r"linears\.\d+\.weight", k))
    if n_linears and n_linears != cfg.dep_q:
        raise CheckpointError(
            f"{name} stores {n_linears} depth steps ('linears.*') but the configuration says "
            f"dep_q {cfg.dep_q}; set 'dep_q' in config.json to match the checkpoint.")
    if unexpected:
        key = sorted(unexpected)[0]
        raise CheckpointError(
            f"{name} has an unexpected tensor '{key}' that the configuration ({describe_cfg(cfg)}) "
            "does not use; check that config.json matches the checkpoint.")
    for key, shape in expected.items():
        if key not in plan:
            raise CheckpointError(
                f"{name} is missing tensor '{key}' that the configuration ({describe_cfg(cfg)}) needs.")
        parts = plan[key]
        for p in parts:
            if p.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"tensor '{p.name}' in {name} has dtype {p.dtype}, but LM weights must be floats.")
        if len(parts) == 1:
            got = parts[0].shape
        else:
            rows = sum(p.shape[0] for p in parts)
            tails = {p.shape[1:] for p in parts}
            got = (rows,) + parts[0].shape[1:] if len(tails) == 1 and all(len(p.shape) == 2 for p in parts) else None
            if got is None:
                raise CheckpointError(f"the per-step tensors of '{key}' in {name} have mismatched shapes.")
        if tuple(got) != tuple(shape):
            raise CheckpointError(
                f"tensor '{key}' in {name} has shape {list(got)} but the configuration "
                f"({describe_cfg(cfg)}) expects {list(shape)}.")
    return plan, start


class TensorReader:
    """Reads tensors one at a time with plain file reads (no mmap, so untouched tensors never
    count toward the process's memory). Floats come back as float32 numpy arrays, or as raw bf16
    bits (uint16) when `raw_bf16=True`."""

    def __init__(self, path: Path, start: int):
        self.path = path
        self.start = start
        self._f = open(path, "rb")

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, info: TensorInfo, rows: slice | None = None) -> np.ndarray:
        """The tensor (optionally only rows `rows.start:rows.stop` of dim 0) as a numpy array in
        its stored dtype (bf16 as uint16 bits)."""
        dt = _ST_DTYPES[info.dtype]
        shape = list(info.shape)
        begin = info.begin
        if rows is not None:
            row_bytes = (int(np.prod(shape[1:])) if len(shape) > 1 else 1) * dt.itemsize
            r0, r1 = rows.start or 0, min(rows.stop, shape[0])
            begin += r0 * row_bytes
            shape[0] = r1 - r0
        count = int(np.prod(shape)) if shape else 1
        out = np.empty(count, dtype=dt)
        self._f.seek(self.start + begin)
        buf = memoryview(out).cast("B")
        got = self._f.readinto(buf)
        if got != buf.nbytes:
            raise CheckpointError(
                f"{self.path.name} is truncated: tensor '{info.name}' could not be read completely.")
        return out.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Writing (streamed: one tensor in memory at a time)
# ------------------------------------------------------------------------------------------------


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bit patterns (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_safetensors_streamed(path: str | os.PathLike,
                               shapes: dict[str, tuple[int, ...]],
                               produce: Callable[[str], np.ndarray],
                               dtype: str = "BF16",
                               metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file whose tensors are produced one by one by `produce(name)` (a
    float32 array of the declared shape), so only one tensor is ever held in memory."""
    itemsize = _ST_DTYPES[dtype].itemsize
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    names = list(shapes)
    for name in names:
        nbytes = int(np.prod(shapes[name])) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name in names:
            arr = produce(name)
            if tuple(arr.shape) != tuple(shapes[name]):
                raise ValueError(f"produced {name} with shape {arr.shape}, declared {shapes[name]}")
            if dtype == "BF16":
                data = float32_to_bf16_bits(arr)
            else:
                data = np.ascontiguousarray(arr, dtype=_ST_DTYPES[dtype])
            f.write(memoryview(data).cast("B"))
            del data, arr
    os.replace(tmp, path)
