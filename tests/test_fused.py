"""engine/lm/fused.py: when the fused CUDA kernels are chosen, and what they are built from.

The kernels themselves need MLX's CUDA backend: on such a machine the tests marked `cuda` here
run, and so do the reference-parity tests (tests/test_offline.py, tests/test_lm_personaplex.py),
whose live depth steps then go through the kernels (`bash scripts/bench_gpu.sh fused` with
PYTEST set; results in docs/benchmarks.md). `scripts/check_fused_kernels.py` compares each kernel
with the unfused MLX operations there, and compiles every variant with NVRTC anywhere.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.lm import fused
from engine.lm.layers import Linear

cuda = pytest.mark.skipif(not fused.enabled(), reason="needs MLX's CUDA backend")


def _lin(n, k, bits=4, group=64, dtype=mx.bfloat16):
    w = mx.zeros((n, k), dtype=dtype)
    if not bits:
        return Linear(w)
    q, s, b = mx.quantize(w, group_size=group, bits=bits)
    return Linear(q, s, b, bits, group)


def test_layouts_the_kernels_take():
    assert fused.supports(_lin(3072, 1024), mx.bfloat16)
    assert fused.supports(_lin(1024, 2816, bits=8), mx.bfloat16)
    assert fused.supports(_lin(96, 32, bits=0, dtype=mx.float32), mx.float32)  # tiny, float32
    assert fused.supports(_lin(4096, 11264, group=32), mx.bfloat16)
    assert not fused.supports(_lin(1024, 1024), mx.float32)  # scales of another dtype
    assert not fused.supports(_lin(1024, 1024, bits=0, dtype=mx.float16), mx.float16)
    assert not fused.supports(_lin(1023, 1024, bits=0), mx.bfloat16)  # odd rows
    assert not fused.supports(_lin(64, 16384), mx.bfloat16)  # x would not fit shared memory


def test_the_cpu_never_takes_the_fused_path(tiny_dir, monkeypatch):
    from engine.duplex import DuplexEngine
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("a CPU-only check")
    assert not fused.enabled()
    engine = DuplexEngine.load(str(tiny_dir), seed=0)
    assert engine.gen.fused is False
    with pytest.raises(ValueError, match="CUDA"):
        engine.gen.fused = True


def test_parley_fused_0_turns_them_off(monkeypatch):
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert fused.enabled()
    monkeypatch.setenv("PARLEY_FUSED", "0")
    assert not fused.enabled()


def _fake_cuda_kernels(monkeypatch, made: dict) -> None:
    """Replaces mx.fast.cuda_kernel with a stand-in that checks each call against the kernel's
    declaration and returns zeros of the declared output shapes (the kernels need a GPU)."""

    def fake_cuda_kernel(**kw):
        def call(*, inputs, template, output_shapes, output_dtypes, grid, threadgroup):
            assert len(inputs) == len(kw["input_names"]), kw["name"]
            assert len(output_shapes) == len(kw["output_names"]) == len(output_dtypes)
            names = dict(template)
            needed = (("T", "HD", "S", "C", "CL", "LPR", "NT") if "_ring_attn_" in kw["name"]
                      else ("T", "V", "TOPK", "NT", "J") if "_sample_topk_" in kw["name"]
                      else ("T", "BITS", "K", "N", "GROUP", "RW"))
            for name in needed:
                assert name in names
            made[kw["name"]] = (kw, names)
            assert grid[0] % threadgroup[0] == 0
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
        return call

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    fused._kernel.cache_clear()


def test_each_kernel_declares_what_its_wrapper_passes(monkeypatch):
    """The argument lists of the Python wrappers and the kernels' declared inputs agree (a
    mismatch would only show on a GPU)."""
    made = {}
    _fake_cuda_kernels(monkeypatch, made)
    try:
        x = mx.zeros((1, 1, 1024), dtype=mx.bfloat16)
        alpha = mx.ones((1024,), dtype=mx.float32)
        lin = _lin(1024, 1024)
        assert fused.gemv(x, lin).shape == (1, 1, 1024)
        assert fused.gemv(x, lin, alpha=alpha, res=x).shape == (1, 1, 1024)
        assert fused.gemv_gated(x, alpha, _lin(5632, 1024)).shape == (1, 1, 2816)
        q, k, v = fused.qkv(x, alpha, _lin(3072, 1024), 16, mx.array([3], dtype=mx.int32))
        assert q.shape == k.shape == v.shape == (1, 16, 1, 64)
        out = fused.attn_gemv(q, [k, k], [v, v], lin, x, 16, 0.125)
        assert out.shape == x.shape
    finally:
        fused._kernel.cache_clear()
    # MLX caches builds on disk by name: each name carries its source's digest.
    import hashlib
    for name, (kw, _) in made.items():
        assert hashlib.sha1((kw["header"] + kw["source"]).encode()).hexdigest()[:12] in name
    assert len(made) == 5  # gemv, gemv with norm and residual, gated, qkv, attn
    kinds = {name.split("_")[1] for name in made}
    assert kinds == {"gemv", "gated", "qkv", "attn"}
    qkv_kw, qkv_t = next(v for n, v in made.items() if "_qkv_" in n)
    assert qkv_t["HD"] == 64 and qkv_t["ROPE"] is True
    assert qkv_kw["output_names"] == ["q", "k", "v"]
    attn_kw, attn_t = next(v for n, v in made.items() if "_attn_" in n)
    assert attn_t["NKV"] == 2 and attn_t["H"] == 16
    assert attn_kw["input_names"][:5] == ["q", "k0", "k1", "v0", "v1"]


@cuda
def test_on_cuda_the_live_depth_step_is_fused_and_matches_the_unfused_one(tiny_dir):
    """float32 tiny model: a frame's tokens with the fused depth step equal the unfused ones
    (greedy), and its logits agree to float32 rounding."""
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal((12, 1920))).astype(np.float32)
    runs = []
    for flag in (True, False):
        engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0, dtype="float32")
        assert engine.gen.fused is True
        engine.gen.fused = flag
        engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
        runs.append([engine.step(p).tokens.copy() for p in pcm])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_the_fused_temporal_step_is_the_cuda_default(tiny_dir, monkeypatch):
    """On where the kernels run (PARLEY_FUSED_TEMPORAL=0 turns it off), never on the CPU."""
    from engine.duplex import DuplexEngine
    monkeypatch.delenv("PARLEY_FUSED_TEMPORAL", raising=False)
    engine = DuplexEngine.load(str(tiny_dir), seed=0)
    assert engine.gen.model.temporal.use_fused is fused.enabled()
    monkeypatch.setenv("PARLEY_FUSED_TEMPORAL", "0")
    engine = DuplexEngine.load(str(tiny_dir), seed=0)
    assert engine.gen.model.temporal.use_fused is False


def _greedy_tokens(tiny_dir, monkeypatch, env: dict, pcm, wrap_after: int | None = None):
    """The tiny float32 model's greedy tokens for `pcm` frames under environment `env`; with
    `wrap_after`, the ring's position is moved to just before a wrap after that many frames."""
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0, dtype="float32")
    engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
    tokens = []
    for i, p in enumerate(pcm):
        if i == wrap_after:
            kv = engine.gen.kv
            kv.end = 2 * kv.slots - 3  # full ring, the write slot wrapping to 0 three frames on
        tokens.append(engine.step(p).tokens.copy())
    return engine, tokens


