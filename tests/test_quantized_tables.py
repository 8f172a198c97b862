"""Quantized embedding tables and output heads: the loader's default whenever the LM is quantized,
and the depth step kernel reading quantized tables (engine/lm/depth_kernel.py, `table_value`).

Here (any machine) the kernel's indexing is checked through a numpy transcription of it against
`mx.dequantize`, and its wiring with a stand-in for `mx.fast.cuda_kernel`; on a CUDA machine the
tests marked `cuda` compare what the kernel reads, and its frames, with the MLX operations'.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from engine.config import load_model_config
from engine.lm import LMGen, LMModel, depth_kernel
from engine.lm.layers import Embedding
from engine.lm.random_weights import random_lm_weights
from tests.test_depth_kernel import _stand_in, cuda


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return load_model_config(tiny_dir)


def _quantizable(cfg):
    """The tiny LM with a depth feed-forward of 64 (not 88), so that every depth linear takes
    groups of 32 and a quantized depformer fits the step kernel."""
    return dataclasses.replace(cfg.lm, depformer_dim_feedforward=96)


def _model(cfg, bits=4, group=32, dtype="float32", **kw) -> LMModel:
    lm = _quantizable(cfg)
    return LMModel.from_weights(random_lm_weights(lm, seed=5), lm, dtype=dtype, quantize=bits,
                                group_size=group, **kw)


def _tables(model: LMModel) -> list[Embedding]:
    dep = model.depformer
    return [model.text_emb, model.audio_emb, *model.emb, dep.text_emb, *dep.emb]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_quantized_loading_quantizes_tables_and_heads_too(tiny_dir, cfg):
    path = tiny_dir / "model.safetensors"
    q = LMModel.load(path, cfg.lm, quantize=4, group_size=32, cache=False)
    assert all(t.scales is not None and t.bits == 4 and t.group_size == 32 for t in _tables(q))
    assert q.text_linear.quantized and q.depformer.heads.quantized
    plain = LMModel.load(path, cfg.lm)  # no `quantize`: the flags change nothing
    assert all(t.scales is None for t in _tables(plain))
    assert not plain.text_linear.quantized and not plain.depformer.heads.quantized
    off = LMModel.load(path, cfg.lm, quantize=4, group_size=32, cache=False,
                       quantize_embeddings=False, quantize_heads=False)
    assert all(t.scales is None for t in _tables(off))
    assert not off.text_linear.quantized and not off.depformer.heads.quantized
    assert q.nbytes() < off.nbytes()
    # Groups of 64: the depformer's 32-wide tables and heads cannot take them and stay plain.
    q64 = LMModel.load(path, cfg.lm, quantize=4, group_size=64, cache=False)
    assert q64.text_emb.scales is not None and q64.text_linear.quantized
    assert q64.depformer.text_emb.scales is None and not q64.depformer.heads.quantized


def test_the_engine_and_the_bench_pass_quantize_tables_on(tiny_dir, monkeypatch, tmp_path):
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    monkeypatch.setenv("PARLEY_CACHE_DIR", str(tmp_path))  # quantized loads are cached
    engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0, quantize=4, group_size=32)
    lm = engine.gen.model
    assert lm.text_emb.scales is not None and lm.text_linear.quantized
    # Quantized frames still run (here: the CPU's MLX operations).
    engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
    rng = np.random.default_rng(1)
    for _ in range(3):
        tokens = engine.step((0.1 * rng.standard_normal(1920)).astype(np.float32)).tokens
        assert tokens.shape == (17,)
    plain = DuplexEngine.load(str(tiny_dir), seed=0, quantize=4, group_size=32,
                              quantize_tables=False).gen.model
    assert plain.text_emb.scales is None and not plain.text_linear.quantized
    import inspect

    from engine.bench import random_full_size_engine
    assert inspect.signature(random_full_size_engine).parameters["quantize_tables"].default is True


def test_a_quantized_model_with_quantized_tables_runs_close_to_the_plain_one(cfg):
    ref = _model(cfg, bits=None)
    for bits, tol in ((8, 0.02), (4, 0.3)):  # as test_lm_loading.py allows the linears alone
        q = _model(cfg, bits=bits)
        gen_ref, gen_q = LMGen(ref, cfg.lmgen, greedy=True), LMGen(q, cfg.lmgen, greedy=True)
        pad = cfg.lm.existing_text_padding_id
        frames = np.array([[pad] + list(cfg.lmgen.silence_tokens) + list(cfg.lmgen.sine_tokens)] * 6)
        gen_ref.prefill(None, frames)
        gen_q.prefill(None, frames)
        a, b = gen_ref.last_text_logits, gen_q.last_text_logits
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert rel < tol, (bits, rel)
        out = gen_q.step(user_codes=np.arange(8) % cfg.lm.card)
        assert np.asarray(out).shape == (17,)


# ----------------------------------------------------------------------------------------------
# The depth step kernel's table reads
# ----------------------------------------------------------------------------------------------


def _round_bf16(x) -> np.ndarray:
    """x rounded once to the nearest bfloat16 (8 significant bits, ties to even), as float64."""
    m, e = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.rint(m * 256.0) / 256.0, e)


def _lane_read(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               group: int, d: int, tk, col):
    """numpy transcription of `table_value`'s quantized branch (the same index arithmetic):
    the scale, packed integer and bias of value `col` of row `tk` (broadcasting arrays)."""
    w = weight.reshape(-1).astype(np.uint64)
    words = tk * (d * bits // 32)  # the row's first word
    bit = col * bits
    shift = (bit % 32).astype(np.uint64)
    u = w[words + bit // 32] >> shift
    straddles = bit % 32 + bits > 32  # 3, 5 and 6 bits: the value's high bits in the next word
    nxt = w[np.where(straddles, words + bit // 32 + 1, words + bit // 32)] << (np.uint64(32) - shift)
    u = np.where(straddles, u | nxt, u) & np.uint64(0xFFFFFFFF)
    g = tk * (d // group) + col // group
    return scales.reshape(-1)[g], u & np.uint64((1 << bits) - 1), biases.reshape(-1)[g]


def _as_mlx_rounds(s, q, b, dtype) -> np.ndarray:
    """scale * q + bias rounded as mx.dequantize rounds it on the default device: MLX's CUDA
    backend as one fused multiply-add rounded once to the dtype (what the kernel does), its CPU
    backend with the product rounded first."""
    s, q, b = (np.asarray(a, np.float64) for a in (s, q, b))
    once = mx.default_device().type == mx.DeviceType.gpu
    if dtype == mx.bfloat16:
        return _round_bf16(s * q + b) if once else _round_bf16(_round_bf16(s * q) + b)
    if once:
        return (s * q + b).astype(np.float32)  # s * q is exact in float64: one rounding
    return (s * q).astype(np.float32) + b.astype(np.float32)


def test_the_transcription_follows_the_kernel_source():
    src = depth_kernel._HELPERS
    for piece in ("(size_t)tk * (D * EBITS / 32)", "const int bit = col * EBITS;",
                  "w[bit / 32] >> (bit % 32)", "u |= w[bit / 32 + 1] << (32 - bit % 32)",
                  "(size_t)tk * (D / EGROUP) + col / EGROUP", "u & ((1u << EBITS) - 1u)"):
        assert piece in src, piece


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 64), (4, 128),
                                        (2, 32), (3, 32), (5, 64), (6, 32)])
def test_the_lanes_read_what_mx_dequantize_gives(bits, group, dtype):
    """Every value of a random table, read with the kernel's indexing, equals mx.dequantize's."""
    if mx.default_device().type == mx.DeviceType.gpu and not mx.cuda.is_available():
        pytest.skip("MLX's rounding on Metal is not what the CUDA kernel mirrors")
    rows, d = 37, 256
    rng = np.random.default_rng(bits * 1000 + group)
    w = mx.array((3 * rng.standard_normal((rows, d)) + rng.standard_normal((rows, 1)))
                 .astype(np.float32)).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    want = np.array(mx.dequantize(wq, s, b, group_size=group, bits=bits).astype(mx.float32))
    tk, col = np.arange(rows)[:, None], np.arange(d)[None, :]
    sv, qv, bv = _lane_read(np.array(wq), np.array(s.astype(mx.float32)),
                            np.array(b.astype(mx.float32)), bits, group, d, tk, col)
    got = _as_mlx_rounds(sv, qv, bv, dtype).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_a_quantized_depformer_with_quantized_tables_fits_the_kernel(cfg):
    dep = _model(cfg).depformer
    assert all(t.scales is not None for t in [dep.text_emb, *dep.emb]) and dep.heads.quantized
    assert depth_kernel.supports(dep, mx.float32)
    # Tables need not share the linears' bits or group: an 8-bit and a 3-bit one.
    for bits in (8, 3):
        t = dep.emb[1]
        wq, s, b = mx.quantize(t(mx.arange(t.weight.shape[0])), group_size=32, bits=bits)
        dep.emb[1] = Embedding(wq, s, b, bits, 32)
        assert depth_kernel.supports(dep, mx.float32)
    # Layouts the kernel does not read.
    good = dep.emb[1]
    for bad in (Embedding(good.weight, good.scales.astype(mx.float16), good.biases, 3, 32),
                Embedding(good.weight, good.scales, good.biases, 7, 32),
                Embedding(mx.zeros((5, 32), dtype=mx.float16))):
        dep.emb[1] = bad
        assert not depth_kernel.supports(dep, mx.float32)
    dep.emb[1] = good


@pytest.mark.parametrize("quantized", [True, False])
def test_each_step_passes_its_tables_scales_and_biases(cfg, monkeypatch, quantized):
    model = _model(cfg, quantize_embeddings=quantized, quantize_heads=quantized)
    dep = model.depformer
    calls = []
    _stand_in(monkeypatch, calls)
    try:
        hn = mx.zeros((1, 1, model.cfg.dim), dtype=mx.float32)
        kvs = []
        for k in range(3):
            _, kv = dep.step_kernel(k, hn, mx.array(5, dtype=mx.int32), kvs)
            kvs.append(kv)
    finally:
        depth_kernel._kernel.cache_clear()
    assert len(calls) == 3
    for k, c in enumerate(calls):
        table = dep.text_emb if k == 0 else dep.emb[k - 1]
        ins, t = c["inputs"], c["t"]
        assert ins["emb"] is table.weight
        if quantized:
            assert ins["emb_s"] is table.scales and ins["emb_b"] is table.biases
            assert (t["EBITS"], t["EGROUP"]) == (4, 32) and (t["HBITS"], t["HGROUP"]) == (4, 32)
            assert ins["hw_s"] is dep.heads.step(k).scales
        else:  # dummies, unused with EBITS = 0
            assert ins["emb_s"].size == ins["emb_b"].size == 1 and t["EBITS"] == 0
            assert t["HBITS"] == 0
        assert t["BITS"] == 4
        assert "table_value<T, EBITS, EGROUP, D>(emb, emb_s, emb_b" in c["kw"]["source"]


@cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 64), (8, 128), (3, 32), (6, 64)])
def test_on_cuda_the_kernel_reads_the_rows_mx_dequantize_gives(bits, group, dtype):
    """A depformer whose linears are zeros and whose head is the identity: a step's logits are
    then the embedding row the kernel read, bit for bit."""
    from engine.lm.depformer import Depformer, DepformerLayer
    from engine.lm.layers import StackedLinear
    d, hid, steps = 128, 64, 3

    def zeros(n, k):
        return StackedLinear(mx.zeros((steps, n, k), dtype=dtype))

    def norm():
        return mx.ones((d,), dtype=mx.float32)

    rng = np.random.default_rng(bits)

    def table(rows):
        w = mx.array((2 * rng.standard_normal((rows, d))).astype(np.float32)).astype(dtype)
        return Embedding(*mx.quantize(w, group_size=group, bits=bits), bits, group)

    eye = StackedLinear(mx.broadcast_to(mx.eye(d, dtype=dtype), (steps, d, d)) + 0)
    layer = DepformerLayer(norm(), zeros(3 * d, d), zeros(d, d), norm(), zeros(2 * hid, d),
                           zeros(d, hid))
    dep = Depformer([layer], zeros(d, 64), table(41), [table(33) for _ in range(steps - 1)], eye,
                    num_heads=2, capacity=steps)
    assert depth_kernel.supports(dep, dtype)
    hn = mx.zeros((1, 1, 64), dtype=dtype)
    for k, tok in ((0, 40), (1, 7), (2, 32), (1, -1)):
        kvs = [mx.zeros((2 * d,), dtype=dtype)] * k
        got, _ = dep.step_kernel(k, hn, mx.array([tok], dtype=mx.int32), kvs)
        want = dep.token_embedding(k, mx.array([tok]))[0]
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)),
                                      np.array(want.astype(mx.float32)))
    assert not dep.step_kernel_failed()


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_cuda_quantized_tables_give_the_frames_of_the_mlx_operations(cfg, dtype):
    """4-bit tiny model, tables and heads quantized, greedy: a session's tokens with one kernel a
    depth step equal those of the per-layer kernels and of plain MLX operations."""
    model = _model(cfg, dtype=dtype)
    assert model.depformer.can_run_step_kernel(model.dtype)
    rng = np.random.default_rng(3)
    users = [rng.integers(0, cfg.lm.card, 8) for _ in range(10)]
    pad = cfg.lm.existing_text_padding_id
    frames = np.array([[pad] + list(cfg.lmgen.silence_tokens) + list(cfg.lmgen.sine_tokens)] * 6)
    runs = []
    for path in ("kernel", "fused", "mlx"):
        gen = LMGen(model, cfg.lmgen, greedy=True)
        assert gen.depth_path == "kernel"
        gen.depth_path = path
        gen.prefill(None, frames)
        runs.append([np.asarray(gen.step(user_codes=u)).copy() for u in users])
        assert not model.depformer.step_kernel_failed()
    for a, b, c in zip(*runs):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
