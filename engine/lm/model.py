"""`LMModel`: the PersonaPlex / Moshi language model in MLX, its loading, validation, quantization
and the on-disk cache of converted weights.

    model = LMModel.load(path, cfg, dtype="bfloat16", quantize=8, group_size=64,
                         depformer_steps=None, cache="auto")

* `path` is a `model.safetensors` in the published fused naming (475 tensors for PersonaPlex, 355 for
  Moshi); Kyutai's per-step attention naming is accepted too. The tensor list and shapes are checked
  against `cfg` before anything is loaded; a missing, unexpected or mis-shaped tensor, or a corrupt
  or truncated file, raises `CheckpointError` naming the key.
* `dtype` is the compute dtype ("float32" for parity tests, "bfloat16" for the 7B). RMSNorm scales
  are kept in float32 (rounded through `dtype` first, as the reference casts every parameter).
* `depformer_steps`: how many depth steps to load and run. None means 8 (the agent codebooks) when
  the checkpoint has 16 (PersonaPlex live inference, MODEL.md §4.3 / §11.1), else `dep_q`. Pass
  `cfg.dep_q` for full parity tests that look at the user predictions.
* `quantize` = 4 or 8 quantizes, while loading and tensor by tensor, the linears of the temporal
  transformer (QKV, out, FFN in/out) and of the depformer (QKV, out, FFN in/out, `depformer_in`), so
  peak memory stays near the quantized size. Layers whose input dimension `group_size` does not
  divide stay unquantized. The embedding tables and the heads (`text_linear`, `linears`) are
  quantized with them (`quantize_embeddings` / `quantize_heads`, default True: at 4 bits the 7B's
  tables and heads take ~0.26 GB instead of ~0.92 GB in bf16); False keeps them in `dtype`.
  Token −1 still embeds as exact zeros, and a lookup dequantizes only the rows it reads.
* `model.reference` ("nvidia" for the PersonaPlex layout, "kyutai" for Moshi's) says which PyTorch
  implementation streaming reproduces where they differ (the attention-window rule of kv_ring.py,
  depth-chain conditioning, see lmgen.py); `LMGen(reference=...)` overrides it.
* `cache`: converted weights are saved under `cache_dir` (default `$PARLEY_CACHE_DIR`, else
  `$XDG_CACHE_HOME/parley` or `~/.cache/parley`, subfolder `lm/`), one file per source path and
  conversion settings, valid only for the source's current size, mtime and header hash (a changed
  source rebuilds and replaces it), so the next start reads them directly.
  "auto" caches quantized conversions only; True / False force it.

On MLX's CPU backend a quantized product with 16-bit activations and 16-bit scales is ~8x slower
than with float32 activations, so there `Linear` widens the activations for that product
(layers.py); on Metal/CUDA the bf16 kernels are used as is.

`LMModel.from_weights(dict, cfg, ...)` builds a model from in-memory tensors (fused naming; numpy
float arrays, uint16 bf16 bits, or MLX arrays) with the same validation and conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import numpy as np

from engine.config import LMConfig
from engine.errors import CheckpointError

from .checkpoint import TensorReader, expected_lm_tensors, plan_lm_checkpoint
from .depformer import Depformer, DepformerLayer
from .kv_ring import KVRing
from .layers import Embedding, Linear, StackedLinear
from .temporal import Temporal, TemporalLayer

# 2: audio embeddings stacked; 3: entries record their source and settings, so one that a
# newer entry supersedes (or an older format) is removed when a new entry is written.
CACHE_FORMAT = "parley-lm-converted-3"
_CACHE_PREFIX = "parley-lm-converted-"
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_QUANT_BITS = (2, 3, 4, 5, 6, 8)
_QUANT_GROUPS = (32, 64, 128)


def default_cache_dir() -> Path:
    base = os.environ.get("PARLEY_CACHE_DIR")
    if base:
        return Path(base) / "lm"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "parley" / "lm"


def default_depformer_steps(cfg: LMConfig) -> int:
    return cfg.n_q // 2 if cfg.dep_q == cfg.n_q else cfg.dep_q


class _Converter:
    """Turns raw checkpoint tensors into the model's flat dict of MLX arrays, one tensor at a time
    (cast, optionally quantize, evaluate, drop the source)."""

    def __init__(self, dtype: mx.Dtype, bits: int | None, group_size: int,
                 quantize_embeddings: bool, quantize_heads: bool):
        self.dtype, self.bits, self.group_size = dtype, bits, group_size
        self.quantize_embeddings, self.quantize_heads = quantize_embeddings, quantize_heads
        self.flat: dict[str, mx.array] = {}

    def _to_mx(self, arr) -> mx.array:
        if isinstance(arr, mx.array):
            return arr.astype(self.dtype)
        if arr.dtype == np.uint16:  # raw bf16 bits
            return mx.array(arr).view(mx.bfloat16).astype(self.dtype)
        return mx.array(arr).astype(self.dtype)

    def norm(self, name: str, arr) -> None:
        a = self._to_mx(arr).reshape(-1).astype(mx.float32)
        mx.eval(a)
        self.flat[name] = a

    def matrix(self, name: str, arr, kind: str) -> None:
        """kind: "linear" (quantized when enabled and compatible), "head", "embedding"."""
        w = self._to_mx(arr)
        want = self.bits is not None and (
            kind == "linear" or (kind == "head" and self.quantize_heads)
            or (kind == "embedding" and self.quantize_embeddings))
        if want and w.shape[-1] % self.group_size == 0:
            q, s, b = mx.quantize(w, group_size=self.group_size, bits=self.bits)
            mx.eval(q, s, b)
            self.flat[name + ".weight"] = q
            self.flat[name + ".scales"] = s
            self.flat[name + ".biases"] = b
        else:
            mx.eval(w)
            self.flat[name + ".weight"] = w
        del w


def _linear(flat: Mapping[str, mx.array], name: str, bits: int, group: int, stacked: bool = False):
    cls = StackedLinear if stacked else Linear
    w = flat[name + ".weight"]
    if name + ".scales" in flat:
        return cls(w, flat[name + ".scales"], flat[name + ".biases"], bits, group)
    return cls(w)


def _embedding(flat: Mapping[str, mx.array], name: str, bits: int, group: int) -> Embedding:
    w = flat[name + ".weight"]
    if name + ".scales" in flat:
        return Embedding(w, flat[name + ".scales"], flat[name + ".biases"], bits, group)
    return Embedding(w)


class LMModel:
    """The temporal transformer, text head and depformer, ready to run. See the module docstring."""

    def __init__(self, cfg: LMConfig, flat: dict[str, mx.array], dtype: mx.Dtype,
                 depformer_steps: int, bits: int | None, group_size: int):
        self.cfg = cfg
        self.dtype = dtype
        self.depformer_steps = depformer_steps
        self.bits = bits
        self.group_size = group_size
        self.source: str | None = None
        self.cache_path: Path | None = None
        self.loaded_from_cache = False
        self.cache_pruned: list[Path] = []  # entries this load's new cache entry made useless
        b, g = bits or 0, group_size
        layers = []
        for i in range(cfg.num_layers):
            p = f"temporal.{i}."
            layers.append(TemporalLayer(
                norm1=flat[p + "norm1"], norm2=flat[p + "norm2"],
                in_proj=_linear(flat, p + "in_proj", b, g), out_proj=_linear(flat, p + "out_proj", b, g),
                linear_in=_linear(flat, p + "linear_in", b, g),
                linear_out=_linear(flat, p + "linear_out", b, g)))
        self.temporal = Temporal(layers, flat["out_norm"], cfg.num_heads, cfg.context, cfg.max_period)
        self.text_emb = _embedding(flat, "text_emb", b, g)
        self.audio_emb = _embedding(flat, "emb", b, g)  # stacked [n_q, rows, d]
        self.emb = self.audio_emb.unstacked()  # per channel, views of the stacked table
        self.text_linear = _linear(flat, "text_linear", b, g)
        dlayers = []
        for l in range(cfg.depformer_num_layers):
            p = f"depformer.{l}."
            dlayers.append(DepformerLayer(
                norm1=flat[p + "norm1"], norm2=flat[p + "norm2"],
                in_proj=_linear(flat, p + "in_proj", b, g, True),
                out_proj=_linear(flat, p + "out_proj", b, g, True),
                linear_in=_linear(flat, p + "linear_in", b, g, True),
                linear_out=_linear(flat, p + "linear_out", b, g, True)))
        self.depformer = Depformer(
            dlayers, _linear(flat, "depformer_in", b, g, True),
            _embedding(flat, "depformer_text_emb", b, g),
            [_embedding(flat, f"depformer_emb.{k}", b, g) for k in range(depformer_steps - 1)],
            _linear(flat, "linears", b, g, True), cfg.depformer_num_heads, cfg.dep_q)
        self._flat = flat
        self._embed_c = None
        # The streaming attention-window rule (kv_ring.py): NVIDIA's fork for the PersonaPlex
        # layout, Kyutai's for Moshi. Tests of the other implementation set it explicitly.
        self.reference = "nvidia" if cfg.dep_q == cfg.n_q else "kyutai"

    # -------------------------------------------------------------------------------------------
    # Construction
    # -------------------------------------------------------------------------------------------

    @staticmethod
    def _check_args(cfg: LMConfig, dtype: str, quantize, group_size: int, depformer_steps):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if quantize is not None and quantize not in _QUANT_BITS:
            raise ValueError(f"quantize must be None or one of {_QUANT_BITS}, got {quantize!r}")
        if quantize is not None and group_size not in _QUANT_GROUPS:
            raise ValueError(f"group_size must be one of {_QUANT_GROUPS}, got {group_size!r}")
        steps = default_depformer_steps(cfg) if depformer_steps is None else int(depformer_steps)
        if not 1 <= steps <= cfg.dep_q:
            raise ValueError(f"depformer_steps must be in 1..{cfg.dep_q}, got {depformer_steps!r}")
        return steps

    @staticmethod
    def _convert(cfg: LMConfig, get: Callable[[str, slice | None], Any], conv: _Converter,
                 steps: int) -> dict[str, mx.array]:
        """Reads every tensor through `get(fused_key, rows)` and converts it, temporal layer by
        layer, then the rest. Only steps 0..steps−1 of the depformer are read."""
        D = cfg.depformer_dim
        for i in range(cfg.num_layers):
            p, q = f"transformer.layers.{i}.", f"temporal.{i}."
            conv.norm(q + "norm1", get(p + "norm1.alpha", None))
            conv.norm(q + "norm2", get(p + "norm2.alpha", None))
            conv.matrix(q + "in_proj", get(p + "self_attn.in_proj_weight", None), "linear")
            conv.matrix(q + "out_proj", get(p + "self_attn.out_proj.weight", None), "linear")
            conv.matrix(q + "linear_in", get(p + "gating.linear_in.weight", None), "linear")
            conv.matrix(q + "linear_out", get(p + "gating.linear_out.weight", None), "linear")
        conv.norm("out_norm", get("out_norm.alpha", None))
        def stack(keys: list[str]):
            parts = [get(k, None) for k in keys]
            if isinstance(parts[0], mx.array):
                return mx.stack(parts)
            return np.stack(parts)

        conv.matrix("text_emb", get("text_emb.weight", None), "embedding")
        # The audio tables stacked [n_q, card + 1, d]: a step looks its 16 rows up in one gather.
        conv.matrix("emb", stack([f"emb.{k}.weight" for k in range(cfg.n_q)]), "embedding")
        conv.matrix("text_linear", get("text_linear.weight", None), "head")

        for l in range(cfg.depformer_num_layers):
            p, q = f"depformer.layers.{l}.", f"depformer.{l}."
            conv.norm(q + "norm1", get(p + "norm1.alpha", None))
            conv.norm(q + "norm2", get(p + "norm2.alpha", None))
            w = get(p + "self_attn.in_proj_weight", slice(0, steps * 3 * D))
            conv.matrix(q + "in_proj", w.reshape(steps, 3 * D, D), "linear")
            w = get(p + "self_attn.out_proj.weight", slice(0, steps * D))
            conv.matrix(q + "out_proj", w.reshape(steps, D, D), "linear")
            del w
            conv.matrix(q + "linear_in", stack([p + f"gating.{k}.linear_in.weight" for k in range(steps)]), "linear")
            conv.matrix(q + "linear_out", stack([p + f"gating.{k}.linear_out.weight" for k in range(steps)]), "linear")
        conv.matrix("depformer_in", stack([f"depformer_in.{k}.weight" for k in range(steps)]), "linear")
        conv.matrix("depformer_text_emb", get("depformer_text_emb.weight", None), "embedding")
        for k in range(steps - 1):
            conv.matrix(f"depformer_emb.{k}", get(f"depformer_emb.{k}.weight", None), "embedding")
        conv.matrix("linears", stack([f"linears.{k}.weight" for k in range(steps)]), "head")
        return conv.flat

    @classmethod
    def from_weights(cls, weights: Mapping[str, Any], cfg: LMConfig, dtype: str = "float32",
                     quantize: int | None = None, group_size: int = 64,
                     depformer_steps: int | None = None, quantize_embeddings: bool = True,
                     quantize_heads: bool = True) -> "LMModel":
        """Builds a model from in-memory tensors in the fused naming (validated like a file)."""
        steps = cls._check_args(cfg, dtype, quantize, group_size, depformer_steps)
        expected = expected_lm_tensors(cfg)
        names = {k for k in weights if not k.endswith("_initialized")}
        for key in sorted(names - set(expected)):
            raise CheckpointError(f"the weights have an unexpected tensor '{key}' that the configuration does not use.")
        for key, shape in expected.items():
            if key not in weights:
                raise CheckpointError(f"the weights are missing tensor '{key}' that the configuration needs.")
            if tuple(weights[key].shape) != tuple(shape):
                raise CheckpointError(f"tensor '{key}' has shape {list(weights[key].shape)} but the "
                                      f"configuration expects {list(shape)}.")

        def get(key, rows):
            w = weights[key]
            return w if rows is None else w[rows]

        conv = _Converter(_DTYPES[dtype], quantize, group_size, quantize_embeddings, quantize_heads)
        flat = cls._convert(cfg, get, conv, steps)
        return cls(cfg, flat, _DTYPES[dtype], steps, quantize, group_size)

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: LMConfig, dtype: str = "float32",
             quantize: int | None = None, group_size: int = 64,
             depformer_steps: int | None = None, *, cache: bool | str = "auto",
             cache_dir: str | os.PathLike | None = None, quantize_embeddings: bool = True,
             quantize_heads: bool = True) -> "LMModel":
        path = Path(path)
        steps = cls._check_args(cfg, dtype, quantize, group_size, depformer_steps)
        plan, start = plan_lm_checkpoint(path, cfg)
        use_cache = (quantize is not None) if cache == "auto" else bool(cache)
        cache_path = None
        if use_cache:
            slot, key = cls._cache_key(path, cfg, dtype, quantize, group_size, steps,
                                       quantize_embeddings, quantize_heads)
            cache_path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            cache_path = cache_path / f"lm-{slot[:24]}.safetensors"
            model = cls._load_cache(cache_path, key, cfg, dtype, quantize, group_size, steps)
            if model is not None:
                model.source = str(path)
                return model
        conv = _Converter(_DTYPES[dtype], quantize, group_size, quantize_embeddings, quantize_heads)
        with TensorReader(path, start) as reader:
            def get(fused_key, rows):
                parts = plan[fused_key]
                if len(parts) == 1:
                    return reader.read(parts[0], rows)
                # Per-step naming: read whole steps until `rows` are covered.
                out, need = [], (rows.stop if rows is not None else None)
                got = 0
                for p in parts:
                    if need is not None and got >= need:
                        break
                    out.append(reader.read(p))
                    got += p.shape[0]
                arr = np.concatenate(out)
                return arr if rows is None else arr[rows]
            flat = cls._convert(cfg, get, conv, steps)
        model = cls(cfg, flat, _DTYPES[dtype], steps, quantize, group_size)
        model.source = str(path)
        if cache_path is not None:
            model._save_cache(cache_path, key, source=str(path.resolve()),
                              settings=cls._cache_settings(dtype, quantize, group_size, steps))
        return model

    # -------------------------------------------------------------------------------------------
    # Converted-weights cache
    # -------------------------------------------------------------------------------------------

    @staticmethod
    def _cache_key(path: Path, cfg: LMConfig, dtype, bits, group, steps, qe, qh) -> tuple[str, str]:
        """(slot, key): the cache file name depends on the source path and the conversion
        settings, so a changed source replaces its old entry; the key stored inside also covers the
        source's size, mtime and header hash, so a stale entry is never used."""
        st = path.stat()
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(min(n, 100 << 20))
        settings = {
            "format": CACHE_FORMAT, "dtype": dtype, "bits": bits,
            "group_size": group if bits else None, "depformer_steps": steps,
            "quantize_embeddings": qe, "quantize_heads": qh,
            "cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        }
        slot = {"source": str(path.resolve()), **settings}
        ident = {**settings, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "header_sha256": hashlib.sha256(header).hexdigest()}
        h = lambda o: hashlib.sha256(json.dumps(o, sort_keys=True).encode()).hexdigest()  # noqa: E731
        return h(slot), h(ident)

    @staticmethod
    def _cache_settings(dtype, bits, group, steps) -> str:
        """The conversion settings an entry shares with the entries it supersedes: everything but
        the embedding/head quantization, whose default changed (session 9)."""
        return json.dumps({"dtype": dtype, "bits": bits, "group_size": group if bits else None,
                           "depformer_steps": steps}, sort_keys=True)

    @classmethod
    def _load_cache(cls, cache_path: Path, key: str, cfg, dtype, bits, group, steps):
        if not cache_path.is_file():
            return None
        try:
            flat, meta = mx.load(str(cache_path), return_metadata=True)
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                return None
            for name in list(flat):
                mx.eval(flat[name])
            model = cls(cfg, flat, _DTYPES[dtype], steps, bits, group)
        except Exception as exc:  # a damaged cache is rebuilt, never fatal
            warnings.warn(f"ignoring the damaged converted-weights cache {cache_path}: {exc}")
            return None
        model.cache_path = cache_path
        model.loaded_from_cache = True
        return model

    def _save_cache(self, cache_path: Path, key: str, source: str = "", settings: str = "") -> None:
        tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.partial.safetensors")
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            mx.save_safetensors(str(tmp), self._flat, metadata={
                "format": CACHE_FORMAT, "key": key, "source": source, "settings": settings})
            os.replace(tmp, cache_path)
            self.cache_path = cache_path
        except OSError as exc:
            warnings.warn(f"could not write the converted-weights cache {cache_path}: {exc}")
            try:
                tmp.unlink()
            except OSError:
                pass
            return
        removed = prune_converted_cache(cache_path, source, settings)
        if removed:
            self.cache_pruned = removed

    # -------------------------------------------------------------------------------------------
    # Compute
    # -------------------------------------------------------------------------------------------

    def arrays(self) -> dict[str, mx.array]:
        return dict(self._flat)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._flat.values())

    def new_kv(self, rule: str | None = None, bits: int | None = None) -> KVRing:
        """A KV ring for this model (`bits`=8: stored in 8 bits, kv_ring.py)."""
        cfg = self.cfg
        return KVRing(cfg.num_layers, cfg.num_heads, cfg.dim // cfg.num_heads, cfg.context,
                      self.dtype, rule or self.reference, bits)

    def embed(self, tokens: mx.array) -> mx.array:
        """tokens [T, 17] int (−1 = zero token) -> the summed input embeddings [1, T, d], in the
        reference's order (audio channels 1..16, then text)."""
        x = None
        for k in range(self.cfg.n_q):
            e = self.emb[k](tokens[:, k + 1])
            x = e if x is None else x + e
        x = x + self.text_emb(tokens[:, 0])
        return x[None]

    def embed_step(self, row, compiled: bool = True) -> mx.array:
        """One position's embedding [1, 1, d] from 17 host ints (−1 = zero token): one gather
        over the stacked audio tables, one over the text table, summed in the reference's order
        (a −1 channel adds an exact zero, so it is skipped)."""
        row = np.asarray(row)
        for k, t in enumerate(row):
            if t < -1:
                raise ValueError(f"token {int(t)} on channel {k} cannot be embedded")
        rows_per_table = self.audio_emb.weight.shape[1]
        audio = [k * rows_per_table + int(t) for k, t in enumerate(row[1:]) if t >= 0]
        text = [int(row[0])] if row[0] >= 0 else []
        fn = self._embed_ids
        if compiled:
            if self._embed_c is None:
                self._embed_c = mx.compile(self._embed_ids)
            fn = self._embed_c
        return fn(mx.array(np.array(audio, dtype=np.int32)),
                  mx.array(np.array(text, dtype=np.int32))).astype(self.dtype)

    def embed_row(self, row: mx.array, compiled: bool = True) -> mx.array:
        """`embed_step` for a row held on the device: int32 [17], every channel a token (no −1),
        the same gathers summed in the same order -> [1, 1, d]."""
        rows_per_table = self.audio_emb.weight.shape[1]
        audio = mx.arange(self.cfg.n_q, dtype=mx.int32) * rows_per_table + row[1:]
        fn = self._embed_ids
        if compiled:
            if self._embed_c is None:
                self._embed_c = mx.compile(self._embed_ids)
            fn = self._embed_c
        return fn(audio, row[:1]).astype(self.dtype)

    def _embed_ids(self, audio_ids: mx.array, text_ids: mx.array) -> mx.array:
        """Rows `audio_ids` of the flattened audio tables plus rows `text_ids` of the text table,
        summed in order -> [1, 1, d]."""
        parts = []
        if audio_ids.shape[0]:
            parts.append(self.audio_emb.flat_rows(audio_ids))
        if text_ids.shape[0]:
            parts.append(self.text_emb.rows(text_ids))
        x = None
        for p in parts:
            for i in range(p.shape[0]):
                x = p[i: i + 1] if x is None else x + p[i: i + 1]
        if x is None:
            x = mx.zeros((1, self.cfg.dim), dtype=self.dtype)
        return x[None]

    def hidden(self, x: mx.array, kv: KVRing, visibility: str = "step",
               compiled: bool = False) -> mx.array:
        """The temporal transformer + out_norm: [1, T, d] -> [1, T, d]. `compiled` uses the
        compiled per-layer functions for a one-position step."""
        x = x.astype(self.dtype)
        if compiled and x.shape[1] == 1 and visibility == "step":
            return self.temporal.step_compiled(x, kv)
        return self.temporal(x, kv, visibility)

    def text_logits(self, hn: mx.array) -> mx.array:
        return self.text_linear(hn)

    def teacher_forced_logits(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Kyutai's `LMModel.forward` (REFERENCE.md §5): codes [17, T] (−1 = zero token) ->
        (text logits [T, text_card], audio logits [K, T, card]) as float32 numpy with NaN where a
        delay makes the position invalid. One causal pass with the exact `context` window."""
        cfg = self.cfg
        codes = np.asarray(codes, dtype=np.int64)
        Kc, T = codes.shape
        delays = np.array(cfg.delays)
        initial = np.array([cfg.text_card] + [cfg.card] * cfg.n_q)
        seq = np.empty((Kc, T + 1), dtype=np.int64)
        for k in range(Kc):
            d = delays[k]
            seq[k, 0] = initial[k]
            for p in range(1, T + 1):
                seq[k, p] = codes[k, p - 1 - d] if p - 1 - d >= 0 else initial[k]
        kv = self.new_kv()
        hn = self.hidden(self.embed(mx.array(seq[:, :T].T.astype(np.int32))), kv, "exact")
        tl = self.text_logits(hn)[0]
        K = self.depformer_steps
        prev = mx.array(seq[:K, 1:].T.astype(np.int32))[None]  # [1, T, K]
        al = self.depformer.teacher_forced(hn, prev, K)[0]  # [T, K, card]
        mx.eval(tl, al)
        tl = np.array(tl.astype(mx.float32))
        al = np.array(al.astype(mx.float32)).transpose(1, 0, 2)
        text = np.full_like(tl, np.nan)
        d0 = delays[0]
        text[: T - d0] = tl[d0:]
        audio = np.full_like(al, np.nan)
        for j in range(K):
            d = delays[j + 1]
            audio[j, : T - d] = al[j, d:]
        return text, audio


def cache_entry_metadata(path: Path) -> dict | None:
    """A converted-weights file's metadata from its safetensors header (a few KB read), or None
    if it is not one (not safetensors, or damaged)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 << 20:
                return None
            meta = json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def prune_converted_cache(kept: Path, source: str, settings: str) -> list[Path]:
    """Removes the converted-weights entries `kept` makes useless: entries of an older cache
    format (never read again), and entries of the same source and conversion settings that
    differ only in how the tables and heads are stored (a default that changed). Entries for
    other models or settings (say the 8-bit conversion beside a 4-bit one) stay. Returns the
    files removed; files it cannot read as entries are left alone."""
    removed = []
    for path in sorted(kept.parent.glob("lm-*.safetensors")):
        if path == kept or ".partial." in path.name:
            continue
        meta = cache_entry_metadata(path)
        if meta is None or not str(meta.get("format", "")).startswith(_CACHE_PREFIX):
            continue
        obsolete = meta["format"] != CACHE_FORMAT
        superseded = bool(source) and meta.get("source") == source and \
            meta.get("settings") == settings
        if obsolete or superseded:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def converted_cache_usage(cache_dir: Path | None = None) -> tuple[Path, int, int]:
    """(folder, entries, bytes) of the converted-weights cache."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    files = [p for p in folder.glob("lm-*.safetensors")] if folder.is_dir() else []
    return folder, len(files), sum(p.stat().st_size for p in files)