@cuda
def test_on_cuda_the_fused_temporal_step_matches_the_unfused_one(tiny_dir, monkeypatch):
    """float32 tiny model, greedy: the same frames with the fused temporal step as without."""
    pcm = (0.1 * np.random.default_rng(1).standard_normal((12, 1920))).astype(np.float32)
    fused_engine, fused_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_FUSED_TEMPORAL": "1"}, pcm)
    plain_engine, plain_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_FUSED_TEMPORAL": "0"}, pcm)
    assert fused_engine.gen.model.temporal.use_fused and not plain_engine.gen.model.temporal.use_fused
    for a, b in zip(fused_tokens, plain_tokens):
        np.testing.assert_array_equal(a, b)


def test_the_fused_steps_fit_the_engine(tiny_dir, monkeypatch):
    """The fused temporal and depth steps, wired into a real (tiny) model, pass every kernel
    what it declares and give arrays of the unfused steps' shapes (kernels stood in for)."""
    from engine.duplex import DuplexEngine
    made = {}
    _fake_cuda_kernels(monkeypatch, made)
    try:
        gen = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32").gen
        model = gen.model
        model.temporal.use_fused = True
        model.temporal.ring_attention = False  # MLX's attention here (the ring kernel: below)
        x = mx.zeros((1, 1, model.cfg.dim), dtype=model.dtype)
        hn = model.hidden(x, gen.kv, compiled=True)
        assert hn.shape == x.shape
        dep = model.depformer
        cache = dep.new_cache()
        for k in range(model.depformer_steps):
            logits = dep.step(k, hn, mx.zeros((1, 1), mx.int32), cache, "nvidia", True)
            assert logits.shape == (1, 1, model.cfg.card)
        mx.eval(hn, logits)
    finally:
        fused._kernel.cache_clear()
    kinds = {name.split("_")[1] for name in made}
    assert kinds == {"gemv", "gated", "qkv", "attn"}
    rope = [t for n, (kw, t) in made.items() if "_qkv_" in n]
    assert {t["ROPE"] for t in rope} == {True, False}  # temporal with RoPE, depth without


def test_direct_products_split_rows_for_enough_blocks(monkeypatch):
    """Rows per warp of the direct-read products: as many as leave MIN_BLOCKS blocks of WARPS
    warps (RoPE's pairs need an even count), fewer when the matrix is small."""
    monkeypatch.setattr(fused, "MIN_BLOCKS", 256)
    assert fused._direct_rows(12288, even=True) == 4  # 384 blocks: QKV of the 7B
    assert fused._direct_rows(4096) == 2  # 256 blocks: out projection, down projection
    assert fused._direct_rows(11264) == 4  # 352 blocks (the gated kernel takes 2 + 2 rows)
    assert fused._direct_rows(1024) == 1  # the depth transformer: as many blocks as it gets
    assert fused._direct_rows(3072, even=True) == 2
    assert fused._direct_rows(6) == 1 and fused._direct_rows(6, even=True) == 2
    monkeypatch.setattr(fused, "MIN_BLOCKS", 512)
    assert fused._direct_rows(12288, even=True) == 2


def test_each_product_kernel_reads_x_directly_with_its_norm_flag(monkeypatch):
    """gemv, gated and qkv are the direct-read kernels (no block staging), told by NORM whether
    to normalise x and by WL how many weight loads to keep in flight."""
    made = {}
    _fake_cuda_kernels(monkeypatch, made)
    try:
        x = mx.zeros((1, 1, 1024), dtype=mx.bfloat16)
        alpha = mx.ones((1024,), dtype=mx.float32)
        fused.gemv(x, _lin(1024, 1024))
        fused.gemv(x, _lin(1024, 1024), alpha=alpha, res=x)
        fused.gemv_gated(x, alpha, _lin(5632, 1024))
        fused.qkv(x, alpha, _lin(3072, 1024), 16, mx.array([3], dtype=mx.int32))
    finally:
        fused._kernel.cache_clear()
    assert len(made) == 4
    norms = []
    for name, (kw, t) in made.items():
        assert "gemv_direct<" in kw["source"] and "stage_x" not in kw["source"]
        assert t["WL"] == fused.WEIGHT_LOADS and t["SPLIT"] == fused.SPLIT_X
        norms.append(t.get("NORM"))
    assert sorted(map(str, norms)) == ["False", "None", "True", "True"]  # gated: NORM built in


def test_ring_attention_lays_rows_over_lanes():
    """Values a lane holds and lanes a key row: 8-byte bf16 loads over a warp for the 7B's heads
    of 128, 16-byte float32 loads for small heads; head sizes that do not split are refused."""
    assert fused.ring_layout(128) == (4, 32)
    assert fused.ring_layout(16) == (4, 4)
    assert fused.ring_layout(256) == (8, 32)
    assert fused.ring_layout(96) is None


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_the_fused_ring_attention_fits_the_temporal_step(tiny_dir, monkeypatch, kv_bits):
    """PARLEY_RING_ATTENTION=1 on the fused temporal step: the whole step is one compiled call
    whose layers each take one ring_attn kernel given that layer's ring (written in place, so the
    ring keeps its arrays: no slice updates; an 8-bit ring's bytes and row scales alike) and the
    step's [slot, n]; the warm-up builds the kernel on a throwaway ring (kernels stood in for)."""
    from engine.duplex import DuplexEngine
    made, calls = {}, []
    _fake_cuda_kernels(monkeypatch, made)
    real = fused.ring_attention

    def spy(q, k, v, keys, values, meta, counters, scale, key_params, value_params):
        calls.append((keys.shape, values.shape, keys.dtype, key_params.shape,
                      value_params.shape, meta.shape, counters.shape))
        return real(q, k, v, keys, values, meta, counters, scale, key_params, value_params)

    monkeypatch.setattr(fused, "ring_attention", spy)
    monkeypatch.setattr(fused, "enabled", lambda: True)
    monkeypatch.setenv("PARLEY_RING_ATTENTION", "1")
    monkeypatch.setenv("PARLEY_TEMPORAL_KERNEL", "0")  # the ring path itself, not its successor
    try:
        gen = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", kv_bits=kv_bits).gen
        model = gen.model
        assert model.temporal.use_fused and model.temporal.ring_attention
        model.temporal.warm_up(mx.zeros((1, 1, model.cfg.dim)), gen.kv)
        traced = list(calls)  # a throwaway ring's kernel, then the whole step traced
        calls.clear()
        kv = gen.kv
        kv.end = kv.slots + 5  # a wrapped ring
        rings = kv.arrays()
        for _ in range(2):  # traced by the warm-up, so replayed: no Python call of the kernels
            hn = model.hidden(mx.zeros((1, 1, model.cfg.dim)), kv, compiled=True)
            mx.eval(hn)
    finally:
        fused._kernel.cache_clear()
    ring = (1, model.cfg.num_heads, kv.slots, model.cfg.dim // model.cfg.num_heads)
    dtype, params = (mx.uint8, ring[:3] + (2,)) if kv_bits else (mx.float32, (1,))
    assert traced[1:] == [(ring, ring, dtype, params, params, (2,), (model.cfg.num_heads,))] * \
        model.cfg.num_layers
    assert calls == []
    assert len(rings) == (4 if kv_bits else 2) * model.cfg.num_layers
    assert all(a is b for a, b in zip(kv.arrays(), rings))  # no slice updates
    assert kv.end == kv.slots + 7 and hn.shape == (1, 1, model.cfg.dim)
    assert any("_ring_attn_" in name for name in made)


def test_the_step_meta_gives_the_slot_and_how_many_slots_to_attend():
    from engine.lm.kv_ring import KVRing
    kv = KVRing(2, 2, 4, context=8)  # "nvidia": 7 slots
    for end, want in ((0, [0, 1]), (5, [5, 6]), (6, [6, 7]), (7, [0, 7]), (23, [2, 7])):
        kv.end = end
        assert np.array(kv.step_meta()).tolist() == want


@cuda
def test_on_cuda_the_ring_attention_kernel_keeps_the_frames_the_same(tiny_dir, monkeypatch):
    """float32 tiny model, greedy: frames with the ring attention kernel (which writes the ring
    in place) equal the frames without: six while the ring fills, then, the ring's position
    moved on to just before a wrap, six across it."""
    pcm = (0.1 * np.random.default_rng(2).standard_normal((12, 1920))).astype(np.float32)
    ring_engine, ring_tokens = _greedy_tokens(
        tiny_dir, monkeypatch, {"PARLEY_RING_ATTENTION": "1", "PARLEY_TEMPORAL_KERNEL": "0"},
        pcm, wrap_after=6)
    sdpa_engine, sdpa_tokens = _greedy_tokens(tiny_dir, monkeypatch, {"PARLEY_RING_ATTENTION": "0"},
                                              pcm, wrap_after=6)
    assert ring_engine.gen.model.temporal.ring_attention
    assert not sdpa_engine.gen.model.temporal.ring_attention
    for a, b in zip(ring_tokens, sdpa_tokens):
        np.testing.assert_array_equal(a, b)
